// Config changes, remove, freeze/restore, timeouts and a device that breaks the ring's rules.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newSizeMessage, type ResizeEvent } from '../src/blk/driver.js';
import { QueueBrokenError, RequestError, TimeoutError } from '../src/blk/driver-errors.js';
import { VIRTIO_BLK_F, VIRTIO_BLK_S } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, features } from '../src/spec/virtio.js';
import type { BlkDriver } from '../src/blk/driver.js';
import { ScriptedDevice, pattern, rig, scriptedRig } from './blk-driver-harness.js';
import { waitUntil, within } from './support/wait.js';

function nextResize(driver: BlkDriver): Promise<ResizeEvent> {
  return new Promise((resolve) => {
    const off = driver.on('resize', (e) => {
      off();
      resolve(e);
    });
  });
}

test('the "new size" line is the seed\'s, with string_get_size sizes', () => {
  assert.equal(newSizeMessage(2_097_152, 512), 'new size: 2097152 512-byte logical blocks (1.07 GB/1.00 GiB)');
  assert.equal(newSizeMessage(4096, 512), 'new size: 4096 512-byte logical blocks (2.09 MB/2.00 MiB)');
  // 4 KiB blocks: the count is of logical blocks and the size is true (the seed overstated it 8×).
  assert.equal(newSizeMessage(2_097_152, 4096), 'new size: 262144 4096-byte logical blocks (1.07 GB/1.00 GiB)');
});

test('a config change re-reads capacity, emits resize and logs the seed\'s notice', async () => {
  const r = await rig({ size: 1 << 20 });
  try {
    const resized = nextResize(r.driver);
    await r.device.resize(1 << 30);
    assert.deepEqual(await resized, { capacity: 2_097_152, previousCapacity: 2048 });
    assert.equal(r.driver.capacity, 2_097_152);
    assert.deepEqual(r.log, [{ level: 'notice', disk: r.driver.name, message: 'new size: 2097152 512-byte logical blocks (1.07 GB/1.00 GiB)' }]);
    // The new space is usable.
    await r.driver.write(2_097_144, [pattern(4096, 1)]);
  } finally {
    await r.close();
  }
});

test('remove lets requests in flight complete, then refuses new ones and frees the index', async () => {
  const r = await rig({ size: 1 << 20 });
  const data = pattern(1 << 20, 5);
  await r.driver.write(0, [data]);
  const bufs = Array.from({ length: 32 }, () => new Uint8Array(4096));
  const reads = bufs.map((b, i) => r.driver.read(i * 8, [b]));
  const removed = r.driver.remove();
  await assert.rejects(r.driver.read(0, [new Uint8Array(512)]), (e) => e instanceof RequestError && e.code === 'DISK_REMOVED');
  await Promise.all(reads);
  await removed;
  bufs.forEach((b, i) => assert.deepEqual(b, data.subarray(i * 4096, (i + 1) * 4096)));
  assert.equal(await r.transport.getStatus(), 0, 'the device was reset');
  await assert.rejects(r.driver.flush(), { code: 'DISK_REMOVED' });
  const next = await rig();
  assert.equal(next.driver.index, r.driver.index);
  await next.close();
  await r.transport.close();
});

test('freeze holds new requests, restore sends them: none lost, data right', async () => {
  const r = await rig({ size: 1 << 20, device: { queueSize: 8 } });
  try {
    // More than the ring holds: some are on the ring, the rest wait in software.
    const early = Array.from({ length: 16 }, (_, i) => r.driver.write(i * 8, [pattern(4096, i)]));
    const frozen = r.driver.freeze();
    const held = Array.from({ length: 16 }, (_, i) => r.driver.write((16 + i) * 8, [pattern(4096, 16 + i)]));
    await frozen;
    assert.equal(await r.transport.getStatus(), 0, 'frozen: the device is reset');
    const more = Array.from({ length: 8 }, (_, i) => r.driver.write((32 + i) * 8, [pattern(4096, 32 + i)]));
    let completed = 0;
    for (const p of [...held, ...more]) void p.then(() => completed++);
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(completed, 0, 'nothing submitted after freeze completes while frozen');
    await r.driver.restore();
    await Promise.all([...early, ...held, ...more]);
    const back = new Uint8Array(40 * 4096);
    await r.driver.read(0, [back]);
    for (let i = 0; i < 40; i++) assert.deepEqual(back.subarray(i * 4096, (i + 1) * 4096), pattern(4096, i), `block ${i}`);
  } finally {
    await r.close();
  }
});

