// qemu-img and qemu-io as the oracle: images QEMU made and wrote read through the driver
// as `qemu-img convert -O raw` reads them; images the driver wrote pass `qemu-img check`
// and `qemu-img compare` against the expected bytes; internal snapshots survive writes.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inflateRawSync } from 'node:zlib';
import { requirePeer } from '../../../scripts/guest/guest.js';
import { MemoryImageFile } from './memory-image-file.js';
import { openQcow2, type Qcow2Backend, type Qcow2Options } from './qcow2.js';
import { pattern } from '../../../test/support/pattern.js';

const skip = requirePeer('qemu-img', 'qemu-io');
let dir = '';
const p = (name: string): string => join(dir, name);
const run = (cmd: string, ...args: string[]): string => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const zlib = (data: Uint8Array, clusterSize: number): Uint8Array => inflateRawSync(data, { maxOutputLength: clusterSize });

async function open(name: string, options: Qcow2Options = {}): Promise<[Qcow2Backend, MemoryImageFile]> {
  const file = new MemoryImageFile(readFileSync(p(name)), { readOnly: options.readOnly ?? false });
  return [await openQcow2(file, { decompressors: { zlib }, ...options }), file];
}

async function readAll(q: Qcow2Backend): Promise<Uint8Array> {
  const out = new Uint8Array(q.size);
  // In 1 MiB pieces, as a device would ask, through both paths.
  for (let at = 0; at < q.size; at += 1 << 20) await q.read(at, [out.subarray(at, Math.min(q.size, at + (1 << 20)))]);
  return out;
}

function raw(name: string): Uint8Array {
  run('qemu-img', 'convert', '-O', 'raw', p(name), p(`${name}.raw`));
  return new Uint8Array(readFileSync(p(`${name}.raw`)));
}

/** Equal bytes, or a failure naming the first difference (a diff of megabytes would not fit in memory). */
function sameBytes(actual: Uint8Array, expected: Uint8Array, what = 'bytes'): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  const i = actual.findIndex((b, k) => b !== expected[k]);
  assert.equal(i, -1, `${what}: first difference at byte ${i}`);
}

const QEMU_WRITES = [
  'write -P 0x11 0 100k', 'write -P 0x22 1M 4k', 'write -z 2M 64k', 'write -P 0x33 3M 8k', 'discard 3M 4k',
  'write -P 0x44 5000k 512', 'write -P 0x55 7M 1M',
];

