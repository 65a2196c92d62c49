import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, fstatSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as native from './native.js';
import { isNativeError } from './native.js';

function withTempFile(body: (fd: number, path: string) => Promise<void> | void): () => Promise<void> {
  return async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-io-'));
    const path = join(dir, 'image');
    writeFileSync(path, '');
    const fd = openSync(path, 'r+');
    try {
      await body(fd, path);
    } finally {
      closeSync(fd);
      rmSync(dir, { recursive: true });
    }
  };
}

function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

test('pwritev then preadv round-trips several segments of odd sizes, including an empty one', withTempFile((fd, path) => {
  const segments = [pattern(3, 1), pattern(0, 2), pattern(4096, 3), pattern(777, 4)];
  assert.equal(native.pwritev(fd, segments, 100), 3 + 4096 + 777);
  const file = readFileSync(path);
  assert.equal(file.length, 100 + 3 + 4096 + 777);
  assert.deepEqual(file.subarray(103, 103 + 4096), Buffer.from(segments[2]));

  const into = [new Uint8Array(1), new Uint8Array(4000), new Uint8Array(875)];
  assert.equal(native.preadv(fd, into, 100), 4876);
  const joined = Buffer.concat(into);
  assert.deepEqual(joined, Buffer.concat(segments.map((s) => Buffer.from(s))));
}));

test('preadv returns a short count only at end of file', withTempFile((fd) => {
  native.pwritev(fd, [pattern(10, 0)], 0);
  const into = [new Uint8Array(8), new Uint8Array(8)];
  assert.equal(native.preadv(fd, into, 0), 10);
  assert.equal(native.preadv(fd, into, 10), 0);
}));

test('preadv writes into views of a larger buffer at their offsets only', withTempFile((fd) => {
  native.pwritev(fd, [pattern(8, 9)], 0);
  const backing = new Uint8Array(32).fill(0xee);
  assert.equal(native.preadv(fd, [backing.subarray(4, 8), backing.subarray(20, 24)], 0), 8);
  assert.deepEqual([...backing.subarray(0, 4)], [0xee, 0xee, 0xee, 0xee]);
  assert.deepEqual([...backing.subarray(4, 8)], [...pattern(8, 9).subarray(0, 4)]);
  assert.deepEqual([...backing.subarray(8, 20)], new Array(12).fill(0xee));
  assert.deepEqual([...backing.subarray(20, 24)], [...pattern(8, 9).subarray(4, 8)]);
}));

test('the asynchronous variants round-trip and resolve with the byte count', withTempFile(async (fd) => {
  const data = [pattern(5000, 7), pattern(3000, 8)];
  assert.equal(await native.pwritevAsync(fd, data, 8192), 8000);
  await native.fdatasyncAsync(fd);
  native.fdatasync(fd);
  const into = [new Uint8Array(8000)];
  assert.equal(await native.preadvAsync(fd, into, 8192), 8000);
  assert.deepEqual(Buffer.from(into[0]), Buffer.concat(data.map((d) => Buffer.from(d))));
}));

test('asynchronous errors reject with the errno code', async () => {
  await assert.rejects(native.preadvAsync(987654, [new Uint8Array(4)], 0), (e: unknown) =>
    isNativeError(e, 'EBADF') && /^preadv \(fd 987654\): Bad file descriptor \(EBADF\)$/.test(e.message));
  await assert.rejects(native.fdatasyncAsync(987654), (e: unknown) => isNativeError(e, 'EBADF'));
});

test('tryPreadv reads cached data without waiting', withTempFile((fd) => {
  native.pwritev(fd, [pattern(4096, 5)], 0);
  const into = new Uint8Array(4096);
  let n: number;
  try {
    n = native.tryPreadv(fd, [into], 0);
  } catch (e) {
    // Some filesystems cannot do RWF_NOWAIT: the caller falls back to preadvAsync.
    assert.ok(isNativeError(e, 'EOPNOTSUPP'), String(e));
    return;
  }
  // Just written, so in the page cache.
  assert.equal(n, 4096);
  assert.deepEqual(into, pattern(4096, 5));
}));

test('a mapping used by an asynchronous request cannot be unmapped until the request settles', withTempFile(async (fd) => {
  const mem = native.memfdCreate('vblk-pin', native.PAGE_SIZE);
  const m = native.mmap(mem, native.PAGE_SIZE, 0, true);
  native.close(mem);
  new Uint8Array(m.buffer).set(pattern(native.PAGE_SIZE, 1));
  const pending = native.pwritevAsync(fd, [new Uint8Array(m.buffer, 16, 100)], 0);
  assert.throws(() => native.munmap(m.buffer), (e: unknown) => isNativeError(e, 'EBUSY'));
  assert.equal(m.buffer.byteLength, native.PAGE_SIZE);
  assert.equal(await pending, 100);
  assert.equal(native.munmap(m.buffer), true);
}));

test('a detached view is refused rather than read as empty', () => {
  const mem = native.memfdCreate('vblk-detached', native.PAGE_SIZE);
  const m = native.mmap(mem, native.PAGE_SIZE, 0, true);
  native.close(mem);
  const view = new Uint8Array(m.buffer);
  native.munmap(m.buffer);
  assert.throws(() => native.preadv(0, [view], 0), (e: unknown) => isNativeError(e, 'ERR_VBLK_DETACHED'));
});

test('punching a hole frees the blocks of a file but keeps its size', withTempFile(async (fd) => {
  const mib = 1024 * 1024;
  native.pwritev(fd, [pattern(4 * mib, 3)], 0);
  native.fdatasync(fd);
  const before = fstatSync(fd);
  await native.fallocateAsync(fd, native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE, mib, 2 * mib);
  const after = fstatSync(fd);
  assert.equal(after.size, 4 * mib);
  // st_blocks counts 512-byte units: 2 MiB fewer is 4096 fewer (allow filesystem slack).
  assert.ok(before.blocks - after.blocks >= 4096 - 64, `blocks ${before.blocks} -> ${after.blocks}`);
  const into = new Uint8Array(16);
  native.preadv(fd, [into], mib + 12345);
  assert.deepEqual(into, new Uint8Array(16));
}));

test('ZERO_RANGE zeroes bytes, or fails with a code the caller can fall back on', withTempFile((fd) => {
  native.pwritev(fd, [pattern(8192, 6)], 0);
  try {
    native.fallocate(fd, native.FALLOC_FL_ZERO_RANGE | native.FALLOC_FL_KEEP_SIZE, 4096, 4096);
  } catch (e) {
    assert.ok(isNativeError(e, 'EOPNOTSUPP'), String(e));
    return;
  }
  const into = new Uint8Array(8192);
  native.preadv(fd, [into], 0);
  assert.deepEqual(into.subarray(0, 4096), pattern(8192, 6).subarray(0, 4096));
  assert.deepEqual(into.subarray(4096), new Uint8Array(4096));
}));

test('fallocate errors carry the errno code; unknown mode bits are refused up front', () => {
  const [a, b] = native.socketpair();
  try {
    assert.throws(() => native.fallocate(a, native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE, 0, 4096),
      (e: unknown) => isNativeError(e) && e.syscall === 'fallocate' && typeof e.errno === 'number');
    assert.throws(() => native.fallocate(a, 0x40, 0, 1), (e: unknown) => isNativeError(e, 'ERR_OUT_OF_RANGE'));
  } finally {
    native.close(a);
    native.close(b);
  }
});
