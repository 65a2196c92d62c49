// The write oracle: our driver writes, discards and zeroes through a real `vblk serve` on
// qcow2 images (empty ones of several layouts, one whose clusters an internal snapshot
// shares, one of compressed clusters, overlays of backing files with data) — whole
// clusters, partial clusters over backing data, ranges across cluster boundaries, and
// seeded random batches of disjoint requests in flight together, many of them sharing
// clusters. The same operations are applied to a raw copy. Then QEMU judges: `qemu-img
// check` finds no errors and no leaks, `qemu-img compare` finds the image identical to
// the raw copy, the backing files are byte for byte what they were, and a snapshot still
// reads as it was taken.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BlkDriver } from '../../src/blk/driver.js';
import { VIRTIO_BLK_SECTOR_SIZE as SECTOR } from '../../src/spec/virtio-blk.js';
import { requirePeer } from '../../scripts/guest/guest.js';
import { Rng } from '../support/fuzz-prng.js';
import { pattern } from '../support/pattern.js';
import { openDisk, QEMU_TOOLS, qemuImg, qemuImgCheck, qemuImgCompare, qemuIo, sha256File } from './qcow2-helpers.js';
import { scratchDir, startServe } from './serve-helpers.js';

const KiB = 1024;
const MiB = 1 << 20;
const SIZE = 64 * MiB;
const CLUSTER = 64 * KiB;
const RANDOM_BATCHES = 24;
const BATCH = 16;

interface Op {
  readonly kind: 'write' | 'discard' | 'zeroes' | 'zeroes-unmap';
  readonly offset: number;
  readonly length: number;
  /** The write's data is pattern(length, seed). */
  readonly seed: number;
}

/** The fixed operations: each shape a qcow2 writer must get right, in a known order. */
const FIXED: readonly Op[] = [
  { kind: 'write', offset: 0, length: 2 * CLUSTER, seed: 1 }, // whole clusters
  { kind: 'write', offset: 3 * CLUSTER + 512, length: 4096, seed: 2 }, // part of a cluster, over backing data
  { kind: 'write', offset: 16 * CLUSTER + 1024, length: 512, seed: 3 }, // one sector
  { kind: 'write', offset: 5 * CLUSTER - 5120, length: 10240, seed: 4 }, // across a cluster boundary
  { kind: 'write', offset: 3 * MiB - 512, length: MiB + 1024, seed: 5 }, // many clusters, unaligned at both ends
  { kind: 'write', offset: 4096, length: 8192, seed: 6 }, // over a cluster this run allocated
  { kind: 'discard', offset: 8 * MiB, length: 4 * CLUSTER, seed: 0 }, // whole clusters over backing data
  { kind: 'discard', offset: 9 * MiB + 4096, length: 8192, seed: 0 }, // part of a cluster
  { kind: 'write', offset: 10 * MiB, length: 3 * CLUSTER, seed: 7 },
  { kind: 'discard', offset: 10 * MiB, length: 3 * CLUSTER, seed: 0 }, // what this run wrote
  { kind: 'zeroes-unmap', offset: 12 * MiB, length: 2 * CLUSTER, seed: 0 },
  { kind: 'zeroes', offset: 13 * MiB + 512, length: 4608, seed: 0 }, // partial, stays allocated
  { kind: 'zeroes', offset: 14 * MiB, length: CLUSTER, seed: 0 },
  { kind: 'write', offset: 14 * MiB + 1024, length: 1024, seed: 8 }, // into a zeroed cluster
  { kind: 'write', offset: SIZE - 4096, length: 4096, seed: 9 }, // the last sectors
];

