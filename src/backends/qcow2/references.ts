/**
 * What the refcounts of a qcow2 image should be: every host cluster counted once per
 * reference to it from the header, the active and snapshot L1 tables, the L2 tables they
 * name, the data clusters those name, the snapshot table, the refcount table and the
 * persistent bitmaps (docs/interop/qcow2.txt, "Host cluster management"). The walk follows what
 * `qemu-img check` counts, so that the two agree on corruptions and leaks.
 *
 * Bounded on hostile input: the dense count array has one u16 per cluster of the file
 * (capped), nothing more than a cluster past the end of the file is counted, every L2
 * table is read once however many L1 entries name it, and the L1 entries walked in total
 * are capped, so loops and shared tables cost no more than the file's size.
 */
import {
  INCOMPAT, MAX_L1_BYTES, Qcow2Error, QCOW_OFLAG_ZERO, decodeL2Entry, entryOffset, l1EntryReserved, maxRefcount, type Qcow2Header,
} from './header.js';
import { forEachBitmapRegion } from './bitmaps.js';
import type { ImageFile } from './image-file.js';
import { readSnapshotTable } from './snapshot-table.js';

/** Clusters of the file the check counts in memory (2 bytes each): 2^28, 16 TiB of 64 KiB clusters. */
export const MAX_CHECK_CLUSTERS = 2 ** 28;
/** L1 entries walked over the active table and all snapshots: 32 tables of QEMU's largest. */
export const MAX_L1_ENTRIES_WALKED = 2 ** 27;
/** Distinct L2 tables the walk remembers (how many L1 entries name each). */
export const MAX_DISTINCT_L2_TABLES = 2 ** 23;

/** How far past the end of the file a repair grows it to cover what is referenced there. */
export const NEAR_END = 64 * 1024 * 1024;

/** Findings of a check, in qemu-img's terms, with a bounded list of one-line messages. */
export class Tally {
  corruptions = 0;
  leaks = 0;
  checkErrors = 0;
  readonly messages: string[] = [];
  constructor(private readonly maxMessages: number) {}

  corruption(message: string, times = 1): void {
    this.corruptions += times;
    this.note(message);
  }
  leak(message: string): void {
    this.leaks++;
    this.note(message);
  }
  error(message: string, times = 1): void {
    this.checkErrors += times;
    this.note(message);
  }
  note(message: string): void {
    if (this.messages.length < this.maxMessages) this.messages.push(message);
  }
}

/** Expected refcount of every host cluster: dense inside the file, sparse past its end. */
export class ClusterCounts {
  readonly #dense: Uint16Array;
  /**
   * Exact counts of clusters at 0xffff and above, and of clusters past the end of the
   * file (at most one: a region is counted only when it ends less than a cluster past it).
   */
  readonly #sparse = new Map<number, number>();
  /** The highest cluster referenced, -1 when none. */
  highest = -1;

  constructor(readonly fileClusters: number, readonly max: number) {
    this.#dense = new Uint16Array(fileClusters);
  }

  get(cluster: number): number {
    if (cluster < this.fileClusters) {
      const n = this.#dense[cluster];
      return n === 0xffff ? this.#sparse.get(cluster)! : n;
    }
    return this.#sparse.get(cluster) ?? 0;
  }

  /** Adds `times` references; returns how many of them did not fit below {@link max} (each a corruption). */
  add(cluster: number, times: number): number {
    const before = this.get(cluster);
    const after = Math.min(this.max, before + times);
    if (cluster < this.fileClusters) {
      if (after >= 0xffff) this.#sparse.set(cluster, after);
      this.#dense[cluster] = Math.min(after, 0xffff);
    } else {
      this.#sparse.set(cluster, after);
    }
    if (cluster > this.highest) this.highest = cluster;
    return before + times - after;
  }

