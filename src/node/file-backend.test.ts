// The file backend's own promises: holes punched by discard, nothing ever written past
// the image size, zeroes past a short file's end, the fallback to writing zeroes where
// a filesystem refuses a fallocate mode, O_RDONLY opens, and one-line typed errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileBackend, openFileBackend, type FileIoMode } from './file-backend.js';

const MiB = 1024 * 1024;
const SHM = '/dev/shm';

function tempDir(base = tmpdir()): { dir: string; done(): void } {
  const dir = mkdtempSync(join(base, 'vblk-file-'));
  return { dir, done: () => rmSync(dir, { recursive: true, force: true }) };
}

function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 29 + seed) & 0xff || 1;
  return b;
}

for (const io of ['sync', 'async', 'auto', 'mmap'] as FileIoMode[]) {
  test(`discard punches a hole: st_blocks shrinks, the size stays (${io})`, async () => {
    const t = tempDir();
    try {
      const path = join(t.dir, 'img');
      const b = openFileBackend(path, { size: 8 * MiB, io });
      await b.write(0, [pattern(8 * MiB, 1)]);
      await b.flush();
      const before = statSync(path);
      await b.discard(2 * MiB, 4 * MiB);
      const after = statSync(path);
      assert.equal(after.size, 8 * MiB);
      // st_blocks counts 512-byte units: 4 MiB is 8192 of them (allow filesystem slack).
      assert.ok(before.blocks - after.blocks >= 8192 - 64, `blocks ${before.blocks} -> ${after.blocks}`);
      const back = new Uint8Array(4 * MiB).fill(1);
      await b.read(2 * MiB, [back]);
      assert.deepEqual(back, new Uint8Array(4 * MiB));
      await b.close();
    } finally {
      t.done();
    }
  });

  test(`write-zeroes with unmap deallocates too (${io})`, async () => {
    const t = tempDir();
    try {
      const path = join(t.dir, 'img');
      const b = openFileBackend(path, { size: 4 * MiB, io });
      await b.write(0, [pattern(4 * MiB, 2)]);
      await b.flush();
      const before = statSync(path).blocks;
      await b.writeZeroes(0, 2 * MiB, true);
      assert.ok(before - statSync(path).blocks >= 4096 - 64);
      await b.close();
    } finally {
      t.done();
    }
  });

  test(`on tmpfs, which has no ZERO_RANGE, write-zeroes falls back to writing zeroes (${io})`, { skip: !existsSync(SHM) }, async () => {
    const t = tempDir(SHM);
    try {
      const b = openFileBackend(join(t.dir, 'img'), { size: 4 * MiB, io });
      await b.write(0, [pattern(4 * MiB, 3)]);
      await b.writeZeroes(MiB, 2 * MiB + 512, false);
      await b.writeZeroes(0, 512, false);
      const back = new Uint8Array(4 * MiB);
      await b.read(0, [back]);
      const expected = pattern(4 * MiB, 3);
      expected.fill(0, MiB, 3 * MiB + 512);
      expected.fill(0, 0, 512);
      assert.deepEqual(back, expected);
      assert.equal((b as unknown as { writer: { zeroRanges: boolean } }).writer.zeroRanges, false, 'the fallback path ran');
      await b.close();
    } finally {
      t.done();
    }
  });

  test(`nothing is written past the image size (${io})`, async () => {
    const t = tempDir();
    try {
      const path = join(t.dir, 'img');
      const b = openFileBackend(path, { size: MiB, io });
      await b.write(MiB - 512, [pattern(512, 4)]);
      await b.writeZeroes(MiB - 4096, 4096, false);
      await b.discard(MiB - 4096, 4096);
      await assert.rejects(async () => b.write(MiB - 512, [new Uint8Array(1024)]), { code: 'OUT_OF_RANGE' });
      await assert.rejects(async () => b.writeZeroes(MiB, 512, false), { code: 'OUT_OF_RANGE' });
      await b.flush();
      assert.equal(statSync(path).size, MiB);
      await b.close();
    } finally {
      t.done();
    }
  });

  // mmap: see 'mmap: a file truncated behind our back fails the reads past its end'.
  test(`a read past the end of a file shorter than the image gives zeroes (${io})`, { skip: io === 'mmap' && 'a mapping past the file end cannot be read' }, async () => {
    const t = tempDir();
    try {
      const path = join(t.dir, 'img');
      const b = openFileBackend(path, { size: MiB, io });
      await b.write(0, [pattern(MiB, 5)]);
      // Truncated behind the backend's back: the tail is now past end of file.
      truncateSync(path, 1000);
      const head = new Uint8Array(1024).fill(9);
      const tail = new Uint8Array(4096).fill(9);
      await b.read(0, [head, tail]);
      assert.deepEqual(head.subarray(0, 1000), pattern(MiB, 5).subarray(0, 1000));
      assert.deepEqual(head.subarray(1000), new Uint8Array(24));
      assert.deepEqual(tail, new Uint8Array(4096));
      await b.close();
    } finally {
      t.done();
    }
  });
}

