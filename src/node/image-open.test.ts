// Opening images and their backing chains: format probing and --format, relative and
// absolute backing names, stated vs probed backing formats, loops, the depth bound,
// missing backing files, and the probed-raw guard. The qcow2 levels are served by a
// stand-in driver that reads through to its backing, so these tests check the chain,
// not the qcow2 driver (which has its own tests); chains made by qemu-img check that
// names resolve as QEMU resolves them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import fc from 'fast-check';
import { BackendError, type BlockBackend } from '../backends/backend.js';
import { VblkError } from '../errors.js';
import { createQcow2, type Qcow2CreateOptions } from '../backends/qcow2/create.js';
import { parseHeader } from '../backends/qcow2/header.js';
import type { ImageFile } from '../backends/qcow2/image-file.js';
import { requirePeer } from '../../scripts/guest/guest.js';
import { openImageFile } from './image-file.js';
import {
  ImageOpenError, MAX_BACKING_DEPTH, backingPath, openImage, resolveChain, type Qcow2Opener,
} from './image-open.js';

const qemuSkip = requirePeer('qemu-img');

function tempDir(): { dir: string; done(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-open-'));
  return { dir, done: () => rmSync(dir, { recursive: true, force: true }) };
}

async function makeQcow2(path: string, options: Qcow2CreateOptions): Promise<void> {
  const f = openImageFile(path, { create: true });
  await createQcow2(f, options);
  f.close();
}

/** Stand-in for the qcow2 driver: the virtual size from the header, every read from the backing (zeroes past it). */
const passThrough: Qcow2Opener = async (file: ImageFile, options) => {
  const first = new Uint8Array(Math.min(file.size, 65536));
  await file.read(0, [first]);
  const header = parseHeader(first, file.size);
  const backing = options.backing;
  let closed = false;
  const backend: BlockBackend = {
    size: header.size, readOnly: options.readOnly, canFlush: false, canDiscard: false, canWriteZeroes: false,
    async read(offset, buffers) {
      for (const b of buffers) {
        b.fill(0);
        const n = backing === undefined ? 0 : Math.max(0, Math.min(b.length, backing.size - offset));
        if (n > 0) await backing?.read(offset, [b.subarray(0, n)]);
        offset += b.length;
      }
    },
    write() {
      throw new BackendError('UNSUPPORTED', 'stand-in');
    },
    flush() {},
    discard() {},
    writeZeroes() {},
    close() {
      if (!closed) file.close();
      closed = true;
    },
  };
  return backend;
};

async function readAll(b: BlockBackend, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  await b.read(offset, [out]);
  return out;
}

test('a raw image is served raw; --format raw keeps a raw image that starts with the qcow2 magic raw', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'disk.raw');
    const bytes = new Uint8Array(1 << 20);
    bytes.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
    writeFileSync(path, bytes);
    const opened = await openImage(path, { format: 'raw', openQcow2: passThrough });
    assert.equal(opened.format, 'raw');
    assert.equal(opened.backend.size, 1 << 20);
    assert.deepEqual(await readAll(opened.backend, 0, 8), bytes.subarray(0, 8));
    await opened.backend.close();
    // Probing it instead takes the guest's bytes for a header, which is refused as malformed.
    await assert.rejects(openImage(path, { openQcow2: passThrough }), (e: unknown) => (e as { code?: string }).code === 'QCOW2_BAD_HEADER');
  } finally {
    t.done();
  }
});

test('a probed raw image refuses a guest write that would give it the qcow2 magic; --format raw allows it', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'disk.raw');
    writeFileSync(path, new Uint8Array(65536));
    const magic = new Uint8Array(512);
    magic.set([0x51, 0x46, 0x49, 0xfb]);
    const probed = await openImage(path, { openQcow2: passThrough });
    assert.throws(() => probed.backend.write(0, [magic.subarray(0, 2), magic.subarray(2)]), (e: unknown) => e instanceof BackendError && /qcow2 magic/.test(e.message));
    await probed.backend.write(512, [magic]);
    await probed.backend.write(0, [new Uint8Array(512).fill(7)]);
    await probed.backend.close();
    const stated = await openImage(path, { format: 'raw' });
    await stated.backend.write(0, [magic]);
    await stated.backend.close();
    assert.deepEqual(new Uint8Array(readFileSync(path)).subarray(0, 4), magic.subarray(0, 4));
  } finally {
    t.done();
  }
});

