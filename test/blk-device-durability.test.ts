// Durability (VIRTIO 1.2, 5.2.6.2, stable writes): in writethrough mode a write completes
// only after a backend flush that started after the write finished; in writeback mode a
// completed FLUSH covers every write completed before it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkDevice } from '../src/blk/device.js';
import { VIRTIO_BLK_CONFIG, VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { Harness, RecordingBackend, framed, pattern, segments } from './blk-device-harness.js';

const { OK, IOERR } = VIRTIO_BLK_S;
const T = VIRTIO_BLK_T;
const bit = (b: number): bigint => 1n << BigInt(b);
const WCE = bit(VIRTIO_BLK_F.CONFIG_WCE);
const FLUSH = bit(VIRTIO_BLK_F.FLUSH);

function make(features: (offered: bigint) => bigint, cache?: 'writeback' | 'writethrough') {
  const backend = new RecordingBackend();
  const device = new BlkDevice({ backend, cache });
  const h = new Harness(device, { features: features(device.deviceFeatures) });
  return { backend, device, h };
}

/** Posts one write, lets the backend finish it, and says whether it completed. */
async function heldWrite(h: Harness, backend: RecordingBackend, sector: number): Promise<number> {
  const token = h.post(0, framed(T.OUT, sector, { out: pattern(512, sector) }));
  h.kick(0);
  const isWrite = (): number => backend.held.findIndex((x) => x.call[0] === 'write');
  await h.until(() => isWrite() >= 0);
  assert.deepEqual(backend.release(isWrite()), ['write', sector * 512, 512]);
  return token;
}

async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
}

test('writeback (FLUSH and CONFIG_WCE negotiated, writeback 1): writes complete without a flush', async () => {
  const { backend, device, h } = make((f) => f);
  assert.equal(device.writeback, 1);
  backend.hold = true;
  const t = await heldWrite(h, backend, 0);
  await h.until(() => h.reap(0).includes(t));
  assert.equal(h.result(0, t).status, OK);
  assert.deepEqual(backend.calls.map((c) => c[0]), ['write']);
});

test('writeback: FLUSH completes only after a backend flush that began after the earlier writes completed', async () => {
  const { backend, h } = make((f) => f);
  backend.hold = true;
  const w = await heldWrite(h, backend, 0);
  await h.until(() => h.reap(0).includes(w));
  const f = h.post(0, framed(T.FLUSH, 0));
  h.kick(0);
  await h.until(() => backend.held.length === 1);
  assert.deepEqual(backend.held[0].call, ['flush']);
  await settle();
  assert.deepEqual(h.reap(0), [], 'FLUSH waits for the backend flush');
  backend.release();
  await h.until(() => h.reap(0).includes(f));
  assert.equal(h.result(0, f).status, OK);
  assert.deepEqual(backend.events, ['start:write', 'end:write', 'start:flush', 'end:flush']);
});

test('writeback: a FLUSH arriving during a running flush waits for the next one', async () => {
  const { backend, h } = make((f) => f);
  backend.hold = true;
  const f1 = h.post(0, framed(T.FLUSH, 0));
  h.kick(0);
  await h.until(() => backend.held.length === 1);
  // A write completes while that flush runs: the first flush may not cover it.
  const w = await heldWrite(h, backend, 1);
  await h.until(() => h.reap(0).includes(w));
  const f2 = h.post(0, framed(T.FLUSH, 0));
  h.kick(0);
  await settle();
  assert.equal(backend.held.length, 1, 'one flush at a time');
  backend.release();
  await h.until(() => h.reap(0).includes(f1));
  assert.ok(!h.sides[0].done.has(f2), 'the second FLUSH needs a flush that started after it');
  await h.until(() => backend.held.length === 1);
  backend.release();
  await h.until(() => h.reap(0).includes(f2));
  assert.equal(backend.calls.filter((c) => c[0] === 'flush').length, 2);
});

test('writethrough by CONFIG_WCE (writeback 0): a write completes only after a flush that follows it', async () => {
  const { backend, device, h } = make((f) => f);
  device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([0]));
  assert.equal(device.writeback, 0);
  backend.hold = true;
  const t = await heldWrite(h, backend, 2);
  await h.until(() => backend.held.length === 1);
  assert.deepEqual(backend.held[0].call, ['flush']);
  await settle();
  assert.ok(!h.reap(0).includes(t), 'not complete before the flush');
  backend.release();
  await h.until(() => h.reap(0).includes(t));
  assert.equal(h.result(0, t).status, OK);
  assert.deepEqual(backend.events, ['start:write', 'end:write', 'start:flush', 'end:flush']);
});

test('writethrough by negotiation: FLUSH offered, neither FLUSH nor CONFIG_WCE negotiated', async () => {
  const { backend, h } = make((f) => f & ~WCE & ~FLUSH);
  backend.hold = true;
  const t = await heldWrite(h, backend, 3);
  await h.until(() => backend.held.length === 1);
  assert.deepEqual(backend.held[0].call, ['flush']);
  backend.release();
  await h.until(() => h.reap(0).includes(t));
});

