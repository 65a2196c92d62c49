/**
 * VIRTIO 1.2 facts shared by every device type: device status (section 2.1) and the
 * reserved feature bits (section 6). Feature sets are `bigint`: bit 32 (VERSION_1) and
 * above do not fit JavaScript's 32-bit bitwise operators, and negotiation is control path.
 */

/** Device status field bits (VIRTIO 1.2, 2.1). */
export const VIRTIO_CONFIG_S = {
  /** The driver has noticed the device. */
  ACKNOWLEDGE: 1,
  /** The driver knows how to drive the device. */
  DRIVER: 2,
  /** The driver is set up and the device is live. */
  DRIVER_OK: 4,
  /** The driver has acknowledged the features it understands; negotiation is over. */
  FEATURES_OK: 8,
  /** The device hit an error it cannot recover from and needs a reset. */
  NEEDS_RESET: 0x40,
  /** The driver has given up on the device. */
  FAILED: 0x80,
} as const;

/** Reserved feature bit numbers (VIRTIO 1.2, 6) that vblk knows. */
export const VIRTIO_F = {
  /** Legacy: the device notifies when a queue runs out of available buffers, even with notifications suppressed. */
  NOTIFY_ON_EMPTY: 24,
  /** Legacy: the device does not rely on how a request is split into descriptors. */
  ANY_LAYOUT: 27,
  /** Descriptors may point at a table of indirect descriptors (2.7.5.3). */
  RING_INDIRECT_DESC: 28,
  /** The used_event and avail_event fields replace the notification flags (2.7.7, 2.7.10). */
  RING_EVENT_IDX: 29,
  /** The device is a VIRTIO 1.x device, not a legacy one; vblk requires it. */
  VERSION_1: 32,
  /** The device reaches memory only through the platform's translation and access checks (an IOMMU). */
  ACCESS_PLATFORM: 33,
  /** The packed virtqueue layout (2.8) is supported. */
  RING_PACKED: 34,
  /** The device uses buffers in the order they were made available. */
  IN_ORDER: 35,
  /** Memory accesses are ordered as the platform describes (a device in hardware): the driver needs the platform's barriers, not just SMP ones. */
  ORDER_PLATFORM: 36,
  /** The device supports PCI single root I/O virtualization. */
  SR_IOV: 37,
  /** Available-buffer notifications carry the queue's next available position, not just its index. */
  NOTIFICATION_DATA: 38,
  /** The driver may reset and re-enable one queue without resetting the device. */
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
