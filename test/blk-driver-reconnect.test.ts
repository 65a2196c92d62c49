// The driver over a transport that loses its device and reaches it again (a vhost-user
// backend restarted on the same socket): requests not completed go out again to the new
// device, new ones wait, and after reconnectTimeoutMs they fail with DEVICE_GONE.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkDriver, type BlkDriverOptions, type ResizeEvent } from '../src/blk/driver.js';
import { QueueBrokenError, RequestError, TimeoutError } from '../src/blk/driver-errors.js';
import { decodeBlkConfig, encodeBlkConfig, type BlkConfig } from '../src/blk/config.js';
import { VblkError } from '../src/errors.js';
import { VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, features } from '../src/spec/virtio.js';
import { LoopbackTransport } from '../src/transport/loopback.js';
import type { DriverQueueBinding, DriverTransport } from '../src/virtqueue/device.js';
import { ScriptedDevice, recordingLogger, type Rig } from './blk-driver-harness.js';
import { waitUntil, within } from './support/wait.js';

/**
 * A loopback transport whose device can be lost (every call fails, the lost listeners
 * run, the device forgets its rings and held requests) and found again once `isBack`.
 */
class Reconnectable implements DriverTransport {
  readonly inner: LoopbackTransport;
  private lostListeners: ((reason: Error) => void)[] = [];
  private isLost = false;
  isBack = true;
  attempts = 0;
  /** Feature bits the device offers once found again (all of the device's by default). */
  offerMask = ~0n;

  constructor(readonly device: ScriptedDevice) {
    this.inner = new LoopbackTransport(device);
  }

  get memory() {
    return this.inner.memory;
  }

  get dma() {
    return this.inner.dma;
  }

  async lose(): Promise<void> {
    this.isLost = true;
    // The device process is gone: what it held is gone with it.
    await this.device.reset();
    for (const l of this.lostListeners.splice(0)) l(new VblkError('DISCONNECTED', 'the backend closed the connection'));
  }

  private check(): void {
    if (this.isLost) throw new VblkError('DISCONNECTED', 'the backend is gone');
  }

  async reconnect(): Promise<void> {
    this.attempts++;
    if (!this.isBack) throw new VblkError('CONNECT_FAILED', 'cannot connect: ECONNREFUSED');
    await this.inner.teardownQueues();
    this.isLost = false;
  }

  // Like the vhost-user frontend's, a reset is local: it works on a lost device.
  async reset() { return this.inner.reset(); }
  async getStatus() { this.check(); return this.inner.getStatus(); }
  async setStatus(s: number) { this.check(); return this.inner.setStatus(s); }
  async getDeviceFeatures() { this.check(); return (await this.inner.getDeviceFeatures()) & this.offerMask; }
  async setDriverFeatures(f: bigint) { this.check(); return this.inner.setDriverFeatures(f); }
  async readConfig(o: number, n: number) { this.check(); return this.inner.readConfig(o, n); }
  async writeConfig(o: number, d: Uint8Array) { this.check(); return this.inner.writeConfig(o, d); }
  async maxQueues() { this.check(); return this.inner.maxQueues(); }
  async maxQueueSize() { this.check(); return this.inner.maxQueueSize(); }
  async setupQueue<T>(i: number, size: number, ind: number, onUsed: () => void): Promise<DriverQueueBinding<T>> {
    this.check();
    return this.inner.setupQueue<T>(i, size, ind, onUsed);
  }
  // Taking the rings back needs no device: it is how the driver lets go of a lost one.
  async teardownQueues() { return this.inner.teardownQueues(); }
  onConfigChange(l: () => void) { this.inner.onConfigChange(l); }
  onDeviceLost(l: (reason: Error) => void) { this.lostListeners.push(l); }
  async close() { return this.inner.close(); }
}

async function reconnectRig(device: ScriptedDevice, options: BlkDriverOptions = {}): Promise<Rig<ScriptedDevice> & { t: Reconnectable }> {
  const t = new Reconnectable(device);
  const log: Rig['log'] = [];
  const driver = await BlkDriver.probe(t, { logger: recordingLogger(log), reconnectTimeoutMs: 60_000, ...options });
  return {
    driver, device, transport: t.inner, log, t,
    async close() {
      await driver.remove();
      await t.close();
    },
  };
}

