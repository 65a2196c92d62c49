// The driver's fast paths: zero-copy I/O (buffers from BlkDriver.allocBuffer go into the
// chain as they are, and the driver guards their lifetime: a buffer a ring still points
// into cannot be freed) and coalesced used-buffer notifications.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { inspect } from 'node:util';
import { VIRTIO_BLK_S } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, features } from '../src/spec/virtio.js';
import { ScriptedDevice, pattern, rig, scriptedRig } from './blk-driver-harness.js';
import { waitUntil } from './support/wait.js';

for (const exclude of [[], [VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.RING_INDIRECT_DESC]]) {
  test(`DMA buffers round-trip data, concurrently (excluded: ${exclude.join(',') || 'none'})`, async () => {
    const r = await rig({ size: 1 << 20, driver: { excludeFeatures: exclude } });
    try {
      const bufs = Array.from({ length: 16 }, () => r.driver.allocBuffer(4096));
      bufs.forEach((b, i) => b.set(pattern(4096, i)));
      await Promise.all(bufs.map((b, i) => r.driver.write(i * 8, [b])));
      // Read back in reverse into the same buffers: the device writes straight into them.
      bufs.forEach((b) => b.fill(0));
      await Promise.all(bufs.map((b, i) => r.driver.read((15 - i) * 8, [b])));
      bufs.forEach((b, i) => assert.deepEqual(b, pattern(4096, 15 - i), `buffer ${i}`));
      // What the device stored is what was written (checked around the driver).
      const direct = [new Uint8Array(4096)];
      r.backend.read(3 * 4096, direct);
      assert.deepEqual(direct[0], pattern(4096, 3));
      for (const b of bufs) r.driver.freeBuffer(b);
    } finally {
      await r.close();
    }
  });
}

test('zero-copy requests take no bounce memory; other buffer lists still bounce', async () => {
  const r = await rig({ size: 1 << 20 });
  try {
    const buf = r.driver.allocBuffer(8192);
    const available = r.transport.dma.available;
    for (let i = 0; i < 8; i++) {
      buf.set(pattern(8192, i));
      await r.driver.write(i * 16, [buf]);
      await r.driver.read(i * 16, [buf]);
      assert.deepEqual(buf, pattern(8192, i));
    }
    assert.equal(r.transport.dma.available, available, 'no bounce block was taken');
    // A subarray of a DMA buffer is an ordinary buffer: copied, and still right.
    await r.driver.read(16, [buf.subarray(0, 4096), buf.subarray(4096)]);
    assert.deepEqual(buf, pattern(8192, 1));
    r.driver.freeBuffer(buf);
  } finally {
    await r.close();
  }
});

test('a DMA buffer larger than one chain is split across chains and size_max descriptors', async () => {
  const r = await rig({ size: 4 << 20, device: { sizeMax: 1024, segMax: 4 }, driver: { maxRequestBytes: 1 << 20 } });
  try {
    assert.equal(r.driver.maxRequestBytes, 4096);
    const buf = r.driver.allocBuffer(64 * 1024 + 512);
    const data = pattern(buf.length, 9);
    buf.set(data);
    await r.driver.write(40, [buf]);
    buf.fill(0);
    await r.driver.read(40, [buf]);
    assert.deepEqual(buf, data);
    const check = new Uint8Array(data.length);
    await r.driver.read(40, [check]);
    assert.deepEqual(check, data);
    r.driver.freeBuffer(buf);
  } finally {
    await r.close();
  }
});

test('freeBuffer refuses a buffer on a ring, and anything not from allocBuffer', async () => {
  const device = new ScriptedDevice({ answer: () => 'hold' });
  const r = await scriptedRig(device);
  try {
    const buf = r.driver.allocBuffer(512);
    const pending = r.driver.read(0, [buf]);
    await new Promise((res) => setImmediate(res));
    assert.equal(device.held.length, 1);
    assert.throws(() => r.driver.freeBuffer(buf), { code: 'BUFFER_BUSY' });
    device.releaseHeld({ status: VIRTIO_BLK_S.OK, fill: 0x5a });
    await pending;
    assert.ok(buf.every((b) => b === 0x5a), 'the device wrote into the DMA buffer itself');
    r.driver.freeBuffer(buf);
    assert.throws(() => r.driver.freeBuffer(buf), { code: 'NOT_A_DMA_BUFFER' });
    assert.throws(() => r.driver.freeBuffer(new Uint8Array(512)), { code: 'NOT_A_DMA_BUFFER' });
  } finally {
    await r.close();
  }
});

