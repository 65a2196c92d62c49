/**
 * Repair of a qcow2 image's refcounts, as `qemu-img check -r all` does it when the
 * refcounts cannot be trusted: the refcount structures are rebuilt from the metadata that
 * references clusters, so leaked clusters become free and under-counted ones get their
 * true count; then the OFLAG_COPIED flags of the active tables are set to match, and the
 * dirty and corrupt bits are cleared when nothing is left to fix.
 *
 * Crash-safe order: the new refcount table and blocks go past everything in use and are
 * flushed before one header write (refcount_table_offset and refcount_table_clusters, 12
 * bytes in one sector) switches to them; until then the old structures stand untouched.
 * Meant also for the driver, on a writable open of a dirty (lazy refcounts) image.
 */
import { BackendError } from '../backend.js';
import { checkQcow2, readHeader, type Qcow2CheckOptions, type Qcow2CheckResult } from './check.js';
import {
  INCOMPAT, MAX_REFTABLE_BYTES, Qcow2Error, entryOffset, setRefcount, writeU64, type Qcow2Header,
} from './header.js';
import type { ImageFile } from './image-file.js';
import { l2EntryBytes, scanReferences, Tally, type ClusterCounts } from './references.js';

/** What {@link repairQcow2} found and fixed. */
export interface Qcow2RepairResult {
  /** The check before the repair. */
  readonly before: Qcow2CheckResult;
  /** The check after it: what could not be repaired (misaligned entries, reserved bits, references far past the end …). */
  readonly after: Qcow2CheckResult;
  /** Leaks before less leaks after. */
  readonly leaksFixed: number;
  /** Corruptions before less corruptions after. */
  readonly corruptionsFixed: number;
  /** New refcount structures were written. */
  readonly rebuilt: boolean;
}

/** Where the new refcount structures go, in clusters. */
interface RefcountLayout {
  /** First cluster of the new table; the blocks follow it. */
  readonly start: number;
  readonly tableClusters: number;
  /** Table indexes that get a block, in order. */
  readonly blocks: readonly number[];
}

function planLayout(h: Qcow2Header, counts: ClusterCounts, start: number): RefcountLayout {
  const clusterSize = 2 ** h.clusterBits;
  const perBlock = (clusterSize * 8) / 2 ** h.refcountOrder;
  const tooLarge = (entries: number): boolean => entries * 8 > MAX_REFTABLE_BYTES;
  if (tooLarge(Math.ceil(start / perBlock))) {
    throw new Qcow2Error('QCOW2_NO_SPACE', `a refcount table for ${start} clusters would exceed ${MAX_REFTABLE_BYTES} bytes`);
  }
  const used = new Set<number>();
  for (let c = 0; c < Math.min(start, counts.fileClusters); c++) {
    if (counts.get(c) > 0) {
      used.add(Math.floor(c / perBlock));
      c = (Math.floor(c / perBlock) + 1) * perBlock - 1; // the rest of this block is decided
    }
  }
  for (const c of counts.pastEnd()) used.add(Math.floor(c / perBlock));
  // The new structures count themselves: grow them until they cover their own clusters.
  let tableClusters = 1;
  for (;;) {
    const blocks = new Set(used);
    let n = tableClusters + blocks.size;
    for (;;) {
      for (let b = Math.floor(start / perBlock); b <= Math.floor((start + n - 1) / perBlock); b++) blocks.add(b);
      if (tableClusters + blocks.size <= n) break;
      n = tableClusters + blocks.size;
    }
    let entries = 0;
    for (const b of blocks) entries = Math.max(entries, b + 1);
    if (tooLarge(entries)) throw new Qcow2Error('QCOW2_NO_SPACE', `the rebuilt refcount table would exceed ${MAX_REFTABLE_BYTES} bytes`);
    const needed = Math.ceil((entries * 8) / clusterSize);
    if (needed <= tableClusters) return { start, tableClusters, blocks: [...blocks].sort((a, b) => a - b) };
    tableClusters = needed;
  }
}

/** Writes new refcount structures for `counts` and switches the header to them. */
async function rebuildRefcounts(file: ImageFile, h: Qcow2Header, counts: ClusterCounts): Promise<void> {
  const clusterSize = 2 ** h.clusterBits;
  const bits = 2 ** h.refcountOrder;
  const perBlock = (clusterSize * 8) / bits;
  const start = Math.max(Math.ceil(file.size / clusterSize), counts.highest + 1);
  const plan = planLayout(h, counts, start);
  const firstBlock = plan.start + plan.tableClusters;
  const structuresEnd = firstBlock + plan.blocks.length;

  const table = new Uint8Array(plan.tableClusters * clusterSize);
  const tableView = new DataView(table.buffer);
  const block = new Uint8Array(clusterSize);
  for (let b = 0; b < plan.blocks.length; b++) {
    const index = plan.blocks[b];
    block.fill(0);
    for (let i = 0; i < perBlock; i++) {
      const cluster = index * perBlock + i;
      const n = cluster >= plan.start && cluster < structuresEnd ? 1 : cluster < plan.start ? counts.get(cluster) : 0;
      if (n > 0) setRefcount(block, i, bits, n);
    }
    await file.write((firstBlock + b) * clusterSize, [block]);
    writeU64(tableView, index * 8, (firstBlock + b) * clusterSize);
  }
  await file.write(plan.start * clusterSize, [table]);
  await file.flush();
  const pointer = new Uint8Array(12);
  const pointerView = new DataView(pointer.buffer);
  writeU64(pointerView, 0, plan.start * clusterSize);
  pointerView.setUint32(8, plan.tableClusters);
  await file.write(48, [pointer]);
  await file.flush();
}

