// Queue processing: batching of completions and notifications, out-of-order
// completion, multiqueue, a broken ring, stop, reset and resize.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { BlkDevice } from '../src/blk/device.js';
import { decodeBlkConfig } from '../src/blk/config.js';
import { VIRTIO_BLK_CONFIG, VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, hasFeature } from '../src/spec/virtio.js';
import { VIRTQ_DESC_F } from '../src/spec/split-ring.js';
import { RawRing } from '../src/virtqueue/testing.js';
import { SplitDeviceQueue } from '../src/virtqueue/split-device.js';
import { ChainError } from '../src/virtqueue/chain.js';
import { Harness, RecordingBackend, RecordingHost, framed, pattern, setup } from './blk-device-harness.js';

const { OK, IOERR } = VIRTIO_BLK_S;
const T = VIRTIO_BLK_T;
const MiB = 1 << 20;
const NO_EVENT_IDX = ~(1n << BigInt(VIRTIO_F.RING_EVENT_IDX));

test('32 synchronous reads in one kick complete in one batch: one publish, one notification', async () => {
  const { h } = setup({}, { features: new BlkDevice({ backend: new MemoryBackend({ size: MiB }) }).deviceFeatures & NO_EVENT_IDX });
  const tokens = Array.from({ length: 32 }, (_, i) => h.post(0, framed(T.IN, i * 8, { inLen: 4096 })));
  h.kick(0);
  // Synchronous backend: everything is done and published before queueNotify returns.
  assert.equal(h.sides[0].notifications, 1);
  assert.deepEqual(h.reap(0).sort((a, b) => a - b), tokens);
  for (const t of tokens) assert.equal(h.result(0, t).status, OK);
});

test('with EVENT_IDX, a long synchronous drain publishes as it goes and notifies as used_event asks', async () => {
  // A driver on another CPU can take the first completions while the rest are served.
  const seen: boolean[] = [];
  const driverSide: { h: Harness | null } = { h: null };
  const inner = new MemoryBackend({ size: MiB });
  const backend = Object.assign(Object.create(inner) as MemoryBackend, {
    read(offset: number, buffers: readonly Uint8Array[]): void {
      inner.read(offset, buffers);
      seen.push((driverSide.h as Harness).sides[0].driver.hasUsed());
    },
  });
  const { h } = setup({ backend });
  driverSide.h = h;
  const tokens = Array.from({ length: 32 }, (_, i) => h.post(0, framed(T.IN, i * 8, { inLen: 4096 })));
  // Notify once the tenth completion is used (used_event 9).
  h.sides[0].driver.enableInterrupts(9);
  h.kick(0);
  assert.equal(seen[0], false);
  assert.equal(seen[31], true, 'completions were visible to the driver before the drain ended');
  assert.equal(h.sides[0].notifications, 1, 'one notification, once the tenth was published');
  assert.deepEqual(h.reap(0).sort((a, b) => a - b), tokens);
});

test('asynchronous completions come back out of order, as the backend finishes them', async () => {
  const backend = new RecordingBackend();
  backend.inner.write(0, [pattern(3 * 4096, 7)]);
  const { h } = setup({ backend });
  backend.hold = true;
  const tokens = [0, 1, 2].map((i) => h.post(0, framed(T.IN, i * 8, { inLen: 4096 })));
  h.kick(0);
  assert.equal(backend.held.length, 3);
  assert.equal(h.sides[0].notifications, 0);
  backend.release(2);
  await h.until(() => h.sides[0].notifications === 1);
  assert.deepEqual(h.reap(0), [tokens[2]]);
  backend.release(0);
  backend.release(0);
  await h.until(() => h.sides[0].notifications === 2);
  await new Promise((r) => setImmediate(r));
  assert.equal(h.sides[0].notifications, 2);
  assert.deepEqual(h.reap(0), [tokens[0], tokens[1]], 'both released in one tick: one batch, one notification');
  for (const [i, t] of tokens.entries()) {
    const r = h.result(0, t);
    assert.equal(r.status, OK);
    assert.deepEqual(r.data, pattern(3 * 4096, 7).subarray(i * 4096, (i + 1) * 4096));
  }
});

test('without EVENT_IDX the driver can suppress notifications (VRING_AVAIL_F_NO_INTERRUPT)', async () => {
  const { h } = setup({}, { features: new BlkDevice({ backend: new MemoryBackend({ size: MiB }) }).deviceFeatures & NO_EVENT_IDX });
  h.sides[0].driver.disableInterrupts();
  h.post(0, framed(T.IN, 0, { inLen: 512 }));
  h.kick(0);
  assert.equal(h.sides[0].notifications, 0);
  assert.equal(h.reap(0).length, 1);
});

