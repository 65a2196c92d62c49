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

export interface MetadataClusters {
  /** Every metadata cluster. */
  readonly all: ReadonlySet<number>;
  /** The refcount blocks alone (an L1 entry may not point at one). */
  readonly refcountBlocks: ReadonlySet<number>;
}

export class MetadataMap {
  /** Counts the changes to the L1 table: the owner bumps it with each one. */
  l1Changes = 0;
  #cached: (MetadataClusters & { l1Changes: number; rcChanges: number }) | null = null;

  constructor(private readonly src: MetadataSources) {}

  /** The fixed tables, as [first, end) cluster ranges (a snapshot table counted at its smallest). */
  reserved(): (readonly [number, number])[] {
    const cs = this.src.clusterSize, h = this.src.header(), rc = this.src.refcounts();
    const areas: (readonly [number, number])[] = [[0, 1]];
    if (h.l1TableOffset !== 0) areas.push([h.l1TableOffset / cs, h.l1TableOffset / cs + Math.ceil(h.l1Size * 8 / cs)]);
    if (rc !== undefined) areas.push([rc.tableOffset / cs, rc.tableOffset / cs + rc.table.length / cs]);
    if (h.nbSnapshots > 0) areas.push([h.snapshotsOffset / cs, h.snapshotsOffset / cs + Math.max(1, Math.ceil(h.nbSnapshots * 40 / cs))]);
    return areas;
  }

  /** Every metadata cluster; derived again after the L1 or the refcount table changed. */
  clusters(): MetadataClusters {
    const rc = this.src.refcounts();
    const rcChanges = rc?.changes ?? 0;
    const c = this.#cached;
    if (c !== null && c.l1Changes === this.l1Changes && c.rcChanges === rcChanges) return c;
    const refcountBlocks = new Set(rc?.blockClusters() ?? []);
    const all = new Set(refcountBlocks);
    for (const [from, to] of this.reserved()) for (let k = from; k < to; k++) all.add(k);
    const l1 = this.src.l1();
    const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let o = 0; o < l1.length; o += 8) {
      const l2 = entryOffset(view.getUint32(o), view.getUint32(o + 4));
      if (l2 !== 0) all.add(l2 / this.src.clusterSize);
    }
    this.#cached = { all, refcountBlocks, l1Changes: this.l1Changes, rcChanges };
    return this.#cached;
  }
}
