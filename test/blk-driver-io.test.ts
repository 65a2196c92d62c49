// The data path: chains, back-pressure, splitting, status mapping, special requests.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  IoError, NotSupportedError, ReadOnlyError, RequestError,
} from '../src/blk/driver-errors.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, features } from '../src/spec/virtio.js';
import { ScriptedDevice, pattern, rig, scriptedRig } from './blk-driver-harness.js';
import { RecordingBackend } from './blk-device-harness.js';

const NO_RING_EXTRAS = [VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.RING_INDIRECT_DESC];

for (const exclude of [[], NO_RING_EXTRAS]) {
  test(`back-pressure: a 4-entry ring takes 64 concurrent requests, none lost, data right (excluded: ${exclude.join(',') || 'none'})`, async () => {
    const r = await rig({ device: { queueSize: 4 }, driver: { excludeFeatures: exclude } });
    try {
      const writes = [];
      for (let i = 0; i < 64; i++) writes.push(r.driver.write(i * 8, [pattern(4096, i)]));
      await Promise.all(writes);
      const bufs = Array.from({ length: 64 }, () => new Uint8Array(4096));
      await Promise.all(bufs.map((b, i) => r.driver.read(i * 8, [b])));
      bufs.forEach((b, i) => assert.deepEqual(b, pattern(4096, i), `block ${i}`));
    } finally {
      await r.close();
    }
  });
}

test('requests larger than maxRequestBytes and size_max are split and reassembled', async () => {
  const r = await rig({ size: 4 << 20, device: { sizeMax: 1024, segMax: 4 }, driver: { maxRequestBytes: 1 << 20 } });
  try {
    assert.equal(r.driver.maxRequestBytes, 4096, 'seg_max × size_max');
    const data = pattern(100 * 1024 + 512, 7);
    // Scatter-gather with uneven pieces whose total is a multiple of 512.
    const pieces = [data.subarray(0, 1), data.subarray(1, 3000), data.subarray(3000, 70_001), data.subarray(70_001)];
    await r.driver.write(24, pieces);
    const a = new Uint8Array(333);
    const b = new Uint8Array(data.length - 333);
    await r.driver.read(24, [a, b]);
    assert.deepEqual(a, data.subarray(0, 333));
    assert.deepEqual(b, data.subarray(333));
  } finally {
    await r.close();
  }
});

test('offsets and lengths must be whole logical blocks, inside the disk', async () => {
  const r = await rig({ size: 1 << 20, device: { blockSize: 4096 } });
  try {
    await assert.rejects(r.driver.read(1, [new Uint8Array(4096)]), { code: 'MISALIGNED' });
    await assert.rejects(r.driver.read(0, [new Uint8Array(512)]), { code: 'MISALIGNED' });
    await assert.rejects(r.driver.read(2048, [new Uint8Array(4096)]), { code: 'OUT_OF_RANGE' });
    await assert.rejects(r.driver.read(-8, [new Uint8Array(4096)]), { code: 'OUT_OF_RANGE' });
    await assert.rejects(r.driver.discard([{ sector: 8, sectors: 1 }]), { code: 'MISALIGNED' });
    await assert.rejects(r.driver.read(0, [new Uint8Array(4096)], { queue: 3 }), { code: 'BAD_QUEUE_INDEX' });
    await r.driver.read(2040, [new Uint8Array(4096)]);
  } finally {
    await r.close();
  }
});

test('a read-only disk refuses writes, discards, write-zeroes and secure erase before the ring', async () => {
  const backend = new MemoryBackend({ size: 1 << 20 });
  await backend.write(0, [pattern(4096, 3)]);
  const r = await rig({ backend, device: { readOnly: true } });
  let kicks = 0;
  const notify = r.device.queueNotify.bind(r.device);
  r.device.queueNotify = (i: number) => {
    kicks++;
    notify(i);
  };
  try {
    assert.equal(r.driver.readOnly, true);
    await assert.rejects(r.driver.write(0, [new Uint8Array(512)]), ReadOnlyError);
    await assert.rejects(r.driver.discard([{ sector: 0, sectors: 8 }]), ReadOnlyError);
    await assert.rejects(r.driver.writeZeroes([{ sector: 0, sectors: 8 }]), ReadOnlyError);
    await assert.rejects(r.driver.secureErase([{ sector: 0, sectors: 8 }]), ReadOnlyError);
    assert.equal(kicks, 0, 'nothing reached the device');
    const back = new Uint8Array(4096);
    await r.driver.read(0, [back]);
    assert.deepEqual(back, pattern(4096, 3));
  } finally {
    await r.close();
  }
});