  /** Referenced clusters past the end of the file, in order. */
  pastEnd(): number[] {
    return [...this.#sparse.keys()].filter((c) => c >= this.fileClusters).sort((a, b) => a - b);
  }
}

/** How many L1 entries name one L2 table, in all L1 tables and in the active one. */
interface L2Use {
  count: number;
  active: number;
}

/** The result of {@link scanReferences}. */
export interface ReferenceScan {
  readonly counts: ClusterCounts;
  /**
   * Just past the farthest byte referenced, counted or not, among references ending at
   * most {@link NEAR_END} past the end of the file: a repair grows the file to cover them
   * (so they count, and nothing new is placed under them).
   */
  readonly referencedEnd: number;
  /** References that did not fit the refcount width (each also a corruption in the tally). */
  readonly overflows: number;
  readonly allocatedClusters: number;
  readonly fragmentedClusters: number;
  readonly compressedClusters: number;
}

/** Reports the fraction of the scan done, from 0 to 1. */
export type ScanProgress = (fraction: number) => void;

const L1_CHUNK_ENTRIES = 8192;

/**
 * Counts the references to every host cluster, except those from the refcount table to
 * the refcount blocks (the caller checks those against the stored table). In `repair`
 * mode the old refcount table is not counted (the repair replaces it), and neither are
 * references skipped that qemu-img's check skips but a cluster allocator must not reuse. Problems found
 * on the way (misaligned tables and clusters, COPIED on compressed clusters, refcount
 * overflow) go to `tally`; malformed structures that cannot be walked throw
 * {@link Qcow2Error}.
 */
export async function scanReferences(
  file: ImageFile, h: Qcow2Header, tally: Tally, progress?: ScanProgress, mode: 'check' | 'repair' = 'check',
): Promise<ReferenceScan> {
  const clusterSize = 2 ** h.clusterBits;
  const fileClusters = Math.ceil(file.size / clusterSize);
  if (fileClusters > MAX_CHECK_CLUSTERS) {
    throw new Qcow2Error('QCOW2_UNSUPPORTED', `the file has ${fileClusters} clusters; the check counts at most ${MAX_CHECK_CLUSTERS}`);
  }
  const counts = new ClusterCounts(fileClusters, maxRefcount(2 ** h.refcountOrder));
  let referencedEnd = 0, overflows = 0;
  const inc = (offset: number, bytes: number, times = 1): void => {
    if (bytes <= 0) return;
    if (offset + bytes <= file.size + NEAR_END) referencedEnd = Math.max(referencedEnd, offset + bytes);
    // Like qemu-img: a region ending a cluster or more past the end of the file is a
    // corruption and counts nowhere; one ending less than that still counts.
    if (offset + bytes - file.size >= clusterSize) {
      tally.corruption(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${bytes.toString(16)}`, times);
      return;
    }
    const last = Math.floor((offset + bytes - 1) / clusterSize);
    for (let c = Math.floor(offset / clusterSize); c <= last; c++) {
      const over = counts.add(c, times);
      overflows += over;
      if (over > 0) tally.corruption(`ERROR: overflow cluster offset=0x${(c * clusterSize).toString(16)}`, over);
    }
  };
  const l2s = new Map<number, L2Use>();
  let l1Walked = 0;

  const walkL1 = async (offset: number, size: number, active: boolean): Promise<void> => {
    if (size === 0) return;
    inc(offset, size * 8);
    l1Walked += size;
    if (l1Walked > MAX_L1_ENTRIES_WALKED) {
      throw new Qcow2Error('QCOW2_BAD_METADATA', `the L1 tables hold more than ${MAX_L1_ENTRIES_WALKED} entries in all`);
    }
    const chunk = new Uint8Array(Math.min(size, L1_CHUNK_ENTRIES) * 8);
    const view = new DataView(chunk.buffer);
    for (let first = 0; first < size; first += L1_CHUNK_ENTRIES) {
      const n = Math.min(L1_CHUNK_ENTRIES, size - first);
      await file.read(offset + first * 8, [chunk.subarray(0, n * 8)]);
      for (let i = 0; i < n; i++) {
        const hi = view.getUint32(i * 8), lo = view.getUint32(i * 8 + 4);
        if (l1EntryReserved(hi, lo)) tally.corruption(`ERROR found L1 entry with reserved bits set: ${hex(hi, lo)}`);
        const l2Offset = entryOffset(hi, lo);
        if (l2Offset === 0) continue;
        inc(l2Offset, clusterSize);
        if (l2Offset % clusterSize !== 0) {
          tally.corruption(`ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
        }
        let use = l2s.get(l2Offset);
        if (use === undefined) {
          if (l2s.size >= MAX_DISTINCT_L2_TABLES) throw new Qcow2Error('QCOW2_BAD_METADATA', `the L1 tables name more than ${MAX_DISTINCT_L2_TABLES} L2 tables`);
          use = { count: 0, active: 0 };
          l2s.set(l2Offset, use);
        }
        use.count++;
        if (active) use.active++;
      }
    }
  };

