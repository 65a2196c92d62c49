// seg_max and size_max, from both ends: the device completes a request beyond them with
// IOERR and says so once per queue, and our driver, whatever it is asked to move, never
// sends such a request (a property over random requests, against a device advertising
// small limits).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { VIRTIO_F } from '../src/spec/virtio.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { RecordingBackend, cut, header, pattern, setup } from './blk-device-harness.js';
import { rig } from './blk-driver-harness.js';

const { OK, IOERR } = VIRTIO_BLK_S;
const T = VIRTIO_BLK_T;

test('a request with more data segments than seg_max completes with IOERR and never reaches the backend', async () => {
  const backend = new RecordingBackend();
  const reports: [number, string][] = [];
  const { h } = setup({ backend, segMax: 2, numQueues: 2, onLimitExceeded: (q, m) => reports.push([q, m]) });
  const data = pattern(1536, 1);
  const write = await h.run(0, { readable: [header(T.OUT, 0), ...cut(data, [512, 1024])], writable: [1] });
  assert.equal(write.status, IOERR);
  assert.equal(write.len, 1);
  const read = await h.run(0, { readable: [header(T.IN, 0)], writable: [512, 512, 512, 1] });
  assert.equal(read.status, IOERR);
  assert.deepEqual(backend.calls, []);
  // Exactly seg_max segments are fine; the status byte may share the last one.
  assert.equal((await h.run(0, { readable: [header(T.OUT, 0), ...cut(data, [768])], writable: [1] })).status, OK);
  assert.equal((await h.run(0, { readable: [header(T.IN, 0)], writable: [1024, 513] })).status, OK);
  // Reported once per queue, however often it happens there.
  assert.deepEqual(reports, [[0, 'request 0 has 3 data segments, more than seg_max 2; it completes with IOERR (reported once)']]);
  assert.equal((await h.run(1, { readable: [header(T.IN, 0)], writable: [512, 512, 512, 1] })).status, IOERR);
  assert.deepEqual(reports.map(([q]) => q), [0, 1]);
});

test('a descriptor longer than size_max makes its request IOERR', async () => {
  const backend = new RecordingBackend();
  const reports: string[] = [];
  const { h } = setup({ backend, sizeMax: 1024, onLimitExceeded: (_q, m) => reports.push(m) });
  const data = pattern(2048, 2);
  assert.equal((await h.run(0, { readable: [header(T.OUT, 0), data], writable: [1] })).status, IOERR);
  assert.equal((await h.run(0, { readable: [header(T.IN, 0)], writable: [2048, 1] })).status, IOERR);
  assert.deepEqual(backend.calls, []);
  assert.equal((await h.run(0, { readable: [header(T.OUT, 0), ...cut(data, [1024])], writable: [1] })).status, OK);
  assert.deepEqual(reports, ['request 0 has a 2048-byte segment, more than size_max 1024; it completes with IOERR (reported once)']);
});

test('segments in an indirect table count against seg_max like direct ones', async () => {
  // A 4-entry ring: the harness puts a 5-descriptor chain in an indirect table.
  const { h } = setup({ queueSize: 4, segMax: 2 });
  const data = pattern(1536, 3);
  assert.equal((await h.run(0, { readable: [header(T.OUT, 0), ...cut(data, [512, 1024])], writable: [1] })).status, IOERR);
  assert.equal((await h.run(0, { readable: [header(T.OUT, 0), ...cut(data, [768])], writable: [1] })).status, OK);
});

test('without a listener a request beyond the limits still completes with IOERR', async () => {
  const { h } = setup({ segMax: 1 });
  assert.equal((await h.run(0, { readable: [header(T.IN, 0)], writable: [512, 512, 1] })).status, IOERR);
});

const DISK_BYTES = 256 * 1024;

type Op =
  | { kind: 'write' | 'read'; block: number; blocks: number; cuts: number[]; zeroCopy: boolean; seed: number }
  | { kind: 'discard' | 'writeZeroes'; ranges: { block: number; blocks: number }[] }
  | { kind: 'flush' | 'getId' };

