/**
 * The dirty log of vhost-user live migration (vhost-user.rst, "Migration" → "Dirty log"):
 * a bitmap shared with the frontend, one bit per 4 KiB page of guest-physical memory.
 * While the frontend migrates, it reads and clears the bitmap concurrently (QEMU 7.2
 * swaps each 64-bit word to zero, then sends the pages whose bits were set), so a page
 * must be marked *after* the backend wrote it: marking first would let a sync clear the
 * bit and copy the page before the write lands, and the write would never be sent.
 *
 * Bits are set with `Atomics.or`, a locked read-modify-write on x86: it cannot lose a bit
 * to the frontend's concurrent swap, and it is a full fence, so the stores that made the
 * page dirty are visible before the bit is (the status byte is a plain store by this
 * thread; a plain load of the log word could be ordered before it).
 *
 * The holder outlives the bitmap it points to: SET_LOG_BASE replaces the bitmap (QEMU
 * resizes the log when guest memory grows) while queues keep the holder.
 */
import { VHOST_LOG_PAGE } from '../spec/vhost-user.js';

export class DirtyLog {
  private bits: Uint8Array | null = null;

  /** Whether a bitmap is attached: marks land somewhere. */
  get active(): boolean {
    return this.bits !== null;
  }

  /** Bytes of the attached bitmap (0 without one). */
  get size(): number {
    return this.bits?.length ?? 0;
  }

  /** Attaches `bits` (or detaches with null); returns the previous bitmap. */
  replace(bits: Uint8Array | null): Uint8Array | null {
    const old = this.bits;
    this.bits = bits;
    return old;
  }

  /**
   * Marks every page that [addr, addr + length) touches. Pages past the end of the bitmap
   * are left out: the frontend sizes the log for all of its memory (the session checks
   * that), so only an address it made up (a used-ring log address) reaches beyond.
   */
  mark(addr: number, length: number): void {
    const bits = this.bits;
    if (bits === null || length <= 0 || addr < 0) return;
    // Divisions, not shifts: guest addresses go up to 2^53, pages to 2^41.
    const first = Math.floor(addr / VHOST_LOG_PAGE);
    const last = Math.floor((addr + length - 1) / VHOST_LOG_PAGE);
    const firstByte = Math.floor(first / 8);
    const lastByte = Math.floor(last / 8);
    const end = Math.min(lastByte, bits.length - 1);
    for (let b = firstByte; b <= end; b++) {
      const lo = b === firstByte ? first % 8 : 0;
      const hi = b === lastByte ? last % 8 : 7;
      Atomics.or(bits, b, (0xff >> (7 - hi)) & (0xff << lo));
    }
  }
}

/** Bytes of log that cover guest-physical addresses below `end` (QEMU's log is sized in u64 words; a byte is enough). */
export function logBytesFor(end: number): number {
  return Math.ceil(end / VHOST_LOG_PAGE / 8);
}