for (const io of ['sync', 'mmap'] as FileIoMode[]) {
  test(`more buffers than one vectored call takes are split into batches (${io})`, async () => {
    const t = tempDir();
    try {
      const b = openFileBackend(join(t.dir, 'img'), { size: 2 * MiB, io });
      // 70 000 pieces of 16 bytes: more than the addon's 65 536 buffers per call.
      const data = pattern(70_000 * 16, 6);
      const pieces: Uint8Array[] = [];
      for (let i = 0; i < 70_000; i++) pieces.push(data.subarray(i * 16, (i + 1) * 16));
      await b.write(0, pieces);
      const back = pieces.map((p) => new Uint8Array(p.length));
      await b.read(0, back);
      back.forEach((p, i) => assert.deepEqual(p, pieces[i]));
      await b.close();
    } finally {
      t.done();
    }
  });
}

test('a read-only open uses O_RDONLY and refuses writes', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'img');
    writeFileSync(path, pattern(4096, 7));
    const b = openFileBackend(path, { readOnly: true });
    assert.equal(b.readOnly, true);
    const fd = (b as unknown as { fd: number }).fd;
    const flags = /flags:\s*(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
    assert.ok(flags);
    // O_ACCMODE is the low two bits; O_RDONLY is 0.
    assert.equal(parseInt(flags[1], 8) & 3, 0);
    assert.throws(() => b.write(0, [new Uint8Array(512)]), { code: 'READ_ONLY' });
    assert.throws(() => b.resize(8192), { code: 'READ_ONLY' });
    const back = new Uint8Array(4096);
    b.read(0, [back]);
    assert.deepEqual(back, pattern(4096, 7));
    b.close();
    assert.deepEqual(new Uint8Array(readFileSync(path)), pattern(4096, 7));
  } finally {
    t.done();
  }
});

test('openFileBackend creates a missing image when given a size, sparsely, and grows a smaller one', () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'new.img');
    const b = openFileBackend(path, { size: 64 * MiB });
    assert.equal(b.size, 64 * MiB);
    const st = statSync(path);
    assert.equal(st.size, 64 * MiB);
    assert.ok(st.blocks < 64, 'sparse');
    assert.equal(st.mode & 0o777, 0o600);
    b.close();
    const grown = openFileBackend(path, { size: 128 * MiB });
    assert.equal(grown.size, 128 * MiB);
    grown.close();
    const kept = openFileBackend(path, { size: MiB });
    assert.equal(kept.size, 128 * MiB, 'a larger image keeps its size');
    kept.close();
  } finally {
    t.done();
  }
});

test('resize grows the file with ftruncate', () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'img');
    const b = openFileBackend(path, { size: MiB });
    b.resize(3 * MiB);
    assert.equal(statSync(path).size, 3 * MiB);
    assert.equal(b.size, 3 * MiB);
    b.close();
  } finally {
    t.done();
  }
});

const unreadableCheck = process.getuid?.() === 0 ? 'root reads anything' : false;

for (const [name, prepare, options, code] of [
  ['a missing image', () => undefined, {}, 'IMAGE_MISSING'],
  ['a missing image opened read-only with a size', () => undefined, { readOnly: true, size: MiB }, 'IMAGE_MISSING'],
  ['an empty image', (p: string) => writeFileSync(p, ''), {}, 'IMAGE_TOO_SMALL'],
  ['an image under 512 bytes', (p: string) => writeFileSync(p, new Uint8Array(511)), {}, 'IMAGE_TOO_SMALL'],
  ['an image not a multiple of 512', (p: string) => writeFileSync(p, new Uint8Array(1000)), {}, 'IMAGE_MISALIGNED'],
  ['a read-only image smaller than the size asked', (p: string) => writeFileSync(p, new Uint8Array(512)), { readOnly: true, size: 1024 }, 'IMAGE_TOO_SMALL'],
  ['a directory', (p: string) => mkdirSync(p), {}, 'IMAGE_NOT_FILE'],
  ['a size that is not a multiple of 512', (p: string) => writeFileSync(p, new Uint8Array(512)), { size: 1000 }, 'BAD_SIZE'],
] as const) {
  test(`openFileBackend refuses ${name} with ${code} and a one-line message`, () => {
    const t = tempDir();
    try {
      const path = join(t.dir, 'img');
      prepare(path);
      assert.throws(() => openFileBackend(path, options), (e: unknown) => {
        assert.equal((e as { code?: string }).code, code);
        assert.ok(e instanceof Error && !e.message.includes('\n') && e.message.length > 0);
        return true;
      });
    } finally {
      t.done();
    }
  });
}

