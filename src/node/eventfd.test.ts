import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as native from './native.js';
import { isNativeError } from './native.js';
import { EventFd } from './eventfd.js';

test('writes add up and a read takes the whole count; an empty read returns 0 (EAGAIN)', () => {
  const e = EventFd.create();
  try {
    assert.equal(e.read(), 0);
    e.write();
    e.write(2);
    e.write(40);
    assert.equal(e.read(), 43);
    assert.equal(e.read(), 0);
  } finally {
    e.close();
  }
});

test('the initial count is readable at once', () => {
  const e = EventFd.create(7);
  assert.equal(e.read(), 7);
  e.close();
});

test('writing past the counter\'s limit fails with EAGAIN rather than blocking', () => {
  const e = EventFd.create();
  try {
    // The counter holds at most 2^64 - 2: 2^53 - 1 written 2049 times overflows it.
    assert.throws(() => {
      for (let i = 0; i < 4096; i++) e.write(Number.MAX_SAFE_INTEGER);
    }, (err: unknown) => isNativeError(err, 'EAGAIN'));
  } finally {
    e.close();
  }
});

test('watch calls back with the drained count, coalescing writes made before the loop turns', async () => {
  const e = EventFd.create();
  const counts: number[] = [];
  let wake: () => void = () => {};
  e.watch((count) => {
    counts.push(count);
    wake();
  });
  e.write();
  e.write();
  e.write(3);
  await new Promise<void>((resolve) => { wake = resolve; });
  assert.deepEqual(counts, [5]);
  e.write(1);
  await new Promise<void>((resolve) => { wake = resolve; });
  assert.deepEqual(counts, [5, 1]);
  e.close();
});

test('one watcher per eventfd; a stopped watcher can be replaced', () => {
  const e = EventFd.create();
  const w = e.watch(() => {});
  assert.throws(() => e.watch(() => {}), (err: unknown) => isNativeError(err, 'ALREADY_WATCHED'));
  w.stop();
  e.watch(() => {});
  e.close();
});

test('use after close throws CLOSED; close is idempotent', () => {
  const e = EventFd.create();
  e.close();
  e.close();
  assert.equal(e.isClosed, true);
  assert.throws(() => e.read(), (err: unknown) => isNativeError(err, 'CLOSED'));
  assert.throws(() => e.write(), (err: unknown) => isNativeError(err, 'CLOSED'));
});

test('adopt takes a received eventfd and refuses anything else', () => {
  const raw = native.eventfd();
  const e = EventFd.adopt(raw);
  e.write(2);
  assert.equal(native.eventfdRead(raw), 2);
  e.close();

  const memfd = native.memfdCreate('not-an-eventfd', 16);
  assert.throws(() => EventFd.adopt(memfd), (err: unknown) => isNativeError(err, 'NOT_AN_EVENTFD'));
  native.close(memfd);
  assert.throws(() => EventFd.adopt(memfd), (err: unknown) => isNativeError(err, 'NOT_AN_EVENTFD'));
});

test('eventfdRead on an fd that is not an eventfd throws EINVAL', () => {
  const [a, b] = native.socketpair();
  native.sendmsg(a, new Uint8Array(3));
  assert.throws(() => native.eventfdRead(b), (err: unknown) => isNativeError(err, 'EINVAL') && /not an eventfd/.test(err.message));
  native.close(a);
  native.close(b);
});
