/**
 * A virtqueue as the driver uses it: its ring (through the transport's binding), one
 * {@link Slot} per entry with the chain's header and status byte in DMA memory, and the
 * software FIFO of requests waiting for room. Data only; the engine moves requests
 * through it.
 */
import { VIRTIO_BLK_REQ_HEADER } from '../spec/virtio-blk.js';
import type { DriverQueueBinding } from '../virtqueue/device.js';
import type { SplitDriverQueue } from '../virtqueue/split-driver.js';
import type { DmaBlock } from './driver-dma.js';
import type { QueueBrokenError } from './driver-errors.js';
import type { Req } from './driver-request.js';

/** Per slot in the header area: 16-byte header, then the status byte, padded. */
export const SLOT_STRIDE = 32;
const STATUS_OFFSET = VIRTIO_BLK_REQ_HEADER.size;

/**
 * One chain's resources: its header and status byte in the queue's header area, and a
 * bounce block kept across requests.
 */
export class Slot {
  chunk: Req | null = null;
  /** The bounce block in use, or kept from an earlier request for reuse. */
  bounce: DmaBlock | null = null;
  /** The header's first u32 word in {@link QueueState.headerWords}. */
  readonly headerWord: number;
  /** The status byte's index in {@link QueueState.headerBytes}. */
  readonly statusAt: number;
  readonly statusAddr: number;
  constructor(
    index: number,
    /** Guest address of the request header. */
    readonly headerAddr: number,
  ) {
    this.headerWord = (index * SLOT_STRIDE) / Uint32Array.BYTES_PER_ELEMENT;
    this.statusAt = index * SLOT_STRIDE + STATUS_OFFSET;
    this.statusAddr = headerAddr + STATUS_OFFSET;
  }
}

/** A virtqueue as the driver uses it, and the requests waiting for room on it. */
export class QueueState {
  readonly freeSlots: Slot[] = [];
  pendingHead: Req | null = null;
  pendingTail: Req | null = null;
  pendingCount = 0;
  kickScheduled = false;
  broken: QueueBrokenError | null = null;
  /** False once torn down: late notifications and kicks are ignored. */
  isLive = true;
  /** The used-buffer notification handler and the batched kick, bound once (no per-request closures). */
  reap: () => void = () => {};
  kick: () => void = () => {};
  /** While notifications are delayed: a reap in case the device leaves the rest unfinished. */
  lateReap: ReturnType<typeof setTimeout> | null = null;
  constructor(
    readonly index: number,
    readonly binding: DriverQueueBinding<Slot>,
    readonly slots: Slot[],
    readonly headerArea: number,
    /**
     * The header area as u32 words (headers are written as words: no byte copy per
     * request) and as bytes (status). One view each for all slots: a request touches
     * no view object of its own.
     */
    readonly headerWords: Uint32Array,
    readonly headerBytes: Uint8Array,
  ) {
    for (let i = slots.length - 1; i >= 0; i--) this.freeSlots.push(slots[i]);
  }

  get queue(): SplitDriverQueue<Slot> {
    return this.binding.queue;
  }
}
