/**
 * Typed-array views over the three parts of a split ring, taken once when a queue is set
 * up: the hot path then indexes aligned typed arrays, never a DataView or a translation.
 */
import { VblkError } from '../errors.js';
import type { DirtyLog } from '../memory/dirty-log.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import {
  VIRTQ_AVAIL_ALIGN, VIRTQ_DESC_ALIGN, VIRTQ_USED_ALIGN, availRingSize, descTableSize, isValidQueueSize, usedRingSize,
} from '../spec/split-ring.js';

/** Where a split queue lives in guest memory and what it was negotiated with. */
export interface SplitQueueConfig {
  /** Queue size: a power of two, 1 … 32768. */
  readonly size: number;
  /** Guest addresses of the descriptor table, available ring and used ring. */
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  /** VIRTIO_RING_F_EVENT_IDX negotiated. */
  readonly eventIdx: boolean;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated. */
  readonly indirect: boolean;
  /** Live migration: where the queue marks every write it makes into guest memory. Absent: no marking. */
  readonly dirtyLog?: QueueDirtyLog | null;
}

/** A queue's part in the migration dirty log (vhost-user.rst, "Migration"). */
export interface QueueDirtyLog {
  readonly log: DirtyLog;
  /**
   * Guest-physical address at which used-ring writes are logged: SET_VRING_ADDR's
   * `log_guest_addr` (which need not be where the used ring is mapped for us).
   */
  readonly usedAt: number;
}

export type QueueSetupErrorCode = 'BAD_QUEUE_SIZE' | 'RING_OUT_OF_BOUNDS' | 'RING_MISALIGNED';

/** A queue that cannot be set up as configured (bad size, ring outside memory, misaligned). */
export class QueueSetupError extends VblkError {
  declare readonly code: QueueSetupErrorCode;
  constructor(code: QueueSetupErrorCode, message: string) {
    super(code, message);
  }
}

export interface RingViews {
  readonly descU32: Uint32Array;
  readonly descU16: Uint16Array;
  readonly availU16: Uint16Array;
  readonly usedU16: Uint16Array;
  readonly usedU32: Uint32Array;
  /** Whether ring indices need atomic accesses: false for exclusive memory (ring-index.ts). */
  readonly ordered: boolean;
}

/** Views over the rings, or why they cannot be had. Never throws on guest-supplied addresses. */
export function ringViews(memory: GuestMemory, c: SplitQueueConfig): RingViews | QueueSetupError {
  if (!isValidQueueSize(c.size)) {
    return new QueueSetupError('BAD_QUEUE_SIZE', `queue size ${c.size} is not a power of two from 1 to 32768`);
  }
  const desc = part(memory, 'descriptor table', c.desc, descTableSize(c.size), VIRTQ_DESC_ALIGN);
  if (desc instanceof QueueSetupError) return desc;
  // The avail ring is read as u16 words; its length (6 + 2n) is even.
  const avail = part(memory, 'available ring', c.avail, availRingSize(c.size), VIRTQ_AVAIL_ALIGN);
  if (avail instanceof QueueSetupError) return avail;
  // The used ring is 6 + 8n bytes; the u32 view covers the 4 + 8n bytes up to avail_event.
  const used = part(memory, 'used ring', c.used, usedRingSize(c.size), VIRTQ_USED_ALIGN);
  if (used instanceof QueueSetupError) return used;
  return {
    descU32: new Uint32Array(desc.buffer, desc.byteOffset, desc.length / 4),
    descU16: new Uint16Array(desc.buffer, desc.byteOffset, desc.length / 2),
    availU16: new Uint16Array(avail.buffer, avail.byteOffset, avail.length / 2),
    usedU16: new Uint16Array(used.buffer, used.byteOffset, used.length / 2),
    usedU32: new Uint32Array(used.buffer, used.byteOffset, (used.length - 2) / 4),
    ordered: !memory.exclusive,
  };
}

function part(memory: GuestMemory, what: string, addr: number, length: number, align: number): Uint8Array | QueueSetupError {
  const view = memory.view(addr, length);
  if (view === null) {
    return new QueueSetupError('RING_OUT_OF_BOUNDS', `${what} at 0x${addr.toString(16)} (${length} bytes) is not inside one memory region`);
  }
  if (addr % align !== 0) {
    return new QueueSetupError('RING_MISALIGNED', `${what} at 0x${addr.toString(16)} is not ${align}-byte aligned`);
  }
  // Typed arrays need their own alignment in host memory too; it differs from the guest
  // address's only when a region was mapped at a misaligned offset.
  const hostAlign = Math.min(align, 4);
  if (view.byteOffset % hostAlign !== 0) {
    return new QueueSetupError('RING_MISALIGNED', `${what} at 0x${addr.toString(16)} is not ${hostAlign}-byte aligned in host memory`);
  }
  return view;
}
