/**
 * The qcow2 format driver (QEMU docs/interop/qcow2.txt), a {@link BlockBackend} over an
 * {@link ImageFile}. Sans-IO: it runs on a `Uint8Array` in a browser as well as on a file.
 *
 * Hot path: a read, or a write to a cluster this image owns alone (COPIED), whose L2
 * table is cached, goes straight to the file and returns what the file returns (nothing
 * when the file is synchronous). Everything else (L2 loads, allocation, copy-on-write,
 * compressed clusters, discard) takes an async path under one metadata lock, with a
 * per-guest-cluster lock so that two writers never allocate the same cluster.
 *
 * Crash safety: data is written before the L2 entry that points to it is published;
 * metadata is written back in dependency order (refcount blocks, flush, L2 tables, flush,
 * L1, flush); refcount decrements are applied only after the metadata that stopped
 * pointing at a cluster is durable, and after every data I/O that might still target it
 * has completed. A crash at any point leaves at worst leaked clusters.
 */
import {
  BackendError, checkGrow, checkRange, totalLength,
  type BackendResult, type BlockBackend, type Extent, type ExtentKind,
} from '../backend.js';
import type { ImageFile } from './image-file.js';
import { TableCache, type CachedTable } from './table-cache.js';
import { MetadataMap } from './metadata-map.js';
import { Refcounts } from './refcounts.js';
import { Mutex, copyInto, sliceBuffers } from './buffers.js';
import { defaultInflate, type Decompressor } from './inflate.js';
import { ALL_SUBCLUSTERS, UNALLOCATED, decodeEntry, subclusterState, validateL2Table, type Entry, type L2Geometry } from './l2-entry.js';

import type { Qcow2Options } from './open.js';
import {
  INCOMPAT, MAX_L1_BYTES, Qcow2Error, entryOffset, writeU64,
  type CompressionType, type Qcow2Header,
} from './header.js';

export type { Decompressor } from './inflate.js';
// The opener lives beside the class (it builds one); both are this module's API.
export { openQcow2, type Qcow2Options } from './open.js';

/** The most L2 cache a default takes: tables mapping 128 GiB with 64 KiB clusters. */
const MAX_DEFAULT_L2_CACHE_BYTES = 16 << 20;

/**
 * Enough L2 tables to map the whole disk, up to {@link MAX_DEFAULT_L2_CACHE_BYTES} (QEMU on
 * Linux does the same up to 32 MiB): random I/O over a disk the cache cannot map reloads
 * and revalidates a whole table per request (measured: a 16 GiB image with 1 MiB of cache
 * served 4 KiB random writes at 619 IOPS where qemu-storage-daemon served 11 320).
 */
function defaultL2CacheBytes(diskSize: number, clusterSize: number, entriesPerTable: number): number {
  const tables = Math.ceil(diskSize / (clusterSize * entriesPerTable));
  return Math.min(tables * clusterSize, MAX_DEFAULT_L2_CACHE_BYTES);
}

/** Codes of the hot path's cluster lookup beside host offsets (which are positive). */
const NOT_FAST = -1, READS_ZERO = -2, READS_BACKING = -3;

export class Qcow2Backend implements BlockBackend {
  #h: Qcow2Header;
  readonly #file: ImageFile;
  readonly #backing: BlockBackend | undefined;
  readonly #decompressors: Partial<Record<CompressionType, Decompressor>>;
  readonly #cs: number;
  readonly #ext: boolean;
  readonly #v3: boolean;
  readonly #entryBytes: number;
  readonly #l2Entries: number;
  readonly #scSize: number;
  readonly #geometry: L2Geometry;
  #l1: Uint8Array;
  #l1View: DataView;
  /** The image's metadata clusters, which no data entry may point into. */
  readonly #meta: MetadataMap;
  #l1DirtyFrom = Infinity;
  #l1DirtyTo = 0;
  readonly #l2: TableCache;
  readonly #rc: Refcounts | undefined;
  readonly #lock = new Mutex();
  readonly #busy = new Map<number, Promise<void>>();
  #frees: number[] = [];
  #ioEpoch = 0;
  readonly #ioCounts = new Map<number, number>();
  #drainWaiters: { epoch: number; resolve: () => void }[] = [];
  /** No unknown autoclear bit left to clear before the first write. */
  #headerClean: boolean;
  /** What an unallocated cluster reads as: {@link READS_BACKING} or {@link READS_ZERO}. */
  readonly #unallocatedReads: number;
  #closed = false;
  #inflated: { offset: number; data: Uint8Array } | undefined;

