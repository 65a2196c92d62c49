// The NBD backend against real servers (qemu-nbd on raw and qcow2 images, nbdkit's
// memory plugin with its error and delay filters), each result checked with a tool
// that is not ours: qemu-img compare on the images, nbdcopy out of nbdkit, the image's
// allocation as stat reports it. And the flags a scripted server sees on the wire.
import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { readFileSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeer } from '../scripts/guest/guest.js';
import { openNbdBackend, type NbdExportBackend } from '../src/node/nbd-backend.js';
import { startNbdkit, startQemuNbd } from './support/nbd-servers.js';
import { FakeNbdServer } from './support/fake-nbd-server.js';
import { FLAGS } from './support/nbd-wire.js';
import { BlkDevice } from '../src/blk/device.js';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { Harness, framed } from './blk-device-harness.js';
import { scratchDir } from './e2e/serve-helpers.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

/** Backends a test opened: closed after it whatever happens, or their reconnecting would keep the process alive. */
const opened: NbdExportBackend[] = [];
function track(b: NbdExportBackend): NbdExportBackend {
  opened.push(b);
  return b;
}
afterEach(async () => {
  await Promise.all(opened.splice(0).map((b) => b.close()));
});

function random(n: number): Uint8Array {
  return randomFillSync(new Uint8Array(n));
}

/** Exit status of `qemu-img compare` (0: same content), with its output on failure. */
function qemuImgCompare(a: string, fa: string, b: string, fb: string): void {
  try {
    // -U: the image may be open in qemu-nbd (reading it is safe: what we check was flushed).
    execFileSync('qemu-img', ['compare', '-q', '-U', '-f', fa, '-F', fb, a, b], { stdio: 'pipe' });
  } catch (e) {
    const err = e as { status: number; stdout: Buffer; stderr: Buffer };
    assert.fail(`qemu-img compare ${a} ${b}: status ${err.status}: ${err.stdout}${err.stderr}`);
  }
}

/** Reads the whole export through the backend, in pieces of assorted sizes, many at once. */
async function readAll(b: NbdExportBackend): Promise<Uint8Array> {
  const out = new Uint8Array(b.size);
  const jobs: Promise<void>[] = [];
  for (let at = 0, i = 0; at < b.size; i++) {
    const n = Math.min(b.size - at, [4096, 65536, 512, 1 << 20, 12288][i % 5]);
    // Scattered: the piece goes into two views of `out`.
    const half = Math.floor(n / 1024) * 512;
    jobs.push(b.read(at, half > 0 ? [out.subarray(at, at + half), out.subarray(at + half, at + n)] : [out.subarray(at, at + n)]));
    at += n;
  }
  await Promise.all(jobs);
  return out;
}

/** Writes `ops` (offset, data) all at once and flushes. */
async function writeAll(b: NbdExportBackend, ops: [number, Uint8Array][]): Promise<void> {
  await Promise.all(ops.map(([at, data]) => b.write(at, [data])));
  await b.flush();
}

/** A set of writes across the disk: small, large (split at no limit here), unaligned to 4 KiB. */
function someWrites(): [number, Uint8Array][] {
  return [
    [0, random(512)], [4096 + 512, random(3 * 512)], [MiB - 4096, random(8192)], [5 * MiB, random(2 * MiB + 512)],
    [SIZE - 4096, random(4096)], [9 * MiB + 1024, random(65536)],
  ];
}

