/**
 * Guest memory for the device fuzzer: three regions carved out of one host buffer, with
 * guard bytes before, between and after them, so the fuzzer can compare the whole host
 * buffer — guards included — before and after the device runs.
 *
 *   host:  [guard][ R0 ][guard][ R1 ][guard][ R2 ][guard]
 *   guest:  R0 and R1 are adjacent (a buffer may cross from one into the other, and the
 *           device then sees two views); R2 sits above 4 GiB, so descriptor addresses
 *           need their high half; the space between R1 and R2 is a hole.
 *
 * The fuzzer's reference model translates guest addresses with its own code
 * ({@link FuzzMemory.translate}), never through GuestMemory, so a translation bug in
 * GuestMemory cannot hide itself from the oracle.
 */
import { GuestMemory } from '../../src/memory/guest-memory.js';
import type { Rng } from './fuzz-prng.js';

/** A byte range of the host buffer. */
export interface HostRange {
  readonly at: number;
  readonly len: number;
}

interface RegionLayout {
  readonly guest: number;
  readonly host: number;
  readonly size: number;
}

const GUARD = 512;
const R0_GUEST = 0x10_0000;
const R0_SIZE = 64 * 1024;
const R1_SIZE = 32 * 1024;
const R2_GUEST = 0x1_0004_0000;
const R2_SIZE = 64 * 1024;
/** Addresses at or above 2^53 do not fit a JS number; descriptors may still name them. */
const HI_UNSAFE = 0x20_0000;

export class FuzzMemory {
  readonly host: Uint8Array;
  readonly memory: GuestMemory;
  readonly regions: readonly RegionLayout[];
  /** R0: the rings live at its start (see {@link ringArea}). */
  readonly r0: RegionLayout;

  constructor() {
    const sizes = [R0_SIZE, R1_SIZE, R2_SIZE];
    const guests = [R0_GUEST, R0_GUEST + R0_SIZE, R2_GUEST];
    this.host = new Uint8Array(GUARD * 4 + R0_SIZE + R1_SIZE + R2_SIZE);
    const regions: RegionLayout[] = [];
    let at = GUARD;
    for (let i = 0; i < sizes.length; i++) {
      regions.push({ guest: guests[i], host: at, size: sizes[i] });
      at += sizes[i] + GUARD;
    }
    this.regions = regions;
    this.r0 = regions[0];
    this.memory = new GuestMemory(regions.map((r) => ({ guestAddress: r.guest, bytes: this.host.subarray(r.host, r.host + r.size) })));
  }

  /** Random content everywhere, guards included (the comparison covers them like any byte). */
  scramble(rng: Rng): void {
    rng.fill(this.host);
  }

  /** Host offset of guest byte `addr`, or -1 when no region holds it. */
  hostOffset(addr: number): number {
    for (const r of this.regions) {
      if (addr >= r.guest && addr < r.guest + r.size) return r.host + (addr - r.guest);
    }
    return -1;
  }

  /** Guest address of host byte `at`, or -1 for a guard byte. */
  guestAddress(at: number): number {
    for (const r of this.regions) {
      if (at >= r.host && at < r.host + r.size) return r.guest + (at - r.host);
    }
    return -1;
  }

  /**
   * Where the device may touch the guest range given as a descriptor gives it (low and
   * high u32 halves of the address, and a length): host ranges in order, or null when
   * the device must refuse it. An empty range touches nothing and is accepted wherever
   * it points, unless the address cannot even be represented (the device's policy: an
   * empty buffer is never dereferenced).
   */
  translate(lo: number, hi: number, len: number): HostRange[] | null {
    if (hi >= HI_UNSAFE) return null;
    const out: HostRange[] = [];
    let addr = hi * 0x1_0000_0000 + lo;
    let left = len;
    while (left > 0) {
      const at = this.hostOffset(addr);
      if (at < 0) return null;
      const r = this.regions.find((g) => addr >= g.guest && addr < g.guest + g.size) as RegionLayout;
      const n = Math.min(left, r.guest + r.size - addr);
      out.push({ at, len: n });
      addr += n;
      left -= n;
    }
    return out;
  }