test('a timed-out request keeps its DMA buffer busy until the device returns the chain', async () => {
  const device = new ScriptedDevice({ answer: () => 'hold' });
  const r = await scriptedRig(device, { timeoutMs: 20 });
  try {
    const buf = r.driver.allocBuffer(512);
    await assert.rejects(r.driver.read(0, [buf]), { code: 'TIMEOUT' });
    assert.throws(() => r.driver.freeBuffer(buf), { code: 'BUFFER_BUSY' }, 'the device may still write into it');
    device.releaseHeld();
    await new Promise((res) => setImmediate(res));
    r.driver.freeBuffer(buf);
  } finally {
    await r.close();
  }
});

test('a request still waiting for ring room fails when its DMA buffer is freed meanwhile', async () => {
  // A 4-entry ring without indirect descriptors has room for one 3-descriptor chain.
  const device = new ScriptedDevice({ queueSize: 4, answer: () => 'hold' });
  const r = await scriptedRig(device, { excludeFeatures: [VIRTIO_F.RING_INDIRECT_DESC] });
  try {
    const first = r.driver.allocBuffer(512);
    const second = r.driver.allocBuffer(512);
    const a = r.driver.read(0, [first]);
    const b = r.driver.read(1, [second]);
    await new Promise((res) => setImmediate(res));
    assert.equal(device.held.length, 1, 'one chain fills the ring; the other waits in software');
    r.driver.freeBuffer(second);
    device.releaseHeld();
    await a;
    await assert.rejects(b, { code: 'BUFFER_FREED' });
    r.driver.freeBuffer(first);
  } finally {
    await r.close();
  }
});

test('allocBuffer refuses bad lengths, more than DMA memory holds, and a removed disk', async () => {
  const r = await rig({ size: 1 << 20, loopback: { memorySize: 4 << 20 } });
  assert.throws(() => r.driver.allocBuffer(0), { code: 'BAD_LENGTH' });
  assert.throws(() => r.driver.allocBuffer(1.5), { code: 'BAD_LENGTH' });
  assert.throws(() => r.driver.allocBuffer(8 << 20), { code: 'NO_DMA_MEMORY' });
  const buf = r.driver.allocBuffer(4096);
  await r.close();
  assert.throws(() => r.driver.allocBuffer(512), { code: 'BAD_STATE' });
  // Freeing after removal is still allowed: the memory goes back to the transport.
  r.driver.freeBuffer(buf);
});

test('coalesced notifications: requests a device finished are reaped while it holds the rest', async () => {
  // 15 in flight after the first: the driver asks to be notified after 7 more
  // completions; the device does 2 and holds the rest. Those 2 must still resolve (the
  // late reap) with nothing more from the device, not wait for the next batch.
  const device = new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1, VIRTIO_F.RING_EVENT_IDX), answer: () => 'hold' });
  const r = await scriptedRig(device);
  try {
    assert.ok(r.driver.has(VIRTIO_F.RING_EVENT_IDX));
    const done: number[] = [];
    const all = Array.from({ length: 16 }, (_, i) => r.driver.read(i, [new Uint8Array(512)]).then(() => done.push(i)));
    await new Promise((res) => setImmediate(res));
    assert.equal(device.held.length, 16);
    // One completion first: the driver reaps it and re-arms with 15 in flight.
    device.respond(device.held.shift()!, { status: VIRTIO_BLK_S.OK });
    await waitUntil(() => done.length === 1, { what: 'the first completion (the device notified it)' });
    device.respond(device.held.shift()!, { status: VIRTIO_BLK_S.OK });
    device.respond(device.held.shift()!, { status: VIRTIO_BLK_S.OK });
    // No notification comes for these two: only the driver's late reap can find them.
    await waitUntil(() => done.length === 3, { what: 'the two completions below the coalescing threshold: stranded, the late reap never found them' });
    device.releaseHeld();
    await Promise.all(all);
  } finally {
    await r.close();
  }
});

test("another driver's DMA buffer is an ordinary buffer here: copied, and not this driver's to free", async () => {
  const a = await rig({ size: 1 << 20 });
  const b = await rig({ size: 1 << 20 });
  try {
    const foreign = a.driver.allocBuffer(4096);
    await b.driver.write(8, [pattern(4096, 3)]);
    await b.driver.read(8, [foreign]);
    assert.deepEqual(foreign, pattern(4096, 3));
    // What marks a DMA buffer stays out of sight: not printed, not copied by a spread.
    assert.ok(!inspect(foreign).includes('vblk'), inspect(foreign));
    assert.equal(Object.getOwnPropertySymbols({ ...foreign }).length, 0);
    assert.throws(() => b.driver.freeBuffer(foreign), { code: 'NOT_A_DMA_BUFFER' });
    a.driver.freeBuffer(foreign);
  } finally {
    await a.close();
    await b.close();
  }
});