test('a missing raw image with a size is created raw; a size with qcow2 is refused', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'new.raw');
    const opened = await openImage(path, { size: 1 << 20 });
    assert.equal(opened.format, 'raw');
    assert.equal(opened.backend.size, 1 << 20);
    await opened.backend.close();
    const q = join(t.dir, 'd.qcow2');
    await makeQcow2(q, { size: 1 << 20 });
    await assert.rejects(openImage(q, { size: 2 << 20, openQcow2: passThrough }), (e: unknown) => e instanceof ImageOpenError && e.code === 'FORMAT_OPTION');
    await assert.rejects(openImage(q, { io: 'mmap', openQcow2: passThrough }), /mmap serves raw images only/);
  } finally {
    t.done();
  }
});

test('a chain qcow2 → qcow2 → raw: relative names resolve against the naming image\'s directory, formats stated', async () => {
  const t = tempDir();
  try {
    mkdirSync(join(t.dir, 'base'));
    mkdirSync(join(t.dir, 'mid'));
    const raw = join(t.dir, 'base', 'base.raw');
    const data = new Uint8Array(1 << 20).map((_, i) => (i * 13) & 0xff);
    writeFileSync(raw, data);
    const mid = join(t.dir, 'mid', 'mid.qcow2');
    await makeQcow2(mid, { size: 2 << 20, backingFile: '../base/base.raw', backingFormat: 'raw' });
    const top = join(t.dir, 'top.qcow2');
    await makeQcow2(top, { size: 2 << 20, backingFile: 'mid/mid.qcow2', backingFormat: 'qcow2' });
    // Opened from elsewhere, with a relative path to the top: names still resolve per image.
    const cwd = process.cwd();
    process.chdir(tmpdir());
    try {
      const opened = await openImage(relative(tmpdir(), top), { openQcow2: passThrough });
      assert.equal(opened.format, 'qcow2');
      assert.deepEqual(opened.backing.map((l) => [l.path, l.format, l.formatSource]), [[mid, 'qcow2', 'stated'], [raw, 'raw', 'stated']]);
      assert.equal(opened.backend.size, 2 << 20);
      assert.deepEqual(await readAll(opened.backend, 4096, 4096), data.subarray(4096, 8192));
      assert.deepEqual(await readAll(opened.backend, (1 << 20) - 512, 1024), Uint8Array.from([...data.subarray((1 << 20) - 512), ...new Uint8Array(512)]));
      await opened.backend.close();
    } finally {
      process.chdir(cwd);
    }
  } finally {
    t.done();
  }
});

test('a stated backing format is never probed: raw stated over a file with the qcow2 magic stays raw', async () => {
  const t = tempDir();
  try {
    const base = join(t.dir, 'base.img');
    await makeQcow2(base, { size: 1 << 20 });
    const top = join(t.dir, 'top.qcow2');
    await makeQcow2(top, { size: 1 << 20, backingFile: 'base.img', backingFormat: 'raw' });
    const chain = resolveChain(top);
    assert.deepEqual(chain.map((l) => [l.format, l.formatSource]), [['qcow2', 'probed'], ['raw', 'stated']]);
    for (const l of chain) l.file.close();
    // Without a stated format the same file is probed, and found to be qcow2.
    await makeQcow2(top, { size: 1 << 20, backingFile: 'base.img' });
    const probed = resolveChain(top, { format: 'qcow2' });
    assert.deepEqual(probed.map((l) => [l.format, l.formatSource]), [['qcow2', 'given'], ['qcow2', 'probed']]);
    for (const l of probed) l.file.close();
  } finally {
    t.done();
  }
});

test('backing files are opened read-only', async () => {
  const t = tempDir();
  try {
    writeFileSync(join(t.dir, 'base.raw'), new Uint8Array(65536));
    const top = join(t.dir, 'top.qcow2');
    await makeQcow2(top, { size: 65536, backingFile: 'base.raw', backingFormat: 'raw' });
    const chain = resolveChain(top);
    assert.deepEqual(chain.map((l) => l.file.readOnly), [false, true]);
    for (const l of chain) l.file.close();
  } finally {
    t.done();
  }
});