test('with EVENT_IDX, a notification is sent only when used_event is crossed', async () => {
  const { h, device } = setup();
  assert.ok(hasFeature(device.deviceFeatures, VIRTIO_F.RING_EVENT_IDX));
  assert.ok(h.sides[0].driver.eventIdx);
  h.sides[0].driver.enableInterrupts();
  h.post(0, framed(T.IN, 0, { inLen: 512 }));
  h.kick(0);
  assert.equal(h.sides[0].notifications, 1);
  // The driver has not re-armed used_event (still 0): the next completion is silent.
  h.post(0, framed(T.IN, 0, { inLen: 512 }));
  h.kick(0);
  assert.equal(h.sides[0].notifications, 1);
  assert.equal(h.reap(0).length, 2);
});

test('requests arriving while the device drains are picked up without another kick', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  // A backend read that posts another request mid-drain, as a concurrent driver would.
  let posted = false;
  const inner = backend.read.bind(backend);
  backend.read = (offset, buffers) => {
    if (!posted) {
      posted = true;
      h.post(0, framed(T.IN, 8, { inLen: 512 }));
      h.sides[0].driver.kickPrepare();
    }
    return inner(offset, buffers);
  };
  h.post(0, framed(T.IN, 0, { inLen: 512 }));
  h.kick(0);
  assert.equal(h.reap(0).length, 2);
});

test('each queue of a multiqueue device serves its own requests', async () => {
  const backend = new MemoryBackend({ size: MiB });
  const { h, device } = setup({ backend, numQueues: 4 });
  assert.ok(hasFeature(device.deviceFeatures, VIRTIO_BLK_F.MQ));
  const writes = await Promise.all([0, 1, 2, 3].map((q) => h.run(q, framed(T.OUT, q * 8, { out: pattern(4096, q) }))));
  for (const w of writes) assert.equal(w.status, OK);
  const reads = await Promise.all([0, 1, 2, 3].map((q) => h.run(3 - q, framed(T.IN, q * 8, { inLen: 4096 }))));
  reads.forEach((r, q) => assert.deepEqual(r.data, pattern(4096, q)));
  for (const side of h.sides) assert.ok(side.notifications >= 2);
});

test('a single-queue device does not offer MQ but reports num_queues = 1', () => {
  const dev = new BlkDevice({ backend: new MemoryBackend({ size: MiB }) });
  assert.ok(!hasFeature(dev.deviceFeatures, VIRTIO_BLK_F.MQ));
  const c = decodeBlkConfig(dev.readConfig(0, 72));
  assert.ok(!(c instanceof Error));
  assert.equal(c.numQueues, 1);
});

/** A device with a RawRing on queue 1, so the test can break that ring by hand. */
function brokenRingSetup(): { dev: BlkDevice; host: RecordingHost; ring: RawRing; h: Harness } {
  const dev = new BlkDevice({ backend: new MemoryBackend({ size: MiB }), numQueues: 2 });
  const h = new Harness(dev, { queues: 1 });
  const ring = new RawRing(8);
  const q = SplitDeviceQueue.create(ring.memory, ring.config);
  assert.ok(q instanceof SplitDeviceQueue);
  dev.startQueue(1, q, () => undefined);
  return { dev, host: h.host, ring, h };
}

test('a broken ring stops its queue and reports NEEDS_RESET once; the other queue keeps working', async () => {
  const { dev, host, ring, h } = brokenRingSetup();
  ring.desc(0, ring.dataBase, 16, VIRTQ_DESC_F.NEXT, 0);
  ring.publish(0);
  dev.queueNotify(1);
  dev.queueNotify(1);
  assert.equal(host.resets.length, 1);
  assert.equal(host.resets[0].index, 1);
  assert.ok(host.resets[0].reason instanceof ChainError);
  assert.equal(host.resets[0].reason.code, 'CHAIN_LOOP');
  assert.equal((await h.run(0, framed(T.IN, 0, { inLen: 512 }))).status, OK);
  assert.equal(await dev.stopQueue(1), 1);
});

test('a good request before the broken one on the same ring still completes', async () => {
  const { dev, host, ring } = brokenRingSetup();
  // Request 0: header (readable) + status (writable); request 1: a head out of range.
  const hdr = ring.dataBase;
  ring.desc(0, hdr, 16, VIRTQ_DESC_F.NEXT, 1);
  ring.desc(1, hdr + 16, 1, VIRTQ_DESC_F.WRITE);
  ring.publish(0);
  ring.publish(9);
  dev.queueNotify(1);
  assert.equal(host.resets.length, 1);
  assert.equal(host.resets[0].reason.code, 'HEAD_OUT_OF_RANGE');
  assert.equal(ring.usedIdx(), 1);
  assert.deepEqual(ring.usedElem(0), { id: 0, len: 1 });
});