  inc(0, clusterSize);
  await walkL1(h.l1TableOffset, h.l1Size, true);
  if (h.nbSnapshots > 0) {
    const table = await readSnapshotTable(file, h);
    for (const sn of table.snapshots) {
      if (sn.l1TableOffset % clusterSize !== 0) {
        tally.corruption(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${sn.l1TableOffset.toString(16)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      } else if (sn.l1Size > MAX_L1_BYTES / 8) {
        tally.corruption(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${sn.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`);
      } else {
        await walkL1(sn.l1TableOffset, sn.l1Size, false);
      }
    }
    inc(h.snapshotsOffset, table.byteLength);
  }
  if (mode === 'check') inc(h.refcountTableOffset, h.refcountTableClusters * clusterSize);
  await forEachBitmapRegion(file, h, inc, (offset) => tally.corruption(`ERROR bitmap data cluster offset=0x${offset.toString(16)} is not cluster aligned`));
  progress?.(0.1);

  // Each L2 table once, in file order, its references weighted by how many L1 entries name it.
  let allocatedClusters = 0, fragmentedClusters = 0, compressedClusters = 0;
  const table = new Uint8Array(clusterSize);
  const view = new DataView(table.buffer);
  const extendedL2 = (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0;
  const stride = l2EntryBytes(h);
  const offsets = [...l2s.keys()].sort((a, b) => a - b);
  for (let t = 0; t < offsets.length; t++) {
    const { count, active } = l2s.get(offsets[t])!;
    await file.read(offsets[t], [table]);
    let nextContiguous = 0;
    for (let at = 0; at < clusterSize; at += stride) {
      const hi = view.getUint32(at), lo = view.getUint32(at + 4);
      // Extended L2: bits 0..31 of the bitmap say which subclusters are allocated, 32..63 which read as zeroes.
      const allocBits = extendedL2 ? view.getUint32(at + 12) : 0, zeroBits = extendedL2 ? view.getUint32(at + 8) : 0;
      if (hi & 0x4000_0000) {
        const entry = decodeL2Entry(hi, lo, h.clusterBits, true);
        if (typeof entry === 'string' || entry.kind !== 'compressed') {
          tally.corruption(`ERROR compressed L2 entry ${hex(hi, lo)}: ${typeof entry === 'string' ? entry : 'undecodable'}`, count);
          continue;
        }
        if (hi & 0x8000_0000) {
          tally.corruption(`ERROR: coffset=0x${entry.offset.toString(16)}: copied flag must never be set for compressed clusters`, count);
        }
        if (allocBits !== 0 || zeroBits !== 0) {
          // qemu-img counts such an entry as nothing but this corruption: its clusters then look leaked.
          tally.corruption(`ERROR compressed cluster with a non-zero subcluster bitmap: l2_entry=${hex(hi, lo)}`, count);
          // A repair still counts them: freeing a cluster an entry names would let new data overwrite it.
          if (mode === 'check') continue;
        }
        inc(entry.offset, entry.length, count);
        allocatedClusters += active;
        compressedClusters += active;
        fragmentedClusters += active; // compressed clusters are fragmented by nature, as qemu-img counts them
        continue;
      }
      if ((hi & 0x3f00_0000) !== 0 || (lo & 0x1fe) !== 0) tally.corruption(`ERROR found l2 entry with reserved bits set: ${hex(hi, lo)}`, count);
      const offset = entryOffset(hi, lo);
      if (offset === 0) {
        // Unallocated, or zero without a preallocated cluster: no subcluster may claim a host cluster.
        if (allocBits !== 0) tally.corruption(`ERROR unallocated cluster with a non-zero subcluster allocation bitmap: l2_entry=${hex(hi, lo)}`, count);
        continue;
      }
      if ((zeroBits & allocBits) !== 0) {
        tally.corruption(`ERROR offset=${offset.toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`, count);
      }
      if (offset % clusterSize !== 0) {
        const what = (extendedL2 ? allocBits === 0 : (lo & QCOW_OFLAG_ZERO) !== 0) ? 'Preallocated cluster' : 'Data cluster';
        tally.corruption(`ERROR offset=${offset.toString(16)}: ${what} is not properly aligned; L2 entry corrupted.`, count);
      }
      if (active > 0) {
        allocatedClusters += active;
        if (nextContiguous !== 0 && offset !== nextContiguous) fragmentedClusters += active;
        nextContiguous = offset + clusterSize;
      }
      inc(offset, clusterSize, count);
    }
    if (t % 64 === 0) progress?.(0.1 + (0.6 * t) / offsets.length);
  }
  progress?.(0.7);
  return { counts, referencedEnd, overflows, allocatedClusters, fragmentedClusters, compressedClusters };
}

/** Bytes of one L2 entry: 16 with extended L2 entries (the entry and its subcluster bitmap), else 8. */
export function l2EntryBytes(h: Qcow2Header): number {
  return (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0 ? 16 : 8;
}

/** A 64-bit entry from its halves, in hex, for messages. */
export function hex(hi: number, lo: number): string {
  return hi === 0 ? lo.toString(16) : hi.toString(16) + lo.toString(16).padStart(8, '0');
}