test('a missing backing file is one line naming it and the image that references it', async () => {
  const t = tempDir();
  try {
    const top = join(t.dir, 'top.qcow2');
    await makeQcow2(top, { size: 65536, backingFile: 'gone.qcow2', backingFormat: 'qcow2' });
    await assert.rejects(openImage(top, { openQcow2: passThrough }), (e: unknown) =>
      e instanceof ImageOpenError && e.code === 'BACKING_MISSING' && e.message === `backing file ${join(t.dir, 'gone.qcow2')} of ${top} does not exist`);
    // A directory, or a device, is no backing file: a hostile image cannot make vblk read one.
    mkdirSync(join(t.dir, 'gone.qcow2'));
    await assert.rejects(openImage(top, { openQcow2: passThrough }), (e: unknown) =>
      e instanceof ImageOpenError && e.code === 'BACKING_UNREADABLE' && e.message.startsWith(`backing file of ${top}: `));
    await makeQcow2(top, { size: 65536, backingFile: '/dev/null', backingFormat: 'raw' });
    assert.throws(() => resolveChain(top), (e: unknown) => e instanceof ImageOpenError && /not a regular file/.test(e.message));
  } finally {
    t.done();
  }
});

test('a loop through names (a → b → a, and a file naming itself through a symlink) is refused', async () => {
  const t = tempDir();
  try {
    const a = join(t.dir, 'a.qcow2');
    const b = join(t.dir, 'b.qcow2');
    await makeQcow2(a, { size: 65536, backingFile: 'b.qcow2', backingFormat: 'qcow2' });
    await makeQcow2(b, { size: 65536, backingFile: 'a.qcow2', backingFormat: 'qcow2' });
    await assert.rejects(openImage(a, { openQcow2: passThrough }), (e: unknown) =>
      e instanceof ImageOpenError && e.code === 'BACKING_LOOP' && e.message.includes(`${a} (named by ${b}) is ${a} again`));
    symlinkSync('c.qcow2', join(t.dir, 'link'));
    await makeQcow2(join(t.dir, 'c.qcow2'), { size: 65536, backingFile: 'link', backingFormat: 'qcow2' });
    assert.throws(() => resolveChain(join(t.dir, 'c.qcow2')), (e: unknown) => e instanceof ImageOpenError && e.code === 'BACKING_LOOP');
  } finally {
    t.done();
  }
});

test(`a chain deeper than ${MAX_BACKING_DEPTH} backing files is refused, naming the limit; exactly ${MAX_BACKING_DEPTH} opens`, async () => {
  const t = tempDir();
  try {
    writeFileSync(join(t.dir, 'l0'), new Uint8Array(65536).fill(9));
    for (let i = 1; i <= MAX_BACKING_DEPTH + 1; i++) {
      await makeQcow2(join(t.dir, `l${i}`), { size: 65536, backingFile: `l${i - 1}`, backingFormat: i === 1 ? 'raw' : 'qcow2' });
    }
    const ok = await openImage(join(t.dir, `l${MAX_BACKING_DEPTH}`), { openQcow2: passThrough });
    assert.equal(ok.backing.length, MAX_BACKING_DEPTH);
    assert.deepEqual(await readAll(ok.backend, 0, 512), new Uint8Array(512).fill(9));
    await ok.backend.close();
    await assert.rejects(openImage(join(t.dir, `l${MAX_BACKING_DEPTH + 1}`), { openQcow2: passThrough }), (e: unknown) =>
      e instanceof ImageOpenError && e.code === 'BACKING_TOO_DEEP' && e.message.includes(`more than ${MAX_BACKING_DEPTH} files deep`));
  } finally {
    t.done();
  }
});

test('backing names: absolute kept, relative against the image\'s directory, protocols and unknown formats refused', async () => {
  assert.equal(backingPath('/a/b/top.qcow2', '/abs/base'), '/abs/base');
  assert.equal(backingPath('/a/b/top.qcow2', 'base.qcow2'), '/a/b/base.qcow2');
  assert.equal(backingPath('/a/b/top.qcow2', '../c/base'), '/a/c/base');
  assert.throws(() => backingPath('/a/top', 'nbd://host/export'), (e: unknown) => e instanceof ImageOpenError && e.code === 'BACKING_UNSUPPORTED');
  assert.throws(() => backingPath('/a/top', 'json:{"file.filename":"/etc/shadow"}'), /protocols are not supported/);
  const t = tempDir();
  try {
    writeFileSync(join(t.dir, 'base'), new Uint8Array(512));
    const top = join(t.dir, 'top.qcow2');
    await makeQcow2(top, { size: 65536, backingFile: 'base', backingFormat: 'vmdk' });
    assert.throws(() => resolveChain(top), /backing format 'vmdk' .* is not supported/);
  } finally {
    t.done();
  }
});

