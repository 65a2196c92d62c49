/**
 * virtio-blk facts (VIRTIO 1.2, 5.2): feature bits, request types, status codes and the
 * layout of the config space, request header and discard/write-zeroes segments.
 */
import { hasFeature } from './virtio.js';

/** Feature bits (5.2.3), with the legacy ones (5.2.3.1) for completeness. */
export const VIRTIO_BLK_F = {
  /** Legacy: the device supports request barriers. */
  BARRIER: 0,
  /** size_max holds the largest size of any one data segment. */
  SIZE_MAX: 1,
  /** seg_max holds the most data segments in one request. */
  SEG_MAX: 2,
  /** geometry holds a cylinders/heads/sectors disk geometry. */
  GEOMETRY: 4,
  /** The disk is read-only: writes, discards and write-zeroes fail. */
  RO: 5,
  /** blk_size holds the logical block size. */
  BLK_SIZE: 6,
  /** Legacy: the device accepts SCSI packet commands (VIRTIO_BLK_T_SCSI_CMD). */
  SCSI: 7,
  /** The device takes flush requests (VIRTIO_BLK_F_WCE in legacy drivers). */
  FLUSH: 9,
  /** topology holds the physical block size and I/O size hints. */
  TOPOLOGY: 10,
  /** The driver can switch the cache between writeback and writethrough through the writeback field. */
  CONFIG_WCE: 11,
  /** num_queues holds how many request queues the device has. */
  MQ: 12,
  /** The device takes discard requests, within max_discard_sectors and max_discard_seg. */
  DISCARD: 13,
  /** The device takes write-zeroes requests, within max_write_zeroes_sectors and max_write_zeroes_seg. */
  WRITE_ZEROES: 14,
  /** The device reports its wear (VIRTIO_BLK_T_GET_LIFETIME). */
  LIFETIME: 15,
  /** The device takes secure erase requests, within max_secure_erase_sectors and max_secure_erase_seg. */
  SECURE_ERASE: 16,
  /** The device is a zoned block device, with zone requests and zone fields in its config. */
  ZONED: 17,
} as const;
/** The name of a virtio-blk feature bit, as a key of {@link VIRTIO_BLK_F}. */
export type VirtioBlkFeature = keyof typeof VIRTIO_BLK_F;

/** Spec names by bit number, for display (`vblk info`). */
export const VIRTIO_BLK_F_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(VIRTIO_BLK_F).map(([name, bit]) => [bit, `VIRTIO_BLK_F_${name}`]),
);

/** Request types (5.2.6), legacy SCSI_CMD included so the device can answer UNSUPP by name. */
export const VIRTIO_BLK_T = {
  /** Read sectors into the request's writable buffers. */
  IN: 0,
  /** Write the request's readable buffers to sectors. */
  OUT: 1,
  /** Legacy: a SCSI command passed through. */
  SCSI_CMD: 2,
  /** Make every completed write durable (VIRTIO_BLK_F_FLUSH). */
  FLUSH: 4,
  /** Read the device's ID string, at most {@link VIRTIO_BLK_ID_BYTES} bytes. */
  GET_ID: 8,
  /** Read the device's wear and lifetime estimates (VIRTIO_BLK_F_LIFETIME). */
  GET_LIFETIME: 10,
  /** Deallocate sector ranges (VIRTIO_BLK_F_DISCARD). */
  DISCARD: 11,
  /** Make sector ranges read as zeroes, maybe deallocating them (VIRTIO_BLK_F_WRITE_ZEROES). */
  WRITE_ZEROES: 13,
  /** Erase sector ranges so their data cannot be recovered (VIRTIO_BLK_F_SECURE_ERASE). */
  SECURE_ERASE: 14,
  /** Zoned: write at a zone's write pointer; the device says where the data went. */
  ZONE_APPEND: 15,
  /** Zoned: report the state of the zones from a sector on. */
  ZONE_REPORT: 16,
  /** Zoned: open a zone explicitly. */
  ZONE_OPEN: 18,
  /** Zoned: close an open zone. */
  ZONE_CLOSE: 20,
  /** Zoned: move a zone to the full state. */
  ZONE_FINISH: 22,
  /** Zoned: move a zone's write pointer back to its start, emptying it. */
  ZONE_RESET: 24,
  /** Zoned: move the write pointer of every zone back to its start at once. */
  ZONE_RESET_ALL: 26,
} as const;

