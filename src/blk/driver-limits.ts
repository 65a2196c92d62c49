/**
 * What the driver knows of the disk once negotiated: the features, the config space as
 * last read, and the limits derived from them that every request is checked and cut by
 * (logical block, seg_max, size_max, bytes per chain, range-request limits). Validating
 * a config and deriving limits is pure: no transport, no queue.
 */
import {
  VIRTIO_BLK_DWZ_SEGMENT, VIRTIO_BLK_F, VIRTIO_BLK_SECTOR_SIZE,
} from '../spec/virtio-blk.js';
import { VIRTIO_F, hasFeature } from '../spec/virtio.js';
import { powerOfTwo } from '../memory/dma-allocator.js';
import { isAligned } from './align.js';
import type { BlkConfig } from './config.js';
import { ProbeError, RequestError } from './driver-errors.js';
import { DEFAULT_MAX_REQUEST_BYTES, DEFAULT_QUEUE_SIZE, type BlkDriverOptions } from './driver-options.js';
import { rangeLimits, type RangeLimits } from './range-split.js';
import { STRING_UNITS, stringGetSize } from './size-string.js';

/** Indirect tables longer than this are not worth their memory: 128 × 16 bytes per slot. */
export const MAX_INDIRECT_ENTRIES = 128;
/** Header and status byte of every chain, around its data descriptors. */
export const CHAIN_OVERHEAD_DESCS = 2;
/** The logical block size when VIRTIO_BLK_F_BLK_SIZE is not negotiated (the block layer's default). */
const DEFAULT_BLOCK_SIZE = VIRTIO_BLK_SECTOR_SIZE;
/** Largest logical block we accept: 64 KiB, above any real device (Linux caps at a page). */
const MAX_BLOCK_SIZE = 1 << 16;
/** Largest physical block we accept (blk_size << physical_block_exp must stay sane). */
const MAX_PHYSICAL_BLOCK_SIZE = 2 ** 31;
/** Descriptor length is a u32: without SIZE_MAX one descriptor may describe this much. */
const U32_MAX = 0xffff_ffff;
/** Range limits before the config is read: no range request gets that far. */
const NO_RANGE_LIMITS: RangeLimits = { maxSectors: 0, maxSegments: 0, granularity: 1 };

/** The disk's negotiated features, config and limits; {@link apply} and {@link planChains} fill it in. */
export class DiskLimits {
  negotiated = 0n;
  cfg!: BlkConfig;
  capacitySectors = 0;
  blockSize = DEFAULT_BLOCK_SIZE;
  sectorsPerBlock = 1;
  segMax = 1;
  sizeMax = U32_MAX;
  /** Largest data of one chain; longer requests are split into several. */
  maxChainBytes = 0;
  isWriteback = false;
  /** VIRTIO_BLK_F_RO, cached: the write path tests it per request (no BigInt there). */
  isReadOnly = false;
  discard: RangeLimits = NO_RANGE_LIMITS;
  writeZeroes: RangeLimits = NO_RANGE_LIMITS;
  secureErase: RangeLimits = NO_RANGE_LIMITS;

  constructor(
    /** The disk's name, for messages. */
    private readonly name: string,
  ) {}

  /** Whether feature `bit` was negotiated. */
  has(bit: number): boolean {
    return hasFeature(this.negotiated, bit);
  }

  /** A topology field with VIRTIO_BLK_F_TOPOLOGY, else 0. */
  topologyField(field: 'physicalBlockExp' | 'alignmentOffset' | 'minIoSize' | 'optIoSize'): number {
    return this.has(VIRTIO_BLK_F.TOPOLOGY) ? this.cfg.topology[field] : 0;
  }

