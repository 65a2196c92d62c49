// Probe (the seed's virtblk_probe, modernised): negotiation, config, limits, naming.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkDriver, BLK_DRIVER_FEATURES } from '../src/blk/driver.js';
import { ProbeError } from '../src/blk/driver-errors.js';
import { VIRTIO_BLK_F } from '../src/spec/virtio-blk.js';
import { VIRTIO_CONFIG_S, VIRTIO_F, features, hasFeature } from '../src/spec/virtio.js';
import { LoopbackTransport } from '../src/transport/loopback.js';
import { ScriptedDevice, rig, scriptedRig } from './blk-driver-harness.js';

test('probe negotiates the driver set ∩ the device set and reaches DRIVER_OK', async () => {
  const r = await rig({ device: { numQueues: 1 } });
  try {
    const offered = r.device.deviceFeatures;
    assert.equal(r.driver.features, offered & BLK_DRIVER_FEATURES);
    assert.ok(r.driver.has(VIRTIO_F.VERSION_1));
    assert.ok(r.driver.has(VIRTIO_F.RING_EVENT_IDX));
    assert.ok(r.driver.has(VIRTIO_F.RING_INDIRECT_DESC));
    const S = VIRTIO_CONFIG_S;
    assert.equal(await r.transport.getStatus(), S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    assert.equal(r.driver.capacity, (1 << 20) / 512);
    assert.equal(r.driver.sizeBytes, 1 << 20);
  } finally {
    await r.close();
  }
});

test('excludeFeatures keeps offered bits out of the negotiation', async () => {
  const r = await rig({ driver: { excludeFeatures: [VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.RING_INDIRECT_DESC, VIRTIO_BLK_F.DISCARD] } });
  try {
    assert.ok(!r.driver.has(VIRTIO_F.RING_EVENT_IDX));
    assert.ok(!r.driver.has(VIRTIO_F.RING_INDIRECT_DESC));
    assert.ok(!r.driver.has(VIRTIO_BLK_F.DISCARD));
    assert.ok(hasFeature(r.device.deviceFeatures, VIRTIO_BLK_F.DISCARD));
  } finally {
    await r.close();
  }
});

test('a device without VERSION_1 is refused with NO_VERSION_1 and set FAILED; the index is freed', async () => {
  const before = await rig();
  const freeIndex = before.driver.index;
  await before.close();
  const device = new ScriptedDevice({ features: features(VIRTIO_BLK_F.FLUSH) });
  const transport = new LoopbackTransport(device);
  await assert.rejects(BlkDriver.probe(transport), (e: unknown) => {
    assert.ok(e instanceof ProbeError);
    assert.equal(e.code, 'NO_VERSION_1');
    assert.match(e.message, /VIRTIO_F_VERSION_1/);
    return true;
  });
  assert.ok((await transport.getStatus()) & VIRTIO_CONFIG_S.FAILED);
  const after = await rig();
  assert.equal(after.driver.index, freeIndex);
  await after.close();
  await transport.close();
});

test('a device that clears FEATURES_OK fails the probe with FEATURES_NOT_ACCEPTED', async () => {
  class Refusing extends LoopbackTransport {
    override async getStatus(): Promise<number> {
      return (await super.getStatus()) & ~VIRTIO_CONFIG_S.FEATURES_OK;
    }
  }
  const transport = new Refusing(new ScriptedDevice());
  await assert.rejects(BlkDriver.probe(transport), { code: 'FEATURES_NOT_ACCEPTED' });
  await transport.close();
});

test('seg_max 0 counts as 1 (the seed: "at least one SG element, whatever they say"); size_max bounds each chain', async () => {
  const device = new ScriptedDevice({
    features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.SEG_MAX, VIRTIO_BLK_F.SIZE_MAX),
    config: { segMax: 0, sizeMax: 4096 },
  });
  const r = await scriptedRig(device);
  try {
    assert.equal(r.driver.segMax, 1);
    assert.equal(r.driver.sizeMax, 4096);
    assert.equal(r.driver.maxRequestBytes, 4096);
    await r.driver.read(0, [new Uint8Array(16384)]);
    assert.equal(device.seen.length, 4, 'a 16 KiB read goes out as four 4 KiB chains');
    for (const s of device.seen) assert.equal(s.chain.writableBytes, 4096 + 1);
    assert.deepEqual(device.seen.map((s) => s.sector), [0, 8, 16, 24]);
  } finally {
    await r.close();
  }
});

test('without SEG_MAX the seed allows one data segment; without SIZE_MAX a segment is unbounded', async () => {
  const r = await scriptedRig(new ScriptedDevice(), { maxRequestBytes: 1 << 16 });
  try {
    assert.equal(r.driver.segMax, 1);
    assert.equal(r.driver.sizeMax, 0xffff_ffff);
    assert.equal(r.driver.maxRequestBytes, 1 << 16);
  } finally {
    await r.close();
  }
});

