import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  availEventOffset, availRingSize, contiguousRingLayout, descTableSize, isValidQueueSize, usedEventOffset, usedRingSize,
  vringNeedEvent,
} from './split-ring.js';

test('ring part sizes follow VIRTIO 1.2 2.7', () => {
  assert.equal(descTableSize(256), 4096);
  assert.equal(availRingSize(256), 6 + 512);
  assert.equal(usedRingSize(256), 6 + 2048);
  assert.equal(usedEventOffset(256), 4 + 512);
  assert.equal(availEventOffset(256), 4 + 2048);
});

test('queue sizes are powers of two up to 32768', () => {
  for (const n of [1, 2, 4, 128, 256, 32768]) assert.equal(isValidQueueSize(n), true, String(n));
  for (const n of [0, 3, 100, 65536, -2, 1.5]) assert.equal(isValidQueueSize(n), false, String(n));
});

test('a contiguous layout aligns each part', () => {
  for (let n = 1; n <= 32768; n *= 2) {
    const l = contiguousRingLayout(n);
    assert.equal(l.desc % 16, 0);
    assert.equal(l.avail % 2, 0);
    assert.equal(l.used % 4, 0);
    assert.ok(l.used >= l.avail + availRingSize(n));
  }
});

test('vringNeedEvent is true exactly when the event index was crossed, across wrap-around', () => {
  fc.assert(fc.property(fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 0, max: 0xffff }), fc.integer({ min: 1, max: 0x7fff }),
    (old, event, step) => {
      const next = (old + step) & 0xffff;
      // Crossed: event lies in [old, next) going forward from old.
      const crossed = ((event - old) & 0xffff) < step;
      assert.equal(vringNeedEvent(event, next, old), crossed);
    }));
  assert.equal(vringNeedEvent(0, 1, 0), true);
  assert.equal(vringNeedEvent(1, 1, 0), false);
  assert.equal(vringNeedEvent(0xffff, 0, 0xffff), true);
});
