/**
 * virtio-blk facts (VIRTIO 1.2, 5.2): feature bits, request types, status codes and the
 * layout of the config space, request header and discard/write-zeroes segments.
 */
import { hasFeature } from './virtio.js';

/** Feature bits (5.2.3), with the legacy ones (5.2.3.1) for completeness. */
export const VIRTIO_BLK_F = {
  BARRIER: 0,
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  SCSI: 7,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
  LIFETIME: 15,
  SECURE_ERASE: 16,
  ZONED: 17,
} as const;
export type VirtioBlkFeature = keyof typeof VIRTIO_BLK_F;

/** Spec names by bit number, for display (`vblk info`). */
export const VIRTIO_BLK_F_NAMES: Readonly<Record<number, string>> = Object.fromEntries(
  Object.entries(VIRTIO_BLK_F).map(([name, bit]) => [bit, `VIRTIO_BLK_F_${name}`]),
);

/** Request types (5.2.6), legacy SCSI_CMD included so the device can answer UNSUPP by name. */
export const VIRTIO_BLK_T = {
  IN: 0,
  OUT: 1,
  SCSI_CMD: 2,
  FLUSH: 4,
  GET_ID: 8,
  GET_LIFETIME: 10,
  DISCARD: 11,
  WRITE_ZEROES: 13,
  SECURE_ERASE: 14,
  ZONE_APPEND: 15,
  ZONE_REPORT: 16,
  ZONE_OPEN: 18,
  ZONE_CLOSE: 20,
  ZONE_FINISH: 22,
  ZONE_RESET: 24,
  ZONE_RESET_ALL: 26,
} as const;

/** Request status byte values (5.2.6). */
export const VIRTIO_BLK_S = {
  OK: 0,
  IOERR: 1,
  UNSUPP: 2,
} as const;
export type VirtioBlkStatus = (typeof VIRTIO_BLK_S)[keyof typeof VIRTIO_BLK_S];

/** Sectors on the wire are always 512 bytes, whatever blk_size says (5.2.6). */
export const VIRTIO_BLK_SECTOR_SIZE = 512;
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
