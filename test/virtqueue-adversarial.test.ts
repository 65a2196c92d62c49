// A hostile driver hands the device side broken rings. Each must be refused with its
// specific typed error, the queue must stay broken (sticky) without throwing, and no
// byte outside guest memory may be touched.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SplitDeviceQueue } from '../src/virtqueue/split-device.js';
import { ChainError, type ChainErrorCode } from '../src/virtqueue/chain.js';
import { RawRing } from '../src/virtqueue/testing.js';
import { VIRTQ_DESC_F } from '../src/spec/split-ring.js';

const { NEXT, WRITE, INDIRECT } = VIRTQ_DESC_F;

function expectBroken(r: RawRing, code: ChainErrorCode): void {
  const q = SplitDeviceQueue.create(r.memory, r.config);
  assert.ok(q instanceof SplitDeviceQueue);
  const first = q.pop();
  assert.ok(first instanceof ChainError, `expected ${code}, got ${JSON.stringify(first)}`);
  assert.equal(first.code, code);
  assert.equal(q.broken, first);
  assert.equal(q.pop(), first, 'broken is sticky');
  assert.equal(q.pending(), 0);
  assert.equal(r.usedIdx(), 0, 'nothing was completed');
  assert.ok(r.guardsIntact(), 'no byte outside guest memory changed');
}

test('a descriptor loop', () => {
  const r = new RawRing(8);
  r.desc(0, r.dataBase, 16, NEXT, 1);
  r.desc(1, r.dataBase, 16, NEXT, 2);
  r.desc(2, r.dataBase, 16, NEXT, 0);
  r.publish(0);
  expectBroken(r, 'CHAIN_LOOP');
});

test('a loop inside an indirect table', () => {
  const r = new RawRing(8, { indirect: true });
  const t = r.dataBase;
  r.desc(0, r.dataBase + 4096, 16, NEXT, 1, t);
  r.desc(1, r.dataBase + 4096, 16, NEXT, 0, t);
  r.desc(0, t, 32, INDIRECT);
  r.publish(0);
  expectBroken(r, 'CHAIN_LOOP');
});

test('next out of range', () => {
  const r = new RawRing(8);
  r.desc(0, r.dataBase, 16, NEXT, 8);
  r.publish(0);
  expectBroken(r, 'NEXT_OUT_OF_RANGE');
});

test('a head out of range', () => {
  const r = new RawRing(8);
  r.publish(9);
  expectBroken(r, 'HEAD_OUT_OF_RANGE');
});

test('an address reaching outside every region', () => {
  const r = new RawRing(8);
  r.desc(0, r.regionEnd - 8, 16, WRITE);
  r.publish(0);
  expectBroken(r, 'OUT_OF_BOUNDS');
});

test('an address beyond 2^53', () => {
  const r = new RawRing(8);
  r.desc(0, 2 ** 60, 16, WRITE);
  r.publish(0);
  expectBroken(r, 'OUT_OF_BOUNDS');
});

test('a length reaching outside every region', () => {
  const r = new RawRing(8);
  r.desc(0, r.dataBase, 0xffff_ffff, WRITE);
  r.publish(0);
  expectBroken(r, 'OUT_OF_BOUNDS');
});

test('an indirect table outside memory', () => {
  const r = new RawRing(8, { indirect: true });
  r.desc(0, r.regionEnd, 32, INDIRECT);
  r.publish(0);
  expectBroken(r, 'OUT_OF_BOUNDS');
});

test('a nested indirect table', () => {
  const r = new RawRing(8, { indirect: true });
  const t = r.dataBase;
  r.desc(0, r.dataBase + 4096, 16, INDIRECT, 0, t);
  r.desc(0, t, 16, INDIRECT);
  r.publish(0);
  expectBroken(r, 'INDIRECT_NESTED');
});

test('INDIRECT combined with NEXT', () => {
  const r = new RawRing(8, { indirect: true });
  r.desc(0, r.dataBase, 16, INDIRECT | NEXT, 1);
  r.desc(1, r.dataBase, 16, WRITE);
  r.publish(0);
  expectBroken(r, 'INDIRECT_WITH_NEXT');
});

test('an indirect table whose length is not a multiple of 16', () => {
  const r = new RawRing(8, { indirect: true });
  r.desc(0, r.dataBase, 24, INDIRECT);
  r.publish(0);
  expectBroken(r, 'INDIRECT_BAD_LENGTH');
});

test('an indirect table of length zero', () => {
  const r = new RawRing(8, { indirect: true });
  r.desc(0, r.dataBase, 0, INDIRECT);
  r.publish(0);
  expectBroken(r, 'INDIRECT_BAD_LENGTH');
});

test('an indirect descriptor when INDIRECT_DESC was not negotiated', () => {
  const r = new RawRing(8);
  r.desc(0, r.dataBase, 16, INDIRECT);
  r.publish(0);
  expectBroken(r, 'INDIRECT_NOT_NEGOTIATED');
});

test('a writable descriptor before a readable one', () => {
  const r = new RawRing(8);
  r.desc(0, r.dataBase, 16, WRITE | NEXT, 1);
  r.desc(1, r.dataBase + 16, 16, 0);
  r.publish(0);
  expectBroken(r, 'READABLE_AFTER_WRITABLE');
});

test('a writable before a readable one inside an indirect table', () => {
  const r = new RawRing(8, { indirect: true });
  const t = r.dataBase;
  r.desc(0, r.dataBase + 4096, 16, WRITE | NEXT, 1, t);
  r.desc(1, r.dataBase + 4096, 16, 0, 0, t);
  r.desc(0, t, 32, INDIRECT);
  r.publish(0);
  expectBroken(r, 'READABLE_AFTER_WRITABLE');
});

test('an avail index that jumps by more than the queue size', () => {
  const r = new RawRing(8);
  r.desc(0, r.dataBase, 16, WRITE);
  r.setAvailIdx(9);
  expectBroken(r, 'AVAIL_INDEX_JUMP');
});

test('a chain describing more than 4 GiB (the used length is a u32)', () => {
  // Descriptors may all point at the same memory: 4097 × 1 MiB passes 2^32 bytes.
  const r = new RawRing(8192, { regionSize: 4 << 20 });
  const n = 4097;
  for (let i = 0; i < n; i++) r.desc(i, r.dataBase, 1 << 20, WRITE | (i < n - 1 ? NEXT : 0), i + 1);
  r.publish(0);
  expectBroken(r, 'CHAIN_TOO_LARGE');
});

test('a broken queue does not disturb another queue on the same memory', () => {
  const r = new RawRing(8);
  r.desc(0, r.dataBase, 16, NEXT, 0);
  r.publish(0);
  const broken = SplitDeviceQueue.create(r.memory, r.config) as SplitDeviceQueue;
  assert.ok(broken.pop() instanceof ChainError);
  const good = new RawRing(8);
  good.desc(0, good.dataBase, 16, WRITE);
  good.publish(0);
  const q = SplitDeviceQueue.create(good.memory, good.config) as SplitDeviceQueue;
  const c = q.pop();
  assert.ok(c && !(c instanceof ChainError));
});