describe('NBD backend against qemu-nbd', { skip: requirePeer('qemu-nbd', 'qemu-img') }, () => {
  let scratch: { dir: string; cleanup(): void };
  let original: Uint8Array;
  before(() => {
    scratch = scratchDir('vblk-nbd-peers-');
    original = random(SIZE);
  });
  after(() => scratch.cleanup());

  for (const format of ['raw', 'qcow2'] as const) {
    test(`${format}: every byte read equals the export; writes on 4 connections land where they should (qemu-img compare)`, async () => {
      const raw = join(scratch.dir, `${format}-src.raw`);
      writeFileSync(raw, original);
      const image = join(scratch.dir, `disk.${format}`);
      execFileSync('qemu-img', ['convert', '-q', '-f', 'raw', '-O', format, raw, image]);
      const server = await startQemuNbd(image, join(scratch.dir, `${format}.sock`), { format, shared: 4 });
      try {
        const b = track(await openNbdBackend({ uri: server.uri, connections: 4 }));
        assert.equal(b.connectionsUp, 4, 'qemu-nbd --shared=4 advertises multi-conn');
        assert.equal(b.size, SIZE);
        const got = await readAll(b);
        const readBack = join(scratch.dir, `${format}-read.raw`);
        writeFileSync(readBack, got);
        qemuImgCompare(readBack, 'raw', image, format);

        const writes = someWrites();
        const expected = original.slice();
        for (const [at, data] of writes) expected.set(data, at);
        await writeAll(b, writes);
        await b.close();
        const want = join(scratch.dir, `${format}-want.raw`);
        writeFileSync(want, expected);
        qemuImgCompare(want, 'raw', image, format);
      } finally {
        await server.stop();
      }
    });
  }

  test('raw: trim and write-zeroes take effect (zeroes read back; trim and zeroes with unmap free the image\'s blocks, NO_HOLE keeps them)', async () => {
    const image = join(scratch.dir, 'trim.raw');
    writeFileSync(image, original);
    const server = await startQemuNbd(image, join(scratch.dir, 'trim.sock'));
    try {
      const b = track(await openNbdBackend({ uri: server.uri }));
      assert.ok(b.canDiscard && b.canWriteZeroes && b.canFlush && b.canFua);
      const blocks = (): number => statSync(image).blocks * 512;
      const full = blocks();
      await b.discard(MiB, 2 * MiB);
      await b.flush();
      const afterTrim = blocks();
      assert.ok(full - afterTrim >= 2 * MiB - 64 * 1024, `trim freed ${full - afterTrim} bytes`);
      await b.writeZeroes(4 * MiB, 2 * MiB, false);
      await b.flush();
      assert.ok(blocks() >= afterTrim - 64 * 1024, 'NO_HOLE keeps the range allocated');
      await b.writeZeroes(8 * MiB, 2 * MiB, true);
      await b.flush();
      assert.ok(afterTrim - blocks() >= 2 * MiB - 64 * 1024, `write-zeroes with unmap freed ${afterTrim - blocks()} bytes`);
      await b.close();
      const want = original.slice();
      want.fill(0, MiB, 3 * MiB);
      want.fill(0, 4 * MiB, 6 * MiB);
      want.fill(0, 8 * MiB, 10 * MiB);
      assert.ok(Buffer.from(readFileSync(image)).equals(want), 'the image holds zeroes exactly there');
    } finally {
      await server.stop();
    }
  });

  test('without multi-conn (qemu-nbd --shared=1) one connection is used, whatever was asked', async () => {
    const image = join(scratch.dir, 'single.raw');
    writeFileSync(image, original.subarray(0, MiB));
    const server = await startQemuNbd(image, join(scratch.dir, 'single.sock'));
    const logs: string[] = [];
    try {
      const b = track(await openNbdBackend({ uri: server.uri, connections: 4, log: (m) => logs.push(m) }));
      assert.equal(b.connectionsUp, 1);
      assert.match(logs.join('\n'), /does not advertise multi-conn: using 1 connection, not 4/);
      await b.close();
    } finally {
      await server.stop();
    }
  });

  test('a read-only export makes a read-only backend; an unknown export is a clear error', async () => {
    const image = join(scratch.dir, 'ro.raw');
    writeFileSync(image, original.subarray(0, MiB));
    const server = await startQemuNbd(image, join(scratch.dir, 'ro.sock'), { readOnly: true });
    try {
      const b = track(await openNbdBackend({ uri: server.uri }));
      assert.equal(b.readOnly, true);
      assert.equal(b.canFlush || b.canDiscard || b.canWriteZeroes, false);
      assert.throws(() => b.write(0, [new Uint8Array(512)]), { code: 'READ_ONLY' });
      await b.close();
      await assert.rejects(openNbdBackend({ uri: server.uri.replace('/disk?', '/nope?') }),
        (e: Error & { code?: string }) => e.code === 'CONNECT_FAILED' && /no export 'nope'/.test(e.message));
      await assert.rejects(openNbdBackend({ uri: `nbd+unix:///disk?socket=${join(scratch.dir, 'absent.sock')}` }),
        (e: Error & { code?: string }) => e.code === 'CONNECT_FAILED' && /ENOENT/.test(e.message));
    } finally {
      await server.stop();
    }
  });
});

