// Feature bits derived from the backend and the options, the config space built from
// them, and option validation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { BlkDevice, MAX_RANGE_SEGMENTS, type BlkDeviceOptions } from '../src/blk/device.js';
import { decodeBlkConfig, type BlkConfig } from '../src/blk/config.js';
import { VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_F } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, VIRTIO_ID, featureBits } from '../src/spec/virtio.js';

const MiB = 1 << 20;

function device(options: Partial<BlkDeviceOptions> = {}): BlkDevice {
  return new BlkDevice({ backend: new MemoryBackend({ size: MiB }), ...options });
}

function config(d: BlkDevice): BlkConfig {
  const c = decodeBlkConfig(d.readConfig(0, VIRTIO_BLK_CONFIG_SIZE));
  assert.ok(!(c instanceof Error));
  return c;
}

test('a default memory-backed device offers exactly what it implements', () => {
  const d = device();
  assert.equal(d.deviceId, VIRTIO_ID.BLOCK);
  assert.deepEqual(featureBits(d.deviceFeatures), [
    VIRTIO_BLK_F.SEG_MAX, VIRTIO_BLK_F.BLK_SIZE, VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.TOPOLOGY, VIRTIO_BLK_F.CONFIG_WCE,
    VIRTIO_BLK_F.DISCARD, VIRTIO_BLK_F.WRITE_ZEROES, VIRTIO_BLK_F.SECURE_ERASE,
    VIRTIO_F.RING_INDIRECT_DESC, VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.VERSION_1,
  ].sort((a, b) => a - b));
});

test('optional bits follow the options: SIZE_MAX, GEOMETRY, RO, MQ', () => {
  const d = device({ sizeMax: 65536, geometry: { cylinders: 2, heads: 16, sectors: 63 }, readOnly: true, numQueues: 4 });
  const bits = featureBits(d.deviceFeatures);
  for (const b of [VIRTIO_BLK_F.SIZE_MAX, VIRTIO_BLK_F.GEOMETRY, VIRTIO_BLK_F.RO, VIRTIO_BLK_F.MQ]) assert.ok(bits.includes(b));
  const c = config(d);
  assert.equal(c.sizeMax, 65536);
  assert.deepEqual(c.geometry, { cylinders: 2, heads: 16, sectors: 63 });
  assert.equal(c.numQueues, 4);
  assert.equal(d.numQueues, 4);
});

test('the config space holds capacity, limits, topology and cache mode', () => {
  const d = device({
    blockSize: 4096, queueSize: 128, topology: { physicalBlockExp: 1, minIoSize: 2, optIoSize: 64 },
    discard: { maxSectors: 8192, maxSegments: 16 },
  });
  const c = config(d);
  assert.equal(c.capacity, MiB / 512);
  assert.equal(c.blkSize, 4096);
  assert.equal(c.segMax, 126);
  assert.equal(d.maxQueueSize, 128);
  assert.deepEqual(c.topology, { physicalBlockExp: 1, alignmentOffset: 0, minIoSize: 2, optIoSize: 64 });
  assert.equal(c.writeback, 1);
  assert.equal(c.maxDiscardSectors, 8192);
  assert.equal(c.maxDiscardSeg, 16);
  assert.equal(c.discardSectorAlignment, 8);
  assert.equal(c.maxWriteZeroesSeg, MAX_RANGE_SEGMENTS);
  assert.equal(c.maxWriteZeroesSectors % 8, 0);
  assert.equal(c.writeZeroesMayUnmap, 1);
  assert.equal(c.maxSecureEraseSeg, MAX_RANGE_SEGMENTS);
  assert.equal(c.secureEraseSectorAlignment, 8);
});

test('capacity counts whole logical blocks only', () => {
  const d = new BlkDevice({ backend: new MemoryBackend({ size: 4096 * 3 + 512 }), blockSize: 4096 });
  assert.equal(d.capacity, 24);
});

test('limits of range requests that are not offered read as zero', () => {
  const c = config(device({ discard: false, secureErase: false }));
  assert.equal(c.maxDiscardSectors, 0);
  assert.equal(c.maxDiscardSeg, 0);
  assert.equal(c.maxSecureEraseSectors, 0);
  assert.ok(c.maxWriteZeroesSectors > 0);
});

test('readConfig returns exactly the bytes asked for, zero past the structure', () => {
  const d = device();
  for (const n of [1, 8, 57, 60, 72, 256]) assert.equal(d.readConfig(0, n).length, n);
  assert.deepEqual(d.readConfig(0, 60), d.readConfig(0, 72).subarray(0, 60));
  assert.deepEqual(d.readConfig(70, 10).subarray(2), new Uint8Array(8));
  assert.deepEqual(d.readConfig(1000, 4), new Uint8Array(4));
  assert.equal(d.readConfig(-5, 4).length, 4);
  assert.equal(d.readConfig(0, -1).length, 0);
});

for (const [name, options, pattern] of [
  ['a block size other than 512 or 4096', { blockSize: 1024 }, /block size/],
  ['zero queues', { numQueues: 0 }, /numQueues/],
  ['a queue size that is not a power of two', { queueSize: 100 }, /queue size/],
  ['a serial longer than 20 bytes', { serial: 'x'.repeat(21) }, /serial/],
  ['a serial with non-ASCII', { serial: 'disk-é' }, /serial/],
  ['more than 256 discard segments', { discard: { maxSegments: 257 } }, /discard.maxSegments/],
  ['max sectors not whole blocks', { blockSize: 4096, writeZeroes: { maxSectors: 12 } }, /writeZeroes.maxSectors/],
  ['a geometry out of range', { geometry: { cylinders: 70000, heads: 1, sectors: 1 } }, /cylinders/],
  ['a size_max of 0', { sizeMax: 0 }, /sizeMax/],
  ['a size_max below one sector', { sizeMax: 511 }, /sizeMax 511 is not an integer from 512/],
] as const) {
  test(`options with ${name} are refused with BAD_OPTION`, () => {
    assert.throws(() => device(options as Partial<BlkDeviceOptions>), (e: unknown) =>
      e instanceof Error && (e as { code?: string }).code === 'BAD_OPTION' && pattern.test(e.message));
  });
}

test('a backend smaller than one logical block is refused', () => {
  assert.throws(() => new BlkDevice({ backend: new MemoryBackend({ size: 512 }), blockSize: 4096 }), { code: 'BAD_OPTION' });
});