test('a chain made by qemu-img resolves as QEMU resolves it, after moving the whole directory', { skip: qemuSkip }, async () => {
  const t = tempDir();
  try {
    const dir = join(t.dir, 'images');
    mkdirSync(join(dir, 'sub'), { recursive: true });
    const opts = { cwd: dir, stdio: 'pipe' as const };
    execFileSync('qemu-img', ['create', '-f', 'raw', 'sub/base.raw', '1M'], opts);
    execFileSync('qemu-img', ['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'sub/mid.qcow2', '1M'], opts);
    execFileSync('qemu-img', ['create', '-f', 'qcow2', '-b', 'sub/mid.qcow2', '-F', 'qcow2', 'top.qcow2', '2M'], opts);
    const moved = join(t.dir, 'moved');
    renameSync(dir, moved);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--backing-chain', '--output=json', join(moved, 'top.qcow2')], { encoding: 'utf8' })) as { filename: string }[];
    const chain = resolveChain(join(moved, 'top.qcow2'));
    assert.deepEqual(chain.map((l) => l.path), info.map((i) => i.filename));
    assert.deepEqual(chain.map((l) => l.format), ['qcow2', 'qcow2', 'raw']);
    for (const l of chain) l.file.close();
  } finally {
    t.done();
  }
});

/** The guest-visible bytes of an image as qemu-img sees them. */
function qemuRaw(path: string, dir: string): Uint8Array {
  const out = join(dir, `raw-${Math.random().toString(36).slice(2)}`);
  execFileSync('qemu-img', ['convert', '-O', 'raw', path, out]);
  const bytes = new Uint8Array(readFileSync(out));
  rmSync(out);
  return bytes;
}

for (const io of ['sync', 'async', 'auto'] as const) {
  test(`the real driver over a qemu-img chain (raw base, compressed zlib and zstd levels) reads what qemu-img reads (${io})`, { skip: qemuSkip }, async () => {
    const t = tempDir();
    try {
      const run = (...args: string[]) => execFileSync(args[0], args.slice(1), { cwd: t.dir, stdio: 'pipe' });
      run('qemu-img', 'create', '-f', 'raw', 'base.raw', '4M');
      run('qemu-io', '-f', 'raw', '-c', 'write -P 0x11 0 4M', 'base.raw');
      run('qemu-img', 'create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid-src.qcow2', '4M');
      run('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x22 64k 256k', '-c', 'write -z 1M 64k', 'mid-src.qcow2');
      // Compressed levels: convert -c keeps the backing when -B names it.
      run('qemu-img', 'convert', '-c', '-O', 'qcow2', '-B', 'base.raw', '-F', 'raw', 'mid-src.qcow2', 'mid.qcow2');
      run('qemu-img', 'create', '-f', 'qcow2', '-o', 'compression_type=zstd', '-b', 'mid.qcow2', '-F', 'qcow2', 'top-src.qcow2', '6M');
      run('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x33 200k 100k', '-c', 'write -P 0x44 5M 64k', 'top-src.qcow2');
      run('qemu-img', 'convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', '-B', 'mid.qcow2', '-F', 'qcow2', 'top-src.qcow2', 'top.qcow2');
      const want = qemuRaw(join(t.dir, 'top.qcow2'), t.dir);
      const opened = await openImage(join(t.dir, 'top.qcow2'), { readOnly: true, io });
      assert.deepEqual(opened.backing.map((b) => b.format), ['qcow2', 'raw']);
      assert.equal(opened.backend.size, want.length);
      assert.deepEqual(await readAll(opened.backend, 0, want.length), want);
      await opened.backend.close();
    } finally {
      t.done();
    }
  });
}

test('writes through the real driver over a backing file land in the top image only, and qemu-img check finds it clean', { skip: qemuSkip }, async () => {
  const t = tempDir();
  try {
    const run = (...args: string[]) => execFileSync(args[0], args.slice(1), { cwd: t.dir, stdio: 'pipe' });
    run('qemu-img', 'create', '-f', 'qcow2', 'base.qcow2', '2M');
    run('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x55 0 2M', 'base.qcow2');
    run('qemu-img', 'create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2');
    const baseBefore = readFileSync(join(t.dir, 'base.qcow2'));
    const opened = await openImage(join(t.dir, 'top.qcow2'), { io: 'auto' });
    await opened.backend.write(4096, [new Uint8Array(8192).fill(0x66)]);
    await opened.backend.flush();
    await opened.backend.close();
    assert.deepEqual(readFileSync(join(t.dir, 'base.qcow2')), baseBefore);
    run('qemu-img', 'check', 'top.qcow2');
    const got = qemuRaw(join(t.dir, 'top.qcow2'), t.dir);
    const want = new Uint8Array(2 << 20).fill(0x55);
    want.fill(0x66, 4096, 4096 + 8192);
    assert.deepEqual(got, want);
  } finally {
    t.done();
  }
});

test('property: a header with random bytes changed opens, or fails with a typed one-line error, and leaks no descriptor', async () => {
  const t = tempDir();
  try {
    writeFileSync(join(t.dir, 'base.raw'), new Uint8Array(65536));
    const good = join(t.dir, 'good.qcow2');
    await makeQcow2(good, { size: 1 << 20, backingFile: 'base.raw', backingFormat: 'raw' });
    const pristine = readFileSync(good);
    const fdsBefore = readdirSync('/proc/self/fd').length;
    await fc.assert(fc.asyncProperty(fc.array(fc.tuple(fc.nat(511), fc.nat(255)), { minLength: 1, maxLength: 8 }), async (edits) => {
      const bytes = Uint8Array.from(pristine);
      for (const [at, value] of edits) bytes[at] = value;
      const path = join(t.dir, 'fuzzed.qcow2');
      writeFileSync(path, bytes);
      try {
        const opened = await openImage(path, { readOnly: true });
        await opened.backend.read(0, [new Uint8Array(4096)]);
        await opened.backend.close();
      } catch (e) {
        assert.ok(e instanceof VblkError, `not a VblkError: ${String(e)}`);
        assert.ok(!e.message.includes('\n'), e.message);
      }
    }), { numRuns: 300 });
    assert.equal(readdirSync('/proc/self/fd').length, fdsBefore, 'every descriptor closed');
  } finally {
    t.done();
  }
});

test('the driver\'s refusal names the file: an image marked corrupt opened writable', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'corrupt.qcow2');
    await makeQcow2(path, { size: 1 << 20 });
    const bytes = readFileSync(path);
    bytes[79] |= 2; // incompatible_features, corrupt bit
    writeFileSync(path, bytes);
    await assert.rejects(openImage(path), (e: unknown) => e instanceof VblkError && e.code === 'QCOW2_CORRUPT' && e.message.startsWith(`${path}: `));
    const ro = await openImage(path, { readOnly: true });
    await ro.backend.close();
  } finally {
    t.done();
  }
});