test('GET_ID returns the serial up to the first NUL', async () => {
  for (const serial of ['', 'vblk-serial-1', '01234567890123456789']) {
    const r = await rig({ device: { serial } });
    try {
      assert.equal(await r.driver.getId(), serial);
    } finally {
      await r.close();
    }
  }
});

test('GET_ID answered IOERR or UNSUPP reads as an empty serial (the seed\'s sysfs attribute)', async () => {
  for (const status of [VIRTIO_BLK_S.IOERR, VIRTIO_BLK_S.UNSUPP]) {
    const device = new ScriptedDevice({ answer: () => ({ status, fill: 0x41 }) });
    const r = await scriptedRig(device);
    try {
      assert.equal(await r.driver.getId(), '');
      assert.equal(device.seen[0].type, VIRTIO_BLK_T.GET_ID);
    } finally {
      await r.close();
    }
  }
});

test('status mapping: OK resolves, UNSUPP is NotSupported, IOERR and undefined statuses are I/O errors', async () => {
  const statuses = new Map<number, number | undefined>();
  const device = new ScriptedDevice({ answer: (q) => ({ status: statuses.get(q.sector) }) });
  statuses.set(0, VIRTIO_BLK_S.OK).set(8, VIRTIO_BLK_S.UNSUPP).set(16, VIRTIO_BLK_S.IOERR).set(24, 7).set(32, undefined);
  const r = await scriptedRig(device);
  try {
    const b = () => [new Uint8Array(4096)];
    await r.driver.read(0, b());
    await assert.rejects(r.driver.read(8, b()), (e) => e instanceof NotSupportedError && /read of 4096 bytes at sector 8/.test(e.message));
    await assert.rejects(r.driver.read(16, b()), (e) => e instanceof IoError && e.status === VIRTIO_BLK_S.IOERR);
    await assert.rejects(r.driver.read(24, b()), (e) => e instanceof IoError && e.status === 7);
    // A device that never writes the status byte: the driver's sentinel shows through as an error, not "OK".
    await assert.rejects(r.driver.read(32, b()), IoError);
  } finally {
    await r.close();
  }
});

test('flush goes to the device with FLUSH and resolves at once without it', async () => {
  const backend = new RecordingBackend();
  const flushes = (): number => backend.calls.filter(([op]) => op === 'flush').length;
  const r = await rig({ backend });
  try {
    assert.ok(r.driver.has(VIRTIO_BLK_F.FLUSH));
    // Writeback (the default cache mode): a write alone never reaches the backend's flush.
    await r.driver.write(0, [pattern(4096, 1)]);
    assert.equal(flushes(), 0);
    await r.driver.flush();
    assert.equal(flushes(), 1, 'the device flushed its backend for the FLUSH request');
  } finally {
    await r.close();
  }
  const device = new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1) });
  const s = await scriptedRig(device);
  try {
    await s.driver.flush();
    assert.equal(device.seen.length, 0);
  } finally {
    await s.close();
  }
});

test('discard, write-zeroes and secure erase zero their ranges; unnegotiated ones are NotSupported', async () => {
  const r = await rig({ size: 1 << 20, device: { discard: { maxSectors: 16, maxSegments: 2 } } });
  try {
    const fill = pattern(1 << 20, 9);
    await r.driver.write(0, [fill]);
    await r.driver.discard([{ sector: 0, sectors: 40 }, { sector: 100, sectors: 8 }]);
    await r.driver.writeZeroes([{ sector: 200, sectors: 16 }], { unmap: true });
    await r.driver.writeZeroes([{ sector: 300, sectors: 8 }]);
    await r.driver.secureErase([{ sector: 400, sectors: 24 }]);
    const back = new Uint8Array(1 << 20);
    await r.driver.read(0, [back]);
    const expected = fill.slice();
    for (const [s, n] of [[0, 40], [100, 8], [200, 16], [300, 8], [400, 24]]) expected.fill(0, s * 512, (s + n) * 512);
    assert.deepEqual(back, expected);
  } finally {
    await r.close();
  }
  const none = await rig({ device: { discard: false, writeZeroes: false, secureErase: false } });
  try {
    await assert.rejects(none.driver.discard([{ sector: 0, sectors: 8 }]), NotSupportedError);
    await assert.rejects(none.driver.writeZeroes([{ sector: 0, sectors: 8 }]), NotSupportedError);
    await assert.rejects(none.driver.secureErase([{ sector: 0, sectors: 8 }]), NotSupportedError);
  } finally {
    await none.close();
  }
});

