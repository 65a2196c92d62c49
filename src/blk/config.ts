/**
 * Codec for `struct virtio_blk_config` (VIRTIO 1.2, 5.2.4): every field at the spec's
 * offset. Decoding is of device-supplied bytes and so never throws: a short config reads
 * as zeroes past its end (devices expose fewer bytes than the struct — qemu-storage-daemon
 * answers 60), and a capacity that does not fit a safe integer is an error.
 */
import { VblkError } from '../errors.js';
import { VIRTIO_BLK_CONFIG as F, VIRTIO_BLK_CONFIG_SIZE } from '../spec/virtio-blk.js';
import { getU64, setU64 } from '../spec/u64.js';

/** A cylinders/heads/sectors disk geometry (the config's `geometry`, VIRTIO_BLK_F_GEOMETRY). */
export interface BlkGeometry {
  /** Cylinders, 0 … 65535. */
  readonly cylinders: number;
  /** Heads per cylinder, 0 … 255. */
  readonly heads: number;
  /** Sectors per track, 0 … 255. */
  readonly sectors: number;
}

/** I/O alignment hints (the config's `topology`, VIRTIO_BLK_F_TOPOLOGY); 0 is no hint. */
export interface BlkTopology {
  /** log2 of physical blocks per logical block. */
  readonly physicalBlockExp: number;
  /** Offset of the first aligned logical block, in logical blocks. */
  readonly alignmentOffset: number;
  /** Suggested minimum I/O size, in logical blocks. */
  readonly minIoSize: number;
  /** Optimal (suggested maximum) I/O size, in logical blocks. */
  readonly optIoSize: number;
}

/**
 * The decoded config space. Numbers are as on the wire (sectors are 512 bytes). Every
 * field is decoded, but one past the basic ones means something only when its feature
 * was negotiated (5.2.4).
 */
export interface BlkConfig {
  /** Disk size in 512-byte sectors. */
  readonly capacity: number;
  /** Largest data segment in bytes (VIRTIO_BLK_F_SIZE_MAX). */
  readonly sizeMax: number;
  /** Most data segments in one request (VIRTIO_BLK_F_SEG_MAX). */
  readonly segMax: number;
  /** Disk geometry (VIRTIO_BLK_F_GEOMETRY). */
  readonly geometry: BlkGeometry;
  /** Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE). */
  readonly blkSize: number;
  /** Alignment hints (VIRTIO_BLK_F_TOPOLOGY). */
  readonly topology: BlkTopology;
  /** Cache mode, 1 writeback or 0 writethrough (VIRTIO_BLK_F_CONFIG_WCE). */
  readonly writeback: number;
  /** Request queues the device has (VIRTIO_BLK_F_MQ). */
  readonly numQueues: number;
  /** Most sectors in one discard segment (VIRTIO_BLK_F_DISCARD). */
  readonly maxDiscardSectors: number;
  /** Most segments in one discard request. */
  readonly maxDiscardSeg: number;
  /** Discard segments should start and end on multiples of this many sectors. */
  readonly discardSectorAlignment: number;
  /** Most sectors in one write-zeroes segment (VIRTIO_BLK_F_WRITE_ZEROES). */
  readonly maxWriteZeroesSectors: number;
  /** Most segments in one write-zeroes request. */
  readonly maxWriteZeroesSeg: number;
  /** 1 when a write-zeroes with the unmap flag may deallocate the range. */
  readonly writeZeroesMayUnmap: number;
  /** Most sectors in one secure erase segment (VIRTIO_BLK_F_SECURE_ERASE). */
  readonly maxSecureEraseSectors: number;
  /** Most segments in one secure erase request. */
  readonly maxSecureEraseSeg: number;
  /** Secure erase segments should start and end on multiples of this many sectors. */
  readonly secureEraseSectorAlignment: number;
}

export class BlkConfigError extends VblkError {
  constructor(message: string) {
    super('BAD_CONFIG', message);
  }
}