  /** Copies `bytes` into guest memory at `addr` (which the caller allocated). */
  write(addr: number, bytes: Uint8Array): void {
    const ranges = this.translate(addr % 0x1_0000_0000, Math.floor(addr / 0x1_0000_0000), bytes.length);
    if (ranges === null) throw new Error(`fuzzer bug: writing outside guest memory at 0x${addr.toString(16)}`);
    let from = 0;
    for (const r of ranges) {
      this.host.set(bytes.subarray(from, from + r.len), r.at);
      from += r.len;
    }
  }

  /** A guest address where a buffer of `len` > 0 bytes has at least one byte outside memory. */
  outsideAddress(rng: Rng, len: number): number {
    const r1 = this.regions[1];
    const r2 = this.regions[2];
    const r1End = r1.guest + r1.size;
    const r2End = r2.guest + r2.size;
    switch (rng.below(6)) {
      case 0: return rng.below(R0_GUEST - len);
      // Starts inside R1 and runs into the hole after it.
      case 1: return len < 2 ? r1End : r1End - rng.range(1, Math.min(len - 1, r1.size));
      case 2: return r1End + rng.below(r2.guest - r1End - len);
      // Starts inside R2 and runs past its end.
      case 3: return len < 2 ? r2End : r2End - rng.range(1, Math.min(len - 1, r2.size));
      case 4: return r2End + rng.below(0x1000_0000);
      // Beyond 2^53 (a multiple of 4096, so the number is exact), up to 2^64 - 4096.
      default: return rng.chance(0.5) ? 2 ** 64 - 4096 : 2 ** 53 + rng.below(0x1000_0000) * 4096;
    }
  }
}

/**
 * A per-batch allocator of guest buffers that never overlap each other nor the fixed
 * areas (rings): the fuzzer then knows exactly which bytes each request may touch.
 */
export class BatchAllocator {
  private busy: { start: number; end: number }[] = [];
  private fixed: { start: number; end: number }[] = [];

  constructor(private readonly mem: FuzzMemory) {}

  /** Marks a guest range as permanently taken (until {@link clearFixed}). */
  reserve(start: number, len: number): void {
    this.fixed.push({ start, end: start + len });
  }

  clearFixed(): void {
    this.fixed = [];
  }

  /** Starts a new batch: every buffer of the last one is free again. */
  reset(): void {
    this.busy = [];
  }

  /**
   * A fresh guest range of `len` bytes, or -1 when none was found quickly. Sometimes
   * placed across the R0/R1 boundary, so one buffer maps to two host views.
   */
  alloc(rng: Rng, len: number, align = 1): number {
    const regions = this.mem.regions;
    for (let attempt = 0; attempt < 8; attempt++) {
      let start: number;
      if (len >= 2 && rng.chance(0.05)) {
        const boundary = regions[1].guest;
        start = boundary - rng.range(1, Math.min(len - 1, regions[0].size));
      } else {
        const r = regions[rng.weighted(regions.map((g) => g.size))];
        if (len > r.size) continue;
        start = r.guest + rng.below(r.size - len + 1);
      }
      start -= start % align;
      if (!this.mem.translate(start % 0x1_0000_0000, Math.floor(start / 0x1_0000_0000), len)) continue;
      if (this.overlaps(start, start + len)) continue;
      this.busy.push({ start, end: start + Math.max(len, 1) });
      return start;
    }
    return -1;
  }

  private overlaps(start: number, end: number): boolean {
    const e = Math.max(end, start + 1);
    for (const b of this.busy) if (start < b.end && b.start < e) return true;
    for (const b of this.fixed) if (start < b.end && b.start < e) return true;
    return false;
  }
}
