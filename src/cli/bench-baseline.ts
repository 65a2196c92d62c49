/**
 * The benchmark's yardstick (DESIGN.md, Performance, measure 1): a bare JavaScript loop
 * that only copies the same blocks a benchmark moves — `bs` bytes at offsets chosen the
 * same way (the same generator and seed, block-random.ts) over a region of the same
 * size — and nothing else. No request in JavaScript
 * can beat one copy of its data, so IOPS over this rate says how much of the physical
 * limit the whole stack achieves.
 *
 * Its memory is laid out as the stack's is (page-aligned, src/memory/page-aligned.ts):
 * from ordinary arrays the same copies run about 1.2 times slower, which would make the
 * loop a lower bar than the copy limit and flatter every ratio.
 */
import { pageAlignedBytes } from '../memory/page-aligned.js';
import type { BenchPattern } from './bench-core.js';
import { BlockRandom } from './block-random.js';

/** Copies per time check: enough that reading the clock costs nothing in comparison. */
const COPIES_PER_CHECK = 256;
/**
 * Untimed copies first: a cold loop starts in the interpreter, and timing that would
 * understate the limit (by 10–20% over a second, measured) and flatter every ratio.
 */
const WARMUP_COPIES = 100_000;
const MS_PER_S = 1000;
/** Bytes written per page when touching the source so that its memory really exists. */
const PAGE_SIZE = 4096;

export interface BaselineParams {
  readonly rw: BenchPattern;
  readonly bs: number;
  /** Bytes of the region the blocks come from (the disk region the benchmark uses). */
  readonly regionBytes: number;
  readonly durationMs: number;
}

/** Copies per second of `bs`-byte blocks between a region and a block buffer. */
export function bareCopyRate(p: BaselineParams): number {
  const region = pageAlignedBytes(p.regionBytes);
  // Touch every page, as the benchmark's prefill does, so no copy meets a fresh page.
  for (let i = 0; i < region.length; i += PAGE_SIZE) region[i] = i & 0xff;
  const block = pageAlignedBytes(p.bs);
  const blocks = Math.floor(p.regionBytes / p.bs);
  const isRead = p.rw === 'randread' || p.rw === 'read';
  const isRandom = p.rw === 'randread' || p.rw === 'randwrite';
  // The request loop's generator and seed: the same blocks, at the same small cost.
  const random = new BlockRandom();
  let cursor = 0;
  const copy = (count: number): void => {
    for (let k = 0; k < count; k++) {
      let index: number;
      if (isRandom) index = random.below(blocks);
      else {
        index = cursor;
        cursor = cursor + 1 === blocks ? 0 : cursor + 1;
      }
      const at = index * p.bs;
      if (isRead) block.set(region.subarray(at, at + p.bs));
      else region.set(block, at);
    }
  };
  copy(WARMUP_COPIES);
  let copies = 0;
  const start = performance.now();
  const end = start + p.durationMs;
  let now = start;
  while (now < end) {
    copy(COPIES_PER_CHECK);
    copies += COPIES_PER_CHECK;
    now = performance.now();
  }
  return copies / ((now - start) / MS_PER_S);
}
