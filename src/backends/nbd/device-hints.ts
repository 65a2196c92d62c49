/**
 * What an NBD export's size constraints mean for the virtio-blk device in front of it:
 * the logical block size (a server's minimum block bigger than 512 bytes becomes the
 * device's block, so no request the guest sends can break it) and the topology hints
 * (the preferred block is the physical block and the minimum I/O size, as Linux reads
 * them: requests of that size, aligned, avoid read-modify-write on the server).
 *
 * Not expressible in virtio-blk: `NBD_FLAG_ROTATIONAL` (VIRTIO 1.2 has no such field;
 * Linux's virtio_blk leaves its disks rotational); and the maximum payload, which the
 * backend honours by splitting requests instead.
 */
import { UsageError } from '../../errors.js';
import type { NbdBlockSizes } from './handshake.js';

/** Device settings derived from an export (see {@link nbdDeviceHints}). */
export interface NbdDeviceHints {
  readonly blockSize: 512 | 4096;
  /** BlkDevice's topology: in logical blocks, as VIRTIO_BLK_F_TOPOLOGY counts them. */
  readonly topology: { readonly physicalBlockExp: number; readonly minIoSize: number };
}

/** The largest physical block advertised: a hint beyond it (a 32 MiB "preferred" block) helps no guest. */
const MAX_PHYSICAL_BLOCK = 64 * 1024;
const U16_MAX = 0xffff;

/**
 * The device's block size and topology for an export with `sizes`. `requested` is a
 * block size the user asked for; throws {@link UsageError} when it, or any block size
 * the device offers, is below the export's minimum block.
 */
export function nbdDeviceHints(sizes: NbdBlockSizes, requested?: 512 | 4096): NbdDeviceHints {
  if (sizes.minimum > 4096) {
    throw new UsageError('BAD_OPTION', `the export's minimum block size is ${sizes.minimum} bytes; virtio-blk logical blocks here are at most 4096`);
  }
  const fitting: 512 | 4096 = sizes.minimum <= 512 ? 512 : 4096;
  if (requested !== undefined && requested < sizes.minimum) {
    throw new UsageError('BAD_OPTION', `a ${requested}-byte block is below the export's ${sizes.minimum}-byte minimum block`);
  }
  const blockSize = requested ?? fitting;
  const physical = Math.min(MAX_PHYSICAL_BLOCK, Math.max(sizes.preferred, blockSize));
  return {
    blockSize,
    topology: {
      physicalBlockExp: Math.log2(physical / blockSize),
      minIoSize: Math.min(U16_MAX, Math.max(1, sizes.preferred / blockSize)),
    },
  };
}
