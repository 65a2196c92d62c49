/**
 * Where an open qcow2 image keeps its metadata, by cluster: the header, the L1, refcount
 * and snapshot tables (ranges), the L2 tables the L1 table lists and the refcount blocks.
 * No data entry may point into any of them: a guest write or a free through such an entry
 * would destroy the image's own structure (QEMU's "overlap check" guards the same).
 */
import { entryOffset, type Qcow2Header } from './header.js';
import type { Refcounts } from './refcounts.js';

/** What the map reads, as the image has it now. */
export interface MetadataSources {
  readonly clusterSize: number;
  header(): Qcow2Header;
  /** The L1 table's bytes (its entries, big-endian u64). */
  l1(): Uint8Array;
  /** Absent on a read-only image (the refcounts are not read). */
  refcounts(): Refcounts | undefined;
}

/**
 * Kept up to date at the cost of each change, not of the image's size: the L2 tables by a
 * count per cluster that {@link MetadataMap.l1EntryChanged} adjusts (an image with 4 KiB
 * clusters gets a new L2 table every 2 MiB it grows, and its L1 table may have half a
 * million entries); the fixed tables and the refcount blocks derived again when the
 * header or the refcount table is replaced or a refcount block is added, the L2 tables
 * when the L1 table is replaced.
 */
export class MetadataMap {
  /** Active L2 tables: how many L1 entries point at each (more than one only in a damaged image). */
  #l2: Map<number, number> | null = null;
  #l2From: Uint8Array | null = null;
  #fixed: { all: Set<number>; refcountBlocks: Set<number>; header: Qcow2Header; rcChanges: number } | null = null;

  constructor(private readonly src: MetadataSources) {}

  /** Whether cluster `c` holds metadata: the header, a table, an L2 table or a refcount block. */
  has(c: number): boolean {
    return this.#fixedSets().all.has(c) || this.#l2Tables().has(c);
  }

  /** Whether cluster `c` is a refcount block (an L1 entry may not point at one). */
  isRefcountBlock(c: number): boolean {
    return this.#fixedSets().refcountBlocks.has(c);
  }

  /** The L1 entry that pointed at the L2 table at `oldOffset` now points at `newOffset` (0: none). */
  l1EntryChanged(oldOffset: number, newOffset: number): void {
    const l2 = this.#l2;
    if (l2 === null) return; // derived from the L1 table when first asked
    const cs = this.src.clusterSize;
    if (oldOffset !== 0) {
      const n = (l2.get(oldOffset / cs) ?? 0) - 1;
      if (n > 0) l2.set(oldOffset / cs, n);
      else l2.delete(oldOffset / cs);
    }
    if (newOffset !== 0) l2.set(newOffset / cs, (l2.get(newOffset / cs) ?? 0) + 1);
  }

  /** The fixed tables, as [first, end) cluster ranges (a snapshot table counted at its smallest). */
  reserved(): (readonly [number, number])[] {
    const cs = this.src.clusterSize, h = this.src.header(), rc = this.src.refcounts();
    const areas: (readonly [number, number])[] = [[0, 1]];
    if (h.l1TableOffset !== 0) areas.push([h.l1TableOffset / cs, h.l1TableOffset / cs + Math.ceil(h.l1Size * 8 / cs)]);
    if (rc !== undefined) areas.push([rc.tableOffset / cs, rc.tableOffset / cs + rc.table.length / cs]);
    if (h.nbSnapshots > 0) areas.push([h.snapshotsOffset / cs, h.snapshotsOffset / cs + Math.max(1, Math.ceil(h.nbSnapshots * 40 / cs))]);
    return areas;
  }

  #fixedSets(): { all: Set<number>; refcountBlocks: Set<number> } {
    const h = this.src.header(), rc = this.src.refcounts();
    const rcChanges = rc?.changes ?? 0;
    const f = this.#fixed;
    if (f !== null && f.header === h && f.rcChanges === rcChanges) return f;
    const refcountBlocks = new Set(rc?.blockClusters() ?? []);
    const all = new Set(refcountBlocks);
    for (const [from, to] of this.reserved()) for (let k = from; k < to; k++) all.add(k);
    this.#fixed = { all, refcountBlocks, header: h, rcChanges };
    return this.#fixed;
  }

  #l2Tables(): Map<number, number> {
    const l1 = this.src.l1();
    if (this.#l2 !== null && this.#l2From === l1) return this.#l2;
    const cs = this.src.clusterSize;
    const l2 = new Map<number, number>();
    const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let o = 0; o < l1.length; o += 8) {
      const off = entryOffset(view.getUint32(o), view.getUint32(o + 4));
      if (off !== 0) l2.set(off / cs, (l2.get(off / cs) ?? 0) + 1);
    }
    this.#l2 = l2;
    this.#l2From = l1;
    return l2;
  }
}
