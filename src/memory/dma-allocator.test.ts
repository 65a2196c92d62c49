import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { DmaAllocator, powerOfTwo } from './dma-allocator.js';
import { UsageError } from '../errors.js';

test('blocks are naturally aligned, disjoint and inside the arena', () => {
  fc.assert(fc.property(fc.array(fc.integer({ min: 1, max: 20000 }), { maxLength: 60 }), (sizes) => {
    const a = new DmaAllocator(0x10000, 1 << 20);
    const blocks: [number, number][] = [];
    for (const s of sizes) {
      const addr = a.alloc(s);
      if (addr < 0) continue;
      const size = a.blockSize(addr);
      assert.ok(size >= s);
      assert.equal((addr - 0x10000) % size, 0, 'naturally aligned');
      assert.ok(addr >= 0x10000 && addr + size <= 0x10000 + (1 << 20));
      for (const [b, bs] of blocks) assert.ok(addr + size <= b || b + bs <= addr, 'disjoint');
      blocks.push([addr, size]);
    }
  }));
});

test('freeing everything merges back to one arena-sized block', () => {
  fc.assert(fc.property(fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 40 }), fc.integer(), (sizes, seed) => {
    const a = new DmaAllocator(0, 1 << 18);
    const addrs = sizes.map((s) => a.alloc(s)).filter((x) => x >= 0);
    // Free in a shuffled order.
    addrs.sort((x, y) => ((x * 2654435761) ^ seed) % 97 - ((y * 2654435761) ^ seed) % 97);
    for (const x of addrs) a.release(x);
    assert.equal(a.available, 1 << 18);
    assert.equal(a.alloc(1 << 18), 0);
  }));
});

test('exhaustion returns -1 and double free is a usage error', () => {
  const a = new DmaAllocator(0, 4096, 1024);
  const xs = [a.alloc(1000), a.alloc(1000), a.alloc(1000), a.alloc(1000)];
  assert.ok(xs.every((x) => x >= 0));
  assert.equal(a.alloc(1), -1);
  assert.equal(a.alloc(8192), -1);
  a.release(xs[0]);
  assert.throws(() => a.release(xs[0]), (e) => e instanceof UsageError && e.code === 'NOT_ALLOCATED');
});

test('powerOfTwo is exact on both sides of the 32-bit boundary', () => {
  for (let order = 0; order <= 52; order++) assert.equal(powerOfTwo(order), 2 ** order, `order ${order}`);
});

test('an arena above 4 GiB hands out blocks past 2^32', () => {
  const a = new DmaAllocator(2 ** 33, 2 ** 33, 2 ** 31);
  const first = a.alloc(2 ** 32);
  const second = a.alloc(2 ** 32);
  assert.deepEqual([first, second].sort((x, y) => x - y), [2 ** 33, 2 ** 33 + 2 ** 32]);
  assert.equal(a.blockSize(first), 2 ** 32);
  assert.equal(a.alloc(1), -1);
  a.release(first);
  a.release(second);
  assert.equal(a.available, 2 ** 33);
  assert.equal(a.alloc(2 ** 33), 2 ** 33);
});
