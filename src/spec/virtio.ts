/**
 * VIRTIO 1.2 facts shared by every device type: device status (section 2.1) and the
 * reserved feature bits (section 6). Feature sets are `bigint`: bit 32 (VERSION_1) and
 * above do not fit JavaScript's 32-bit bitwise operators, and negotiation is control path.
 */

/** Device status field bits (VIRTIO 1.2, 2.1). */
export const VIRTIO_CONFIG_S = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  NEEDS_RESET: 0x40,
  FAILED: 0x80,
} as const;

/** Reserved feature bit numbers (VIRTIO 1.2, 6) that vblk knows. */
export const VIRTIO_F = {
  NOTIFY_ON_EMPTY: 24,
  ANY_LAYOUT: 27,
  RING_INDIRECT_DESC: 28,
  RING_EVENT_IDX: 29,
  VERSION_1: 32,
  ACCESS_PLATFORM: 33,
  RING_PACKED: 34,
  IN_ORDER: 35,
  ORDER_PLATFORM: 36,
  SR_IOV: 37,
  NOTIFICATION_DATA: 38,
  RING_RESET: 40,
} as const;

/** Spec names of the reserved feature bits, for display. */
export const VIRTIO_F_NAMES: Readonly<Record<number, string>> = {
  24: 'VIRTIO_F_NOTIFY_ON_EMPTY',
  27: 'VIRTIO_F_ANY_LAYOUT',
  28: 'VIRTIO_RING_F_INDIRECT_DESC',
  29: 'VIRTIO_RING_F_EVENT_IDX',
  32: 'VIRTIO_F_VERSION_1',
  33: 'VIRTIO_F_ACCESS_PLATFORM',
  34: 'VIRTIO_F_RING_PACKED',
  35: 'VIRTIO_F_IN_ORDER',
  36: 'VIRTIO_F_ORDER_PLATFORM',
  37: 'VIRTIO_F_SR_IOV',
  38: 'VIRTIO_F_NOTIFICATION_DATA',
  40: 'VIRTIO_F_RING_RESET',
};

/** Virtio device IDs (VIRTIO 1.2, 5). */
export const VIRTIO_ID = { BLOCK: 2 } as const;

/** The feature set with exactly the given bits. */
export function features(...bits: number[]): bigint {
  let f = 0n;
  for (const b of bits) f |= 1n << BigInt(b);
  return f;
}

/** Whether `set` contains feature `bit`. */
export function hasFeature(set: bigint, bit: number): boolean {
  return ((set >> BigInt(bit)) & 1n) === 1n;
}

/** The bit numbers in a feature set, ascending. */
export function featureBits(set: bigint): number[] {
  const bits: number[] = [];
  for (let b = 0; set >> BigInt(b) !== 0n; b++) if (hasFeature(set, b)) bits.push(b);
  return bits;
}