describe('the qcow2 driver against qemu-img', { skip }, () => {
  before(() => { dir = mkdtempSync(join(tmpdir(), 'vblk-qcow2-')); });
  after(() => rmSync(dir, { recursive: true, force: true }));

  const shapes: [string, string][] = [
    ['v3 64K clusters', 'cluster_size=65536'],
    ['v2 (compat 0.10)', 'compat=0.10'],
    ['512-byte clusters, 1-bit refcounts', 'cluster_size=512,refcount_bits=1'],
    ['2 MiB clusters, 64-bit refcounts', 'cluster_size=2097152,refcount_bits=64'],
    ['extended L2, 32K clusters', 'extended_l2=on,cluster_size=32768'],
    ['4K clusters, 8-bit refcounts', 'cluster_size=4096,refcount_bits=8'],
  ];
  for (const [name, opts] of shapes) {
    test(`${name}: reads what qemu-io wrote, writes what qemu-img reads back`, async () => {
      const img = `${name.replace(/\W+/g, '_')}.qcow2`;
      run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', opts, p(img), '9M');
      for (const c of QEMU_WRITES) run('qemu-io', '-c', c, p(img));
      const expected = raw(img);
      const [q, file] = await open(img);
      sameBytes(await readAll(q), expected);
      // Writes of every shape: sub-cluster, cross-cluster, into compressed/zero/unallocated clusters.
      const writes: [number, number][] = [[512, 1000 * 512], [(1 << 20) + 4096, 3 * 512], [(2 << 20) + 512, 70 * 1024], [6 << 20, 2 << 20], [(9 << 20) - 512, 512]];
      writes.forEach(([at, n], k) => {
        const data = pattern(n, k + 1);
        expected.set(data, at);
      });
      for (const [k, [at, n]] of writes.entries()) await q.write(at, [pattern(n, k + 1)]);
      await q.discard(7 << 20, 64 << 10);
      expected.fill(0, 7 << 20, (7 << 20) + (64 << 10));
      await q.writeZeroes(3 << 20, 4096, false);
      expected.fill(0, 3 << 20, (3 << 20) + 4096);
      sameBytes(await readAll(q), expected);
      await q.close();
      writeFileSync(p(`out-${img}`), file.bytes());
      writeFileSync(p(`expected-${img}.raw`), expected);
      run('qemu-img', 'check', p(`out-${img}`));
      run('qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', p(`expected-${img}.raw`), p(`out-${img}`));
    });
  }

  test('compressed clusters read through a zlib decompressor and are rewritten uncompressed', async () => {
    run('qemu-img', 'create', '-q', '-f', 'qcow2', p('c.qcow2'), '4M');
    run('qemu-io', '-c', 'write -c -P 0x66 0 128k', '-c', 'write -c -P 0x67 1M 64k', p('c.qcow2'));
    const expected = raw('c.qcow2');
    const [q, file] = await open('c.qcow2');
    sameBytes(await readAll(q), expected);
    await q.write(4096, [pattern(4096, 9)]);
    expected.set(pattern(4096, 9), 4096);
    await q.close();
    writeFileSync(p('c-out.qcow2'), file.bytes());
    writeFileSync(p('c-expected.raw'), expected);
    run('qemu-img', 'check', p('c-out.qcow2'));
    run('qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', p('c-expected.raw'), p('c-out.qcow2'));
  });

  test('a compressed cluster without a decompressor for its type fails that read with a typed error', async () => {
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', p('z.qcow2'), '1M');
    run('qemu-io', '-c', 'write -c -P 0x12 0 64k', '-c', 'write -P 0x13 64k 64k', p('z.qcow2'));
    const [q] = await open('z.qcow2', { readOnly: true });
    await assert.rejects(Promise.resolve(q.read(0, [new Uint8Array(512)])), { code: 'QCOW2_NO_DECOMPRESSOR' });
    const plain = new Uint8Array(512);
    await q.read(65536, [plain]);
    assert.deepEqual(plain, new Uint8Array(512).fill(0x13));
  });

  test('an overlay reads through to its backing qcow2 and writes copy-on-write', async () => {
    run('qemu-img', 'create', '-q', '-f', 'qcow2', p('base.qcow2'), '8M');
    run('qemu-io', '-c', 'write -P 0x21 0 8M', p('base.qcow2'));
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('top.qcow2'), '12M');
    run('qemu-io', '-c', 'write -P 0x31 1M 4k', '-c', 'write -z 2M 64k', p('top.qcow2'));
    const expected = raw('top.qcow2');
    const [base] = await open('base.qcow2', { readOnly: true });
    const [q, file] = await open('top.qcow2', { backing: base });
    sameBytes(await readAll(q), expected);
    await q.write((4 << 20) + 512, [pattern(1024, 3)]);
    expected.set(pattern(1024, 3), (4 << 20) + 512);
    await q.discard(5 << 20, 1 << 20);
    expected.fill(0, 5 << 20, 6 << 20);
    sameBytes(await readAll(q), expected);
    await q.close();
    writeFileSync(p('top-out.qcow2'), file.bytes());
    writeFileSync(p('top-expected.raw'), expected);
    run('qemu-img', 'check', p('top-out.qcow2'));
    run('qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', p('top-expected.raw'), p('top-out.qcow2'));
  });

  test('writes over clusters and L2 tables shared with an internal snapshot leave the snapshot intact', async () => {
    run('qemu-img', 'create', '-q', '-f', 'qcow2', p('s.qcow2'), '4M');
    run('qemu-io', '-c', 'write -P 0x41 0 4M', p('s.qcow2'));
    run('qemu-img', 'snapshot', '-c', 'before', p('s.qcow2'));
    const original = raw('s.qcow2');
    const [q, file] = await open('s.qcow2');
    const expected = original.slice();
    await q.write(512, [pattern(512, 5)]);
    expected.set(pattern(512, 5), 512);
    await q.write(2 << 20, [pattern(65536, 6)]);
    expected.set(pattern(65536, 6), 2 << 20);
    await q.discard(3 << 20, 65536);
    expected.fill(0, 3 << 20, (3 << 20) + 65536);
    sameBytes(await readAll(q), expected);
    await q.close();
    writeFileSync(p('s-out.qcow2'), file.bytes());
    writeFileSync(p('s-expected.raw'), expected);
    run('qemu-img', 'check', p('s-out.qcow2'));
    run('qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', p('s-expected.raw'), p('s-out.qcow2'));
    run('qemu-img', 'snapshot', '-a', 'before', p('s-out.qcow2'));
    sameBytes(raw('s-out.qcow2'), original, 'the snapshot still holds the data it was taken with');
  });

  test('growing an image far past its refcount table and L1 table keeps qemu-img check clean', async () => {
    run('qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', p('g.qcow2'), '1M');
    const [q, file] = await open('g.qcow2');
    await q.resize(64 << 20);
    const expected = new Uint8Array(64 << 20);
    for (let k = 0; k < 40; k++) {
      const at = ((k * 1_640_531) % ((64 << 20) / 512)) * 512, data = pattern(8192, k);
      const n = Math.min(8192, expected.length - at);
      await q.write(at, [data.subarray(0, n)]);
      expected.set(data.subarray(0, n), at);
    }
    await q.write(0, [pattern(1 << 20, 99)]);
    expected.set(pattern(1 << 20, 99), 0);
    await q.close();
    writeFileSync(p('g-out.qcow2'), file.bytes());
    writeFileSync(p('g-expected.raw'), expected);
    run('qemu-img', 'check', p('g-out.qcow2'));
    run('qemu-img', 'compare', '-f', 'raw', '-F', 'qcow2', p('g-expected.raw'), p('g-out.qcow2'));
  });
});