  /** Validates the config read after negotiating `negotiated` and takes it; throws {@link ProbeError} `BAD_CONFIG`. */
  apply(negotiated: bigint, config: BlkConfig): void {
    const has = (bit: number): boolean => hasFeature(negotiated, bit);
    const bad = (why: string): ProbeError => new ProbeError('BAD_CONFIG', `${this.name}: ${why}`);
    let blockSize = DEFAULT_BLOCK_SIZE;
    if (has(VIRTIO_BLK_F.BLK_SIZE)) {
      blockSize = config.blkSize;
      if (!isPowerOfTwo(blockSize) || blockSize < VIRTIO_BLK_SECTOR_SIZE || blockSize > MAX_BLOCK_SIZE) {
        throw bad(`blk_size ${config.blkSize} is not a power of two from ${VIRTIO_BLK_SECTOR_SIZE} to ${MAX_BLOCK_SIZE}`);
      }
    }
    if (has(VIRTIO_BLK_F.TOPOLOGY) && blockSize * 2 ** config.topology.physicalBlockExp > MAX_PHYSICAL_BLOCK_SIZE) {
      throw bad(`physical_block_exp ${config.topology.physicalBlockExp} makes a physical block above 2^31 bytes`);
    }
    if (has(VIRTIO_BLK_F.SECURE_ERASE)) {
      // As Linux's virtblk_probe since it learnt secure erase (the seed predates it): a
      // zero secure-erase limit fails the probe ("max_secure_erase_sectors can't be 0").
      // Unlike discard's fields, 0 has no "no limit" reading here, and guessing one sends
      // the device requests it refuses.
      const fields = [
        ['max_secure_erase_sectors', config.maxSecureEraseSectors],
        ['max_secure_erase_seg', config.maxSecureEraseSeg],
        ['secure_erase_sector_alignment', config.secureEraseSectorAlignment],
      ] as const;
      for (const [name, value] of fields) if (value === 0) throw bad(`${name} is 0 with VIRTIO_BLK_F_SECURE_ERASE negotiated`);
    }
    this.negotiated = negotiated;
    this.cfg = config;
    this.blockSize = blockSize;
    this.sectorsPerBlock = blockSize / VIRTIO_BLK_SECTOR_SIZE;
    this.capacitySectors = config.capacity;
    // The seed: "We need at least one SG element, whatever they say."
    this.segMax = has(VIRTIO_BLK_F.SEG_MAX) && config.segMax > 0 ? config.segMax : 1;
    this.sizeMax = has(VIRTIO_BLK_F.SIZE_MAX) && config.sizeMax > 0 ? config.sizeMax : U32_MAX;
    this.isWriteback = has(VIRTIO_BLK_F.CONFIG_WCE) ? config.writeback !== 0 : has(VIRTIO_BLK_F.FLUSH);
    this.isReadOnly = has(VIRTIO_BLK_F.RO);
  }

  /** Takes every limit of `other` (worked out for a device before it is in use). */
  adopt(other: DiskLimits): void {
    Object.assign(this, other);
  }

  /** A config read after a change notification: capacity and cache mode follow it. */
  update(config: BlkConfig): void {
    this.cfg = config;
    this.capacitySectors = config.capacity;
    if (this.has(VIRTIO_BLK_F.CONFIG_WCE)) this.isWriteback = config.writeback !== 0;
  }

  /** The size of each queue: what the transport allows, capped by the option, as a power of two. */
  queueSize(transportMax: number, options: BlkDriverOptions): number {
    return floorPowerOfTwo(Math.min(transportMax, options.queueSize ?? DEFAULT_QUEUE_SIZE));
  }

