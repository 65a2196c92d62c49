/**
 * The benchmarks' random block numbers: xorshift32 (Marsaglia, "Xorshift RNGs", 2003), a
 * generator as cheap as the ones fio picks blocks with. The bare copy loop
 * (bench-baseline.ts) and the request loop (bench-core.ts) both use it with the same
 * seed, so the yardstick and the benchmark visit the same blocks at the same small cost
 * per block, and their ratio compares the stack with the copy alone. About 2 ns a block
 * against Math.random's 7 (`Math.floor(Math.random() * n)`, measured in a loop of
 * nothing else); next to a 4 KiB copy out of a 64 MiB region (about 400 ns here) either
 * is small: Math.random was under 1% of the bare loop's profile.
 *
 * For choosing blocks only: the sequence is predictable, and a seed repeats it run after
 * run (as fio's `randrepeat` does).
 */
import { UsageError } from '../errors.js';

/** The seed when none is given: any non-zero u32 will do (0 is xorshift's fixed point). */
export const DEFAULT_BLOCK_SEED = 0x9e37_79b9;
const U32_MAX = 0xffff_ffff;
const TWO_POW_MINUS_32 = 2 ** -32;

export class BlockRandom {
  /** The generator's 32 bits, kept as an int32 (a small integer to V8, never boxed). */
  private state: number;

  /** Throws {@link UsageError} `BAD_OPTION` unless `seed` is an integer from 1 to 2^32 - 1. */
  constructor(seed: number = DEFAULT_BLOCK_SEED) {
    if (!Number.isInteger(seed) || seed < 1 || seed > U32_MAX) {
      throw new UsageError('BAD_OPTION', `block random seed ${seed} is not an integer from 1 to ${U32_MAX}`);
    }
    this.state = seed | 0;
  }

  /**
   * The next block number in [0, blocks), for `blocks` from 1 to 2^32. Over the
   * generator's period (2^32 - 1 steps) every block comes up.
   */
  below(blocks: number): number {
    let x = this.state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.state = x;
    // floor(u · blocks / 2^32) for the u32 u: the high part of the product, no division.
    // It stays below `blocks` however the product rounds: u · blocks ≤ blocks · 2^32 -
    // blocks, and rounding adds at most blocks · 2^-21.
    return Math.floor((x >>> 0) * blocks * TWO_POW_MINUS_32);
  }
}
