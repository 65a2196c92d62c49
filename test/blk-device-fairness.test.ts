// A guest that makes buffers available as fast as the device serves them must not hold
// the JavaScript thread: the device yields after a ring's worth of requests per kick and
// comes back at the next turn of the event loop, so other queues, connections and timers
// get their turn.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkDevice } from '../src/blk/device.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { VIRTIO_BLK_REQ_HEADER, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, features } from '../src/spec/virtio.js';
import { VIRTQ_DESC_F } from '../src/spec/split-ring.js';
import { RawRing } from '../src/virtqueue/testing.js';
import { SplitDeviceQueue } from '../src/virtqueue/split-device.js';
import { waitUntil } from './support/wait.js';

test('a flooding guest gets a ring of requests per turn, and the device comes back for the rest', async () => {
  const size = 8;
  const r = new RawRing(size);
  const hdr = r.dataBase;
  r.fill(hdr, VIRTIO_BLK_REQ_HEADER.size, 0); // VIRTIO_BLK_T_IN, sector 0
  assert.equal(VIRTIO_BLK_T.IN, 0);
  r.desc(0, hdr, VIRTIO_BLK_REQ_HEADER.size, VIRTQ_DESC_F.NEXT, 1);
  r.desc(1, hdr + 512, 512, VIRTQ_DESC_F.WRITE | VIRTQ_DESC_F.NEXT, 2);
  r.desc(2, hdr + 1024, 1, VIRTQ_DESC_F.WRITE);

  let served = 0;
  let flooding = true;
  const inner = new MemoryBackend({ size: 1 << 20 });
  // Every read makes the same chain available again, as a hostile guest on another CPU could.
  const backend = Object.assign(Object.create(inner) as MemoryBackend, {
    read(offset: number, buffers: readonly Uint8Array[]): void {
      served++;
      inner.read(offset, buffers);
      if (flooding) r.publish(0);
    },
  });
  const device = new BlkDevice({ backend, queueSize: size });
  device.attach({ configChanged: () => {}, needsReset: () => assert.fail('the ring is valid') });
  device.setDriverFeatures(features(VIRTIO_F.VERSION_1));
  const q = SplitDeviceQueue.create(r.memory, r.config);
  assert.ok(q instanceof SplitDeviceQueue);
  device.startQueue(0, q, () => {});
  r.publish(0);

  device.queueNotify(0);
  assert.equal(served, size, 'one turn serves one ring of requests, then returns');
  const timerRan = await new Promise<boolean>((resolve) => setTimeout(() => resolve(true), 0));
  assert.ok(timerRan, 'the event loop got its turn');
  await waitUntil(() => served > size, { what: 'the device to come back for the rest' });
  flooding = false;
  await new Promise((resolve) => setTimeout(resolve, 20));
  await device.stopQueue(0);
  assert.equal(r.usedIdx(), served & 0xffff, 'every request served was returned');
});
