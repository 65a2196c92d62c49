/**
 * The consistency check of a qcow2 image, as `qemu-img check` does it: the refcount each
 * host cluster should have (see references.ts) against the refcount stored for it, the
 * refcount table's own entries, and the OFLAG_COPIED flags of the active L1 and L2
 * tables. A stored refcount below the references is a corruption (the cluster could be
 * freed and reused while in use), one above them a leak (space lost, data safe).
 *
 * Sans-IO over an {@link ImageFile}; reads only. Memory stays bounded by the file's size
 * (see references.ts), never by the virtual size: a sparse 1 TiB image checks in a few
 * kilobytes of tables.
 */
import {
  INCOMPAT, entryOffset, getRefcount, parseHeader, type Qcow2Header,
} from './header.js';
import type { ImageFile } from './image-file.js';
import { hex, l2EntryBytes, scanReferences, Tally, type ReferenceScan } from './references.js';

/** What a check found, named as `qemu-img check --output=json` names it. */
export interface Qcow2CheckResult {
  /** Stored refcounts below the references, misaligned or overlapping tables, wrong COPIED flags. */
  readonly corruptions: number;
  /** Stored refcounts above the references (clusters lost, data intact). */
  readonly leaks: number;
  /** Metadata the check could not read (`check-errors`). */
  readonly checkErrors: number;
  /** Just past the highest cluster in use or referenced. */
  readonly imageEndOffset: number;
  /** Clusters of the virtual disk. */
  readonly totalClusters: number;
  /** Clusters of the virtual disk the active L1 maps to host clusters (data, preallocated zero, compressed). */
  readonly allocatedClusters: number;
  /** Allocated clusters not right after the previous one in their L2 table (compressed ones always count). */
  readonly fragmentedClusters: number;
  /** Compressed clusters in the active tables. */
  readonly compressedClusters: number;
  /** One line per problem, like qemu-img's, at most {@link Qcow2CheckOptions.maxMessages}. */
  readonly messages: readonly string[];
  /** The refcount structures need a rebuild (a referenced cluster with refcount 0, a bad refcount table entry). */
  readonly needsRebuild: boolean;
  /** The header's dirty bit (lazy refcounts in use and the image not closed cleanly). */
  readonly dirty: boolean;
}

/** How {@link checkQcow2} (and `repairQcow2`) report as they go. */
export interface Qcow2CheckOptions {
  /** Called with the fraction done, 0 to 1, now and then (for a progress bar). */
  readonly onProgress?: (fraction: number) => void;
  /** Messages kept; default 1000. */
  readonly maxMessages?: number;
}

const L1_CHUNK_ENTRIES = 8192;
/** Refcount blocks kept in memory while looking up refcounts out of order. */
const CACHED_BLOCKS = 16;

/** The bytes `parseHeader` wants: the first cluster (up to 2 MiB), or the whole file when smaller. */
export async function readHeader(file: ImageFile): Promise<Qcow2Header> {
  const head = new Uint8Array(Math.min(file.size, 2 * 1024 * 1024));
  await file.read(0, [head]);
  return parseHeader(head, file.size);
}

/**
 * The refcounts stored in an image, read through its refcount table with a small cache of blocks.
 * A refcount table entry that is not cluster-aligned makes its clusters unreadable
 * (`undefined`), as in qemu-img, which counts a check error for each.
 */
export class StoredRefcounts {
  readonly #file: ImageFile;
  readonly #table: DataView;
  readonly #clusterSize: number;
  readonly #bits: number;
  readonly perBlock: number;
  /** Recently read refcount blocks by table index, least recently used first. */
  readonly #cache = new Map<number, Uint8Array>();

