// The Node ImageFile: synchronous mode returns no promise, reads past the end give
// zeroes, writes past the end grow the file, discard punches a hole without changing the
// length, read-only and closed files refuse, and open errors are one line.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BackendError } from '../backends/backend.js';
import { FileBackendError } from './file-backend.js';
import { openImageFile, type ImageFileIoMode } from './image-file.js';

const MiB = 1024 * 1024;

function tempDir(): { dir: string; done(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-imagefile-'));
  return { dir, done: () => rmSync(dir, { recursive: true, force: true }) };
}

function filled(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed) & 0xff || 1;
  return b;
}

test('sync mode completes reads, writes, truncate and discard without a promise', () => {
  const t = tempDir();
  try {
    const f = openImageFile(join(t.dir, 'img'), { create: true, io: 'sync' });
    assert.equal(f.write(0, [filled(4096, 1), filled(512, 2)]), undefined);
    const back = new Uint8Array(4608);
    assert.equal(f.read(0, [back.subarray(0, 100), back.subarray(100)]), undefined);
    assert.deepEqual(back.subarray(0, 4096), filled(4096, 1));
    assert.deepEqual(back.subarray(4096), filled(512, 2));
    assert.equal(f.truncate(8192), undefined);
    assert.equal(f.discard(0, 4096), undefined);
    f.close();
  } finally {
    t.done();
  }
});

for (const io of ['sync', 'async', 'auto'] as ImageFileIoMode[]) {
  test(`reads past the end of the file fill zeroes; writes past it grow the file (${io})`, async () => {
    const t = tempDir();
    try {
      const path = join(t.dir, 'img');
      writeFileSync(path, filled(1000, 3));
      const f = openImageFile(path, { io });
      assert.equal(f.size, 1000);
      const back = new Uint8Array(3000).fill(0xee);
      await f.read(0, [back.subarray(0, 600), back.subarray(600)]);
      assert.deepEqual(back.subarray(0, 1000), filled(1000, 3));
      assert.deepEqual(back.subarray(1000), new Uint8Array(2000));
      await f.write(2 * MiB, [filled(512, 4)]);
      assert.equal(f.size, 2 * MiB + 512);
      await f.flush();
      f.close();
      assert.equal(statSync(path).size, 2 * MiB + 512);
      assert.deepEqual(new Uint8Array(readFileSync(path)).subarray(2 * MiB), filled(512, 4));
    } finally {
      t.done();
    }
  });

  test(`discard punches a hole: fewer blocks, same length, zeroes read back (${io})`, async () => {
    const t = tempDir();
    try {
      const path = join(t.dir, 'img');
      const f = openImageFile(path, { create: true, io });
      await f.write(0, [filled(4 * MiB, 5)]);
      await f.flush();
      const before = f.allocatedBytes();
      await f.discard(MiB, 2 * MiB);
      assert.equal(statSync(path).size, 4 * MiB);
      assert.equal(f.size, 4 * MiB);
      // Filesystems without holes fall back to writing zeroes: then nothing is freed.
      const freed = before - f.allocatedBytes();
      assert.ok(freed === 0 || freed >= 2 * MiB - 64 * 1024, `freed ${freed} bytes`);
      const back = new Uint8Array(2 * MiB).fill(1);
      await f.read(MiB, [back]);
      assert.deepEqual(back, new Uint8Array(2 * MiB));
      f.close();
    } finally {
      t.done();
    }
  });
}

test('a read-only file refuses writes, truncate and discard with READ_ONLY', () => {
  const t = tempDir();
  try {
    const path = join(t.dir, 'img');
    writeFileSync(path, filled(4096, 6));
    const f = openImageFile(path, { readOnly: true });
    assert.equal(f.readOnly, true);
    const isReadOnly = (e: unknown) => e instanceof BackendError && e.code === 'READ_ONLY';
    assert.throws(() => f.write(0, [new Uint8Array(512)]), isReadOnly);
    assert.throws(() => f.truncate(0), isReadOnly);
    assert.throws(() => f.discard(0, 512), isReadOnly);
    f.close();
    assert.deepEqual(new Uint8Array(readFileSync(path)), filled(4096, 6));
  } finally {
    t.done();
  }
});

test('a closed file refuses everything with CLOSED; close is idempotent', () => {
  const t = tempDir();
  try {
    const f = openImageFile(join(t.dir, 'img'), { create: true });
    f.close();
    f.close();
    assert.throws(() => f.read(0, [new Uint8Array(1)]), (e: unknown) => e instanceof BackendError && e.code === 'CLOSED');
  } finally {
    t.done();
  }
});

test('nonsense ranges are refused before any syscall', () => {
  const t = tempDir();
  try {
    const f = openImageFile(join(t.dir, 'img'), { create: true });
    const isRange = (e: unknown) => e instanceof BackendError && e.code === 'OUT_OF_RANGE';
    assert.throws(() => f.read(-1, [new Uint8Array(1)]), isRange);
    assert.throws(() => f.write(Number.MAX_SAFE_INTEGER, [new Uint8Array(2)]), isRange);
    assert.throws(() => f.discard(0.5, 1), isRange);
    f.close();
  } finally {
    t.done();
  }
});

test('opening a missing file, a directory, or a missing file read-only with create fails with one line naming it', () => {
  const t = tempDir();
  try {
    const missing = join(t.dir, 'nope');
    assert.throws(() => openImageFile(missing), (e: unknown) =>
      e instanceof FileBackendError && e.code === 'IMAGE_MISSING' && e.message === `image ${missing} does not exist`);
    assert.throws(() => openImageFile(missing, { readOnly: true, create: true }), (e: unknown) => e instanceof FileBackendError && e.code === 'IMAGE_MISSING');
    const dir = join(t.dir, 'd');
    mkdirSync(dir);
    assert.throws(() => openImageFile(dir, { readOnly: true }), (e: unknown) => e instanceof FileBackendError && e.code === 'IMAGE_NOT_FILE');
  } finally {
    t.done();
  }
});