const io = fc.record({
  kind: fc.constantFrom('write' as const, 'read' as const),
  block: fc.nat(),
  blocks: fc.integer({ min: 1, max: 40 }),
  cuts: fc.uniqueArray(fc.integer({ min: 1, max: 1 << 16 }), { maxLength: 5 }),
  zeroCopy: fc.boolean(),
  seed: fc.integer(),
});
const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: io },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constantFrom('discard' as const, 'writeZeroes' as const),
      ranges: fc.array(fc.record({ block: fc.nat(), blocks: fc.integer({ min: 1, max: 8 }) }), { minLength: 1, maxLength: 6 }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constantFrom('flush' as const, 'getId' as const) }) },
);

const shape = fc.record({
  segMax: fc.constantFrom(1, 2, 3, 5),
  sizeMax: fc.constantFrom(undefined, 512, 1024, 1536, 4096),
  blockSize: fc.constantFrom(512 as const, 4096 as const),
  queueSize: fc.constantFrom(4, 8, 16),
  maxRequestBytes: fc.constantFrom(4096, 1 << 20),
  excludeFeatures: fc.constantFrom([], [VIRTIO_F.RING_INDIRECT_DESC]),
});

test('the driver never sends a request beyond seg_max or size_max, whatever it is asked to move', async () => {
  await fc.assert(fc.asyncProperty(shape, fc.array(op, { minLength: 1, maxLength: 12 }), async (s, ops) => {
    // The driver refuses (BAD_CONFIG) limits that cannot carry one block; without
    // INDIRECT a chain's data descriptors are also held to the ring, less header and status.
    const dataDescriptors = s.excludeFeatures.length > 0 ? Math.min(s.segMax, s.queueSize - 2) : s.segMax;
    fc.pre(dataDescriptors * (s.sizeMax ?? Infinity) >= s.blockSize);
    const exceeded: string[] = [];
    const r = await rig({
      backend: new MemoryBackend({ size: DISK_BYTES }),
      device: {
        segMax: s.segMax, sizeMax: s.sizeMax, blockSize: s.blockSize, queueSize: s.queueSize,
        discard: { maxSegments: 4 }, writeZeroes: { maxSegments: 4 },
        onLimitExceeded: (_q, m) => exceeded.push(m),
      },
      driver: { maxRequestBytes: s.maxRequestBytes, excludeFeatures: s.excludeFeatures },
    });
    const diskBlocks = DISK_BYTES / s.blockSize;
    const spb = s.blockSize / 512;
    const model = new Uint8Array(DISK_BYTES);
    try {
      // One at a time: the model then needs no ordering rules.
      for (const o of ops) {
        switch (o.kind) {
          case 'flush':
            await r.driver.flush();
            break;
          case 'getId':
            await r.driver.getId();
            break;
          case 'discard':
          case 'writeZeroes': {
            const ranges = o.ranges.map((g) => {
              const block = g.block % diskBlocks;
              return { sector: block * spb, sectors: Math.min(g.blocks, diskBlocks - block) * spb };
            });
            if (o.kind === 'writeZeroes') await r.driver.writeZeroes(ranges);
            else await r.driver.discard(ranges);
            // Discard need not zero: the model takes whatever the disk now holds.
            for (const g of ranges) await r.driver.read(g.sector, [model.subarray(g.sector * 512, (g.sector + g.sectors) * 512)]);
            break;
          }
          default: {
            const block = o.block % diskBlocks;
            const bytes = Math.min(o.blocks, diskBlocks - block) * s.blockSize;
            const at = block * s.blockSize;
            const buffer = o.zeroCopy ? r.driver.allocBuffer(bytes) : new Uint8Array(bytes);
            const cuts = [...new Set(o.cuts.map((c) => c % bytes).filter((c) => c > 0))].sort((a, b) => a - b);
            const pieces = o.zeroCopy ? [buffer] : cut(buffer, cuts);
            if (o.kind === 'write') {
              buffer.set(pattern(bytes, o.seed));
              model.set(buffer, at);
              await r.driver.write(at / 512, pieces);
            } else {
              await r.driver.read(at / 512, pieces);
              assert.deepEqual(buffer, model.subarray(at, at + bytes), `read of ${bytes} bytes at ${at}`);
            }
            if (o.zeroCopy) r.driver.freeBuffer(buffer);
          }
        }
      }
    } finally {
      await r.close();
    }
    assert.deepEqual(exceeded, []);
  }), { numRuns: 60 });
});