  /**
   * Derives the bytes one chain may carry and the range limits from queues of `sizes`
   * entries; returns the entries of each indirect table (0: no indirect descriptors).
   */
  planChains(sizes: readonly number[], options: BlkDriverOptions): number {
    const isIndirect = this.has(VIRTIO_F.RING_INDIRECT_DESC);
    // Header + seg_max data + status per chain; an indirect table of that many spares the ring.
    const maxIndirect = isIndirect ? Math.min(this.segMax + CHAIN_OVERHEAD_DESCS, MAX_INDIRECT_ENTRIES) : 0;
    const smallest = Math.min(...sizes);
    // A chain longer than an indirect table goes direct, so it must fit the ring.
    const descLimit = isIndirect ? Math.max(maxIndirect, smallest) : smallest;
    const dataDescs = Math.min(this.segMax, descLimit - CHAIN_OVERHEAD_DESCS);
    if (dataDescs < 1) {
      throw new ProbeError('QUEUE_SETUP', `${this.name}: a queue of ${smallest} entries cannot hold a header, data and status`);
    }
    const byDescs = dataDescs * this.sizeMax;
    const limit = Math.min(byDescs, options.maxRequestBytes ?? DEFAULT_MAX_REQUEST_BYTES);
    this.maxChainBytes = limit - (limit % this.blockSize);
    if (this.maxChainBytes === 0) {
      throw new ProbeError('BAD_CONFIG', `${this.name}: seg_max ${this.segMax} × size_max ${this.sizeMax} cannot carry one ${this.blockSize}-byte block`);
    }
    const c = this.cfg;
    // Each kind keeps its own limits. Linux merges the discard and secure-erase ones
    // (the smaller of each) only because its block layer has one set for both.
    this.discard = this.rangeLimits(c.maxDiscardSectors, c.maxDiscardSeg, c.discardSectorAlignment);
    // Write-zeroes has no alignment field: whole logical blocks.
    this.writeZeroes = this.rangeLimits(c.maxWriteZeroesSectors, c.maxWriteZeroesSeg, 0);
    this.secureErase = this.rangeLimits(c.maxSecureEraseSectors, c.maxSecureEraseSeg, c.secureEraseSectorAlignment);
    // Every chain carries one contiguous buffer (a bounce block or a DMA buffer) cut into
    // size_max pieces, so tables need no more entries than that: usually 3. Tables sized
    // for seg_max (128 entries, 2 KiB apart) would make the few lines in use alias in the
    // CPU caches and cost half a megabyte of DMA memory per queue.
    return isIndirect ? Math.min(maxIndirect, Math.ceil(this.maxChainBytes / this.sizeMax) + CHAIN_OVERHEAD_DESCS) : 0;
  }

  /** A kind of range request's limits from its config fields (see {@link rangeLimits}). */
  private rangeLimits(maxSectors: number, maxSegments: number, alignment: number): RangeLimits {
    // A range request's segments travel as one chain's data, so the chain limit caps them too.
    const segmentsPerChain = Math.floor(this.maxChainBytes / VIRTIO_BLK_DWZ_SEGMENT.size);
    return rangeLimits({ maxSectors, maxSegments, alignment, sectorsPerBlock: this.sectorsPerBlock, segmentsPerChain });
  }

  /** Why [sector, sector + bytes) is not a valid extent of this disk, or null. */
  checkExtent(what: string, sector: number, bytes: number): RequestError | null {
    if (!Number.isSafeInteger(sector) || sector < 0 || !Number.isSafeInteger(bytes)) {
      return new RequestError('OUT_OF_RANGE', `${this.name}: ${what} at sector ${sector}: not a valid sector or length`);
    }
    if (!isAligned(sector, this.sectorsPerBlock) || !isAligned(bytes, this.blockSize)) {
      return new RequestError('MISALIGNED',
        `${this.name}: ${what} of ${bytes} bytes at sector ${sector} is not aligned to the ${this.blockSize}-byte logical block`);
    }
    if (sector + bytes / VIRTIO_BLK_SECTOR_SIZE > this.capacitySectors) {
      return new RequestError('OUT_OF_RANGE',
        `${this.name}: ${what} of ${bytes} bytes at sector ${sector} goes past the end of the disk (${this.capacitySectors} sectors)`);
    }
    return null;
  }
}

/**
 * The line the seed logs when the capacity changes: "new size: N B-byte logical blocks
 * (decimal/binary)", sizes as `string_get_size` prints them. `capacity` is in 512-byte
 * sectors. With a logical block of 512 bytes this is the seed's line exactly. For larger
 * blocks the seed printed the sector count as if it were blocks and multiplied it by the
 * block size (an 8× overstatement at 4096); we count logical blocks as later Linux does
 * (rounded up, as `virtblk_update_capacity`) so the numbers are true.
 */
export function newSizeMessage(capacity: number, logicalBlockSize: number): string {
  const sectorsPerBlock = logicalBlockSize / VIRTIO_BLK_SECTOR_SIZE;
  const blocks = Math.ceil(capacity / sectorsPerBlock);
  const bytes = BigInt(blocks) * BigInt(logicalBlockSize);
  return `new size: ${blocks} ${logicalBlockSize}-byte logical blocks ` +
    `(${stringGetSize(bytes, STRING_UNITS.STRING_UNITS_10)}/${stringGetSize(bytes, STRING_UNITS.STRING_UNITS_2)})`;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

function floorPowerOfTwo(n: number): number {
  return n >= 1 ? powerOfTwo(Math.floor(Math.log2(n)) | 0) : 0;
}
