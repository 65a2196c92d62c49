/**
 * Guest memory: the only way vblk touches memory by guest address. A set of
 * non-overlapping regions, each a byte array placed at a guest-physical address, and one
 * bounds-checked translation. Ranges that come from a guest are checked here and nowhere
 * else; a range with any byte outside every region is refused as a whole.
 */
import { VblkError } from '../errors.js';

/** One region of guest memory: `bytes` is guest memory from `guestAddress` on. */
export interface MemoryRegion {
  readonly guestAddress: number;
  readonly bytes: Uint8Array;
}

/**
 * 32- and 16-bit views of a whole region, from its first byte: how descriptor tables
 * (little-endian, naturally aligned fields) are read without a DataView or a copy.
 */
export interface RegionWords {
  readonly u32: Uint32Array;
  readonly u16: Uint16Array;
}

export type MemoryErrorCode = 'BAD_REGION' | 'OVERLAPPING_REGIONS';

export class MemoryError extends VblkError {
  declare readonly code: MemoryErrorCode;
  constructor(code: MemoryErrorCode, message: string) {
    super(code, message);
  }
}

const MAX_ADDRESS = Number.MAX_SAFE_INTEGER;
/**
 * log2 of the views kept per region by {@link GuestMemory.gather}: a queue of 256
 * requests posts about three buffers each, so 4096 slots hold a busy disk's working set.
 */
const VIEW_CACHE_BITS = 12;
/** 2^32 / the golden ratio, the multiplier of Fibonacci hashing. */
const FIB_HASH = 0x9e37_79b1;

/** Direct-mapped: slot k holds the view of `lengths[k]` bytes at `offsets[k]` (-1: empty). */
interface ViewCache {
  readonly offsets: Float64Array;
  readonly lengths: Float64Array;
  readonly views: Uint8Array[];
}

/** How a {@link GuestMemory} is used. */
export interface GuestMemoryOptions {
  /**
   * Nothing but the current thread reads or writes this memory while queues run over it
   * (a loopback's own memory, which no other thread or process can map): ring indices
   * are then read and published without atomics and fences (ring-index.ts). Default
   * false, right for memory shared with a peer process (vhost-user) or another thread
   * (a SharedArrayBuffer).
   */
  readonly exclusive?: boolean;
}

export class GuestMemory {
  readonly regions: readonly MemoryRegion[];
  /** See {@link GuestMemoryOptions.exclusive}. */
  readonly exclusive: boolean;
  private readonly starts: number[];
  private readonly ends: number[];
  /** Per region: its word views once asked for; null when its bytes are not 4-byte aligned. */
  private readonly words: (RegionWords | null | undefined)[];
  /** Per region: views handed out by {@link gather}, by offset (see {@link cachedView}). */
  private readonly viewCaches: (ViewCache | undefined)[] = [];
  /** The region {@link gather} found last, tried first next time. */
  private hot = 0;