/** The config space as bytes (VIRTIO_BLK_CONFIG_SIZE long). */
export function encodeBlkConfig(c: BlkConfig): Uint8Array {
  const bytes = new Uint8Array(VIRTIO_BLK_CONFIG_SIZE);
  const v = new DataView(bytes.buffer);
  setU64(v, F.capacity.offset, c.capacity);
  v.setUint32(F.size_max.offset, c.sizeMax, true);
  v.setUint32(F.seg_max.offset, c.segMax, true);
  v.setUint16(F.cylinders.offset, c.geometry.cylinders, true);
  v.setUint8(F.heads.offset, c.geometry.heads);
  v.setUint8(F.sectors.offset, c.geometry.sectors);
  v.setUint32(F.blk_size.offset, c.blkSize, true);
  v.setUint8(F.physical_block_exp.offset, c.topology.physicalBlockExp);
  v.setUint8(F.alignment_offset.offset, c.topology.alignmentOffset);
  v.setUint16(F.min_io_size.offset, c.topology.minIoSize, true);
  v.setUint32(F.opt_io_size.offset, c.topology.optIoSize, true);
  v.setUint8(F.writeback.offset, c.writeback);
  v.setUint16(F.num_queues.offset, c.numQueues, true);
  v.setUint32(F.max_discard_sectors.offset, c.maxDiscardSectors, true);
  v.setUint32(F.max_discard_seg.offset, c.maxDiscardSeg, true);
  v.setUint32(F.discard_sector_alignment.offset, c.discardSectorAlignment, true);
  v.setUint32(F.max_write_zeroes_sectors.offset, c.maxWriteZeroesSectors, true);
  v.setUint32(F.max_write_zeroes_seg.offset, c.maxWriteZeroesSeg, true);
  v.setUint8(F.write_zeroes_may_unmap.offset, c.writeZeroesMayUnmap);
  v.setUint32(F.max_secure_erase_sectors.offset, c.maxSecureEraseSectors, true);
  v.setUint32(F.max_secure_erase_seg.offset, c.maxSecureEraseSeg, true);
  v.setUint32(F.secure_erase_sector_alignment.offset, c.secureEraseSectorAlignment, true);
  return bytes;
}

/** Decodes config bytes from a device; fields past the end of `bytes` read as 0. */
export function decodeBlkConfig(bytes: Uint8Array): BlkConfig | BlkConfigError {
  const full = new Uint8Array(VIRTIO_BLK_CONFIG_SIZE);
  full.set(bytes.subarray(0, VIRTIO_BLK_CONFIG_SIZE));
  const v = new DataView(full.buffer);
  const capacity = getU64(v, F.capacity.offset);
  if (capacity < 0) return new BlkConfigError('device capacity does not fit in 2^53 sectors');
  return {
    capacity,
    sizeMax: v.getUint32(F.size_max.offset, true),
    segMax: v.getUint32(F.seg_max.offset, true),
    geometry: {
      cylinders: v.getUint16(F.cylinders.offset, true),
      heads: v.getUint8(F.heads.offset),
      sectors: v.getUint8(F.sectors.offset),
    },
    blkSize: v.getUint32(F.blk_size.offset, true),
    topology: {
      physicalBlockExp: v.getUint8(F.physical_block_exp.offset),
      alignmentOffset: v.getUint8(F.alignment_offset.offset),
      minIoSize: v.getUint16(F.min_io_size.offset, true),
      optIoSize: v.getUint32(F.opt_io_size.offset, true),
    },
    writeback: v.getUint8(F.writeback.offset),
    numQueues: v.getUint16(F.num_queues.offset, true),
    maxDiscardSectors: v.getUint32(F.max_discard_sectors.offset, true),
    maxDiscardSeg: v.getUint32(F.max_discard_seg.offset, true),
    discardSectorAlignment: v.getUint32(F.discard_sector_alignment.offset, true),
    maxWriteZeroesSectors: v.getUint32(F.max_write_zeroes_sectors.offset, true),
    maxWriteZeroesSeg: v.getUint32(F.max_write_zeroes_seg.offset, true),
    writeZeroesMayUnmap: v.getUint8(F.write_zeroes_may_unmap.offset),
    maxSecureEraseSectors: v.getUint32(F.max_secure_erase_sectors.offset, true),
    maxSecureEraseSeg: v.getUint32(F.max_secure_erase_seg.offset, true),
    secureEraseSectorAlignment: v.getUint32(F.secure_erase_sector_alignment.offset, true),
  };
}
