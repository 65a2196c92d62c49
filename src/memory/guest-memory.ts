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

export type MemoryErrorCode = 'BAD_REGION' | 'OVERLAPPING_REGIONS';

export class MemoryError extends VblkError {
  declare readonly code: MemoryErrorCode;
  constructor(code: MemoryErrorCode, message: string) {
    super(code, message);
  }
}

const MAX_ADDRESS = Number.MAX_SAFE_INTEGER;

export class GuestMemory {
  readonly regions: readonly MemoryRegion[];
  private readonly starts: number[];
  private readonly ends: number[];

  /** Throws {@link MemoryError} when a region is empty, out of range or overlaps another. */
  constructor(regions: readonly MemoryRegion[]) {
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
