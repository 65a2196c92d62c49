import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SplitDeviceQueue } from './split-device.js';
import { ChainError, type DescriptorChain } from './chain.js';
import { inflightQueueBytes } from './inflight.js';
import { RawRing } from './testing.js';
import { VIRTQ_DESC_F } from '../spec/split-ring.js';

function ring(n: number): RawRing {
  const r = new RawRing(8);
  for (let h = 0; h < n; h++) {
    r.desc(h, r.dataBase + h * 64, 64, VIRTQ_DESC_F.WRITE);
    r.publish(h);
  }
  return r;
}

function start(r: RawRing, log: Uint8Array, base = 0): { q: SplitDeviceQueue; resubmit: number[] } {
  const q = SplitDeviceQueue.create(r.memory, r.config);
  assert.ok(q instanceof SplitDeviceQueue);
  q.nextAvail = base;
  return { q, resubmit: q.attachInflight(log).resubmit };
}

function popHead(q: SplitDeviceQueue): number {
  const c = q.pop();
  assert.ok(c && !(c instanceof ChainError));
  return (c as DescriptorChain).head;
}

test('a fresh log resubmits nothing and keeps the vring base', () => {
  const r = ring(2);
  const { q, resubmit } = start(r, new Uint8Array(inflightQueueBytes(8)));
  assert.deepEqual(resubmit, []);
  assert.equal(q.nextAvail, 0);
  assert.equal(popHead(q), 0);
});

test('chains taken but not completed by a dead backend come out again, oldest first, then new ones', () => {
  const r = ring(4);
  const log = new Uint8Array(inflightQueueBytes(8));
  const first = start(r, log).q;
  const heads = [popHead(first), popHead(first), popHead(first)];
  assert.deepEqual(heads, [0, 1, 2]);
  first.pushUsed(1, 7);
  first.publishUsed();
  // The backend dies here with heads 0 and 2 in flight; the frontend restarts the ring at used.idx.
  const second = start(r, log, r.usedIdx());
  assert.deepEqual(second.resubmit, [0, 2]);
  assert.equal(second.q.nextAvail, 3, 'used.idx 1 + 2 in flight');
  assert.deepEqual([popHead(second.q), popHead(second.q), popHead(second.q)], [0, 2, 3]);
  assert.equal(second.q.pop(), null);
});

test('completions published just before the crash are not resubmitted (the used ring is read back)', () => {
  const r = ring(3);
  const log = new Uint8Array(inflightQueueBytes(8));
  const q = start(r, log).q;
  popHead(q);
  popHead(q);
  popHead(q);
  q.pushUsed(2, 1);
  q.pushUsed(0, 1);
  q.publishUsed();
  // Simulate a crash between the used.idx store and the log update: put the log's view back.
  const view = new DataView(log.buffer);
  view.setUint8(16 + 2 * 16, 1);
  view.setUint8(16 + 0 * 16, 1);
  view.setUint16(14, 0, true);
  const again = start(r, log, r.usedIdx());
  assert.deepEqual(again.resubmit, [1]);
  assert.equal(again.q.nextAvail, 3);
});

test('a log that does not fit the queue is discarded, not trusted', () => {
  const r = ring(1);
  const log = new Uint8Array(inflightQueueBytes(8));
  const view = new DataView(log.buffer);
  view.setUint16(8, 1, true); // version 1
  view.setUint16(10, 4, true); // for a queue of 4
  view.setUint8(16, 1);
  const q = SplitDeviceQueue.create(r.memory, r.config) as SplitDeviceQueue;
  const rec = q.attachInflight(log);
  assert.deepEqual(rec.resubmit, []);
  assert.match(rec.discarded ?? '', /does not fit/);
});