/** Disjoint random operations, BATCH at a time, over the first 16 MiB (so they share clusters). */
function randomBatches(rng: Rng): Op[][] {
  const batches: Op[][] = [];
  for (let b = 0; b < RANDOM_BATCHES; b++) {
    const batch: Op[] = [];
    while (batch.length < BATCH) {
      const sectors = rng.chance(0.2) ? rng.range(1, 512) : rng.range(1, 24);
      const offset = rng.below(16 * MiB / SECTOR - sectors) * SECTOR;
      const length = sectors * SECTOR;
      if (batch.some((o) => offset < o.offset + o.length && o.offset < offset + length)) continue;
      const kind = rng.weighted([6, 1, 1, 1]);
      batch.push({ kind: (['write', 'discard', 'zeroes', 'zeroes-unmap'] as const)[kind], offset, length, seed: rng.u32() });
    }
    batches.push(batch);
  }
  return batches;
}

function applyToRaw(raw: Uint8Array, op: Op): void {
  if (op.kind === 'write') raw.set(pattern(op.length, op.seed), op.offset);
  else raw.fill(0, op.offset, op.offset + op.length);
}

function applyToDisk(driver: BlkDriver, op: Op): Promise<void> {
  const range = [{ sector: op.offset / SECTOR, sectors: op.length / SECTOR }];
  switch (op.kind) {
    case 'write': return driver.write(op.offset / SECTOR, [pattern(op.length, op.seed)]);
    case 'discard': return driver.discard(range);
    case 'zeroes': return driver.writeZeroes(range, { unmap: false });
    case 'zeroes-unmap': return driver.writeZeroes(range, { unmap: true });
  }
}

interface WriteCase {
  readonly name: string;
  /** Makes the image to serve in `dir`, and returns it with the files under it. */
  build(dir: string): { image: string; backing: string[]; snapshot?: { name: string; raw: string } };
}

/** Random data over most of the first 16 MiB of a raw image, so that overlays write over data. */
function filledRaw(path: string): void {
  const data = new Uint8Array(SIZE);
  randomFillSync(data.subarray(0, 15 * MiB));
  writeFileSync(path, data);
}

const CASES: readonly WriteCase[] = [
  {
    name: 'an empty image (64 KiB clusters)',
    build: (dir) => {
      const image = join(dir, 'disk.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', image, String(SIZE));
      return { image, backing: [] };
    },
  },
  {
    name: 'an empty image with 4 KiB clusters and 1-bit refcounts (many L2 tables and refcount blocks)',
    build: (dir) => {
      const image = join(dir, 'disk.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=1', image, String(SIZE));
      return { image, backing: [] };
    },
  },
  {
    name: 'an empty version 2 image (compat=0.10) with 2 MiB clusters',
    build: (dir) => {
      const image = join(dir, 'disk.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=2M', image, String(SIZE));
      return { image, backing: [] };
    },
  },
  {
    name: 'an image with an internal snapshot sharing every cluster (writes copy shared clusters and L2 tables)',
    build: (dir) => {
      const raw = join(dir, 'snapshot.raw');
      const image = join(dir, 'disk.qcow2');
      filledRaw(raw);
      qemuImg('convert', '-O', 'qcow2', raw, image);
      qemuImg('snapshot', '-c', 'before', image);
      return { image, backing: [], snapshot: { name: 'before', raw } };
    },
  },
  {
    name: 'an image of compressed clusters (qemu-img convert -c), written over',
    build: (dir) => {
      const raw = join(dir, 'source.raw');
      const image = join(dir, 'disk.qcow2');
      qemuImg('create', '-q', '-f', 'raw', raw, String(SIZE));
      qemuIo(raw, 'raw', ['write -P 0x71 0 4M', 'write -P 0x72 4M 4M', `write -P 0x73 ${8 * MiB} 8M`, `write -P 0x74 ${SIZE - MiB} 1M`]);
      qemuImg('convert', '-c', '-O', 'qcow2', raw, image);
      return { image, backing: [] };
    },
  },
  {
    name: 'an overlay of a raw base full of data',
    build: (dir) => {
      const base = join(dir, 'base.raw');
      const image = join(dir, 'overlay.qcow2');
      filledRaw(base);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', image);
      return { image, backing: [base] };
    },
  },
  {
    name: 'an overlay with subclusters (extended_l2) of a qcow2 over a raw base',
    build: (dir) => {
      const base = join(dir, 'base.raw');
      const mid = join(dir, 'mid.qcow2');
      const image = join(dir, 'top.qcow2');
      filledRaw(base);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw', mid);
      qemuIo(mid, 'qcow2', ['write -P 0x5c 60k 200k', `write -z ${8 * MiB + 4096} 64k`, `write -P 0x5d ${12 * MiB} 1M`]);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'mid.qcow2', '-F', 'qcow2', image);
      return { image, backing: [base, mid] };
    },
  },
];