test('a dirty image opened writable is repaired, not trusted: the dirty bit is cleared on disk', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'dirty.qcow2');
    await makeQcow2(path, { size: 1 << 20 });
    const bytes = readFileSync(path);
    bytes[79] |= 1; // incompatible_features, dirty bit
    writeFileSync(path, bytes);
    const ro = await openImage(path, { readOnly: true });
    await ro.backend.close();
    assert.equal(readFileSync(path)[79] & 1, 1, 'a read-only open leaves the image as it is');
    const rw = await openImage(path);
    await rw.backend.close();
    assert.equal(readFileSync(path)[79] & 1, 0);
  } finally {
    t.done();
  }
});

test('a backing file on procfs or sysfs is refused: an image cannot make the guest read the host\'s state', async () => {
  const t = tempDir();
  try {
    const top = join(t.dir, 'top.qcow2');
    for (const name of ['/proc/self/environ', '/sys/kernel/mm/transparent_hugepage/enabled']) {
      await makeQcow2(top, { size: 65536, backingFile: name, backingFormat: 'raw' });
      await assert.rejects(openImage(top, { readOnly: true }), (e: unknown) =>
        e instanceof ImageOpenError && e.code === 'BACKING_UNSUPPORTED' && e.message === `backing file ${name} of ${top} is on ${name.startsWith('/proc') ? 'procfs' : 'sysfs'}, not a disk image`);
    }
  } finally {
    t.done();
  }
});

test('an empty raw backing file reads as zeroes', async () => {
  const t = tempDir();
  try {
    writeFileSync(join(t.dir, 'empty.raw'), '');
    const top = join(t.dir, 'top.qcow2');
    await makeQcow2(top, { size: 65536, backingFile: 'empty.raw', backingFormat: 'raw' });
    const opened = await openImage(top, { readOnly: true });
    assert.deepEqual(await readAll(opened.backend, 0, 4096), new Uint8Array(4096));
    await opened.backend.close();
  } finally {
    t.done();
  }
});