test('openFileBackend refuses an unreadable image with IMAGE_UNREADABLE', { skip: unreadableCheck }, () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'img');
    writeFileSync(path, new Uint8Array(512));
    chmodSync(path, 0);
    assert.throws(() => openFileBackend(path), { code: 'IMAGE_UNREADABLE' });
  } finally {
    t.done();
  }
});

test('a closed backend refuses calls and closing twice is harmless', () => {
  const t = tempDir();
  try {
    const b: FileBackend = openFileBackend(join(t.dir, 'img'), { size: MiB });
    b.close();
    b.close();
    assert.throws(() => b.read(0, [new Uint8Array(512)]), { code: 'CLOSED' });
  } finally {
    t.done();
  }
});

test('auto: a read the page cache holds completes on the spot; one reaching past it finishes on the thread pool, bytes right', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'img');
    const b = openFileBackend(path, { size: 4 * MiB, io: 'auto' });
    // Just written, so cached: no promise (what `sync` costs).
    const data = pattern(64 * 1024, 5);
    assert.equal(b.write(0, [data]), undefined);
    const back = new Uint8Array(64 * 1024);
    assert.equal(b.read(0, [back]), undefined);
    assert.deepEqual(back, data);
    // Cached data, then a hole never read: whatever the page cache lacks is read later,
    // split across the caller's buffers at the right byte.
    const a = new Uint8Array(40 * 1024).fill(9);
    const c = new Uint8Array(2 * MiB).fill(9);
    await b.read(32 * 1024, [a, c]);
    assert.deepEqual(a.subarray(0, 32 * 1024), data.subarray(32 * 1024));
    assert.ok(a.subarray(32 * 1024).every((x) => x === 0));
    assert.ok(c.every((x) => x === 0));
    await b.close();
  } finally {
    t.done();
  }
});

test('auto: past a file truncated behind our back, reads give zeroes', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'img');
    const b = openFileBackend(path, { size: 1 * MiB, io: 'auto' });
    await b.write(0, [pattern(MiB, 6)]);
    truncateSync(path, 4096);
    const back = new Uint8Array(8192).fill(7);
    await b.read(0, [back]);
    assert.deepEqual(back.subarray(0, 4096), pattern(MiB, 6).subarray(0, 4096));
    assert.ok(back.subarray(4096).every((x) => x === 0));
    await b.close();
  } finally {
    t.done();
  }
});

test('mmap: reads see every write, across chunks and buffer boundaries, and after a resize', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'img');
    const b = openFileBackend(path, { size: 2 * MiB, io: 'mmap' });
    const data = pattern(MiB, 11);
    assert.equal(b.write(4096, [data.subarray(0, 1000), data.subarray(1000)]), undefined);
    const x = new Uint8Array(333);
    const y = new Uint8Array(MiB + 4096 - 333);
    assert.equal(b.read(0, [x, y]), undefined, 'a mapped read completes on the spot');
    const whole = new Uint8Array(MiB + 4096);
    whole.set(x);
    whole.set(y, 333);
    assert.ok(whole.subarray(0, 4096).every((v) => v === 0), 'the hole before reads as zeroes');
    assert.deepEqual(whole.subarray(4096), data);
    // Written behind the mapping's back, through the file: the same page cache.
    writeFileSync(path, pattern(4096, 12), { flag: 'r+' });
    const first = new Uint8Array(4096);
    b.read(0, [first]);
    assert.deepEqual(first, pattern(4096, 12));
    b.resize(4 * MiB);
    await b.write(3 * MiB, [pattern(8192, 13)]);
    const tail = new Uint8Array(8192);
    b.read(3 * MiB, [tail]);
    assert.deepEqual(tail, pattern(8192, 13));
    await b.close();
    assert.throws(() => b.read(0, [first]), { code: 'CLOSED' });
  } finally {
    t.done();
  }
});

test('mmap: a file truncated behind our back fails the reads past its end with EIO, and the process lives on', async () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'img');
    const b = openFileBackend(path, { size: MiB, io: 'mmap' });
    await b.write(0, [pattern(MiB, 14)]);
    truncateSync(path, 8192);
    // Without the addon's guard this read would kill the process with SIGBUS.
    assert.throws(() => b.read(0, [new Uint8Array(64 * 1024)]), (e: Error & { code?: string }) => e.code === 'EIO' && /65536 bytes at byte 0/.test(e.message));
    const head = new Uint8Array(8192);
    b.read(0, [head]);
    assert.deepEqual(head, pattern(MiB, 14).subarray(0, 8192));
    await b.close();
  } finally {
    t.done();
  }
});