const holdAll = (): 'hold' => 'hold';
const ok = () => ({ status: VIRTIO_BLK_S.OK, fill: 0x5a });

test('requests on the rings when the device is lost go out again to the device that comes back, and complete', async () => {
  const device = new ScriptedDevice({ answer: holdAll, numQueues: 2, features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.MQ) });
  const r = await reconnectRig(device, { queues: 2 });
  try {
    r.t.isBack = false;
    const buf = new Uint8Array(4096);
    const ops = [r.driver.read(8, [buf]), r.driver.write(16, [new Uint8Array(4096).fill(1)]), r.driver.flush()];
    await waitUntil(() => device.held.length === 3, { what: 'the device to hold the three requests' });
    await r.t.lose();
    await waitUntil(() => r.t.attempts >= 1, { what: 'a reconnection attempt' });
    // Submitted while reconnecting: waits for the device like the others.
    const late = r.driver.write(32, [new Uint8Array(512).fill(2)]);
    device.answer = ok;
    r.t.isBack = true;
    await within(Promise.all([...ops, late]), { what: 'every request to complete after the reconnection' });
    assert.ok(buf.every((b) => b === 0x5a), 'the read got the new device\'s data');
    // Each of the three was seen twice (once by each device), the late one once.
    const count = (type: number, sector: number): number => device.seen.filter((s) => s.type === type && s.sector === sector).length;
    assert.equal(count(VIRTIO_BLK_T.IN, 8), 2);
    assert.equal(count(VIRTIO_BLK_T.OUT, 16), 2);
    assert.equal(count(VIRTIO_BLK_T.FLUSH, 0), 2);
    assert.equal(count(VIRTIO_BLK_T.OUT, 32), 1);
    assert.ok(r.log.some((l) => l.level === 'warn' && /device lost: .*; reconnecting for up to 60 s/.test(l.message)), JSON.stringify(r.log));
    assert.ok(r.log.some((l) => l.level === 'notice' && /^device back/.test(l.message)), JSON.stringify(r.log));
    // The disk goes on as before.
    await r.driver.read(0, [buf]);
  } finally {
    await r.close();
  }
});

test('a device that does not come back: held and new requests fail with DEVICE_GONE after reconnectTimeoutMs', async () => {
  const device = new ScriptedDevice({ answer: holdAll });
  const r = await reconnectRig(device, { reconnectTimeoutMs: 50 });
  try {
    r.t.isBack = false;
    const held = r.driver.read(0, [new Uint8Array(512)]);
    await waitUntil(() => device.held.length === 1, { what: 'the device to hold the read' });
    await r.t.lose();
    const isGone = (e: unknown): boolean => e instanceof RequestError && e.code === 'DEVICE_GONE' &&
      /^vd[a-z]+: the device was lost and not back within 0\.05 s \(cannot connect: ECONNREFUSED\)$/.test(e.message);
    await within(assert.rejects(held, isGone), { what: 'the held read to fail' });
    assert.ok(r.t.attempts >= 1);
    await assert.rejects(r.driver.write(0, [new Uint8Array(512)]), isGone);
  } finally {
    await r.close();
  }
});

test('with reconnectTimeoutMs 0 a lost device fails its requests at once, as before', async () => {
  const device = new ScriptedDevice({ answer: holdAll });
  const r = await reconnectRig(device, { reconnectTimeoutMs: 0 });
  try {
    const held = r.driver.read(0, [new Uint8Array(512)]);
    await waitUntil(() => device.held.length === 1, { what: 'the device to hold the read' });
    await r.t.lose();
    await assert.rejects(held, QueueBrokenError);
    assert.equal(r.t.attempts, 0);
  } finally {
    await r.close();
  }
});

