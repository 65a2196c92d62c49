import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { isAligned } from './align.js';

test('isAligned agrees with % for every safe non-negative integer and power of two up to 2^31', () => {
  fc.assert(fc.property(fc.maxSafeNat(), fc.integer({ min: 0, max: 31 }), (n, k) => {
    assert.equal(isAligned(n, 2 ** k), n % 2 ** k === 0);
  }), { numRuns: 20_000 });
  // Above 2^32 only the low bits decide.
  assert.equal(isAligned(2 ** 40 + 4096, 4096), true);
  assert.equal(isAligned(2 ** 40 + 512, 4096), false);
  assert.equal(isAligned(Number.MAX_SAFE_INTEGER, 1), true);
  assert.equal(isAligned(Number.MAX_SAFE_INTEGER, 2), false);
});