test('discard ranges are cut at max_discard_sectors and grouped by max_discard_seg', async () => {
  const device = new ScriptedDevice({
    features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.DISCARD),
    config: { maxDiscardSectors: 16, maxDiscardSeg: 2 },
  });
  const r = await scriptedRig(device);
  try {
    await r.driver.discard([{ sector: 0, sectors: 40 }, { sector: 64, sectors: 8 }]);
    // 40 → 16 + 16 + 8, then 8: four segments, two per request.
    assert.equal(device.seen.length, 2);
    assert.deepEqual(segmentsSeen(device), [[0, 16], [16, 16], [32, 8], [64, 8]]);
    for (const s of device.seen) assert.equal(s.type, VIRTIO_BLK_T.DISCARD);
  } finally {
    await r.close();
  }
});

/** [sector, sectors] of every discard / write-zeroes / secure-erase segment the device saw, in order. */
function segmentsSeen(device: ScriptedDevice): number[][] {
  return device.seen.flatMap((s) => {
    const d = s.chain.readable.slice(1);
    const bytes = new Uint8Array(d.reduce((n, v) => n + v.length, 0));
    let at = 0;
    for (const v of d) {
      bytes.set(v, at);
      at += v.length;
    }
    const view = new DataView(bytes.buffer);
    return Array.from({ length: bytes.length / 16 }, (_, k) => [view.getUint32(k * 16, true), view.getUint32(k * 16 + 8, true)]);
  });
}

// Linux makes the alignment its queue's discard granularity and splits so that every cut
// falls on a granularity boundary (each piece at most max sectors rounded down to it).
test('discard and secure-erase ranges are cut on their sector_alignment boundaries', async () => {
  const cases = [
    { type: VIRTIO_BLK_T.DISCARD, bit: VIRTIO_BLK_F.DISCARD, config: { maxDiscardSectors: 20, maxDiscardSeg: 8, discardSectorAlignment: 8 } },
    {
      type: VIRTIO_BLK_T.SECURE_ERASE, bit: VIRTIO_BLK_F.SECURE_ERASE,
      config: { maxSecureEraseSectors: 20, maxSecureEraseSeg: 8, secureEraseSectorAlignment: 8 },
    },
  ];
  for (const c of cases) {
    const device = new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1, c.bit), config: c.config });
    const r = await scriptedRig(device);
    try {
      const range = [{ sector: 4, sectors: 60 }];
      await (c.type === VIRTIO_BLK_T.DISCARD ? r.driver.discard(range) : r.driver.secureErase(range));
      // At most 20 rounded down to 16; cuts at 16, 32, 48: the first piece stops short.
      assert.deepEqual(segmentsSeen(device), [[4, 12], [16, 16], [32, 16], [48, 16]], `request type ${c.type}`);
      for (const s of device.seen) assert.equal(s.type, c.type);
    } finally {
      await r.close();
    }
  }
});

test('cache mode follows the writeback byte and toggles through it (CONFIG_WCE)', async () => {
  const r = await rig();
  try {
    assert.equal(r.driver.getCacheMode(), 'writeback');
    assert.equal(await r.driver.setCacheMode('writethrough'), 'writethrough');
    assert.equal(r.device.writeback, 0);
    assert.equal(r.driver.getCacheMode(), 'writethrough');
    assert.equal(await r.driver.setCacheMode('writeback'), 'writeback');
    assert.equal(r.device.writeback, 1);
  } finally {
    await r.close();
  }
  const noWce = await scriptedRig(new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.FLUSH) }));
  try {
    assert.equal(noWce.driver.getCacheMode(), 'writeback', 'FLUSH without CONFIG_WCE means a writeback cache');
    await assert.rejects(noWce.driver.setCacheMode('writethrough'), NotSupportedError);
  } finally {
    await noWce.close();
  }
});

test('multiqueue: round robin spreads requests; a caller may pick the queue', async () => {
  const device = new ScriptedDevice({ numQueues: 3, features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.MQ) });
  const r = await scriptedRig(device, { queues: 3 });
  try {
    assert.equal(r.driver.numQueues, 3);
    await Promise.all(Array.from({ length: 6 }, (_, i) => r.driver.read(i * 8, [new Uint8Array(512)])));
    assert.deepEqual(device.seen.map((s) => s.queue).sort(), [0, 0, 1, 1, 2, 2]);
    await r.driver.read(0, [new Uint8Array(512)], { queue: 2 });
    assert.equal(device.seen.at(-1)?.queue, 2);
  } finally {
    await r.close();
  }
});

test('empty requests resolve without touching the device; bad ranges are refused', async () => {
  const device = new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.DISCARD) });
  const r = await scriptedRig(device);
  try {
    await r.driver.read(0, []);
    await r.driver.discard([]);
    assert.equal(device.seen.length, 0);
    await assert.rejects(r.driver.discard([{ sector: 0, sectors: 0 }]), RequestError);
    await assert.rejects(r.driver.discard([{ sector: 2047, sectors: 2 }]), { code: 'OUT_OF_RANGE' });
  } finally {
    await r.close();
  }
});