test('blk_size and topology: physical = blk_size << exp, alignment, io_min and io_opt in bytes', async () => {
  const r = await rig({
    device: { blockSize: 4096, topology: { physicalBlockExp: 3, alignmentOffset: 1, minIoSize: 2, optIoSize: 16 } },
  });
  try {
    assert.equal(r.driver.logicalBlockSize, 4096);
    assert.equal(r.driver.physicalBlockSize, 32768);
    assert.equal(r.driver.alignmentOffset, 4096);
    assert.equal(r.driver.ioMin, 8192);
    assert.equal(r.driver.ioOpt, 65536);
  } finally {
    await r.close();
  }
});

test('zero topology fields leave the defaults: physical = logical, no alignment or I/O hints', async () => {
  const r = await rig();
  try {
    assert.equal(r.driver.logicalBlockSize, 512);
    assert.equal(r.driver.physicalBlockSize, 512);
    assert.equal(r.driver.alignmentOffset, 0);
    assert.equal(r.driver.ioMin, 0);
    assert.equal(r.driver.ioOpt, 0);
  } finally {
    await r.close();
  }
});

test('a blk_size that is not a power of two from 512 is refused as BAD_CONFIG', async () => {
  const device = new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.BLK_SIZE), config: { blkSize: 1000 } });
  const transport = new LoopbackTransport(device);
  await assert.rejects(BlkDriver.probe(transport), { code: 'BAD_CONFIG' });
  assert.ok((await transport.getStatus()) & VIRTIO_CONFIG_S.FAILED);
  await transport.close();
});

// Linux (6.0 on, where virtio_blk learnt secure erase) refuses such a device in
// virtblk_probe with "max_secure_erase_sectors can't be 0" and the like; so do we.
test('with SECURE_ERASE, a zero max_secure_erase_sectors, max_secure_erase_seg or alignment is refused as BAD_CONFIG', async () => {
  const good = { maxSecureEraseSectors: 64, maxSecureEraseSeg: 2, secureEraseSectorAlignment: 1 };
  for (const field of ['maxSecureEraseSectors', 'maxSecureEraseSeg', 'secureEraseSectorAlignment'] as const) {
    const device = new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.SECURE_ERASE), config: { ...good, [field]: 0 } });
    const transport = new LoopbackTransport(device);
    await assert.rejects(BlkDriver.probe(transport), (e: Error & { code?: string }) => {
      assert.equal(e.code, 'BAD_CONFIG');
      assert.match(e.message, /secure_erase.* is 0/);
      return true;
    }, field);
    assert.ok((await transport.getStatus()) & VIRTIO_CONFIG_S.FAILED);
    await transport.close();
  }
  // Without the feature the fields mean nothing, and zeroes are fine.
  const r = await scriptedRig(new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1) }));
  await r.close();
  const ok = await scriptedRig(new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.SECURE_ERASE), config: good }));
  await ok.close();
});

test('geometry: the device\'s with GEOMETRY, else 64 heads / 32 sectors / capacity >> 11', async () => {
  const withGeo = await rig({ size: 64 << 20, device: { geometry: { cylinders: 1000, heads: 16, sectors: 63 } } });
  try {
    assert.deepEqual(withGeo.driver.geometry, { cylinders: 1000, heads: 16, sectors: 63 });
  } finally {
    await withGeo.close();
  }
  const without = await rig({ size: 64 << 20 });
  try {
    assert.deepEqual(without.driver.geometry, { heads: 64, sectors: 32, cylinders: (64 << 20) / 512 / 2048 });
  } finally {
    await without.close();
  }
});

test('MQ: queues = min(num_queues, requested, transport max); without MQ one queue', async () => {
  for (const [requested, expected] of [[2, 2], [8, 4], [1, 1]] as const) {
    const r = await rig({ device: { numQueues: 4 }, driver: { queues: requested } });
    try {
      assert.equal(r.driver.numQueues, expected, `requested ${requested}`);
    } finally {
      await r.close();
    }
  }
  const single = await rig({ device: { numQueues: 1 }, driver: { queues: 4 } });
  try {
    assert.ok(!single.driver.has(VIRTIO_BLK_F.MQ));
    assert.equal(single.driver.numQueues, 1);
  } finally {
    await single.close();
  }
});

test('disks are named from the lowest free index; remove frees it for the next disk', async () => {
  const a = await rig();
  const b = await rig();
  try {
    assert.match(a.driver.name, /^vd[a-z]+$/);
    assert.notEqual(a.driver.name, b.driver.name);
    assert.ok(b.driver.index > a.driver.index);
    const freed = a.driver.index;
    await a.close();
    const c = await rig();
    assert.equal(c.driver.index, freed);
    assert.equal(c.driver.name, a.driver.name);
    await c.close();
  } finally {
    await b.close();
  }
});

test('bad options are refused before touching the device', async () => {
  const transport = new LoopbackTransport(new ScriptedDevice());
  await assert.rejects(BlkDriver.probe(transport, { queueSize: 0 }), { code: 'BAD_OPTION' });
  await assert.rejects(BlkDriver.probe(transport, { timeoutMs: -1 }), { code: 'BAD_OPTION' });
  await assert.rejects(BlkDriver.probe(transport, { excludeFeatures: [VIRTIO_F.VERSION_1] }), { code: 'BAD_OPTION' });
  assert.equal(await transport.getStatus(), 0);
  await transport.close();
});