test('stopQueue waits for requests in flight, publishes them, and returns the next avail index', async () => {
  const backend = new RecordingBackend();
  const { h, device } = setup({ backend });
  backend.hold = true;
  for (let i = 0; i < 3; i++) h.post(0, framed(T.IN, i, { inLen: 512 }));
  h.kick(0);
  let stopped: number | null = null;
  const stopping = device.stopQueue(0).then((n) => {
    stopped = n;
  });
  await new Promise((r) => setImmediate(r));
  assert.equal(stopped, null);
  // Kicks while stopping are ignored.
  h.post(0, framed(T.IN, 0, { inLen: 512 }));
  h.kick(0);
  assert.equal(backend.held.length, 3);
  backend.releaseAll();
  await stopping;
  assert.equal(stopped, 3);
  assert.equal(h.reap(0).length, 3);
});

test('stopping a queue that never started returns 0; a started queue cannot be started twice', async () => {
  const dev = new BlkDevice({ backend: new MemoryBackend({ size: MiB }), numQueues: 2 });
  assert.equal(await dev.stopQueue(1), 0);
  const h = new Harness(dev, { queues: 1 });
  const ring = new RawRing(8);
  const q = SplitDeviceQueue.create(ring.memory, ring.config);
  assert.ok(q instanceof SplitDeviceQueue);
  assert.throws(() => dev.startQueue(0, q, () => undefined), { code: 'QUEUE_BUSY' });
  assert.throws(() => dev.startQueue(2, q, () => undefined), { code: 'BAD_QUEUE' });
  assert.equal(h.host.resets.length, 0);
});

test('a queue restarted after stop continues from its avail index', async () => {
  const backend = new MemoryBackend({ size: MiB });
  const { h, device } = setup({ backend });
  await h.run(0, framed(T.OUT, 0, { out: pattern(512, 1) }));
  const next = await device.stopQueue(0);
  assert.equal(next, 1);
  // Same rings, new device queue starting where the old one stopped (vhost-user SET_VRING_BASE).
  const side = h.sides[0];
  const q = SplitDeviceQueue.create(h.memory, h.queueConfigs[0]);
  assert.ok(q instanceof SplitDeviceQueue);
  q.nextAvail = next;
  device.startQueue(0, q, () => side.notifications++);
  const r = await h.run(0, framed(T.IN, 0, { inLen: 512 }));
  assert.deepEqual(r.data, pattern(512, 1));
});

test('reset stops every queue, waits for in-flight requests and restores the initial cache mode', async () => {
  const backend = new RecordingBackend();
  const { h, device } = setup({ backend, numQueues: 2 });
  device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([0]));
  assert.equal(device.writeback, 0);
  backend.hold = true;
  h.post(1, framed(T.IN, 0, { inLen: 512 }));
  h.kick(1);
  let done = false;
  const resetting = device.reset().then(() => {
    done = true;
  });
  await new Promise((r) => setImmediate(r));
  assert.equal(done, false);
  backend.releaseAll();
  await resetting;
  assert.equal(h.reap(1).length, 1);
  assert.equal(device.writeback, 1);
  // After reset the queues are gone: kicks are ignored, queues can be started again.
  device.queueNotify(0);
  assert.equal(await device.stopQueue(0), 0);
});

test('resize grows the backend, updates capacity and raises a config change', async () => {
  const backend = new MemoryBackend({ size: MiB });
  const { h, device } = setup({ backend });
  assert.equal((await h.run(0, framed(T.IN, 2048, { inLen: 512 }))).status, IOERR);
  await device.resize(2 * MiB);
  assert.equal(h.host.configChanges, 1);
  assert.equal(device.capacity, 4096);
  const c = decodeBlkConfig(device.readConfig(0, 8));
  assert.ok(!(c instanceof Error));
  assert.equal(c.capacity, 4096);
  assert.equal(backend.size, 2 * MiB);
  assert.equal((await h.run(0, framed(T.OUT, 2048, { out: pattern(512, 3) }))).status, OK);
  assert.equal((await h.run(0, framed(T.IN, 4095, { inLen: 512 }))).status, OK);
});

test('resize refuses to shrink, odd sizes, and backends without resize', async () => {
  const { device } = setup();
  await assert.rejects(device.resize(MiB / 2), { code: 'BAD_SIZE' });
  await assert.rejects(device.resize(MiB + 100), { code: 'BAD_SIZE' });
  const backend = new RecordingBackend();
  Object.defineProperty(backend, 'resize', { value: undefined });
  const d2 = new BlkDevice({ backend });
  await assert.rejects(d2.resize(2 * MiB), { code: 'RESIZE_UNSUPPORTED' });
});
