/**
 * A backend's block size hints ({@link BlockSizeHints}, bytes) as virtio-blk topology
 * (VIRTIO 1.2, 5.2.4: `physical_block_exp`, `min_io_size`, `opt_io_size`, the last two
 * in logical blocks). The mapping:
 *
 * - `minimum` is the backend's physical block: `physical_block_exp` is log2(minimum /
 *   logical block) when it is larger than the logical block, else 0. Linux makes the
 *   disk's physical block size `blk_size << physical_block_exp`, so filesystems align to
 *   it and never make the backend read-modify-write.
 * - `preferred` is `min_io_size`, "suggested minimum I/O size" (Linux's io_min):
 *   preferred / logical block, 0 (no hint) when smaller than a block, at most 2^15 (the
 *   largest power of two of the u16 field).
 * - `maximum` is `opt_io_size`, "optimal (suggested maximum) I/O size" (Linux's io_opt):
 *   maximum / logical block, rounded down; no hint for {@link NO_MAXIMUM_BLOCK_SIZE}.
 *   Linux sizes its readahead on io_opt (twice it), so an unlimited backend gives none
 *   rather than a huge one.
 *
 * The device options' own topology, field by field, takes precedence.
 */
import { NO_MAXIMUM_BLOCK_SIZE, type BlockSizeHints } from '../backends/backend.js';
import { UsageError } from '../errors.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../spec/virtio-blk.js';
import type { BlkTopology } from './config.js';

/** nbdkit's bounds on the hints, which this interface takes over. */
const MAX_MINIMUM = 64 * 1024;
const MAX_PREFERRED = 32 * 1024 * 1024;
/** The largest power of two that fits `min_io_size` (a u16). */
const MAX_MIN_IO_BLOCKS = 2 ** 15;

/** The topology fields the hints set (alignment offset is not one of them). */
export type HintedTopology = Pick<BlkTopology, 'physicalBlockExp' | 'minIoSize' | 'optIoSize'>;

/**
 * The topology `hints` ask for on a disk of `logicalBlockSize`-byte blocks (512 or 4096).
 * Throws {@link UsageError} `BAD_BLOCK_SIZE_HINTS` for hints outside their bounds (see
 * {@link BlockSizeHints}): a backend's declaration is checked like an option.
 */
export function topologyFromHints(hints: BlockSizeHints, logicalBlockSize: number): HintedTopology {
  const { minimum, preferred, maximum } = hints;
  if (!isPowerOfTwo(minimum) || minimum > MAX_MINIMUM) {
    bad(`minimum ${minimum} is not a power of two from 1 to ${MAX_MINIMUM}`);
  }
  const leastPreferred = Math.max(VIRTIO_BLK_SECTOR_SIZE, minimum);
  if (!isPowerOfTwo(preferred) || preferred < leastPreferred || preferred > MAX_PREFERRED) {
    bad(`preferred ${preferred} is not a power of two from ${leastPreferred} to ${MAX_PREFERRED}`);
  }
  const unlimited = maximum >= NO_MAXIMUM_BLOCK_SIZE;
  if (!Number.isSafeInteger(maximum) || maximum < preferred || (!unlimited && maximum % minimum !== 0)) {
    bad(`maximum ${maximum} is not a multiple of minimum ${minimum} of at least preferred ${preferred}`);
  }
  return {
    physicalBlockExp: minimum > logicalBlockSize ? Math.log2(minimum / logicalBlockSize) : 0,
    minIoSize: Math.min(MAX_MIN_IO_BLOCKS, Math.floor(preferred / logicalBlockSize)),
    // Below 2^32 / logicalBlockSize blocks, so io_opt in bytes fits Linux's u32.
    optIoSize: unlimited ? 0 : Math.floor(maximum / logicalBlockSize),
  };
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function bad(why: string): never {
  throw new UsageError('BAD_BLOCK_SIZE_HINTS', `the backend's block size hints are invalid: ${why}`);
}
