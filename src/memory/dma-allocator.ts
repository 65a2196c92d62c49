/**
 * A buddy allocator for the driver's side of guest memory: rings, indirect tables and
 * bounce buffers that the device reads and writes. Blocks are powers of two, naturally
 * aligned to their size (so every ring part gets its alignment for free), and merge
 * with their buddy on free so long runs never fragment the arena for good.
 */
import { UsageError } from '../errors.js';

/**
 * 2^order as a small integer whenever it is one. `2 ** n` yields a heap number even for
 * 256, and every address and size computed from it stays one: the driver's per-request
 * fields then hold boxed doubles, one more object to load each, and its arithmetic runs
 * in floating point (loopback CPU per request: −6% without the copies, −3% with them).
 */
export function powerOfTwo(order: number): number {
  return order < 31 ? 1 << order : 2 ** order;
}

/** log2 of a power of two `n`, as a small integer. */
function log2Exact(n: number): number {
  return Math.round(Math.log2(n)) | 0;
}

export class DmaAllocator {
  private readonly minOrder: number;
  private readonly maxOrder: number;
  /** free[order] holds the offsets of free blocks of 2^order bytes. */
  private readonly free: Set<number>[] = [];
  private readonly allocated = new Map<number, number>();
  private freeBytes: number;

  /**
   * Manages [base, base + size). `size` must be a power of two; `base` must be aligned
   * to the largest block anyone will ask for (a page is plenty for rings).
   */
  constructor(readonly base: number, readonly size: number, minBlock = 64) {
    if (!isPowerOfTwo(size) || !isPowerOfTwo(minBlock) || minBlock > size) {
      throw new UsageError('BAD_ARENA', `DMA arena size ${size} and block ${minBlock} must be powers of two, block <= size`);
    }
    this.minOrder = log2Exact(minBlock);
    this.maxOrder = log2Exact(size);
    for (let o = 0; o <= this.maxOrder; o++) this.free.push(new Set());
    this.free[this.maxOrder].add(0);
    this.freeBytes = size;
  }

  /** Bytes not allocated (not all of it in one piece). */
  get available(): number {
    return this.freeBytes;
  }

  /** Guest address of a new block of at least `length` bytes, or -1 when none is free. */
  alloc(length: number): number {
    const order = Math.max(this.minOrder, Math.ceil(Math.log2(Math.max(1, length))) | 0);
    if (order > this.maxOrder) return -1;
    let o = order;
    while (o <= this.maxOrder && this.free[o].size === 0) o++;
    if (o > this.maxOrder) return -1;
    const offset = this.free[o].values().next().value as number;
    this.free[o].delete(offset);
    while (o > order) {
      o--;
      this.free[o].add(offset + powerOfTwo(o));
    }
    this.allocated.set(offset, order);
    this.freeBytes -= powerOfTwo(order);
    return this.base + offset;
  }

  /** Size of the block at `addr` (at least what was asked for). */
  blockSize(addr: number): number {
    const order = this.allocated.get(addr - this.base);
    if (order === undefined) throw new UsageError('NOT_ALLOCATED', `0x${addr.toString(16)} is not an allocated DMA block`);
    return powerOfTwo(order);
  }

  /** Returns a block from {@link alloc}. Freeing anything else is a usage error. */
  release(addr: number): void {
    let offset = addr - this.base;
    let order = this.allocated.get(offset);
    if (order === undefined) throw new UsageError('NOT_ALLOCATED', `0x${addr.toString(16)} is not an allocated DMA block`);
    this.allocated.delete(offset);
    this.freeBytes += powerOfTwo(order);
    while (order < this.maxOrder) {
      // Arithmetic, not `^`: bitwise operators truncate to 32 bits and arenas may be larger.
      const block = powerOfTwo(order);
      const buddy = Math.floor(offset / block) % 2 === 0 ? offset + block : offset - block;
      if (!this.free[order].delete(buddy)) break;
      offset = Math.min(offset, buddy);
      order++;
    }
    this.free[order].add(offset);
  }
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && powerOfTwo(log2Exact(n)) === n;
}
