/**
 * Split virtqueue layout (VIRTIO 1.2, 2.7). Offsets and sizes in bytes; every field is
 * little-endian.
 *
 *   descriptor table: size × { u64 addr; u32 len; u16 flags; u16 next }   align 16
 *   available ring:   u16 flags; u16 idx; u16 ring[size]; u16 used_event   align 2
 *   used ring:        u16 flags; u16 idx; { u32 id; u32 len }[size]; u16 avail_event  align 4
 */

export const VIRTQ_DESC_F = {
  /** This descriptor continues via the `next` field. */
  NEXT: 1,
  /** Device-writable (otherwise device-readable). */
  WRITE: 2,
  /** The buffer holds a table of descriptors (2.7.5.3). */
  INDIRECT: 4,
} as const;

/** avail.flags: the driver asks for no used-buffer notifications (without EVENT_IDX). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** used.flags: the device asks for no available-buffer notifications (without EVENT_IDX). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

export const VIRTQ_DESC_SIZE = 16;
export const VIRTQ_DESC_ALIGN = 16;
export const VIRTQ_AVAIL_ALIGN = 2;
export const VIRTQ_USED_ALIGN = 4;
export const VIRTQ_USED_ELEM_SIZE = 8;
/** Largest queue size of a split virtqueue (2.7: "Queue Size ... maximum 32768"). */
export const VIRTQ_MAX_SIZE = 32768;

/** Descriptor field offsets within one 16-byte descriptor. */
export const VIRTQ_DESC_OFFSET = { addr: 0, len: 8, flags: 12, next: 14 } as const;
/** Field offsets in the available ring. `ring` entries are u16. */
export const VIRTQ_AVAIL_OFFSET = { flags: 0, idx: 2, ring: 4 } as const;
/** Field offsets in the used ring. `ring` entries are {u32 id, u32 len}. */
export const VIRTQ_USED_OFFSET = { flags: 0, idx: 2, ring: 4 } as const;

export function descTableSize(queueSize: number): number {
  return VIRTQ_DESC_SIZE * queueSize;
}

/** Available ring size including `used_event` (present whatever the features). */
export function availRingSize(queueSize: number): number {
  return 6 + 2 * queueSize;
}

/** Used ring size including `avail_event`. */
export function usedRingSize(queueSize: number): number {
  return 6 + VIRTQ_USED_ELEM_SIZE * queueSize;
}

/** Offset of `used_event` in the available ring. */
export function usedEventOffset(queueSize: number): number {
  return 4 + 2 * queueSize;
}

/** Offset of `avail_event` in the used ring. */
export function availEventOffset(queueSize: number): number {
  return 4 + VIRTQ_USED_ELEM_SIZE * queueSize;
}

/** A valid split queue size: a power of two from 1 to 32768 (2.7). */
export function isValidQueueSize(n: number): boolean {
  return Number.isInteger(n) && n >= 1 && n <= VIRTQ_MAX_SIZE && (n & (n - 1)) === 0;
}

/**
 * Offsets of the three parts when a driver places them in one contiguous area, each at
 * its required alignment (VIRTIO 1.x; legacy's 4096-byte used alignment is not needed).
 */
export function contiguousRingLayout(queueSize: number): { desc: number; avail: number; used: number; total: number } {
  const desc = 0;
  const avail = desc + descTableSize(queueSize);
  const used = alignUp(avail + availRingSize(queueSize), VIRTQ_USED_ALIGN);
  return { desc, avail, used, total: used + usedRingSize(queueSize) };
}

export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/**
 * `vring_need_event` (2.7.7.2, 2.7.10.2): with EVENT_IDX, whether moving an index from
 * `old` to `next` crossed `event`, i.e. the other side asked to be notified. All u16
 * arithmetic, so it stays right across wrap-around.
 */
export function vringNeedEvent(event: number, next: number, old: number): boolean {
  return ((next - event - 1) & 0xffff) < ((next - old) & 0xffff);
}