describe('writes through vblk serve to qcow2 images leave what qemu-img check and qemu-img compare accept', { skip: requirePeer(...QEMU_TOOLS) }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(() => {
    scratch = scratchDir('vblk-qcow2-write-');
  });
  after(() => scratch.cleanup());

  CASES.forEach((c, i) => {
    it(c.name, { timeout: 180_000 }, async (t) => {
      const dir = join(scratch.dir, `case-${i}`);
      mkdirSync(dir);
      const { image, backing, snapshot } = c.build(dir);
      const expectedPath = join(dir, 'expected.raw');
      qemuImg('convert', '-O', 'raw', image, expectedPath);
      const expected = new Uint8Array(readFileSync(expectedPath));
      const backingHashes = backing.map(sha256File);
      const seed = (Math.random() * 0x1_0000_0000) >>> 0;
      t.diagnostic(`seed ${seed}`);
      const batches = randomBatches(new Rng(seed));

      const serve = await startServe(image, join(dir, 'vblk.sock'), ['--format', 'qcow2', '--queues', '2']);
      try {
        const disk = await openDisk(serve.socket, { queues: 2 });
        try {
          for (const op of FIXED) {
            await applyToDisk(disk.driver, op);
            applyToRaw(expected, op);
          }
          // Disjoint requests in flight together, on both queues.
          for (const batch of batches) {
            await Promise.all(batch.map((op) => applyToDisk(disk.driver, op)));
            for (const op of batch) applyToRaw(expected, op);
          }
          await disk.driver.flush();
          // What was written reads back through vblk before QEMU looks.
          const got = new Uint8Array(MiB);
          for (let at = 0; at < 16 * MiB; at += MiB) {
            await disk.driver.read(at / SECTOR, [got]);
            assert.equal(Buffer.compare(got, expected.subarray(at, at + MiB)), 0, `[${at}, ${at + MiB}) read back other than written`);
          }
        } finally {
          await disk.close();
        }
      } finally {
        assert.equal(await serve.stop(), 0, `vblk serve did not exit cleanly:\n${serve.log()}`);
      }
      writeFileSync(expectedPath, expected);

      const check = qemuImgCheck(image);
      assert.deepEqual({ corruptions: check.corruptions, leaks: check.leaks, checkErrors: check.checkErrors }, { corruptions: 0, leaks: 0, checkErrors: 0 }, check.text);
      const cmp = qemuImgCompare(image, 'qcow2', expectedPath, 'raw');
      assert.ok(cmp.identical, `qemu-img compare: ${cmp.text}`);
      assert.deepEqual(backing.map(sha256File), backingHashes, 'a backing file changed');
      if (snapshot) {
        // The snapshot still reads as it was taken.
        const taken = join(dir, 'snapshot-now.raw');
        qemuImg('convert', '-O', 'raw', '-l', `snapshot.name=${snapshot.name}`, image, taken);
        assert.equal(sha256File(taken), sha256File(snapshot.raw), `snapshot ${snapshot.name} changed`);
      }
      t.diagnostic(`${FIXED.length} fixed and ${RANDOM_BATCHES * BATCH} random operations; qemu-img check clean, compare identical`);
    });
  });
});