describe('NBD backend against nbdkit', { skip: requirePeer('nbdkit', 'nbdcopy') }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(() => {
    scratch = scratchDir('vblk-nbdkit-');
  });
  after(() => scratch.cleanup());

  test('memory plugin: writes land where they should, as nbdcopy reads them; trim and zeroes read back as zeroes', async () => {
    const server = await startNbdkit(['memory', String(SIZE)], join(scratch.dir, 'mem.sock'));
    try {
      const b = track(await openNbdBackend({ uri: server.uri, connections: 2 }));
      const writes = someWrites();
      const expected = new Uint8Array(SIZE);
      for (const [at, data] of writes) expected.set(data, at);
      await writeAll(b, writes);
      await b.discard(5 * MiB, MiB);
      await b.writeZeroes(MiB - 4096, 4096, false);
      await b.writeZeroes(SIZE - 4096, 4096, true);
      expected.fill(0, 5 * MiB, 6 * MiB);
      expected.fill(0, MiB - 4096, MiB);
      expected.fill(0, SIZE - 4096, SIZE);
      const out = join(scratch.dir, 'mem.raw');
      execFileSync('nbdcopy', [server.uri, out]);
      assert.ok(Buffer.from(readFileSync(out)).equals(expected), 'nbdcopy reads what vblk wrote');
      assert.ok(Buffer.from(await readAll(b)).equals(expected), 'and so does vblk');
      await b.close();
    } finally {
      await server.stop();
    }
  });

  test('error filter: reads fail with the server\'s EIO while errors are injected, writes do not, and the connection stays', async () => {
    const trigger = join(scratch.dir, 'inject');
    writeFileSync(trigger, '');
    const server = await startNbdkit(['--filter=error', 'memory', String(MiB), 'error-pread-rate=100%', `error-pread-file=${trigger}`], join(scratch.dir, 'err.sock'));
    const logs: string[] = [];
    try {
      const b = track(await openNbdBackend({ uri: server.uri, log: (m) => logs.push(m) }));
      const data = random(4096);
      await b.write(8192, [data]);
      await assert.rejects(b.read(8192, [new Uint8Array(4096)]), (e: Error & { code?: string }) => e.code === 'SERVER_ERROR' && /EIO/.test(e.message));
      unlinkSync(trigger);
      const back = new Uint8Array(4096);
      await b.read(8192, [back]);
      assert.deepEqual(back, data);
      assert.deepEqual(logs, [], 'no reconnection');
      await b.close();
    } finally {
      await server.stop();
    }
  });

  test('delay filter: a read takes at least the delay the server adds', async () => {
    const server = await startNbdkit(['--filter=delay', 'memory', String(MiB), 'delay-read=300ms'], join(scratch.dir, 'delay.sock'));
    try {
      const b = track(await openNbdBackend({ uri: server.uri }));
      const t0 = performance.now();
      await Promise.all([b.read(0, [new Uint8Array(512)]), b.read(4096, [new Uint8Array(512)])]);
      // A lower bound only: how much longer it takes depends on the machine.
      assert.ok(performance.now() - t0 >= 290);
      await b.close();
    } finally {
      await server.stop();
    }
  });
});

describe('NBD backend: what goes on the wire', () => {
  let scratch: { dir: string; cleanup(): void };
  before(() => {
    scratch = scratchDir('vblk-nbd-wire-');
  });
  after(() => scratch.cleanup());

  test('a write-through device sends FUA writes and no flush; write-zeroes without unmap carries NO_HOLE; an export without FUA gets write + flush', async () => {
    for (const fua of [true, false]) {
      const flags = FLAGS.HAS_FLAGS | FLAGS.SEND_FLUSH | FLAGS.SEND_TRIM | FLAGS.SEND_WRITE_ZEROES | (fua ? FLAGS.SEND_FUA : 0);
      const fake = await FakeNbdServer.listen(join(scratch.dir, `wire-${fua}.sock`), { size: MiB, flags });
      try {
        const b = track(await openNbdBackend({ uri: fake.uri }));
        assert.equal(b.canFua, fua);
        const device = new BlkDevice({ backend: b, cache: 'writethrough' });
        const h = new Harness(device, { features: device.deviceFeatures });
        const t = h.post(0, framed(VIRTIO_BLK_T.OUT, 8, { out: new Uint8Array(512).fill(1) }));
        h.kick(0);
        await h.until(() => h.reap(0).includes(t));
        assert.equal(h.result(0, t).status, VIRTIO_BLK_S.OK);
        const sent = fake.requests.map((r) => [r.type, r.flags]);
        assert.deepEqual(sent, fua ? [[1, 1]] : [[1, 0], [3, 0]], 'WRITE with FUA, or WRITE then FLUSH');
        fake.requests.length = 0;
        await b.writeZeroes(0, 4096, false);
        await b.writeZeroes(0, 4096, true);
        await b.discard(0, 4096);
        assert.deepEqual(fake.requests.map((r) => [r.type, r.flags]), [[6, 2], [6, 0], [4, 0]], 'NO_HOLE only without unmap');
        await b.close();
      } finally {
        await fake.close();
      }
    }
  });
});
