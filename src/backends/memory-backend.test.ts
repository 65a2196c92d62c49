// The memory backend's own promises: memory grows with what is written, never with the
// disk size; discard and unmapping write-zeroes give whole chunks back. (The shared
// behaviour is in the compliance suite, src/testing/backend-compliance.ts.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MEMORY_CHUNK_SIZE, MemoryBackend } from './memory-backend.js';

const SIZE = 4 * MEMORY_CHUNK_SIZE;

test('a 1 TiB disk costs nothing until written', () => {
  const b = new MemoryBackend({ size: 2 ** 40 });
  assert.equal(b.allocatedBytes, 0);
  const out = new Uint8Array(4096).fill(1);
  b.read(2 ** 40 - 4096, [out]);
  assert.deepEqual(out, new Uint8Array(4096));
  assert.equal(b.allocatedBytes, 0);
  b.write(2 ** 39, [new Uint8Array(4096).fill(2)]);
  assert.equal(b.allocatedBytes, MEMORY_CHUNK_SIZE);
});

test('discard and write-zeroes with unmap free whole chunks; without unmap they keep them', () => {
  const b = new MemoryBackend({ size: SIZE });
  b.write(0, [new Uint8Array(SIZE).fill(3)]);
  assert.equal(b.allocatedBytes, SIZE);
  b.writeZeroes(0, MEMORY_CHUNK_SIZE, false);
  assert.equal(b.allocatedBytes, SIZE);
  b.discard(512, MEMORY_CHUNK_SIZE * 2);
  assert.equal(b.allocatedBytes, SIZE - MEMORY_CHUNK_SIZE, 'only the chunk covered whole is freed');
  b.writeZeroes(MEMORY_CHUNK_SIZE * 2, MEMORY_CHUNK_SIZE * 2, true);
  assert.equal(b.allocatedBytes, SIZE - 3 * MEMORY_CHUNK_SIZE);
});

test('sizes that are not a positive multiple of 512 are refused', () => {
  for (const size of [0, 100, 513, -512, 2 ** 53 + 512]) {
    assert.throws(() => new MemoryBackend({ size }), { code: 'BAD_SIZE' });
  }
});

test('a chunk given back and handed out again reads as zeroes where it is not written', () => {
  const b = new MemoryBackend({ size: SIZE });
  b.write(0, [new Uint8Array(MEMORY_CHUNK_SIZE).fill(0xee)]);
  b.discard(0, MEMORY_CHUNK_SIZE);
  // The next chunk to exist reuses that memory: only the 512 bytes written may show.
  b.write(MEMORY_CHUNK_SIZE + 4096, [new Uint8Array(512).fill(7)]);
  const out = new Uint8Array(MEMORY_CHUNK_SIZE);
  b.read(MEMORY_CHUNK_SIZE, [out]);
  const expected = new Uint8Array(MEMORY_CHUNK_SIZE);
  expected.fill(7, 4096, 4096 + 512);
  assert.deepEqual(out, expected);
  assert.equal(b.allocatedBytes, MEMORY_CHUNK_SIZE);
});

test('chunks from many slabs keep their own data through discards and rewrites', () => {
  // 100 chunks span several slabs (4, 4, 8, 16, 32, 64 chunks); every other one is
  // discarded and written again with new data, reusing the returned chunks.
  const chunks = 100;
  const b = new MemoryBackend({ size: chunks * MEMORY_CHUNK_SIZE });
  const fill = (i: number, round: number): Uint8Array => new Uint8Array(MEMORY_CHUNK_SIZE).fill((i * 7 + round) & 0xff);
  for (let i = 0; i < chunks; i++) b.write(i * MEMORY_CHUNK_SIZE, [fill(i, 0)]);
  for (let i = 0; i < chunks; i += 2) b.discard(i * MEMORY_CHUNK_SIZE, MEMORY_CHUNK_SIZE);
  assert.equal(b.allocatedBytes, (chunks / 2) * MEMORY_CHUNK_SIZE);
  for (let i = 0; i < chunks; i += 2) b.write(i * MEMORY_CHUNK_SIZE, [fill(i, 1)]);
  const out = new Uint8Array(MEMORY_CHUNK_SIZE);
  for (let i = 0; i < chunks; i++) {
    b.read(i * MEMORY_CHUNK_SIZE, [out]);
    assert.deepEqual(out, fill(i, i % 2 === 0 ? 1 : 0), `chunk ${i}`);
  }
  // Everything discarded, then written again from scratch.
  b.discard(0, chunks * MEMORY_CHUNK_SIZE);
  assert.equal(b.allocatedBytes, 0);
  b.write(3 * MEMORY_CHUNK_SIZE, [new Uint8Array(4096).fill(9)]);
  b.read(3 * MEMORY_CHUNK_SIZE, [out]);
  const expected = new Uint8Array(MEMORY_CHUNK_SIZE).fill(9, 0, 4096);
  assert.deepEqual(out, expected);
});

test('extents: written chunks are data, the rest holes, runs merged and clipped to the range', () => {
  const b = new MemoryBackend({ size: 2 ** 40 });
  assert.deepEqual(b.extents(0, 2 ** 40), [{ length: 2 ** 40, kind: 'hole' }]);
  b.write(MEMORY_CHUNK_SIZE + 512, [new Uint8Array(512).fill(1)]);
  b.write(2 * MEMORY_CHUNK_SIZE, [new Uint8Array(512).fill(1)]);
  b.write(2 ** 39, [new Uint8Array(512).fill(1)]);
  assert.deepEqual(b.extents(512, 4 * MEMORY_CHUNK_SIZE), [
    { length: MEMORY_CHUNK_SIZE - 512, kind: 'hole' },
    { length: 2 * MEMORY_CHUNK_SIZE, kind: 'data' },
    { length: MEMORY_CHUNK_SIZE + 512, kind: 'hole' },
  ]);
  assert.deepEqual(b.extents(0, 2 ** 40).map((e) => e.kind), ['hole', 'data', 'hole', 'data', 'hole']);
  b.discard(MEMORY_CHUNK_SIZE, 2 * MEMORY_CHUNK_SIZE);
  assert.deepEqual(b.extents(0, 2 ** 39), [{ length: 2 ** 39, kind: 'hole' }]);
  assert.throws(() => b.extents(2 ** 40, 512), { code: 'OUT_OF_RANGE' });
});
