// Data integrity, property-based: random mixes of reads (scatter-gather with uneven
// pieces), writes, flushes, discards, write-zeroes and secure erases, in concurrent
// batches, through driver → loopback → BlkDevice → each backend, checked against a
// plain byte array. Run with and without EVENT_IDX / INDIRECT_DESC, with small rings
// (back-pressure), small size_max and request limits (multi-descriptor chains and
// splitting), and one or two queues.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import type { BlockBackend } from '../src/backends/backend.js';
import { openFileBackend } from '../src/node/file-backend.js';
import { VIRTIO_F } from '../src/spec/virtio.js';
import type { SectorRange } from '../src/blk/driver.js';
import { pattern, rig } from './blk-driver-harness.js';

const DISK_SECTORS = 512;
const DISK_BYTES = DISK_SECTORS * 512;
const MAX_IO_SECTORS = 72;
const RUNS = 20;

type Op =
  | { kind: 'write'; sector: number; cuts: number[]; sectors: number; seed: number }
  | { kind: 'read'; sector: number; cuts: number[]; sectors: number }
  | { kind: 'flush' }
  | { kind: 'discard' | 'writeZeroes' | 'secureErase'; ranges: SectorRange[]; unmap: boolean };

const extent = fc.integer({ min: 1, max: MAX_IO_SECTORS }).chain((sectors) => fc.record({
  sectors: fc.constant(sectors),
  sector: fc.integer({ min: 0, max: DISK_SECTORS - sectors }),
  // Where the caller's buffer list is cut: uneven pieces whose total is whole sectors.
  cuts: fc.uniqueArray(fc.integer({ min: 1, max: sectors * 512 - 1 }), { maxLength: sectors * 512 > 1 ? 4 : 0 })
    .map((c) => c.sort((a, b) => a - b)),
}));
const range = fc.integer({ min: 1, max: 40 }).chain((sectors) => fc.record({
  sectors: fc.constant(sectors),
  sector: fc.integer({ min: 0, max: DISK_SECTORS - sectors }),
}));

const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.tuple(extent, fc.integer()).map(([e, seed]): Op => ({ kind: 'write', ...e, seed })) },
  { weight: 4, arbitrary: extent.map((e): Op => ({ kind: 'read', ...e })) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: 'flush' }) },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constantFrom('discard' as const, 'writeZeroes' as const, 'secureErase' as const),
      ranges: fc.array(range, { minLength: 1, maxLength: 3 }),
      unmap: fc.boolean(),
    }),
  },
);

function extents(o: Op): [number, number][] {
  if (o.kind === 'write' || o.kind === 'read') return [[o.sector, o.sector + o.sectors]];
  if (o.kind === 'flush') return [];
  return o.ranges.map((r) => [r.sector, r.sector + r.sectors]);
}

/**
 * Keeps the ops of a batch that may run concurrently with a deterministic result: no op
 * may overlap an earlier one unless both only read. Ranges inside one op must not
 * overlap either (the device may apply them in any order; they all zero, but keep it plain).
 */
function independent(batch: Op[]): Op[] {
  const kept: Op[] = [];
  const overlaps = (a: [number, number][], b: [number, number][]): boolean =>
    a.some(([s, e]) => b.some(([t, f]) => s < f && t < e));
  for (const o of batch) {
    const mine = extents(o);
    if (o.kind !== 'read' && o.kind !== 'write' && o.kind !== 'flush' && overlaps(mine.slice(1), mine.slice(0, 1))) continue;
    if (kept.some((k) => !(k.kind === 'read' && o.kind === 'read') && overlaps(extents(k), mine))) continue;
    kept.push(o);
  }
  return kept;
}

function split(buffer: Uint8Array, cuts: number[]): Uint8Array[] {
  const bounds = [0, ...cuts, buffer.length];
  return bounds.slice(1).map((end, i) => buffer.subarray(bounds[i], end));
}

