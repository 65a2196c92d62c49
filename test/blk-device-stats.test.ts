// Request statistics (what `--metrics` and `vblk stats` report) count exactly what the
// device completed: by type and status, the data bytes, one latency per request.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { LATENCY_BUCKETS, QueueStats, STAT_STATUSES, STAT_TYPES, requestCount, type QueueStatsSnapshot } from '../src/blk/stats.js';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { rig } from './blk-driver-harness.js';

const total = (snaps: readonly QueueStatsSnapshot[], type: (typeof STAT_TYPES)[number], status?: (typeof STAT_STATUSES)[number]) =>
  snaps.reduce((n, s) => n + requestCount(s, type, status), 0);

test('a driver\'s reads, writes, flushes, discards and GET_ID are counted by type, with their bytes and latencies', async () => {
  // A clock that moves 1 ms at every read: each request then takes a measurable time.
  let clock = 0;
  const r = await rig({ size: 1 << 20, device: { numQueues: 2, statsClock: () => clock++ } });
  try {
    assert.ok(r.device.stats);
    const before = r.device.stats.map((s) => s.snapshot());
    await r.driver.write(0, [new Uint8Array(4096).fill(7)]);
    await Promise.all(Array.from({ length: 10 }, (_, i) => r.driver.read(i * 8, [new Uint8Array(4096)])));
    await r.driver.read(64, [new Uint8Array(512)]);
    await r.driver.flush();
    await r.driver.discard([{ sector: 128, sectors: 8 }]);
    await r.driver.getId();
    const after = r.device.stats.map((s) => s.snapshot());
    const delta = (type: (typeof STAT_TYPES)[number]) => total(after, type, 'ok') - total(before, type, 'ok');
    assert.equal(delta('write'), 1);
    assert.equal(delta('read'), 11);
    assert.equal(delta('flush'), 1);
    assert.equal(delta('discard'), 1);
    assert.equal(delta('get_id'), 1);
    const sum = (f: (s: QueueStatsSnapshot) => number) => after.reduce((n, s) => n + f(s), 0) - before.reduce((n, s) => n + f(s), 0);
    assert.equal(sum((s) => s.bytesRead), 10 * 4096 + 512);
    assert.equal(sum((s) => s.bytesWritten), 4096);
    const requests = sum((s) => s.requests.reduce((a, b) => a + b, 0));
    assert.equal(sum((s) => s.latencyBuckets.reduce((a, b) => a + b, 0)), requests, 'one latency per completed request');
    assert.ok(sum((s) => s.latencySum) >= requests * 0.001, 'every request took at least one tick of the clock');
    assert.equal(sum((s) => s.inFlight), 0);
  } finally {
    await r.close();
  }
});

test('an unsupported request type and a failed request count under their status', () => {
  const s = new QueueStats(() => 0);
  s.completed(99, VIRTIO_BLK_S.UNSUPP, 0, 0);
  s.completed(VIRTIO_BLK_T.OUT, VIRTIO_BLK_S.IOERR, 4096, 0);
  s.published(0);
  const snap = s.snapshot();
  assert.equal(requestCount(snap, 'unsupported', 'unsupp'), 1);
  assert.equal(requestCount(snap, 'write', 'ioerr'), 1);
  assert.equal(snap.bytesWritten, 0, 'a failed write moved no bytes');
});

test('latencies land in the bucket of their duration; the histogram counts every published completion once', () => {
  fc.assert(fc.property(fc.array(fc.tuple(
    // A few repeated durations: requests of one batch share their start, and are counted as one run.
    fc.oneof(fc.double({ min: 0, max: 20_000, noNaN: true }), fc.constantFrom(0, 0.0005, 3, 3000)), fc.boolean()), { maxLength: 300 }), (reqs) => {
    let now = 0;
    const s = new QueueStats(() => now);
    let expectedSum = 0;
    const expected = new Array<number>(LATENCY_BUCKETS.length + 1).fill(0);
    for (const [ms, publishNow] of reqs) {
      now = 1000;
      s.completed(VIRTIO_BLK_T.IN, VIRTIO_BLK_S.OK, 512, now - ms);
      const seconds = ms / 1000;
      const b = LATENCY_BUCKETS.findIndex((bound) => seconds <= bound);
      expected[b < 0 ? LATENCY_BUCKETS.length : b]++;
      expectedSum += seconds;
      if (publishNow) s.published(now);
    }
    s.published(now);
    const snap = s.snapshot();
    assert.deepEqual(snap.latencyBuckets, expected);
    assert.ok(Math.abs(snap.latencySum - expectedSum) < 1e-6 * Math.max(1, expectedSum));
  }));
});
