/**
 * The driver's bounce buffers: blocks of DMA memory (memory the device can reach) that
 * request data is copied through. Blocks come from the transport's {@link DmaAllocator}
 * and are kept on per-size free lists when released, so the hot path reuses a warm block
 * and a view taken once instead of allocating and translating per request.
 */
import { powerOfTwo, type DmaAllocator } from '../memory/dma-allocator.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { RequestError } from './driver-errors.js';

/** One block of DMA memory and a view of all of it. */
export interface DmaBlock {
  /** Guest address. */
  readonly addr: number;
  /** The whole block (its size is a power of two, at least what was asked for). */
  readonly bytes: Uint8Array;
}

/** Smallest block handed out: a logical block of the smallest size (512 bytes). */
const MIN_ORDER = 9;

export class BouncePool {
  /** free[order]: cached blocks of 2^order bytes. */
  private readonly free: DmaBlock[][] = [];
  private cachedBytes = 0;

  /** Keeps at most `maxCachedBytes` of released blocks for reuse. */
  constructor(
    private readonly memory: GuestMemory,
    private readonly dma: DmaAllocator,
    private readonly maxCachedBytes: number,
  ) {}

  /** A block of at least `length` bytes, or null when DMA memory is exhausted for now. */
  get(length: number): DmaBlock | null {
    const order = orderOf(length);
    const list = this.free[order];
    if (list !== undefined && list.length > 0) {
      this.cachedBytes -= powerOfTwo(order);
      return list.pop() as DmaBlock;
    }
    let addr = this.dma.alloc(powerOfTwo(order));
    if (addr < 0 && this.cachedBytes > 0) {
      // Cached blocks of other sizes may be what stands in the way: give them back.
      this.drain();
      addr = this.dma.alloc(powerOfTwo(order));
    }
    if (addr < 0) return null;
    return { addr, bytes: viewOf(this.memory, this.dma, addr, powerOfTwo(order)) };
  }

  /** Returns a block from {@link get}, caching it while the cache has room. */
  put(block: DmaBlock): void {
    const size = block.bytes.length;
    if (this.cachedBytes + size > this.maxCachedBytes) {
      this.dma.release(block.addr);
      return;
    }
    const order = orderOf(size);
    (this.free[order] ??= []).push(block);
    this.cachedBytes += size;
  }

  /** Releases every cached block to the allocator. */
  drain(): void {
    for (const list of this.free) {
      if (list === undefined) continue;
      for (const b of list) this.dma.release(b.addr);
      list.length = 0;
    }
    this.cachedBytes = 0;
  }
}

/** A view of a freshly allocated DMA block; the block is released again if there is none. */
export function viewOf(memory: GuestMemory, dma: DmaAllocator, addr: number, length: number): Uint8Array {
  const bytes = memory.view(addr, length);
  if (bytes === null) {
    dma.release(addr);
    // The transport's DMA arena must lie inside one memory region (every transport's does).
    throw new RequestError('NO_DMA_MEMORY', `DMA block at 0x${addr.toString(16)} of ${length} bytes is not inside one memory region`);
  }
  return bytes;
}

function orderOf(length: number): number {
  // 32 - clz32(n - 1) = ceil(log2(n)) for 1 < n <= 2^31; request sizes stay far below.
  return Math.max(MIN_ORDER, 32 - Math.clz32(length - 1));
}