  private constructor(file: ImageFile, h: Qcow2Header, table: Uint8Array) {
    this.#file = file;
    this.#table = new DataView(table.buffer, table.byteOffset, table.byteLength);
    this.#clusterSize = 2 ** h.clusterBits;
    this.#bits = 2 ** h.refcountOrder;
    this.perBlock = (this.#clusterSize * 8) / this.#bits;
  }

  static async load(file: ImageFile, h: Qcow2Header): Promise<StoredRefcounts> {
    const table = new Uint8Array(h.refcountTableClusters * 2 ** h.clusterBits);
    await file.read(h.refcountTableOffset, [table]);
    return new StoredRefcounts(file, h, table);
  }

  get tableEntries(): number {
    return this.#table.byteLength / 8;
  }

  /** Offset of refcount block `index` (bits 9..63; past 2^53 as Infinity), 0 when none. */
  blockOffset(index: number): number {
    if (index >= this.tableEntries) return 0;
    const hi = this.#table.getUint32(index * 8), lo = this.#table.getUint32(index * 8 + 4);
    if (hi >= 0x20_0000) return Infinity;
    return hi * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
  }

  /**
   * Refcount block `index`: its bytes, `null` when the table names none (all refcounts
   * 0), or undefined when its offset is misaligned (unreadable, as in qemu-img).
   */
  async block(index: number): Promise<Uint8Array | null | undefined> {
    const offset = this.blockOffset(index);
    if (offset === 0 || offset === Infinity) return null; // none, or past any file: reads as zeroes
    if (offset % this.#clusterSize !== 0) return undefined;
    let block = this.#cache.get(index);
    if (block === undefined) {
      block = new Uint8Array(this.#clusterSize);
      await this.#file.read(offset, [block]);
      if (this.#cache.size >= CACHED_BLOCKS) this.#cache.delete(this.#cache.keys().next().value!);
    } else {
      this.#cache.delete(index);
    }
    this.#cache.set(index, block);
    return block;
  }

  /** The stored refcount of `cluster`, or undefined when its refcount block is misaligned. */
  async get(cluster: number): Promise<number | undefined> {
    const block = await this.block(Math.floor(cluster / this.perBlock));
    return block ? getRefcount(block, cluster % this.perBlock, this.#bits) : block === null ? 0 : undefined;
  }

  /** {@link get} for a block already in hand (from {@link block}). */
  refcountIn(block: Uint8Array | null, cluster: number): number {
    return block === null ? 0 : getRefcount(block, cluster % this.perBlock, this.#bits);
  }
}

/**
 * Checks the refcounts and COPIED flags of the qcow2 image in `file` and reports what it
 * finds; changes nothing. Throws {@link Qcow2Error} when the header or the snapshot table
 * is too broken to walk (as qemu-img fails to open such an image).
 */
export async function checkQcow2(file: ImageFile, options: Qcow2CheckOptions = {}): Promise<Qcow2CheckResult> {
  const h = await readHeader(file);
  const tally = new Tally(options.maxMessages ?? 1000);
  const progress = options.onProgress;
  progress?.(0);
  const scan = await scanReferences(file, h, tally, progress);
  const stored = await StoredRefcounts.load(file, h);
  let needsRebuild = checkRefcountBlocks(h, scan, stored, tally);
  const compared = await compareRefcounts(scan, stored, tally, progress);
  needsRebuild ||= compared.needsRebuild;
  await checkCopiedFlags(file, h, stored, tally);
  progress?.(1);
  const clusterSize = 2 ** h.clusterBits;
  return {
    corruptions: tally.corruptions,
    leaks: tally.leaks,
    checkErrors: tally.checkErrors,
    imageEndOffset: (compared.highest + 1) * clusterSize,
    totalClusters: Math.ceil(h.size / clusterSize),
    allocatedClusters: scan.allocatedClusters,
    fragmentedClusters: scan.fragmentedClusters,
    compressedClusters: scan.compressedClusters,
    messages: tally.messages,
    needsRebuild,
    dirty: (h.incompatibleFeatures & INCOMPAT.DIRTY) !== 0,
  };
}

/** Counts the refcount table's references to the refcount blocks, each of which must then have refcount 1. */
export function checkRefcountBlocks(h: Qcow2Header, scan: ReferenceScan, stored: StoredRefcounts, tally: Tally): boolean {
  const clusterSize = 2 ** h.clusterBits;
  const { counts } = scan;
  let needsRebuild = false;
  for (let i = 0; i < stored.tableEntries; i++) {
    const offset = stored.blockOffset(i);
    if (offset === 0) continue;
    if (offset % clusterSize !== 0) {
      tally.corruption(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      needsRebuild = true;
      continue;
    }
    const cluster = offset / clusterSize;
    if (cluster >= Math.max(counts.fileClusters, counts.highest + 1)) {
      tally.corruption(`ERROR refcount block ${i} is outside image`);
      needsRebuild = true;
      continue;
    }
    const over = counts.add(cluster, 1);
    if (over > 0) tally.corruption(`ERROR: overflow cluster offset=0x${offset.toString(16)}`, over);
    if (counts.get(cluster) !== 1) {
      tally.corruption(`ERROR refcount block ${i} refcount=${counts.get(cluster)}`);
      needsRebuild = true;
    }
  }
  return needsRebuild;
}

/** Stored against expected refcount of every cluster of the file, and of the one just past its end when that is referenced. */
async function compareRefcounts(
  scan: ReferenceScan, stored: StoredRefcounts, tally: Tally, progress?: (fraction: number) => void,
): Promise<{ highest: number; needsRebuild: boolean }> {
  const { counts } = scan;
  let highest = 0, needsRebuild = false;
  const compare = (cluster: number, block: Uint8Array | null | undefined): void => {
    if (block === undefined) {
      tally.error(`Can't get refcount for cluster ${cluster}: Input/output error`);
      return;
    }
    const has = stored.refcountIn(block, cluster);
    const want = counts.get(cluster);
    if (has > 0 || want > 0) highest = cluster;
    if (has === want) return;
    if (has === 0) needsRebuild = true;
    if (has < want) tally.corruption(`ERROR cluster ${cluster} refcount=${has} reference=${want}`);
    else tally.leak(`Leaked cluster ${cluster} refcount=${has} reference=${want}`);
  };
  // A block at a time: one read, then its clusters without awaiting each.
  const { perBlock } = stored;
  for (let first = 0; first < counts.fileClusters; first += perBlock) {
    const block = await stored.block(first / perBlock);
    const end = Math.min(first + perBlock, counts.fileClusters);
    for (let cluster = first; cluster < end; cluster++) compare(cluster, block);
    progress?.(0.7 + (0.25 * end) / counts.fileClusters);
  }
  for (const cluster of counts.pastEnd()) compare(cluster, await stored.block(Math.floor(cluster / perBlock)));
  return { highest, needsRebuild };
}

/**
 * OFLAG_COPIED must be set exactly where the stored refcount is 1, on the active L1's
 * entries and on the normal and preallocated-zero entries of the L2 tables they name
 * (qemu-img counts each mismatch as a corruption). An L2 table named by several entries
 * gives the same answer each time, so it is read once.
 */
async function checkCopiedFlags(file: ImageFile, h: Qcow2Header, stored: StoredRefcounts, tally: Tally): Promise<void> {
  const clusterSize = 2 ** h.clusterBits;
  const l1 = new Uint8Array(Math.min(h.l1Size, L1_CHUNK_ENTRIES) * 8);
  const l1View = new DataView(l1.buffer);
  const l2 = new Uint8Array(clusterSize);
  const l2View = new DataView(l2.buffer);
  const perTable = new Map<number, number>();
  const stride = l2EntryBytes(h);
  for (let i = 0; i < h.l1Size; i++) {
    const slot = i % L1_CHUNK_ENTRIES;
    if (slot === 0) await file.read(h.l1TableOffset + i * 8, [l1.subarray(0, Math.min(L1_CHUNK_ENTRIES, h.l1Size - i) * 8)]);
    const hi = l1View.getUint32(slot * 8), lo = l1View.getUint32(slot * 8 + 4);
    const l2Offset = entryOffset(hi, lo);
    if (l2Offset === 0) continue;
    const refcount = await stored.get(Math.floor(l2Offset / clusterSize));
    if (refcount !== undefined && (refcount === 1) !== ((hi & 0x8000_0000) !== 0)) {
      tally.corruption(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(hi, lo)} refcount=${refcount}`);
    }
    const known = perTable.get(l2Offset);
    if (known !== undefined) {
      if (known > 0) tally.corruption(`ERROR OFLAG_COPIED data clusters of the L2 table at ${l2Offset.toString(16)} (again)`, known);
      continue;
    }
    await file.read(l2Offset, [l2]);
    let mismatches = 0;
    for (let at = 0; at < clusterSize; at += stride) {
      const ehi = l2View.getUint32(at), elo = l2View.getUint32(at + 4);
      if (ehi & 0x4000_0000) continue; // compressed: the scan checked their flag
      const dataOffset = entryOffset(ehi, elo);
      if (dataOffset === 0) continue;
      const dataRefcount = await stored.get(Math.floor(dataOffset / clusterSize));
      if (dataRefcount !== undefined && (dataRefcount === 1) !== ((ehi & 0x8000_0000) !== 0)) {
        mismatches++;
        tally.corruption(`ERROR OFLAG_COPIED data cluster: l2_entry=${hex(ehi, elo)} refcount=${dataRefcount}`);
      }
    }
    perTable.set(l2Offset, mismatches);
  }
}