test('restore re-reads the config: a resize while frozen is reported', async () => {
  const r = await rig({ size: 1 << 20 });
  try {
    await r.driver.freeze();
    await r.device.resize(2 << 20);
    const resized = nextResize(r.driver);
    await r.driver.restore();
    assert.deepEqual(await resized, { capacity: 4096, previousCapacity: 2048 });
  } finally {
    await r.close();
  }
});

test('removing a frozen disk fails its held requests instead of losing them silently', async () => {
  const r = await rig();
  await r.driver.freeze();
  const held = r.driver.read(0, [new Uint8Array(512)]);
  await r.driver.remove();
  await assert.rejects(held, { code: 'DISK_REMOVED' });
  await r.transport.close();
});

test('a timed-out request fails with TimeoutError; its DMA memory is not reused until the device returns it', async () => {
  let hold = true;
  const device = new ScriptedDevice({ answer: () => (hold ? 'hold' : { status: VIRTIO_BLK_S.OK, fill: 0x22 }) });
  const r = await scriptedRig(device, { timeoutMs: 40 });
  try {
    const late = new Uint8Array(4096);
    const started = performance.now();
    await within(assert.rejects(r.driver.read(0, [late]), (e) => e instanceof TimeoutError && /timed out after 40 ms/.test(e.message)),
      { what: 'the held request to time out (its timeout is 40 ms)' });
    // Not before its time (a timer may fire up to a millisecond early); how late is the
    // machine's business, not the driver's.
    const waited = performance.now() - started;
    assert.ok(waited >= 39, `timed out after ${waited} ms, before its 40 ms`);
    assert.equal(device.held.length, 1);
    const stale = device.held[0].chain.writable[0];
    hold = false;
    const fresh = new Uint8Array(4096);
    await r.driver.read(8, [fresh]);
    const used = device.seen[1].chain.writable[0];
    const overlaps = used.buffer === stale.buffer &&
      used.byteOffset < stale.byteOffset + stale.length && stale.byteOffset < used.byteOffset + used.length;
    assert.ok(!overlaps, 'the new request got different bounce memory');
    assert.ok(fresh.every((b) => b === 0x22));
    // The device finally answers the timed-out chain: the caller's buffer stays untouched.
    device.releaseHeld({ status: VIRTIO_BLK_S.OK, fill: 0x99 });
    await new Promise((resolve) => setTimeout(resolve, 5));
    assert.ok(late.every((b) => b === 0));
    await r.driver.read(16, [fresh]);
  } finally {
    await r.close();
  }
});