test('a device that comes back without a feature in use is refused: requests fail with DEVICE_GONE naming it', async () => {
  const device = new ScriptedDevice({ answer: holdAll });
  const r = await reconnectRig(device, { reconnectTimeoutMs: 50 });
  try {
    const held = r.driver.flush();
    await waitUntil(() => device.held.length === 1, { what: 'the device to hold the flush' });
    r.t.offerMask = ~features(VIRTIO_BLK_F.FLUSH);
    await r.t.lose();
    await within(assert.rejects(held, (e) => e instanceof RequestError && e.code === 'DEVICE_GONE' &&
      /without features 0x200 the disk uses/.test(e.message)), { what: 'the flush to fail' });
  } finally {
    await r.close();
  }
});

test('a device that comes back with another capacity is a config change: resize event and "new size" notice', async () => {
  const device = new ScriptedDevice({ answer: holdAll });
  const r = await reconnectRig(device);
  try {
    const resized = new Promise<ResizeEvent>((resolve) => r.driver.on('resize', resolve));
    const held = r.driver.read(0, [new Uint8Array(512)]);
    await waitUntil(() => device.held.length === 1, { what: 'the device to hold the read' });
    device.config.set(encodeBlkConfig({ ...(decodeBlkConfig(device.config) as BlkConfig), capacity: 4096 }));
    device.answer = ok;
    await r.t.lose();
    await within(held, { what: 'the read to complete' });
    assert.deepEqual(await resized, { capacity: 4096, previousCapacity: 2048 });
    assert.equal(r.driver.capacity, 4096);
    assert.ok(r.log.some((l) => l.message.startsWith('new size: 4096 512-byte logical blocks')), JSON.stringify(r.log));
  } finally {
    await r.close();
  }
});

test('an attempt that finds an unsuitable device leaves the disk\'s limits alone: a request submitted meanwhile is checked by the ones in use', async () => {
  const device = new ScriptedDevice({ answer: holdAll, features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.BLK_SIZE) });
  const r = await reconnectRig(device);
  try {
    const held = r.driver.read(0, [new Uint8Array(512)]);
    await waitUntil(() => device.held.length === 1, { what: 'the device to hold the read' });
    // Back at once, but with 4096-byte blocks: every attempt is refused until it has 512 again.
    const config = decodeBlkConfig(device.config) as BlkConfig;
    device.config.set(encodeBlkConfig({ ...config, blkSize: 4096, capacity: 8192 }));
    device.answer = ok;
    await r.t.lose();
    await waitUntil(() => r.t.attempts >= 2, { what: 'two reconnection attempts' });
    assert.equal(r.driver.logicalBlockSize, 512);
    assert.equal(r.driver.capacity, 2048);
    // One 512-byte block: misaligned for the refused device, fine for the disk.
    const late = r.driver.write(1, [new Uint8Array(512).fill(7)]);
    device.config.set(encodeBlkConfig(config));
    await within(Promise.all([held, late]), { what: 'the held read and the late write to complete' });
  } finally {
    await r.close();
  }
});

test('removing the disk while it reconnects fails what it holds with DISK_REMOVED and stops trying', async () => {
  const device = new ScriptedDevice({ answer: holdAll });
  const r = await reconnectRig(device);
  try {
    r.t.isBack = false;
    const held = r.driver.read(0, [new Uint8Array(512)]);
    await waitUntil(() => device.held.length === 1, { what: 'the device to hold the read' });
    await r.t.lose();
    await waitUntil(() => r.t.attempts >= 1, { what: 'a reconnection attempt' });
    await within(r.driver.remove(), { what: 'remove to finish' });
    await assert.rejects(held, (e) => e instanceof RequestError && e.code === 'DISK_REMOVED');
    const attempts = r.t.attempts;
    r.t.isBack = true;
    await new Promise((res) => setTimeout(res, 50));
    assert.equal(r.t.attempts, attempts, 'no attempt after removal');
  } finally {
    await r.t.close();
  }
});

test('the per-request timeout still applies while reconnecting', async () => {
  const device = new ScriptedDevice({ answer: holdAll });
  const r = await reconnectRig(device, { timeoutMs: 20 });
  try {
    r.t.isBack = false;
    await r.t.lose();
    // Submitted with no device to send it to: held, and timed out like any other.
    await within(assert.rejects(r.driver.read(0, [new Uint8Array(512)]), TimeoutError), { what: 'the read to time out' });
  } finally {
    await r.close();
  }
});