test('writethrough with a backend that has FUA: one durable write, no flush; writeback writes stay plain', async () => {
  const backend = new RecordingBackend();
  backend.canFua = true;
  const device = new BlkDevice({ backend, cache: 'writethrough' });
  const h = new Harness(device, { features: device.deviceFeatures });
  const t = h.post(0, framed(T.OUT, 4, { out: pattern(512, 4) }));
  h.kick(0);
  await h.until(() => h.reap(0).includes(t));
  assert.equal(h.result(0, t).status, OK);
  assert.deepEqual(backend.calls, [['write', 4 * 512, 512, true]]);
  device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([1]));
  const u = h.post(0, framed(T.OUT, 5, { out: pattern(512, 5) }));
  h.kick(0);
  await h.until(() => h.reap(0).includes(u));
  assert.deepEqual(backend.calls[1], ['write', 5 * 512, 512]);
  // A FLUSH is still a flush.
  const f = h.post(0, framed(T.FLUSH, 0));
  h.kick(0);
  await h.until(() => h.reap(0).includes(f));
  assert.deepEqual(backend.calls.map((c) => c[0]), ['write', 'write', 'flush']);
});

test('FLUSH negotiated without CONFIG_WCE is writeback', async () => {
  const { backend, h } = make((f) => f & ~WCE);
  const r = await h.run(0, framed(T.OUT, 0, { out: pattern(512, 1) }));
  assert.equal(r.status, OK);
  assert.deepEqual(backend.calls.map((c) => c[0]), ['write']);
});

test('CONFIG_WCE negotiated without FLUSH starts in writethrough (5.2.5.2)', async () => {
  const { backend, device, h } = make((f) => f & ~FLUSH);
  assert.equal(device.writeback, 0);
  await h.run(0, framed(T.OUT, 0, { out: pattern(512, 1) }));
  assert.deepEqual(backend.calls.map((c) => c[0]), ['write', 'flush']);
});

test('cache option writethrough starts with writeback 0; the driver can switch it to writeback', async () => {
  const { backend, device, h } = make((f) => f, 'writethrough');
  assert.equal(device.writeback, 0);
  await h.run(0, framed(T.OUT, 0, { out: pattern(512, 1) }));
  device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([1]));
  await h.run(0, framed(T.OUT, 1, { out: pattern(512, 2) }));
  assert.deepEqual(backend.calls.map((c) => c[0]), ['write', 'flush', 'write']);
});

test('writethrough: writes finishing during a running flush share the next one', async () => {
  const { backend, device, h } = make((f) => f);
  device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([0]));
  backend.hold = true;
  const t1 = await heldWrite(h, backend, 0);
  await h.until(() => backend.held.length === 1); // flush #1 running, covering write 0
  const tokens = [1, 2, 3].map((s) => h.post(0, framed(T.OUT, s, { out: pattern(512, s) })));
  h.kick(0);
  await h.until(() => backend.held.length === 4);
  for (let i = 0; i < 3; i++) backend.release(1); // the three writes
  await settle();
  assert.equal(backend.held.length, 1, 'they wait for the running flush to end');
  backend.release(); // flush #1
  await h.until(() => h.reap(0).includes(t1));
  await h.until(() => backend.held.length === 1); // flush #2, for all three
  backend.release();
  await h.until(() => tokens.every((t) => h.sides[0].done.has(t) || h.reap(0).includes(t)));
  assert.equal(backend.calls.filter((c) => c[0] === 'flush').length, 2);
});

test('writethrough applies to write-zeroes and discard too', async () => {
  const { backend, device, h } = make((f) => f);
  device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([0]));
  await h.run(0, framed(T.WRITE_ZEROES, 0, { out: segments([{ sector: 0, numSectors: 1 }]) }));
  await h.run(0, framed(T.DISCARD, 0, { out: segments([{ sector: 0, numSectors: 1 }]) }));
  assert.deepEqual(backend.calls.map((c) => c[0]), ['writeZeroes', 'flush', 'discard', 'flush']);
});

test('a failing flush fails the FLUSH and the writethrough writes waiting on it with IOERR', async () => {
  const { backend, device, h } = make((f) => f);
  backend.failNext = 'flush';
  assert.equal((await h.run(0, framed(T.FLUSH, 0))).status, IOERR);
  device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([0]));
  backend.failNext = 'flush';
  assert.equal((await h.run(0, framed(T.OUT, 0, { out: pattern(512, 1) }))).status, IOERR);
  assert.equal((await h.run(0, framed(T.OUT, 0, { out: pattern(512, 1) }))).status, OK);
});

test('writeback is writable only with CONFIG_WCE negotiated, only with 0 or 1', () => {
  const { device } = make((f) => f & ~WCE);
  device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([0]));
  assert.equal(device.writeback, 1, 'ignored without CONFIG_WCE');
  const { device: d2 } = make((f) => f);
  d2.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([2]));
  assert.equal(d2.writeback, 1, 'values other than 0 and 1 are ignored');
  d2.writeConfig(0, new Uint8Array(VIRTIO_BLK_CONFIG.writeback.offset + 1));
  assert.equal(d2.writeback, 0, 'a wider write covering writeback sets it');
  const before = d2.readConfig(0, 72);
  d2.writeConfig(0, new Uint8Array(8).fill(0xff));
  d2.writeConfig(100, new Uint8Array([1]));
  d2.writeConfig(-1, new Uint8Array([1]));
  assert.deepEqual(d2.readConfig(0, 72), before, 'other bytes are read-only');
});
