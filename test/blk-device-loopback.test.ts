// The device behind the loopback transport, driven step by step as a driver would
// (3.1.1): negotiation reaches the device at FEATURES_OK, kicks and used-buffer
// notifications flow through the transport, resize raises a configuration change, a
// broken ring sets NEEDS_RESET, and tearing the queues down waits for requests in flight.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkDevice } from '../src/blk/device.js';
import { decodeBlkConfig } from '../src/blk/config.js';
import { VIRTIO_BLK_CONFIG, VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { VIRTIO_CONFIG_S as S } from '../src/spec/virtio.js';
import { VIRTQ_AVAIL_OFFSET, contiguousRingLayout } from '../src/spec/split-ring.js';
import { LoopbackTransport } from '../src/transport/loopback.js';
import type { DriverQueueBinding } from '../src/virtqueue/device.js';
import type { Segment } from '../src/virtqueue/split-driver.js';
import { RecordingBackend, header, pattern } from './blk-device-harness.js';

async function bringUp(device: BlkDevice): Promise<{ t: LoopbackTransport; q: DriverQueueBinding<number>; used: { n: number } }> {
  const t = new LoopbackTransport(device, { memorySize: 4 * 1024 * 1024 });
  await t.reset();
  await t.setStatus(S.ACKNOWLEDGE);
  await t.setStatus(S.ACKNOWLEDGE | S.DRIVER);
  await t.setDriverFeatures(await t.getDeviceFeatures());
  await t.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
  const used = { n: 0 };
  const q = await t.setupQueue<number>(0, 64, 8, () => {
    used.n++;
  });
  await t.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
  return { t, q, used };
}

/** Posts header + data + status; returns the status byte's address and the data segment. */
function post(t: LoopbackTransport, q: DriverQueueBinding<number>, type: number, sector: number, out: Uint8Array | null, inLen: number, token: number): { status: number; data: Segment | null } {
  const place = (bytes: Uint8Array): Segment => {
    const addr = t.dma.alloc(bytes.length);
    assert.ok(t.memory.write(addr, bytes));
    return { addr, len: bytes.length };
  };
  const readable = [place(header(type, sector))];
  if (out) readable.push(place(out));
  const data = inLen > 0 ? { addr: t.dma.alloc(inLen), len: inLen } : null;
  const status = { addr: t.dma.alloc(1), len: 1 };
  assert.ok(q.queue.add(readable, data ? [data, status] : [status], token));
  return { status: status.addr, data };
}

function byte(t: LoopbackTransport, addr: number): number {
  const b = new Uint8Array(1);
  assert.ok(t.memory.read(addr, b));
  return b[0];
}

async function reapAll(q: DriverQueueBinding<number>, n: number): Promise<number[]> {
  const got: number[] = [];
  for (let i = 0; i < 1000 && got.length < n; i++) {
    await new Promise((r) => setImmediate(r));
    for (;;) {
      const u = q.queue.getUsed();
      if (u === null) break;
      assert.ok(!(u instanceof Error));
      got.push(u.token);
    }
  }
  return got;
}

test('write then read over the loopback transport, with notifications both ways', async () => {
  const backend = new RecordingBackend();
  const device = new BlkDevice({ backend });
  const { t, q, used } = await bringUp(device);
  const w = post(t, q, VIRTIO_BLK_T.OUT, 8, pattern(4096, 1), 0, 1);
  if (q.queue.kickPrepare()) q.notify();
  assert.deepEqual(await reapAll(q, 1), [1]);
  assert.equal(byte(t, w.status), VIRTIO_BLK_S.OK);
  const r = post(t, q, VIRTIO_BLK_T.IN, 8, null, 4096, 2);
  if (q.queue.kickPrepare()) q.notify();
  assert.deepEqual(await reapAll(q, 1), [2]);
  assert.equal(byte(t, r.status), VIRTIO_BLK_S.OK);
  const back = new Uint8Array(4096);
  assert.ok(r.data && t.memory.read(r.data.addr, back));
  assert.deepEqual(back, pattern(4096, 1));
  assert.ok(used.n >= 1);
  await t.close();
});

test("the loopback's memory is its own: exclusive, so its rings go without atomics", () => {
  const t = new LoopbackTransport(new BlkDevice({ backend: new RecordingBackend(1 << 20) }), { memorySize: 1 << 20 });
  assert.equal(t.memory.exclusive, true);
});

test('the cache mode toggled through the transport takes effect', async () => {
  const backend = new RecordingBackend();
  const device = new BlkDevice({ backend });
  const { t, q } = await bringUp(device);
  await t.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([0]));
  assert.deepEqual(await t.readConfig(VIRTIO_BLK_CONFIG.writeback.offset, 1), new Uint8Array([0]));
  post(t, q, VIRTIO_BLK_T.OUT, 0, pattern(512, 2), 0, 1);
  if (q.queue.kickPrepare()) q.notify();
  await reapAll(q, 1);
  assert.deepEqual(backend.calls.map((c) => c[0]), ['write', 'flush']);
  await t.close();
});

test('resize raises a configuration change the driver sees', async () => {
  const backend = new RecordingBackend(1 << 20);
  const device = new BlkDevice({ backend });
  const { t } = await bringUp(device);
  let changes = 0;
  t.onConfigChange(() => {
    changes++;
  });
  await device.resize(4 << 20);
  await new Promise((r) => setImmediate(r));
  assert.equal(changes, 1);
  const c = decodeBlkConfig(await t.readConfig(0, 60));
  assert.ok(!(c instanceof Error));
  assert.equal(c.capacity, (4 << 20) / 512);
  await t.close();
});

test('a broken ring sets NEEDS_RESET in the device status', async () => {
  const device = new BlkDevice({ backend: new RecordingBackend() });
  const { t, q } = await bringUp(device);
  post(t, q, VIRTIO_BLK_T.IN, 0, null, 512, 1);
  const kick = q.queue.kickPrepare();
  // The queue's rings are the loopback's first allocation, laid out contiguously:
  // corrupt the head in avail.ring[0] after the driver published it.
  const layout = contiguousRingLayout(64);
  const ringAt = layout.avail + VIRTQ_AVAIL_OFFSET.ring;
  const bytes = t.memory.regions[0].bytes;
  bytes[ringAt] = 99;
  bytes[ringAt + 1] = 0;
  if (kick) q.notify();
  await new Promise((r) => setImmediate(r));
  assert.ok(t.lastNeedsReset);
  assert.equal(t.lastNeedsReset.index, 0);
  assert.equal(t.lastNeedsReset.reason.code, 'HEAD_OUT_OF_RANGE');
  assert.ok((await t.getStatus()) & S.NEEDS_RESET);
  await t.close();
});

test('tearing the queues down waits for requests in flight', async () => {
  const backend = new RecordingBackend();
  const device = new BlkDevice({ backend });
  const { t, q } = await bringUp(device);
  backend.hold = true;
  post(t, q, VIRTIO_BLK_T.IN, 0, null, 512, 1);
  post(t, q, VIRTIO_BLK_T.IN, 1, null, 512, 2);
  if (q.queue.kickPrepare()) q.notify();
  for (let i = 0; i < 10 && backend.held.length < 2; i++) await new Promise((r) => setImmediate(r));
  assert.equal(backend.held.length, 2);
  let down = false;
  const teardown = t.teardownQueues().then(() => {
    down = true;
  });
  await new Promise((r) => setImmediate(r));
  assert.equal(down, false);
  backend.releaseAll();
  await teardown;
  assert.equal(q.queue.getUsed() !== null, true, 'completions were published before the queue stopped');
  await t.close();
});
