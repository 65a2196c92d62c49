import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FALLBACK_HEADS, FALLBACK_SECTORS, diskGeometry } from './geometry.js';

test('without GEOMETRY the seed falls back to 64 heads, 32 sectors, capacity >> 11 cylinders', () => {
  assert.deepEqual(diskGeometry(null, 2_097_152), { heads: 64, sectors: 32, cylinders: 1024 });
  assert.equal(FALLBACK_HEADS * FALLBACK_SECTORS, 2048);
  assert.deepEqual(diskGeometry(null, 2047), { heads: 64, sectors: 32, cylinders: 0 });
});

test('fallback cylinders do not wrap for capacities above 2^32 sectors', () => {
  const capacity = 2 ** 40 + 4096;
  assert.equal(diskGeometry(null, capacity).cylinders, 2 ** 29 + 2);
});

test('the device geometry is reported as given when negotiated', () => {
  assert.deepEqual(diskGeometry({ cylinders: 1000, heads: 16, sectors: 63 }, 1), { cylinders: 1000, heads: 16, sectors: 63 });
});
