/**
 * A bounded write-back cache of cluster-sized metadata tables (L2 tables, refcount
 * blocks), keyed by host offset. Least recently used goes first; a dirty table is
 * written back (by the owner's callback, which knows what must reach the disk before
 * it) before it is dropped. Lookups are synchronous and allocation-free so the hot
 * path can use them; everything that loads, evicts or writes runs under the driver's
 * metadata lock.
 */
export interface CachedTable {
  readonly offset: number;
  readonly data: Uint8Array;
  readonly view: DataView;
  dirty: boolean;
  lastUse: number;
}

export class TableCache {
  readonly #tables = new Map<number, CachedTable>();
  #tick = 0;

  constructor(
    readonly capacity: number,
    readonly tableBytes: number,
    /** Writes a dirty table back (and whatever must precede it); called under the lock. */
    private readonly writeBack: (t: CachedTable) => Promise<void>,
  ) {}

  /** The cached table at `offset`, marked used, or undefined. */
  get(offset: number): CachedTable | undefined {
    const t = this.#tables.get(offset);
    if (t !== undefined) t.lastUse = ++this.#tick;
    return t;
  }

  /** Tables currently cached. */
  get count(): number {
    return this.#tables.size;
  }

  /** Adds a table (made room for first). */
  async insert(offset: number, data: Uint8Array, dirty: boolean): Promise<CachedTable> {
    await this.#makeRoom();
    const t: CachedTable = { offset, data, view: new DataView(data.buffer, data.byteOffset, data.byteLength), dirty, lastUse: ++this.#tick };
    this.#tables.set(offset, t);
    return t;
  }

  /** Drops a table without writing it (its cluster was freed or replaced). */
  forget(offset: number): void {
    this.#tables.delete(offset);
  }

  /** Dirty tables in offset order. */
  dirtyTables(): CachedTable[] {
    return [...this.#tables.values()].filter((t) => t.dirty).sort((a, b) => a.offset - b.offset);
  }

  async #makeRoom(): Promise<void> {
    while (this.#tables.size >= this.capacity) {
      let victim: CachedTable | undefined;
      for (const t of this.#tables.values()) {
        if (victim === undefined || (t.dirty ? 1 : 0) < (victim.dirty ? 1 : 0) ||
            ((t.dirty === victim.dirty) && t.lastUse < victim.lastUse)) victim = t;
      }
      if (victim === undefined) return;
      if (victim.dirty) await this.writeBack(victim);
      // The write-back may have let another table in; drop this one only if it is still clean.
      if (!victim.dirty) this.#tables.delete(victim.offset);
    }
  }
}
