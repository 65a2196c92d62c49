/**
 * CHS geometry for old partitioning tools (the seed's `virtblk_getgeo`): the device's own
 * when VIRTIO_BLK_F_GEOMETRY was negotiated, else "some standard values, similar to sd".
 */
import type { BlkGeometry } from './config.js';

/** The seed's fallback: `1 << 6` heads. */
export const FALLBACK_HEADS = 64;
/** The seed's fallback: `1 << 5` sectors per track. */
export const FALLBACK_SECTORS = 32;
/** Sectors per cylinder with the fallback geometry: capacity >> 11 in the seed. */
const FALLBACK_SECTORS_PER_CYLINDER = FALLBACK_HEADS * FALLBACK_SECTORS;

/**
 * The geometry to report. `capacity` is in 512-byte sectors. The fallback divides rather
 * than shifts: capacity may exceed 2^32, where JavaScript's `>>` would wrap. (HDIO_GETGEO
 * stores cylinders in 16 bits; we report the full value and leave truncation to callers.)
 */
export function diskGeometry(device: BlkGeometry | null, capacity: number): BlkGeometry {
  if (device) return { cylinders: device.cylinders, heads: device.heads, sectors: device.sectors };
  return {
    heads: FALLBACK_HEADS,
    sectors: FALLBACK_SECTORS,
    cylinders: Math.floor(capacity / FALLBACK_SECTORS_PER_CYLINDER),
  };
}
