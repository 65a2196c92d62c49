/**
 * Refcounts of a writable qcow2 image (qcow2.txt, "Host cluster management"): the
 * refcount table held whole in memory, refcount blocks through a bounded write-back
 * cache, cluster allocation (first free run found through the refcounts, else past the
 * end) and the growth of the table and its blocks, including the self-describing case
 * where a new block or table must count its own clusters.
 *
 * Ordering: an increment may reach the disk at any time (a crash leaks at worst), so
 * dirty blocks are written whenever convenient. Decrements are handed in by the driver
 * only once nothing durable points at the cluster any more.
 * Every method runs under the driver's metadata lock.
 */
import type { ImageFile } from './image-file.js';
import { TableCache, type CachedTable } from './table-cache.js';
import {
  MAX_HOST_OFFSET, MAX_REFTABLE_BYTES, Qcow2Error, getRefcount, maxRefcount, readU64, setRefcount, writeU64,
} from './header.js';

export interface RefcountsInit {
  readonly file: ImageFile;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  readonly tableOffset: number;
  readonly table: Uint8Array;
  readonly cacheBytes: number;
  /**
   * Cluster ranges [start, end) never handed out whatever their refcounts say (header, L1,
   * refcount table, snapshot table): a hostile image may claim they are free.
   */
  readonly reserved: () => readonly (readonly [number, number])[];
}

export class Refcounts {
  readonly file: ImageFile;
  readonly clusterSize: number;
  readonly bits: number;
  readonly perBlock: number;
  tableOffset: number;
  table: Uint8Array;
  #tableView: DataView;
  readonly blocks: TableCache;
  readonly #reserved: () => readonly (readonly [number, number])[];
  /** Lowest cluster that may be free. */
  #cursor = 0;
  /** One past the highest cluster handed out or known to the file. */
  end: number;

  constructor(init: RefcountsInit) {
    this.file = init.file;
    this.clusterSize = 2 ** init.clusterBits;
    this.bits = 2 ** init.refcountOrder;
    this.perBlock = (this.clusterSize * 8) / this.bits;
    this.tableOffset = init.tableOffset;
    this.table = init.table;
    this.#tableView = new DataView(init.table.buffer, init.table.byteOffset, init.table.byteLength);
    this.#reserved = init.reserved;
    this.end = Math.ceil(init.file.size / this.clusterSize);
    const capacity = Math.max(4, Math.floor(init.cacheBytes / this.clusterSize));
    this.blocks = new TableCache(capacity, this.clusterSize, (t) => this.#writeBlock(t));
    // Validate the table once: every block inside the file, aligned, off the header; block 0
    // present (it counts the header: without it, every cluster below it would look free).
    if (this.tableEntries === 0 || this.#blockOffset(0) === 0) {
      throw new Qcow2Error('QCOW2_BAD_METADATA', 'refcount table entry 0 is empty: nothing counts the header and the clusters after it');
    }
    for (let i = 0; i < this.tableEntries; i++) {
      const off = this.#blockOffset(i);
      if (off === 0) continue;
      if (off % this.clusterSize !== 0 || off < this.clusterSize || off >= init.file.size) {
        throw new Qcow2Error('QCOW2_BAD_METADATA', `refcount table entry ${i} (${off}) is unaligned, on the header or past the end of the file`);
      }
    }
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  /** Counts the changes to the table (a new block, a moved table): who derives something from it knows when to derive again. */
  changes = 0;

  /** The clusters of the refcount blocks the table lists. */
  blockClusters(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.tableEntries; i++) {
      const off = this.#blockOffset(i);
      if (off !== 0) out.push(off / this.clusterSize);
    }
    return out;
  }

  #blockOffset(i: number): number {
    const off = readU64(this.#tableView, 8 * i, `refcount table entry ${i}`);
    return off - (off % 512); // bits 0..8 are reserved
  }

  async #block(i: number): Promise<CachedTable | undefined> {
    if (i >= this.tableEntries) return undefined;
    const off = this.#blockOffset(i);
    if (off === 0) return undefined;
    const cached = this.blocks.get(off);
    if (cached !== undefined) return cached;
    const data = new Uint8Array(this.clusterSize);
    await this.file.read(off, [data]);
    return this.blocks.insert(off, data, false);
  }

