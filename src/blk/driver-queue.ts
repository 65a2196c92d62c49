/**
 * A virtqueue as the driver uses it: its ring (through the transport's binding), one
 * {@link Slot} per entry with the chain's header and status byte in DMA memory, and the
 * software FIFO of requests waiting for room. Data and its setup only; the engine moves
 * requests through it.
 */
import { VIRTIO_BLK_REQ_HEADER } from '../spec/virtio-blk.js';
import type { DriverQueueBinding, DriverTransport } from '../virtqueue/device.js';
import type { SplitDriverQueue } from '../virtqueue/split-driver.js';
import type { DmaBlock } from './driver-dma.js';
import { ProbeError, type QueueBrokenError } from './driver-errors.js';
import type { Req } from './driver-request.js';

/** Per slot in the header area: 16-byte header, then the status byte, padded. */
const SLOT_STRIDE = 32;
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

  /**
   * Sets up queue `index` of `size` entries at the transport, with its header area in DMA
   * memory. Used-buffer notifications go to {@link reap}, which the engine sets.
   */
  static async create(disk: string, t: DriverTransport, index: number, size: number, indirectEntries: number): Promise<QueueState> {
    const bytes = size * SLOT_STRIDE;
    const headerArea = t.dma.alloc(bytes);
    const area = headerArea < 0 ? null : t.memory.view(headerArea, bytes);
    // Headers are written as u32 words (no byte copy per request): the area must be word aligned in host memory.
    if (area === null || area.byteOffset % Uint32Array.BYTES_PER_ELEMENT !== 0) {
      if (headerArea >= 0) t.dma.release(headerArea);
      throw new ProbeError('QUEUE_SETUP', `${disk}: no word-aligned DMA memory for the request headers of queue ${index}`);
    }
    const holder: { state: QueueState | null } = { state: null };
    let binding: DriverQueueBinding<Slot>;
    try {
      binding = await t.setupQueue<Slot>(index, size, indirectEntries, () => holder.state?.reap());
    } catch (e) {
      t.dma.release(headerArea);
      throw new ProbeError('QUEUE_SETUP', `${disk}: setting up queue ${index} failed: ${(e as Error).message}`, { cause: e });
    }
    const slots: Slot[] = [];
    for (let i = 0; i < size; i++) slots.push(new Slot(i, headerArea + i * SLOT_STRIDE));
    holder.state = new QueueState(index, binding, slots, headerArea,
      new Uint32Array(area.buffer, area.byteOffset, bytes / Uint32Array.BYTES_PER_ELEMENT), area);
    return holder.state;
  }

  get queue(): SplitDriverQueue<Slot> {
    return this.binding.queue;
  }
}