  size: number;
  readonly readOnly: boolean;
  readonly canFlush = true;
  readonly canDiscard: boolean;
  readonly canWriteZeroes: boolean;
  readonly concurrency = 'parallel' as const;

  /** Use {@link openQcow2}. */
  constructor(file: ImageFile, header: Qcow2Header, l1: Uint8Array, refcountTable: Uint8Array | undefined, readOnly: boolean, options: Qcow2Options) {
    this.#file = file;
    this.#h = header;
    this.#backing = options.backing;
    this.#decompressors = { ...(defaultInflate ? { zlib: defaultInflate } : {}), ...options.decompressors };
    this.#cs = 2 ** header.clusterBits;
    this.#v3 = header.version === 3;
    this.#ext = (header.incompatibleFeatures & INCOMPAT.EXTL2) !== 0;
    this.#entryBytes = this.#ext ? 16 : 8;
    this.#l2Entries = this.#cs / this.#entryBytes;
    this.#scSize = this.#ext ? this.#cs / 32 : this.#cs;
    this.#geometry = { clusterBits: header.clusterBits, v3: this.#v3, extended: this.#ext };
    this.#l1 = l1;
    this.#l1View = new DataView(l1.buffer);
    this.#l2 = new TableCache(Math.max(4, Math.floor((options.l2CacheBytes ?? defaultL2CacheBytes(header.size, this.#cs, this.#l2Entries)) / this.#cs)), this.#cs, (t) => this.#writeBackL2(t));
    this.size = header.size;
    this.readOnly = readOnly;
    this.#headerClean = !this.#v3 || header.autoclearFeatures === 0;
    this.#unallocatedReads = this.#backing === undefined ? READS_ZERO : READS_BACKING;
    // v2 has no zero flag: with a backing file a discarded cluster would show the backing data.
    this.canDiscard = !readOnly && (this.#v3 || this.#backing === undefined);
    this.canWriteZeroes = !readOnly;
    this.#meta = new MetadataMap({ clusterSize: this.#cs, header: () => this.#h, l1: () => this.#l1, refcounts: () => this.#rc });
    if (refcountTable !== undefined) {
      this.#rc = new Refcounts({
        file, clusterBits: header.clusterBits, refcountOrder: header.refcountOrder, tableOffset: header.refcountTableOffset,
        table: refcountTable, cacheBytes: options.refcountCacheBytes ?? 256 * 1024, reserved: () => this.#meta.reserved(),
      });
    }
  }

  /** The header as it is now on disk (size, L1 and refcount table positions follow resizes and growth). */
  get header(): Qcow2Header {
    return { ...this.#h, refcountTableOffset: this.#rc?.tableOffset ?? this.#h.refcountTableOffset,
      refcountTableClusters: this.#rc ? this.#rc.table.length / this.#cs : this.#h.refcountTableClusters };
  }

  // ---------------------------------------------------------------- fast path

  /**
   * Where the hot path finds guest cluster `c`: its host offset, {@link READS_ZERO} or
   * {@link READS_BACKING} (reads only), or {@link NOT_FAST} when the async path must decide
   * (L2 table not cached, compressed, partly allocated subclusters, shared on a write).
   */
  #fastHost(c: number, write: boolean): number {
    const l1o = 8 * Math.floor(c / this.#l2Entries);
    const l1hi = this.#l1View.getUint32(l1o);
    const l2off = entryOffset(l1hi, this.#l1View.getUint32(l1o + 4));
    if (l2off === 0) return write ? NOT_FAST : this.#unallocatedReads;
    const t = this.#l2.get(l2off);
    if (t === undefined) return NOT_FAST;
    const o = (c % this.#l2Entries) * this.#entryBytes;
    const hi = t.view.getUint32(o), lo = t.view.getUint32(o + 4);
    if ((hi & 0x4000_0000) !== 0) return NOT_FAST;
    if (this.#ext) {
      const alloc = t.view.getUint32(o + 12);
      if (alloc !== ALL_SUBCLUSTERS) {
        if (write || alloc !== 0) return NOT_FAST;
        const zero = t.view.getUint32(o + 8);
        return zero === ALL_SUBCLUSTERS ? READS_ZERO : zero === 0 ? this.#unallocatedReads : NOT_FAST;
      }
    } else if ((lo & 1) !== 0) {
      return write ? NOT_FAST : READS_ZERO;
    }
    if (write && ((hi & 0x8000_0000) === 0 || (l1hi & 0x8000_0000) === 0)) return NOT_FAST;
    const host = entryOffset(hi, lo);
    if (host === 0) return write ? NOT_FAST : this.#unallocatedReads;
    // The slow path refuses a write onto metadata (see #checkDataCluster).
    return write && this.#meta.has(host / this.#cs) ? NOT_FAST : host;
  }

  read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    this.#checkOpen();
    const length = totalLength(buffers);
    checkRange(this.size, offset, length);
    if (length === 0) return;
    const c = Math.floor(offset / this.#cs);
    if (Math.floor((offset + length - 1) / this.#cs) === c) {
      const host = this.#fastHost(c, false);
      if (host > 0) return this.#track(this.#file.read(host + offset - c * this.#cs, buffers));
      if (host === READS_ZERO) {
        for (let i = 0; i < buffers.length; i++) buffers[i].fill(0);
        return;
      }
      // The backing never frees what it holds: no tracking. Past its end, the async path pads with zeroes.
      if (host === READS_BACKING && offset + length <= this.#backing!.size) return this.#backing!.read(offset, buffers);
    } else if (this.#allFast(offset, length, false)) {
      return this.#fastPieces(offset, buffers, length, false);
    }
    return this.#readSlow(offset, buffers, length);
  }

  write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    this.#checkWritable();
    const length = totalLength(buffers);
    checkRange(this.size, offset, length);
    if (length === 0) return;
    const c = Math.floor(offset / this.#cs);
    if (this.#headerClean && Math.floor((offset + length - 1) / this.#cs) === c) {
      const host = this.#fastHost(c, true);
      if (host > 0) return this.#track(this.#file.write(host + offset - c * this.#cs, buffers));
    } else if (this.#headerClean && this.#allFast(offset, length, true)) {
      return this.#fastPieces(offset, buffers, length, true);
    }
    return this.#writeSlow(offset, buffers, length);
  }

  /** Every cluster of a request spanning several (up to 64) can take the hot path. */
  #allFast(offset: number, length: number, write: boolean): boolean {
    const first = Math.floor(offset / this.#cs), last = Math.floor((offset + length - 1) / this.#cs);
    if (last - first > 64) return false;
    for (let c = first; c <= last; c++) if (this.#fastHost(c, write) <= 0) return false;
    return true;
  }

  /** A multi-cluster request on the hot path: one file call per cluster, synchronous when the file is. */
  #fastPieces(offset: number, buffers: readonly Uint8Array[], length: number, write: boolean): BackendResult {
    let pending: Promise<void>[] | undefined;
    for (const [c, inOff, bufs] of this.#pieces(offset, buffers, length)) {
      const at = this.#fastHost(c, write) + inOff;
      const r = write ? this.#file.write(at, bufs) : this.#file.read(at, bufs);
      if (r !== undefined) (pending ??= []).push(r);
    }
    return pending === undefined ? undefined : this.#track(Promise.all(pending).then(() => undefined));
  }

  /** Counts an in-flight data I/O so that freed clusters are reused only once it has completed. */
  #track(r: BackendResult): BackendResult {
    if (r === undefined) return r;
    const epoch = this.#ioEpoch;
    this.#ioCounts.set(epoch, (this.#ioCounts.get(epoch) ?? 0) + 1);
    return r.finally(() => {
      const n = this.#ioCounts.get(epoch)! - 1;
      if (n === 0) this.#ioCounts.delete(epoch);
      else this.#ioCounts.set(epoch, n);
      this.#drainWaiters = this.#drainWaiters.filter((w) => (this.#drained(w.epoch) ? (w.resolve(), false) : true));
    });
  }

  #drained(epoch: number): boolean {
    for (const e of this.#ioCounts.keys()) if (e <= epoch) return false;
    return true;
  }

  /** Resolves once every data I/O started before this call has completed. */
  async #drain(): Promise<void> {
    const epoch = this.#ioEpoch++;
    if (this.#drained(epoch)) return;
    await new Promise<void>((resolve) => this.#drainWaiters.push({ epoch, resolve }));
  }

  // ---------------------------------------------------------------- slow path

  /** Splits a request into its per-cluster pieces: [guest cluster, offset in it, buffers]. */
  #pieces(offset: number, buffers: readonly Uint8Array[], length: number): [number, number, Uint8Array[]][] {
    const out: [number, number, Uint8Array[]][] = [];
    for (let pos = 0; pos < length;) {
      const at = offset + pos;
      const c = Math.floor(at / this.#cs);
      const inOff = at - c * this.#cs;
      const n = Math.min(this.#cs - inOff, length - pos);
      out.push([c, inOff, sliceBuffers(buffers, pos, n)]);
      pos += n;
    }
    return out;
  }

  async #readSlow(offset: number, buffers: readonly Uint8Array[], length: number): Promise<void> {
    for (const [c, inOff, bufs] of this.#pieces(offset, buffers, length)) {
      await this.#readCluster(c, await this.#entry(c), inOff, bufs);
    }
  }

  /** Reads `[inOff, inOff + length of bufs)` of guest cluster `c` as described by `e`. */
  async #readCluster(c: number, e: Entry, inOff: number, bufs: Uint8Array[]): Promise<void> {
    const length = totalLength(bufs);
    if (e.kind === 'compressed') {
      const data = await this.#decompress(e);
      copyInto(bufs, data.subarray(inOff, inOff + length));
      return;
    }
    // Runs of subclusters in one state: allocated, zero, or from the backing.
    for (let pos = 0; pos < length;) {
      const sc = Math.floor((inOff + pos) / this.#scSize);
      const state = subclusterState(e, sc);
      let end = (sc + 1) * this.#scSize - inOff;
      while (end < length && subclusterState(e, Math.floor((inOff + end) / this.#scSize)) === state) end += this.#scSize;
      const n = Math.min(end, length) - pos;
      const part = sliceBuffers(bufs, pos, n);
      if (state === 1) await this.#track(this.#file.read(e.offset + inOff + pos, part));
      else if (state === 2) for (const b of part) b.fill(0);
      else await this.#readBacking(c * this.#cs + inOff + pos, part, n);
      pos += n;
    }
  }

  async #readBacking(offset: number, bufs: Uint8Array[], length: number): Promise<void> {
    const avail = this.#backing === undefined ? 0 : Math.max(0, Math.min(length, this.#backing.size - offset));
    if (avail > 0) await this.#backing!.read(offset, avail === length ? bufs : sliceBuffers(bufs, 0, avail));
    if (avail < length) for (const b of sliceBuffers(bufs, avail, length - avail)) b.fill(0);
  }

  async #decompress(e: Entry): Promise<Uint8Array> {
    // Small reads walk a compressed cluster piece by piece: keep the last one inflated.
    if (this.#inflated !== undefined && this.#inflated.offset === e.offset) return this.#inflated.data;
    const type = this.#h.compressionType;
    const inflate = this.#decompressors[type];
    if (inflate === undefined) throw new Qcow2Error('QCOW2_NO_DECOMPRESSOR', `a compressed cluster needs a ${type} decompressor and none was given`);
    const compressed = new Uint8Array(e.length);
    await this.#track(this.#file.read(e.offset, [compressed]));
    let out: Uint8Array;
    try {
      out = await inflate(compressed, this.#cs);
    } catch (err) {
      throw new Qcow2Error('QCOW2_BAD_METADATA', `compressed cluster at ${e.offset} does not decompress: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (out.length < this.#cs) throw new Qcow2Error('QCOW2_BAD_METADATA', `compressed cluster at ${e.offset} decompresses to ${out.length} bytes, not ${this.#cs}`);
    this.#inflated = { offset: e.offset, data: out };
    return out;
  }

  /** The entry of guest cluster `c`, loading its L2 table if needed. */
  async #entry(c: number): Promise<Entry> {
    const l2off = this.#l2Offset(c);
    if (l2off === 0) return UNALLOCATED;
    const cached = this.#l2.get(l2off);
    if (cached !== undefined) return this.#entryOf(cached, c);
    return this.#lock.run(async () => this.#entryOf(await this.#loadL2(this.#l2Offset(c)), c));
  }

  #l2Offset(c: number): number {
    const o = 8 * Math.floor(c / this.#l2Entries);
    return entryOffset(this.#l1View.getUint32(o), this.#l1View.getUint32(o + 4));
  }

  #entryOf(t: CachedTable, c: number): Entry {
    return decodeEntry(t.view, (c % this.#l2Entries) * this.#entryBytes, this.#geometry);
  }

  /** Loads (under the lock) and validates the L2 table at `off`. */
  async #loadL2(off: number): Promise<CachedTable> {
    const cached = this.#l2.get(off);
    if (cached !== undefined) return cached;
    if (off % this.#cs !== 0 || off < this.#cs || off >= this.#file.size) {
      throw new Qcow2Error('QCOW2_BAD_METADATA', `L2 table offset ${off} is unaligned, on the header or past the end of the file`);
    }
    if (this.#meta.isRefcountBlock(off / this.#cs)) {
      throw new Qcow2Error('QCOW2_BAD_METADATA', `L2 table offset ${off} is a refcount block`);
    }
    const data = new Uint8Array(this.#cs);
    await this.#file.read(off, [data]);
    validateL2Table(data, off, this.#geometry, this.#file.size, this.#meta);
    return this.#l2.insert(off, data, false);
  }

  async #writeSlow(offset: number, buffers: readonly Uint8Array[], length: number): Promise<void> {
    for (const [c, inOff, bufs] of this.#pieces(offset, buffers, length)) await this.#writeCluster(c, inOff, bufs);
  }

  /** Runs `fn` while no other slow-path operation works on guest cluster `c`. */
  async #withCluster<T>(c: number, fn: () => Promise<T>): Promise<T> {
    for (let p = this.#busy.get(c); p !== undefined; p = this.#busy.get(c)) await p;
    let release!: () => void;
    this.#busy.set(c, new Promise((r) => { release = r; }));
    try {
      return await fn();
    } finally {
      this.#busy.delete(c);
      release();
    }
  }

  async #writeCluster(c: number, inOff: number, bufs: Uint8Array[]): Promise<void> {
    await this.#withCluster(c, async () => {
      const ready = this.#headerClean ? this.#fastHost(c, true) : -1;
      if (ready > 0) {
        await this.#track(this.#file.write(ready + inOff, bufs));
        return;
      }
      let e = UNALLOCATED, host = 0, reuse = false, fresh = false;
      await this.#lock.run(async () => {
        await this.#clearAutoclear();
        e = this.#entryOf(await this.#l2ForWrite(c), c);
        this.#checkDataCluster(e, c);
        reuse = e.copied && e.offset !== 0 && e.kind !== 'compressed';
        host = reuse ? e.offset : await this.#rc!.allocate(1);
        // A cluster past the end of the file reads as zeroes: when the old content is zeroes too, only the new data need be written.
        fresh = !reuse && host >= this.#file.size && this.#readsZero(e);
      });
      // Data (and the copied-on-write rest of the cluster) before the entry that points to it.
      if (fresh || (inOff === 0 && totalLength(bufs) === this.#cs)) {
        await this.#track(this.#file.write(host + inOff, bufs));
      } else {
        const whole = new Uint8Array(this.#cs);
        await this.#readCluster(c, e, 0, [whole]);
        let at = inOff;
        for (const b of bufs) { whole.set(b, at); at += b.length; }
        await this.#track(this.#file.write(host, [whole]));
      }
      await this.#lock.run(async () => {
        const t = await this.#l2ForWrite(c);
        this.#setEntry(t, c, host, true, this.#ext ? ALL_SUBCLUSTERS : 1, 0);
        if (!reuse) this.#free(e);
      });
    });
  }

  /** The whole cluster described by `e` reads as zeroes. */
  #readsZero(e: Entry): boolean {
    if (e.kind === 'compressed') return false;
    if (!this.#ext) return e.kind === 'zero' || (e.kind === 'unallocated' && this.#backing === undefined);
    return e.alloc === 0 && (e.zero === ALL_SUBCLUSTERS || this.#backing === undefined);
  }

  /** Writes an L2 entry: `host` (0 for none) with COPIED, and the subcluster bitmaps (or the zero flag when `zero` is 1 without extended L2). */
  #setEntry(t: CachedTable, c: number, host: number, copied: boolean, alloc: number, zero: number): void {
    const o = (c % this.#l2Entries) * this.#entryBytes;
    const hi = Math.floor(host / 0x1_0000_0000) | (copied && host !== 0 ? 0x8000_0000 : 0);
    t.view.setUint32(o, hi);
    t.view.setUint32(o + 4, (host >>> 0) | (!this.#ext && zero !== 0 ? 1 : 0));
    if (this.#ext) {
      t.view.setUint32(o + 8, zero);
      t.view.setUint32(o + 12, host === 0 ? 0 : alloc);
    }
    t.dirty = true;
  }

  /**
   * Throws unless guest cluster `c`'s entry `e` points at data, not at the image's own
   * metadata. Entries are checked when their table is loaded; this catches a cluster that
   * became metadata since — handed out as a new table because a damaged refcount called
   * it free — before a write or a free through the entry destroys it.
   */
  #checkDataCluster(e: Entry, c: number): void {
    if (e.offset === 0 || e.kind === 'compressed') return;
    const host = Math.floor(e.offset / this.#cs);
    if (this.#meta.has(host)) {
      throw new Qcow2Error('QCOW2_BAD_METADATA', `guest cluster ${c} maps to cluster offset ${host * this.#cs}, which holds the image's metadata (its refcount said it was free)`);
    }
  }

  /** Queues the host clusters of an entry no longer referenced for release at the next flush. */
  #free(e: Entry): void {
    if (e.offset === 0) return;
    const first = Math.floor(e.offset / this.#cs);
    const last = e.kind === 'compressed' ? Math.floor((e.offset + e.length - 1) / this.#cs) : first;
    for (let k = first; k <= last; k++) this.#frees.push(k);
  }

  /** The L2 table of guest cluster `c`, made writable: allocated when absent, copied when shared. Under the lock. */
  async #l2ForWrite(c: number): Promise<CachedTable> {
    const i = Math.floor(c / this.#l2Entries);
    const hi = this.#l1View.getUint32(8 * i), lo = this.#l1View.getUint32(8 * i + 4);
    const off = entryOffset(hi, lo);
    if (off !== 0 && (hi & 0x8000_0000) !== 0) return this.#loadL2(off);
    const data = off === 0 ? new Uint8Array(this.#cs) : (await this.#loadL2(off)).data.slice();
    if (off !== 0) {
      // The copy's entries stay shared with the snapshot: none of them is COPIED.
      for (let o = 0; o < data.length; o += this.#entryBytes) data[o] &= 0x7f;
    }
    const fresh = await this.#rc!.allocate(1);
    const t = await this.#l2.insert(fresh, data, true);
    this.#setL1(i, fresh);
    if (off !== 0) this.#frees.push(off / this.#cs);
    return t;
  }

  #setL1(i: number, l2off: number): void {
    this.#meta.l1EntryChanged(entryOffset(this.#l1View.getUint32(8 * i), this.#l1View.getUint32(8 * i + 4)), l2off);
    writeU64(this.#l1View, 8 * i, l2off);
    // Bit 63, COPIED: this L2 table is ours alone.
    if (l2off !== 0) this.#l1View.setUint32(8 * i, (this.#l1View.getUint32(8 * i) | 0x8000_0000) >>> 0);
    this.#l1DirtyFrom = Math.min(this.#l1DirtyFrom, i);
    this.#l1DirtyTo = Math.max(this.#l1DirtyTo, i + 1);
  }

  /** Clears unknown autoclear bits (durably) before the first change. Under the lock. */
  async #clearAutoclear(): Promise<void> {
    if (this.#headerClean) return;
    await this.#file.write(88, [new Uint8Array(8)]);
    await this.#file.flush();
    this.#h = { ...this.#h, autoclearFeatures: 0 };
    this.#headerClean = true;
  }

  // ---------------------------------------------------------------- write-back

  /** Evicting a dirty L2 table: the refcounts and data it relies on are made durable first. */
  async #writeBackL2(t: CachedTable): Promise<void> {
    await this.#rc?.writeDirty();
    await this.#file.flush();
    t.dirty = false;
    await this.#file.write(t.offset, [t.data]);
  }

  /** Writes back all metadata in dependency order, then releases the clusters freed since the last flush. Under the lock. */
  async #flushLocked(): Promise<void> {
    if (this.#rc !== undefined) {
      const rcDirty = await this.#rc.writeDirty();
      const l2Dirty = this.#l2.dirtyTables();
      const l1Dirty = this.#l1DirtyFrom < this.#l1DirtyTo;
      if (rcDirty || l2Dirty.length > 0 || l1Dirty) await this.#file.flush();
      for (const t of l2Dirty) {
        t.dirty = false;
        await this.#file.write(t.offset, [t.data]);
      }
      if (l1Dirty) {
        if (l2Dirty.length > 0) await this.#file.flush();
        const from = this.#l1DirtyFrom, to = this.#l1DirtyTo;
        this.#l1DirtyFrom = Infinity;
        this.#l1DirtyTo = 0;
        await this.#file.write(this.#h.l1TableOffset + 8 * from, [this.#l1.subarray(8 * from, 8 * to)]);
      }
    }
    await this.#file.flush();
    if (this.#frees.length > 0) {
      const frees = this.#frees;
      this.#frees = [];
      this.#inflated = undefined; // its host clusters may be among those freed, and reused
      await this.#drain();
      for (const k of frees) {
        this.#l2.forget(k * this.#cs);
        if (await this.#rc!.decrement(k) === 0) await this.#file.discard?.(k * this.#cs, this.#cs);
      }
      // Decrements are safe on disk now that nothing durable points at those clusters.
      if (await this.#rc!.writeDirty()) await this.#file.flush();
    }
  }

  flush(): BackendResult {
    this.#checkOpen();
    if (this.readOnly) return this.#file.flush();
    return this.#lock.run(() => this.#flushLocked());
  }

  // ---------------------------------------------------------------- discard, zeroes

  discard(offset: number, length: number): BackendResult {
    this.#checkWritable();
    if (!this.canDiscard) throw new BackendError('UNSUPPORTED', 'discard is not possible on a version 2 image with a backing file');
    checkRange(this.size, offset, length);
    return this.#zeroRange(offset, length, 'discard');
  }

  writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    this.#checkWritable();
    checkRange(this.size, offset, length);
    return this.#zeroRange(offset, length, unmap ? 'unmap' : 'keep');
  }

  async #zeroRange(offset: number, length: number, mode: 'discard' | 'unmap' | 'keep'): Promise<void> {
    const end = offset + length;
    const tableBytes = this.#cs * this.#l2Entries;
    for (let at = offset; at < end;) {
      const c = Math.floor(at / this.#cs);
      if (this.#backing === undefined && at % tableBytes === 0 && end - at >= tableBytes && this.#l2Offset(c) === 0) {
        at += tableBytes; // a whole L2 table's range, unallocated and nothing behind it: reads zeroes already
        continue;
      }
      const n = Math.min((c + 1) * this.#cs, end) - at;
      if (n === this.#cs && (this.#v3 || this.#backing === undefined)) {
        // Whole clusters through metadata where the format can say "zero", a table's worth under one lock.
        const count = Math.floor((Math.min(end, (Math.floor(at / tableBytes) + 1) * tableBytes) - at) / this.#cs);
        await this.#zeroClusters(c, count, mode);
        at += count * this.#cs;
        continue;
      }
      // Partial clusters (and v2 with a backing) are written with zeroes.
      await this.#writeZeroBytes(at, n);
      at += n;
    }
  }

  async #writeZeroBytes(offset: number, n: number): Promise<void> {
    const c = Math.floor(offset / this.#cs);
    if (this.#readsZero(await this.#entry(c))) return;
    await this.#writeSlow(offset, [new Uint8Array(n)], n);
  }

  /** Zeroes `count` whole clusters from `first`, all in one L2 table. */
  async #zeroClusters(first: number, count: number, mode: 'discard' | 'unmap' | 'keep'): Promise<void> {
    const busy: number[] = [];
    await this.#lock.run(async () => {
      if (this.#l2Offset(first) === 0 && this.#backing === undefined) return; // unallocated, nothing behind it: zeroes already
      await this.#clearAutoclear();
      const t = await this.#l2ForWrite(first);
      // Nothing below awaits, so the table stays cached; a cluster a writer holds is done after it, on its own.
      for (let c = first; c < first + count; c++) {
        if (this.#busy.has(c)) busy.push(c);
        else this.#zeroEntry(t, c, mode);
      }
    });
    for (const c of busy) {
      await this.#withCluster(c, () => this.#lock.run(async () => this.#zeroEntry(await this.#l2ForWrite(c), c, mode)));
    }
  }

  #zeroEntry(t: CachedTable, c: number, mode: 'discard' | 'unmap' | 'keep'): void {
    const e = this.#entryOf(t, c);
    this.#checkDataCluster(e, c);
    // v2 has no zero flag: there the cluster is deallocated (nothing behind it, so it reads zeroes).
    if (this.#v3 && mode === 'keep' && e.copied && e.offset !== 0 && e.kind !== 'compressed') {
      this.#setEntry(t, c, e.offset, true, 0, this.#ext ? ALL_SUBCLUSTERS : 1);
      return;
    }
    const zeroFlag = this.#backing !== undefined ? (this.#ext ? ALL_SUBCLUSTERS : 1) : 0;
    if (e.kind === 'unallocated' && e.offset === 0 && e.zero === zeroFlag && e.alloc === 0) return; // already so: stay clean
    this.#setEntry(t, c, 0, false, 0, zeroFlag);
    this.#free(e);
  }

  // ---------------------------------------------------------------- resize, extents, close

  resize(newSize: number): BackendResult {
    this.#checkWritable();
    checkGrow(this.size, newSize);
    return this.#lock.run(async () => {
      await this.#clearAutoclear();
      const need = Math.ceil(newSize / (this.#cs * this.#l2Entries));
      let l1Offset = this.#h.l1TableOffset;
      if (need > this.#h.l1Size) {
        if (need * 8 > MAX_L1_BYTES) throw new Qcow2Error('QCOW2_NO_SPACE', `a disk of ${newSize} bytes needs an L1 table past ${MAX_L1_BYTES} bytes`);
        const l1 = new Uint8Array(need * 8);
        l1.set(this.#l1);
        const haveClusters = l1Offset === 0 ? 0 : Math.ceil(this.#h.l1Size * 8 / this.#cs);
        if (need * 8 <= haveClusters * this.#cs) {
          await this.#file.write(l1Offset + this.#h.l1Size * 8, [l1.subarray(this.#h.l1Size * 8)]);
        } else {
          // A new table elsewhere: every cached change is written first, so the copy is complete and its refcounts durable.
          l1Offset = await this.#rc!.allocate(Math.ceil(need * 8 / this.#cs));
          await this.#flushLocked();
          await this.#file.write(l1Offset, [l1]);
          if (this.#h.l1TableOffset !== 0) {
            const old = this.#h.l1TableOffset / this.#cs;
            for (let k = 0; k < haveClusters; k++) this.#frees.push(old + k);
          }
        }
        await this.#file.flush();
        this.#l1 = l1;
        this.#l1View = new DataView(l1.buffer);
      }
      const fields = new Uint8Array(24); // size, crypt_method, l1_size, l1_table_offset: bytes 24..48
      const v = new DataView(fields.buffer);
      writeU64(v, 0, newSize);
      v.setUint32(8, this.#h.cryptMethod);
      v.setUint32(12, Math.max(need, this.#h.l1Size));
      writeU64(v, 16, l1Offset);
      await this.#file.write(24, [fields]);
      await this.#file.flush();
      this.#h = { ...this.#h, size: newSize, l1Size: Math.max(need, this.#h.l1Size), l1TableOffset: l1Offset };
      this.size = newSize;
    });
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    this.#checkOpen();
    checkRange(this.size, offset, length);
    // One L2 table's worth at most per call: the caller asks again from where the runs end.
    const tableBytes = this.#cs * this.#l2Entries;
    const end = Math.min(offset + length, (Math.floor(offset / tableBytes) + 1) * tableBytes);
    const out: { length: number; kind: ExtentKind }[] = [];
    for (let at = offset; at < end;) {
      const c = Math.floor(at / this.#cs);
      const e = await this.#entry(c);
      const sc = Math.floor((at - c * this.#cs) / this.#scSize);
      const state = e.kind === 'compressed' ? 1 : subclusterState(e, sc);
      const kind: ExtentKind = state === 1 ? 'data' : state === 2 ? 'zero' : this.#backing !== undefined ? 'data' : 'hole';
      const n = Math.min(c * this.#cs + (sc + 1) * this.#scSize, end) - at;
      const last = out[out.length - 1];
      if (last !== undefined && last.kind === kind) last.length += n;
      else out.push({ length: n, kind });
      at += n;
    }
    return out;
  }

  close(): BackendResult {
    if (this.#closed) return;
    const done = (): BackendResult => {
      this.#closed = true;
      return this.#file.close();
    };
    if (this.readOnly) return done();
    return this.#lock.run(() => this.#flushLocked()).then(done);
  }

  #checkOpen(): void {
    if (this.#closed) throw new BackendError('CLOSED', 'the qcow2 image is closed');
  }

  #checkWritable(): void {
    this.#checkOpen();
    if (this.readOnly) throw new BackendError('READ_ONLY', 'the qcow2 image is open read-only');
  }
}