const shape = fc.record({
  queueSize: fc.constantFrom(4, 8, 64),
  sizeMax: fc.constantFrom(undefined, 1024, 4096),
  segMax: fc.constantFrom(2, 6, 30),
  maxRequestBytes: fc.constantFrom(4096, 16384, 1 << 20),
  queues: fc.constantFrom(1, 2),
});

interface BackendKind {
  readonly name: string;
  open(): { backend: BlockBackend; cleanup(): void };
}

const BACKENDS: BackendKind[] = [
  { name: 'memory', open: () => ({ backend: new MemoryBackend({ size: DISK_BYTES }), cleanup: () => {} }) },
  ...(['sync', 'async', 'auto'] as const).map((io): BackendKind => ({
    name: `file (${io})`,
    open: () => {
      const dir = mkdtempSync(join(tmpdir(), 'vblk-integrity-'));
      const backend = openFileBackend(join(dir, 'disk.img'), { size: DISK_BYTES, io });
      return { backend, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
    },
  })),
];

const FEATURE_SETS: [string, number[]][] = [
  ['EVENT_IDX + INDIRECT', []],
  ['no EVENT_IDX', [VIRTIO_F.RING_EVENT_IDX]],
  ['no INDIRECT', [VIRTIO_F.RING_INDIRECT_DESC]],
  ['neither', [VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.RING_INDIRECT_DESC]],
];

for (const kind of BACKENDS) {
  for (const [label, excludeFeatures] of FEATURE_SETS) {
    test(`integrity: ${kind.name} backend, ${label}`, async () => {
      await fc.assert(fc.asyncProperty(shape, fc.array(fc.array(op, { minLength: 1, maxLength: 8 }), { minLength: 1, maxLength: 8 }),
        async (s, batches) => {
          const { backend, cleanup } = kind.open();
          const r = await rig({
            backend,
            device: {
              queueSize: s.queueSize, sizeMax: s.sizeMax, segMax: s.segMax, numQueues: 2,
              discard: { maxSectors: 16, maxSegments: 2 }, writeZeroes: { maxSectors: 24, maxSegments: 3 },
            },
            driver: { excludeFeatures, maxRequestBytes: s.maxRequestBytes, queues: s.queues },
          });
          const model = new Uint8Array(DISK_BYTES);
          try {
            for (const batch of batches) {
              const ops = independent(batch);
              const reads: { buffer: Uint8Array; sector: number }[] = [];
              await Promise.all(ops.map((o) => {
                switch (o.kind) {
                  case 'write': {
                    const data = pattern(o.sectors * 512, o.seed);
                    model.set(data, o.sector * 512);
                    return r.driver.write(o.sector, split(data, o.cuts));
                  }
                  case 'read': {
                    const buffer = new Uint8Array(o.sectors * 512);
                    reads.push({ buffer, sector: o.sector });
                    return r.driver.read(o.sector, split(buffer, o.cuts));
                  }
                  case 'flush':
                    return r.driver.flush();
                  default:
                    for (const g of o.ranges) model.fill(0, g.sector * 512, (g.sector + g.sectors) * 512);
                    if (o.kind === 'writeZeroes') return r.driver.writeZeroes(o.ranges, { unmap: o.unmap });
                    return o.kind === 'discard' ? r.driver.discard(o.ranges) : r.driver.secureErase(o.ranges);
                }
              }));
              for (const { buffer, sector } of reads) {
                assert.deepEqual(buffer, model.subarray(sector * 512, sector * 512 + buffer.length), `read at sector ${sector}`);
              }
            }
            const whole = new Uint8Array(DISK_BYTES);
            await r.driver.read(0, [whole]);
            assert.deepEqual(whole, model, 'the whole disk at the end');
          } finally {
            await r.close();
            await backend.close();
            cleanup();
          }
        }), { numRuns: RUNS });
    });
  }
}