test('a late answer to a timed-out request completes nothing else, though completed requests are reused', async () => {
  let hold = true;
  const device = new ScriptedDevice({ answer: (q) => (hold ? 'hold' : { status: VIRTIO_BLK_S.OK, fill: q.sector & 0xff }) });
  const r = await scriptedRig(device, { timeoutMs: 40 });
  try {
    const calls: (Error | null)[] = [];
    const late = new Uint8Array(512);
    await new Promise<void>((resolve) => r.driver.submitRead(0, [late], (e) => {
      calls.push(e);
      resolve();
    }));
    assert.equal(calls.length, 1);
    assert.ok(calls[0] instanceof TimeoutError);
    hold = false;
    // Many requests one after another, each answered at once, alternating the driver's
    // own buffers and ordinary ones: their request objects are reused among them.
    const dma = r.driver.allocBuffer(512);
    const counts = new Map<number, number>();
    for (let sector = 1; sector <= 40; sector++) {
      const buffer = sector % 2 === 0 ? dma : new Uint8Array(512);
      const e = await new Promise<Error | null>((resolve) => r.driver.submitRead(sector, [buffer], (err) => {
        counts.set(sector, (counts.get(sector) ?? 0) + 1);
        resolve(err);
      }));
      assert.equal(e, null);
      assert.ok(buffer.every((b) => b === sector), `sector ${sector} read its own data`);
      if (sector === 20) {
        // The device answers the timed-out request now, in the middle of the others.
        device.releaseHeld({ status: VIRTIO_BLK_S.IOERR, fill: 0x99 });
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
    assert.equal(calls.length, 1, 'the timed-out request was not called back again');
    assert.ok(late.every((b) => b === 0), "its caller's buffer stayed untouched");
    assert.deepEqual([...counts.values()], new Array(40).fill(1), 'every later request called back exactly once');
    r.driver.freeBuffer(dma);
  } finally {
    await r.close();
  }
});

test('a request submitted while the timeout sweep is already running still gets its whole timeout', async () => {
  const device = new ScriptedDevice({ answer: () => 'hold' });
  const r = await scriptedRig(device, { timeoutMs: 40 });
  try {
    const first = r.driver.read(0, [new Uint8Array(512)]);
    await new Promise((resolve) => setTimeout(resolve, 25));
    const started = performance.now();
    const second = r.driver.read(8, [new Uint8Array(512)]);
    await within(assert.rejects(first, TimeoutError), { what: 'the first held request to time out' });
    await within(assert.rejects(second, TimeoutError), { what: 'the second held request to time out' });
    const waited = performance.now() - started;
    assert.ok(waited >= 39, `the second request timed out after ${waited} ms, before its 40 ms`);
  } finally {
    await r.close();
  }
});

test('without a timeout a held request just waits (Linux semantics)', async () => {
  const device = new ScriptedDevice({ answer: () => 'hold' });
  const r = await scriptedRig(device);
  try {
    let done = false;
    const p = r.driver.read(0, [new Uint8Array(512)]).then(() => (done = true));
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.equal(done, false);
    device.releaseHeld();
    await p;
  } finally {
    await r.close();
  }
});

for (const [what, lie] of [
  ['a used id that is not in flight', { id: 999, status: VIRTIO_BLK_S.OK }],
  ['a used length beyond what was posted', { written: 1 << 20, status: VIRTIO_BLK_S.OK }],
] as const) {
  test(`${what} fails the request, breaks the queue and fails its other requests`, async () => {
    let first = true;
    const device = new ScriptedDevice({
      numQueues: 2,
      features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.MQ),
      answer: (q) => {
        if (q.queue === 1) return { status: VIRTIO_BLK_S.OK };
        if (first) {
          first = false;
          return 'hold';
        }
        return 'hold';
      },
    });
    const r = await scriptedRig(device, { queues: 2 });
    try {
      const onQueue0 = Array.from({ length: 4 }, (_, i) => r.driver.read(i * 8, [new Uint8Array(512)], { queue: 0 }));
      const outcomes = Promise.allSettled(onQueue0);
      await waitUntil(() => device.held.length === 4, { what: 'the device to hold all four requests' });
      device.respond(device.held[0], lie);
      const results = await outcomes;
      for (const res of results) {
        assert.equal(res.status, 'rejected');
        assert.ok((res as PromiseRejectedResult).reason instanceof QueueBrokenError);
      }
      await assert.rejects(r.driver.read(0, [new Uint8Array(512)], { queue: 0 }), QueueBrokenError);
      // The other queue keeps working, and round robin avoids the broken one.
      await r.driver.read(0, [new Uint8Array(512)], { queue: 1 });
      await r.driver.read(0, [new Uint8Array(512)]);
      await r.driver.read(0, [new Uint8Array(512)]);
      assert.equal(r.log.filter((l) => l.level === 'warn').length, 1, 'logged once');
      assert.match(r.log[0].message, /queue 0 is broken/);
      // freeze + restore rebuilds the queues: the disk is whole again.
      await r.driver.freeze();
      device.answer = () => ({ status: VIRTIO_BLK_S.OK });
      await r.driver.restore();
      await r.driver.read(0, [new Uint8Array(512)], { queue: 0 });
    } finally {
      await r.close();
    }
  });
}
