import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DiskIndexAllocator, DiskIndexError, MAX_DISKS, diskName } from './naming.js';

test('disk names follow the seed: one, two, then three letters', () => {
  assert.equal(diskName(0), 'vda');
  assert.equal(diskName(25), 'vdz');
  assert.equal(diskName(26), 'vdaa');
  assert.equal(diskName(27), 'vdab');
  assert.equal(diskName(701), 'vdzz');
  assert.equal(diskName(702), 'vdaaa');
  assert.equal(diskName(18277), 'vdzzz');
});

test('every index names a distinct disk', () => {
  const names = new Set<string>();
  for (let i = 0; i < MAX_DISKS; i++) names.add(diskName(i));
  assert.equal(names.size, MAX_DISKS);
  for (const n of names) assert.match(n, /^vd[a-z]{1,3}$/);
});

test('indexes past vdzzz and non-integers are refused', () => {
  assert.throws(() => diskName(MAX_DISKS), DiskIndexError);
  assert.throws(() => diskName(-1), DiskIndexError);
  assert.throws(() => diskName(1.5), DiskIndexError);
});

test('the allocator hands out the lowest free index and reuses freed ones', () => {
  const a = new DiskIndexAllocator();
  assert.equal(a.allocate(), 0);
  assert.equal(a.allocate(), 1);
  assert.equal(a.allocate(), 2);
  a.release(1);
  assert.equal(a.has(1), false);
  assert.equal(a.allocate(), 1);
  assert.equal(a.allocate(), 3);
});