  /** Throws {@link MemoryError} when a region is empty, out of range or overlaps another. */
  constructor(regions: readonly MemoryRegion[], options: GuestMemoryOptions = {}) {
    this.exclusive = options.exclusive ?? false;
    const sorted = [...regions].sort((a, b) => a.guestAddress - b.guestAddress);
    for (const r of sorted) {
      if (!Number.isSafeInteger(r.guestAddress) || r.guestAddress < 0 || r.bytes.length === 0 ||
          r.guestAddress + r.bytes.length > MAX_ADDRESS) {
        throw new MemoryError('BAD_REGION', `memory region at 0x${r.guestAddress.toString(16)} of ${r.bytes.length} bytes is empty or out of range`);
      }
    }
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1];
      if (prev.guestAddress + prev.bytes.length > sorted[i].guestAddress) {
        throw new MemoryError('OVERLAPPING_REGIONS', `memory regions at 0x${prev.guestAddress.toString(16)} and 0x${sorted[i].guestAddress.toString(16)} overlap`);
      }
    }
    this.regions = sorted;
    this.starts = sorted.map((r) => r.guestAddress);
    this.ends = sorted.map((r) => r.guestAddress + r.bytes.length);
    this.words = sorted.map(() => undefined);
  }

  /** Index of the region holding `addr`, or -1. */
  private find(addr: number): number {
    const starts = this.starts;
    let lo = 0;
    let hi = starts.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (starts[mid] <= addr) lo = mid + 1;
      else hi = mid - 1;
    }
    return hi >= 0 && addr < this.ends[hi] ? hi : -1;
  }

  /** Whether every byte of [addr, addr + length) lies in guest memory (vacuously true for no bytes). */
  contains(addr: number, length: number): boolean {
    if (!isRange(addr, length)) return false;
    let a = addr;
    let left = length;
    while (left > 0) {
      const i = this.find(a);
      if (i < 0) return false;
      const n = Math.min(left, this.ends[i] - a);
      a += n;
      left -= n;
    }
    return true;
  }

  /**
   * Index in {@link regions} of the region holding all of [addr, addr + length), or -1
   * (outside memory, or across a region edge). What {@link view} checks, without a view.
   */
  regionIndex(addr: number, length: number): number {
    if (!isRange(addr, length)) return -1;
    const i = this.find(addr);
    return i >= 0 && length <= this.ends[i] - addr ? i : -1;
  }

  /**
   * Word views of region `index` (made once), or null when the region's bytes do not
   * start 4-byte aligned in their buffer. Word k of `u32` is bytes [4k, 4k + 4) of the
   * region; a trailing partial word is not covered.
   */
  regionWords(index: number): RegionWords | null {
    const cached = this.words[index];
    if (cached !== undefined) return cached;
    const b = this.regions[index].bytes;
    let w: RegionWords | null = null;
    // A detached buffer (an unmapped region) has byteLength 0 and refuses new views.
    if (b.byteOffset % 4 === 0 && b.buffer.byteLength > 0) {
      w = {
        u32: new Uint32Array(b.buffer, b.byteOffset, Math.floor(b.length / 4)),
        u16: new Uint16Array(b.buffer, b.byteOffset, Math.floor(b.length / 2)),
      };
    }
    this.words[index] = w;
    return w;
  }

  /**
   * The guest address of the first byte of `view`, a view this memory handed out
   * ({@link view}, {@link gather}), or -1 when it lies in no region. A scan of the
   * regions: for the migration log's bookkeeping, not for a hot path.
   */
  guestAddressOf(view: Uint8Array): number {
    for (const r of this.regions) {
      const b = r.bytes;
      if (view.buffer === b.buffer && view.byteOffset >= b.byteOffset && view.byteOffset + view.length <= b.byteOffset + b.length) {
        return r.guestAddress + (view.byteOffset - b.byteOffset);
      }
    }
    return -1;
  }

  /**
   * A view of [addr, addr + length) when the range lies within one region, else null.
   * A zero-length range must still start inside a region.
   */
  view(addr: number, length: number): Uint8Array | null {
    if (!isRange(addr, length)) return null;
    const i = this.find(addr);
    if (i < 0 || length > this.ends[i] - addr) return null;
    const off = addr - this.starts[i];
    return this.regions[i].bytes.subarray(off, off + length);
  }

  /**
   * Appends views covering [addr, addr + length) to `out`, one per region the range
   * crosses (a buffer may span adjacent regions). Returns false, leaving `out` as it
   * was, when any byte lies outside guest memory.
   */
  gather(addr: number, length: number, out: Uint8Array[]): boolean {
    if (!isRange(addr, length)) return false;
    if (length > 0) {
      // The common case, one region — most often the one of the last call: a view from
      // the cache (drivers reuse their buffers).
      let i = this.hot;
      if (addr < this.starts[i] || length > this.ends[i] - addr) {
        i = this.find(addr);
        if (i >= 0) this.hot = i;
      }
      if (i >= 0 && length <= this.ends[i] - addr) {
        out.push(this.cachedView(i, addr - this.starts[i], length));
        return true;
      }
    }
    const mark = out.length;
    let a = addr;
    let left = length;
    while (left > 0) {
      const i = this.find(a);
      if (i < 0) {
        out.length = mark;
        return false;
      }
      const n = Math.min(left, this.ends[i] - a);
      const off = a - this.starts[i];
      out.push(this.regions[i].bytes.subarray(off, off + n));
      a += n;
      left -= n;
    }
    return true;
  }

  /**
   * The view of `length` bytes at `offset` in region `i`. Drivers post the same buffers
   * over and over (request headers, status bytes, bounce and DMA buffers), so views are
   * kept in a small direct-mapped cache per region, keyed by offset: a hit costs a hash
   * and a compare instead of a new typed array (and the garbage it becomes). A guest
   * cycling through addresses only evicts entries.
   */
  private cachedView(i: number, offset: number, length: number): Uint8Array {
    const cache = this.viewCaches[i] ?? this.newViewCache(i);
    // Fibonacci hashing of the 16-byte granule: neighbouring headers and buffers spread out.
    const slot = Math.imul(Math.floor(offset / 16) >>> 0, FIB_HASH) >>> (32 - VIEW_CACHE_BITS);
    if (cache.offsets[slot] === offset && cache.lengths[slot] === length) return cache.views[slot];
    const fresh = this.regions[i].bytes.subarray(offset, offset + length);
    cache.offsets[slot] = offset;
    cache.lengths[slot] = length;
    cache.views[slot] = fresh;
    return fresh;
  }

  private newViewCache(i: number): ViewCache {
    const empty = this.regions[i].bytes.subarray(0, 0);
    const cache: ViewCache = {
      offsets: new Float64Array(1 << VIEW_CACHE_BITS).fill(-1),
      lengths: new Float64Array(1 << VIEW_CACHE_BITS),
      views: new Array<Uint8Array>(1 << VIEW_CACHE_BITS).fill(empty),
    };
    this.viewCaches[i] = cache;
    return cache;
  }

  /** Copies guest memory at `addr` into `dest`. False when the range is not all guest memory. */
  read(addr: number, dest: Uint8Array): boolean {
    const views: Uint8Array[] = [];
    if (!this.gather(addr, dest.length, views)) return false;
    let at = 0;
    for (const v of views) {
      dest.set(v, at);
      at += v.length;
    }
    return true;
  }

  /** Copies `src` into guest memory at `addr`. False (nothing written) when out of range. */
  write(addr: number, src: Uint8Array): boolean {
    const views: Uint8Array[] = [];
    if (!this.gather(addr, src.length, views)) return false;
    let at = 0;
    for (const v of views) {
      v.set(src.subarray(at, at + v.length));
      at += v.length;
    }
    return true;
  }
}

function isRange(addr: number, length: number): boolean {
  return Number.isSafeInteger(addr) && addr >= 0 && Number.isSafeInteger(length) && length >= 0 &&
    addr <= MAX_ADDRESS - length;
}
