// The memory backend's own promises: memory grows with what is written, never with the
// disk size; discard and unmapping write-zeroes give whole chunks back. (The shared
// behaviour is in test/backend-compliance.test.ts.)
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
