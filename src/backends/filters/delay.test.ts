// The delay filter on a clock the test moves: each kind of operation reaches the layer
// below exactly its delay after it was asked for, no sooner; no delay is no wait at all.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ManualClock } from '../../testing/manual-clock.js';
import type { BackendResult } from '../backend.js';
import { MemoryBackend } from '../memory-backend.js';
import { DelayFilter } from './delay.js';
import { FilterBackend } from './filter.js';

/** Records when each operation reaches it. */
class Recorder extends FilterBackend {
  readonly seen: [string, number][] = [];
  constructor(private readonly clock: ManualClock) {
    super(new MemoryBackend({ size: 1 << 20 }));
  }
  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    this.seen.push(['read', this.clock.now()]);
    return this.inner.read(offset, buffers);
  }
  override write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    this.seen.push(['write', this.clock.now()]);
    return this.inner.write(offset, buffers);
  }
  override flush(): BackendResult {
    this.seen.push(['flush', this.clock.now()]);
    return this.inner.flush();
  }
}

test('reads and writes wait their own delays, then run', async () => {
  const clock = new ManualClock();
  const below = new Recorder(clock);
  const delay = new DelayFilter(below, { read: 10, write: 25 }, clock);
  const data = new Uint8Array(512).fill(7);
  const w = delay.write(0, [data]);
  const back = new Uint8Array(512);
  const r = delay.read(0, [back]);
  assert.ok(w instanceof Promise && r instanceof Promise);
  await clock.advance(9.9);
  assert.deepEqual(below.seen, []);
  await clock.advance(0.1);
  assert.deepEqual(below.seen, [['read', 10]]);
  await r;
  assert.deepEqual(back, new Uint8Array(512), 'the read ran before the write, as the delays say');
  await clock.advance(15);
  await w;
  assert.deepEqual(below.seen, [['read', 10], ['write', 25]]);
});

test('an operation without a delay passes straight through, synchronously', () => {
  const clock = new ManualClock();
  const below = new Recorder(clock);
  const delay = new DelayFilter(below, { read: 5 }, clock);
  assert.equal(delay.flush(), undefined);
  assert.equal(delay.write(0, [new Uint8Array(512)]), undefined);
  assert.equal(clock.pending, 0);
  assert.deepEqual(below.seen, [['flush', 0], ['write', 0]]);
});

test('a failure below reaches the caller after the delay', async () => {
  const clock = new ManualClock();
  const delay = new DelayFilter(new MemoryBackend({ size: 1 << 20 }), { read: 3 }, clock);
  const r = delay.read(1 << 20, [new Uint8Array(512)]) as Promise<void>;
  const seen = assert.rejects(r, { code: 'OUT_OF_RANGE' });
  await clock.advance(3);
  await seen;
});

test('a delay that is not a number of milliseconds from 0 is refused', () => {
  assert.throws(() => new DelayFilter(new MemoryBackend({ size: 1 << 20 }), { write: -1 }), RangeError);
  assert.throws(() => new DelayFilter(new MemoryBackend({ size: 1 << 20 }), { zero: Number.NaN }), RangeError);
});
