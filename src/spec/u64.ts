/**
 * u64 fields as JavaScript numbers: read as two u32 halves and refused above 2^53 - 1,
 * where a number would silently lose bits (DESIGN.md, Key contracts).
 */

/**
 * The u64 at `offset` (little-endian), or -1 when it is above Number.MAX_SAFE_INTEGER.
 * A value below 2^32 is returned as read, not through `hi * 2^32 + lo`: that sum is a
 * heap number even when it is 0 + lo, and every field it is stored in then holds a boxed
 * double that hot code loads and compares in floating point.
 */
export function getU64(view: DataView, offset: number): number {
  const lo = view.getUint32(offset, true);
  const hi = view.getUint32(offset + 4, true);
  if (hi === 0) return lo;
  return hi >= 0x20_0000 ? -1 : hi * 0x1_0000_0000 + lo;
}

/** Writes a safe non-negative integer as a little-endian u64. */
export function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, value % 0x1_0000_0000, true);
  view.setUint32(offset + 4, Math.floor(value / 0x1_0000_0000), true);
}