/** Request status byte values (5.2.6). */
export const VIRTIO_BLK_S = {
  /** The request succeeded. */
  OK: 0,
  /** The request failed: a device or driver error. */
  IOERR: 1,
  /** The device does not support the request. */
  UNSUPP: 2,
} as const;
/** A request status byte the spec defines, one of {@link VIRTIO_BLK_S}'s values. */
export type VirtioBlkStatus = (typeof VIRTIO_BLK_S)[keyof typeof VIRTIO_BLK_S];

/** Sectors on the wire are always 512 bytes, whatever blk_size says (5.2.6). */
export const VIRTIO_BLK_SECTOR_SIZE = 512;
/** log2 of {@link VIRTIO_BLK_SECTOR_SIZE}: sectors to bytes is a shift by 9. */
export const VIRTIO_BLK_SECTOR_SHIFT = 9;
/** GET_ID answers at most 20 bytes (5.2.6: "VIRTIO_BLK_ID_BYTES"). */
export const VIRTIO_BLK_ID_BYTES = 20;

/** `struct virtio_blk_req` header: le32 type, le32 reserved, le64 sector. */
export const VIRTIO_BLK_REQ_HEADER = { size: 16, type: 0, reserved: 4, sector: 8 } as const;

/** `struct virtio_blk_discard_write_zeroes`: le64 sector, le32 num_sectors, le32 flags. */
export const VIRTIO_BLK_DWZ_SEGMENT = { size: 16, sector: 0, numSectors: 8, flags: 12 } as const;
/** Segment flag bits: only `unmap` is defined (5.2.6). */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

/**
 * `struct virtio_blk_config` field offsets and sizes (5.2.4). Offsets are fixed whatever
 * the features; a field is meaningful only when its feature is negotiated.
 */
export const VIRTIO_BLK_CONFIG = {
  capacity: { offset: 0, size: 8 },
  size_max: { offset: 8, size: 4 },
  seg_max: { offset: 12, size: 4 },
  cylinders: { offset: 16, size: 2 },
  heads: { offset: 18, size: 1 },
  sectors: { offset: 19, size: 1 },
  blk_size: { offset: 20, size: 4 },
  physical_block_exp: { offset: 24, size: 1 },
  alignment_offset: { offset: 25, size: 1 },
  min_io_size: { offset: 26, size: 2 },
  opt_io_size: { offset: 28, size: 4 },
  writeback: { offset: 32, size: 1 },
  num_queues: { offset: 34, size: 2 },
  max_discard_sectors: { offset: 36, size: 4 },
  max_discard_seg: { offset: 40, size: 4 },
  discard_sector_alignment: { offset: 44, size: 4 },
  max_write_zeroes_sectors: { offset: 48, size: 4 },
  max_write_zeroes_seg: { offset: 52, size: 4 },
  write_zeroes_may_unmap: { offset: 56, size: 1 },
  max_secure_erase_sectors: { offset: 60, size: 4 },
  max_secure_erase_seg: { offset: 64, size: 4 },
  secure_erase_sector_alignment: { offset: 68, size: 4 },
} as const;

/** Size of the config space up to and including the secure-erase fields. */
export const VIRTIO_BLK_CONFIG_SIZE = 72;
/**
 * Size of the config space before the secure-erase fields: the structure of VIRTIO 1.1,
 * through write_zeroes_may_unmap and its padding.
 */
export const VIRTIO_BLK_CONFIG_BASE_SIZE = VIRTIO_BLK_CONFIG.max_secure_erase_sectors.offset;

/**
 * Config space bytes a driver reads once `negotiated` is settled (5.2.4: each field past
 * the basic ones exists only with its feature, at a fixed offset). The VIRTIO 1.1
 * structure whatever the features — every device we know answers that much, and
 * qemu-storage-daemon 7.2 refuses any more (VHOST-USER-NOTES.md) — then the secure-erase
 * fields with VIRTIO_BLK_F_SECURE_ERASE. The zoned fields after them are not counted:
 * nothing here negotiates VIRTIO_BLK_F_ZONED.
 */
export function virtioBlkConfigSize(negotiated: bigint): number {
  return hasFeature(negotiated, VIRTIO_BLK_F.SECURE_ERASE) ? VIRTIO_BLK_CONFIG_SIZE : VIRTIO_BLK_CONFIG_BASE_SIZE;
}