  async #writeBlock(t: CachedTable): Promise<void> {
    t.dirty = false;
    await this.file.write(t.offset, [t.data]);
  }

  /** Writes every dirty block; returns whether there were any. */
  async writeDirty(): Promise<boolean> {
    const dirty = this.blocks.dirtyTables();
    for (const t of dirty) await this.#writeBlock(t);
    return dirty.length > 0;
  }

  /** The refcount of a host cluster (0 where no block covers it). */
  async get(cluster: number): Promise<number> {
    const b = await this.#block(Math.floor(cluster / this.perBlock));
    return b === undefined ? 0 : getRefcount(b.data, cluster % this.perBlock, this.bits);
  }

  /** Drops one reference to a cluster; returns the new refcount. A refcount already 0 is left alone (a leak-free no-op). */
  async decrement(cluster: number): Promise<number> {
    const b = await this.#block(Math.floor(cluster / this.perBlock));
    if (b === undefined) return 0;
    const i = cluster % this.perBlock;
    const v = getRefcount(b.data, i, this.bits);
    if (v === 0) return 0;
    // A saturated 64-bit refcount stays put: we cannot know its true value.
    if (v === Number.MAX_SAFE_INTEGER) return v;
    setRefcount(b.data, i, this.bits, v - 1);
    b.dirty = true;
    if (v === 1 && cluster < this.#cursor) this.#cursor = cluster;
    return v - 1;
  }

  /** Allocates `n` contiguous clusters with refcount 1; returns the first's byte offset. */
  async allocate(n: number): Promise<number> {
    for (;;) {
      const start = await this.#findFree(n);
      if ((start + n) * this.clusterSize > MAX_HOST_OFFSET) throw new Qcow2Error('QCOW2_NO_SPACE', 'the image would grow past 2^53 bytes');
      let created = false;
      for (let i = Math.floor(start / this.perBlock); i <= Math.floor((start + n - 1) / this.perBlock); i++) {
        if (await this.#block(i) === undefined) {
          await this.#createBlock(i);
          created = true;
        }
      }
      if (created) continue; // the new blocks may sit in the run found: look again
      for (let c = start; c < start + n; c++) await this.#set(c, 1);
      this.#cursor = start + n;
      if (start + n > this.end) this.end = start + n;
      return start * this.clusterSize;
    }
  }

  async #set(cluster: number, value: number): Promise<void> {
    const b = await this.#block(Math.floor(cluster / this.perBlock));
    if (b === undefined) throw new Qcow2Error('QCOW2_BAD_METADATA', `no refcount block for cluster ${cluster}`);
    if (value > maxRefcount(this.bits)) throw new Qcow2Error('QCOW2_NO_SPACE', `refcount of cluster ${cluster} overflows ${this.bits} bits`);
    setRefcount(b.data, cluster % this.perBlock, this.bits, value);
    b.dirty = true;
  }

  /** First run of `n` clusters with refcount 0, none reserved, from the cursor. */
  async #findFree(n: number): Promise<number> {
    let start = this.#cursor, run = 0;
    for (let c = this.#cursor; ; c++) {
      if (c >= this.end) {
        // Past everything in use: free, whatever a (hostile) block there claims. Bounds the scan by the file.
        if (this.#isReserved(c)) { run = 0; continue; }
        if (run === 0) start = c;
        if (++run >= n) return start;
        continue;
      }
      const blockIndex = Math.floor(c / this.perBlock);
      const b = await this.#block(blockIndex);
      if (b === undefined && !this.#anyReservedIn(c, (blockIndex + 1) * this.perBlock)) {
        // A missing block: its whole range is free.
        if (run === 0) start = c;
        const more = (blockIndex + 1) * this.perBlock - c;
        if (run + more >= n) return start;
        run += more;
        c += more - 1;
        continue;
      }
      const free = !this.#isReserved(c) && (b === undefined || getRefcount(b.data, c % this.perBlock, this.bits) === 0);
      if (!free) {
        run = 0;
        continue;
      }
      if (run === 0) start = c;
      if (++run >= n) return start;
    }
  }

  #anyReservedIn(from: number, to: number): boolean {
    return this.#reserved().some(([s, e]) => s < to && e > from);
  }

  #isReserved(c: number): boolean {
    return this.#anyReservedIn(c, c + 1);
  }

  /** A new refcount block for table entry `i`, placed in its own range so it counts itself. */
  async #createBlock(i: number): Promise<void> {
    if (i >= this.tableEntries) {
      await this.#growTable(i);
      if (await this.#block(i) !== undefined) return;
    }
    let home = -1;
    for (let c = i * this.perBlock; c < (i + 1) * this.perBlock; c++) {
      if (!this.#isReserved(c)) { home = c; break; }
    }
    if (home < 0) throw new Qcow2Error('QCOW2_BAD_METADATA', `no room for refcount block ${i}`);
    const data = new Uint8Array(this.clusterSize);
    setRefcount(data, home % this.perBlock, this.bits, 1);
    const offset = home * this.clusterSize;
    // The block reaches the disk before the table entry that points to it.
    await this.file.write(offset, [data]);
    await this.file.flush();
    writeU64(this.#tableView, 8 * i, offset);
    this.changes++;
    await this.file.write(this.tableOffset + 8 * i, [this.table.subarray(8 * i, 8 * i + 8)]);
    await this.blocks.insert(offset, data, false);
    if (home + 1 > this.end) this.end = home + 1;
  }

  /**
   * Moves the refcount table to a larger copy past the end of the image, with the new
   * blocks that count the new table's clusters and their own, then points the header at
   * it (after a flush) and frees the old table.
   */
  async #growTable(needIndex: number): Promise<void> {
    const perCluster = this.clusterSize / 8;
    const entries = Math.ceil(Math.max(needIndex + 1, Math.ceil(this.tableEntries * 1.5)) / perCluster) * perCluster;
    const tableClusters = entries / perCluster;
    if (tableClusters * this.clusterSize > MAX_REFTABLE_BYTES) throw new Qcow2Error('QCOW2_NO_SPACE', 'the refcount table would grow past its limit');
    let start = this.end;
    while (this.#isReserved(start)) start++;
    // Blocks for [start, start + tableClusters + newBlocks) that do not exist yet come right after the table.
    let newBlocks: number[] = [];
    for (;;) {
      const last = start + tableClusters + newBlocks.length - 1;
      const wanted: number[] = [];
      for (let b = Math.floor(start / this.perBlock); b <= Math.floor(last / this.perBlock); b++) {
        if (b >= this.tableEntries || this.#blockOffset(b) === 0) wanted.push(b);
      }
      if (wanted.length === newBlocks.length) break;
      newBlocks = wanted;
    }
    if (newBlocks.some((b) => b >= entries)) throw new Qcow2Error('QCOW2_NO_SPACE', 'refcount table growth did not converge');
    const table = new Uint8Array(entries * 8);
    table.set(this.table);
    const view = new DataView(table.buffer);
    const used = tableClusters + newBlocks.length;
    const blocks = new Map<number, Uint8Array>();
    newBlocks.forEach((b, k) => {
      writeU64(view, 8 * b, (start + tableClusters + k) * this.clusterSize);
      blocks.set(b, new Uint8Array(this.clusterSize));
    });
    for (let c = start; c < start + used; c++) {
      const b = Math.floor(c / this.perBlock);
      const fresh = blocks.get(b);
      if (fresh !== undefined) setRefcount(fresh, c % this.perBlock, this.bits, 1);
      else {
        await this.#set(c, 1);
        const existing = await this.#block(b);
        if (existing !== undefined && existing.dirty) await this.#writeBlock(existing);
      }
    }
    for (const [b, data] of blocks) await this.file.write(readU64(view, 8 * b, 'new refcount block'), [data]);
    const tableOffset = start * this.clusterSize;
    await this.file.write(tableOffset, [table]);
    await this.file.flush();
    const header = new Uint8Array(12);
    const hv = new DataView(header.buffer);
    writeU64(hv, 0, tableOffset);
    hv.setUint32(8, tableClusters);
    await this.file.write(48, [header]);
    await this.file.flush();
    const oldOffset = this.tableOffset, oldClusters = this.table.length / this.clusterSize;
    this.table = table;
    this.#tableView = view;
    this.tableOffset = tableOffset;
    this.changes++;
    if (start + used > this.end) this.end = start + used;
    for (let k = 0; k < oldClusters; k++) await this.decrement(oldOffset / this.clusterSize + k);
  }
}