/**
 * Sets OFLAG_COPIED on the active L1 and L2 entries exactly where the (now right)
 * refcount is 1, and clears it on compressed entries. Tables that are misaligned or past
 * the end of the file are left alone (the check still reports them).
 */
async function fixCopiedFlags(file: ImageFile, h: Qcow2Header, counts: ClusterCounts): Promise<void> {
  const clusterSize = 2 ** h.clusterBits;
  const inFile = (offset: number): boolean => offset % clusterSize === 0 && offset + clusterSize <= file.size;
  const l1 = new Uint8Array(h.l1Size * 8);
  const l1View = new DataView(l1.buffer);
  await file.read(h.l1TableOffset, [l1]);
  let l1Changed = false;
  const l2 = new Uint8Array(clusterSize);
  const l2View = new DataView(l2.buffer);
  const done = new Set<number>();
  const stride = l2EntryBytes(h);
  for (let i = 0; i < h.l1Size; i++) {
    const hi = l1View.getUint32(i * 8), lo = l1View.getUint32(i * 8 + 4);
    const l2Offset = entryOffset(hi, lo);
    if (l2Offset === 0 || !inFile(l2Offset)) continue;
    const copied = counts.get(l2Offset / clusterSize) === 1;
    if (copied !== ((hi & 0x8000_0000) !== 0)) {
      l1View.setUint32(i * 8, copied ? (hi | 0x8000_0000) >>> 0 : hi & 0x7fff_ffff);
      l1Changed = true;
    }
    if (done.has(l2Offset)) continue;
    done.add(l2Offset);
    await file.read(l2Offset, [l2]);
    let l2Changed = false;
    for (let at = 0; at < clusterSize; at += stride) {
      const ehi = l2View.getUint32(at), elo = l2View.getUint32(at + 4);
      let want: boolean;
      if (ehi & 0x4000_0000) {
        want = false;
      } else {
        const offset = entryOffset(ehi, elo);
        if (offset === 0 || offset % clusterSize !== 0) continue;
        // Data and preallocated zero clusters alike.
        want = counts.get(offset / clusterSize) === 1;
      }
      if (want !== ((ehi & 0x8000_0000) !== 0)) {
        l2View.setUint32(at, want ? (ehi | 0x8000_0000) >>> 0 : ehi & 0x7fff_ffff);
        l2Changed = true;
      }
    }
    if (l2Changed) await file.write(l2Offset, [l2]);
  }
  if (l1Changed) await file.write(h.l1TableOffset, [l1]);
  await file.flush();
}

/** Clears the dirty and corrupt bits (version 3 only has them). */
async function markClean(file: ImageFile, h: Qcow2Header): Promise<void> {
  if (h.version !== 3 || (h.incompatibleFeatures & (INCOMPAT.DIRTY | INCOMPAT.CORRUPT)) === 0) return;
  const word = new Uint8Array(4);
  new DataView(word.buffer).setUint32(0, h.incompatibleFeatures & ~(INCOMPAT.DIRTY | INCOMPAT.CORRUPT));
  await file.write(76, [word]);
  await file.flush();
}

/**
 * Checks the image in `file` and repairs what a refcount rebuild can: leaks, refcounts
 * below their references, wrong OFLAG_COPIED flags, a dirty bit. Returns the checks
 * before and after. Throws {@link Qcow2Error} when the image is too broken to walk or its
 * references overflow its refcount width, and a `READ_ONLY` BackendError on a read-only file.
 */
export async function repairQcow2(file: ImageFile, options: Qcow2CheckOptions = {}): Promise<Qcow2RepairResult> {
  if (file.readOnly) throw new BackendError('READ_ONLY', 'cannot repair a qcow2 image opened read-only');
  const progress = options.onProgress;
  const before = await checkQcow2(file, { ...options, onProgress: progress && ((f) => progress(f * 0.4)) });
  const h = await readHeader(file);
  const broken = (h.incompatibleFeatures & (INCOMPAT.DIRTY | INCOMPAT.CORRUPT)) !== 0;
  if (before.corruptions === 0 && before.leaks === 0 && before.checkErrors === 0 && !broken) {
    progress?.(1);
    return { before, after: before, leaksFixed: 0, corruptionsFixed: 0, rebuilt: false };
  }
  let rebuilt = false;
  if (before.corruptions > 0 || before.leaks > 0 || before.checkErrors > 0) {
    const scanProgress = progress && ((f: number) => progress(0.4 + f * 0.3));
    let scan = await scanReferences(file, h, new Tally(0), scanProgress, 'repair');
    const clusterSize = 2 ** h.clusterBits;
    if (scan.referencedEnd > file.size) {
      // References just past the end count once the file covers them: grow it (zeroes,
      // which nothing trusts until the header switch) and count again.
      await file.truncate(Math.ceil(scan.referencedEnd / clusterSize) * clusterSize);
      scan = await scanReferences(file, h, new Tally(0), scanProgress, 'repair');
    }
    if (scan.overflows > 0) {
      throw new Qcow2Error('QCOW2_UNSUPPORTED', `${scan.overflows} references do not fit ${2 ** h.refcountOrder}-bit refcounts; convert the image to one with wider refcounts`);
    }
    await rebuildRefcounts(file, h, scan.counts);
    await fixCopiedFlags(file, h, scan.counts);
    rebuilt = true;
  }
  const checked = await checkQcow2(file, { ...options, onProgress: progress && ((f) => progress(0.7 + f * 0.3)) });
  let after = checked;
  if (checked.corruptions === 0 && checked.checkErrors === 0) {
    await markClean(file, h);
    after = { ...checked, dirty: false };
  }
  return {
    before, after, rebuilt,
    leaksFixed: Math.max(0, before.leaks - after.leaks),
    corruptionsFixed: Math.max(0, before.corruptions - after.corruptions),
  };
}
