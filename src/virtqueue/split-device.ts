/**
 * The device side of a split virtqueue (VIRTIO 1.2, 2.7): pops available descriptor
 * chains, validating each one completely before device code sees it, and returns used
 * buffers in batches with the spec's notification suppression.
 *
 * Policy for a hostile ring (STYLE.md, principle 8): any structural fault — an index out
 * of range, a loop, a bad indirect table, an address outside guest memory — makes the
 * queue broken. It stays broken (sticky), returns the error from every later `pop()`, and
 * the device reports NEEDS_RESET. Nothing here throws on guest-controlled input.
 */
import type { GuestMemory } from '../memory/guest-memory.js';
import {
  VIRTQ_DESC_F, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY, VIRTQ_DESC_SIZE, vringNeedEvent,
} from '../spec/split-ring.js';
import { ChainError, type DescriptorChain } from './chain.js';
import { InflightLog, type InflightRecovery } from './inflight.js';
import { loadIndex, publishIndex } from './ring-index.js';
import { QueueSetupError, ringViews, type RingViews, type SplitQueueConfig } from './ring-views.js';

/** u16 word offsets within the avail and used rings. */
const FLAGS = 0;
const IDX = 1;
const RING = 2;

/**
 * Upper bound on the bytes one chain may describe: the used ring reports lengths as u32,
 * and nothing a block device does needs more.
 */
export const MAX_CHAIN_BYTES = 0xffff_ffff;

export class SplitDeviceQueue {
  readonly size: number;
  readonly eventIdx: boolean;
  readonly indirect: boolean;
  private readonly v: RingViews;
  private readonly mask: number;
  /** Offset (u16 words) of used_event in the avail ring and avail_event in the used ring. */
  private readonly usedEventAt: number;
  private readonly availEventAt: number;
  private lastAvail = 0;
  /** Next used index to publish (our shadow of used.idx). */
  private usedIdx: number;
  /** used.idx as last published, for the EVENT_IDX "did we cross used_event" test. */
  private publishedUsed: number;
  private brokenBy: ChainError | null = null;
  /** Inflight log (vhost-user INFLIGHT_SHMFD), heads to resubmit, heads pushed since the last publish. */
  private inflight: InflightLog | null = null;
  private resubmit: number[] = [];
  private readonly batch: number[] = [];

  private constructor(private readonly memory: GuestMemory, config: SplitQueueConfig, views: RingViews) {
    this.size = config.size;
    this.mask = config.size - 1;
    this.eventIdx = config.eventIdx;
    this.indirect = config.indirect;
    this.v = views;
    this.usedEventAt = RING + config.size;
    this.availEventAt = RING + 4 * config.size;
    // A queue may start on rings that are already in use (vhost-user reconnect, or a
    // restart after GET_VRING_BASE): continue from the used index the driver sees.
    this.usedIdx = loadIndex(views.usedU16, IDX);
    this.publishedUsed = this.usedIdx;
  }

  /** A queue over the rings `config` describes, or why they are unusable. */
  static create(memory: GuestMemory, config: SplitQueueConfig): SplitDeviceQueue | QueueSetupError {
    const views = ringViews(memory, config);
    return views instanceof QueueSetupError ? views : new SplitDeviceQueue(memory, config, views);
  }

  /** Next available-ring index the device will process (vhost-user's "vring base"). */
  get nextAvail(): number {
    return this.lastAvail;
  }

  /** Sets where processing starts (SET_VRING_BASE); only while the queue is idle. */
  set nextAvail(index: number) {
    this.lastAvail = index & 0xffff;
  }

  /**
   * Keeps an inflight log in `bytes` from now on, first recovering what a previous
   * backend left in it: the chains it had taken but not completed come out of
   * {@link pop} again, before new ones, and `nextAvail` moves past them.
   */
  attachInflight(bytes: Uint8Array): InflightRecovery {
    const log = new InflightLog(bytes, this.size);
    const usedU32 = this.v.usedU32;
    const mask = this.mask;
    const r = log.recover(loadIndex(this.v.usedU16, IDX), (k) => usedU32[1 + 2 * (k & mask)], this.lastAvail);
    this.inflight = log;
    this.resubmit = r.resubmit;
    this.lastAvail = r.nextAvail;
    return r;
  }

  /** The fault that broke this queue, or null. */
  get broken(): ChainError | null {
    return this.brokenBy;
  }

  /** Available entries not yet popped (0 when the queue is broken). */
  pending(): number {
    if (this.brokenBy) return 0;
    const n = (loadIndex(this.v.availU16, IDX) - this.lastAvail) & 0xffff;
    return (n > this.size ? 0 : n) + this.resubmit.length;
  }

  /**
   * The next available chain, null when there is none, or the {@link ChainError} that
   * broke the queue (now or earlier).
   */
  pop(): DescriptorChain | ChainError | null {
    if (this.brokenBy) return this.brokenBy;
    if (this.resubmit.length > 0) {
      const again = this.walk(this.resubmit.shift()!);
      return again instanceof ChainError ? this.fail(again) : again;
    }
    const availIdx = loadIndex(this.v.availU16, IDX);
    const pending = (availIdx - this.lastAvail) & 0xffff;
    if (pending === 0) return null;
    if (pending > this.size) {
      return this.fail(new ChainError('AVAIL_INDEX_JUMP',
        `avail index moved from ${this.lastAvail} to ${availIdx}, more than the queue size ${this.size}`, -1));
    }
    const head = this.v.availU16[RING + (this.lastAvail & this.mask)];
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    if (head >= this.size) {
      return this.fail(new ChainError('HEAD_OUT_OF_RANGE', `chain head ${head} is not below the queue size ${this.size}`, head));
    }
    const chain = this.walk(head);
    if (chain instanceof ChainError) return this.fail(chain);
    this.inflight?.popped(head);
    return chain;
  }

  /** Walks and validates the chain at `head` (2.7.5, 2.7.5.3). */
  private walk(head: number): DescriptorChain | ChainError {
    const { descU32, descU16 } = this.v;
    const readable: Uint8Array[] = [];
    const writable: Uint8Array[] = [];
    let readableBytes = 0;
    let writableBytes = 0;
    let i = head;
    // 2.7.5.3.1: a chain is no longer than the queue size; more steps means a loop.
    for (let steps = 0; ; steps++) {
      if (steps >= this.size) {
        return new ChainError('CHAIN_LOOP', `chain at head ${head} is longer than the queue size ${this.size} (a loop)`, head);
      }
      const hi = descU32[i * 4 + 1];
      const addr = descU32[i * 4] + hi * 0x1_0000_0000;
      const len = descU32[i * 4 + 2];
      const flags = descU16[i * 8 + 6];
      const next = descU16[i * 8 + 7];
      if (flags & VIRTQ_DESC_F.INDIRECT) {
        if (!this.indirect) {
          return new ChainError('INDIRECT_NOT_NEGOTIATED', `descriptor ${i} is indirect but VIRTIO_RING_F_INDIRECT_DESC was not negotiated`, head);
        }
        // 2.7.5.3.1: "MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT".
        if (flags & VIRTQ_DESC_F.NEXT) {
          return new ChainError('INDIRECT_WITH_NEXT', `descriptor ${i} sets both INDIRECT and NEXT`, head);
        }
        const r = this.walkIndirect(head, addr, len, readable, writable, readableBytes, writableBytes);
        if (r instanceof ChainError) return r;
        return { head, readable, writable, readableBytes: r[0], writableBytes: r[1] };
      }
      const target = flags & VIRTQ_DESC_F.WRITE ? writable : readable;
      if (!(flags & VIRTQ_DESC_F.WRITE) && writableBytes > 0) {
        return new ChainError('READABLE_AFTER_WRITABLE', `descriptor ${i} is device-readable but follows a device-writable one`, head);
      }
      if (hi >= 0x20_0000 || !this.memory.gather(addr, len, target)) {
        return outOfBounds(head, i, addr, len);
      }
      if (flags & VIRTQ_DESC_F.WRITE) writableBytes += len;
      else readableBytes += len;
      if (readableBytes + writableBytes > MAX_CHAIN_BYTES) {
        return new ChainError('CHAIN_TOO_LARGE', `chain at head ${head} describes more than ${MAX_CHAIN_BYTES} bytes`, head);
      }
      if (!(flags & VIRTQ_DESC_F.NEXT)) break;
      if (next >= this.size) {
        return new ChainError('NEXT_OUT_OF_RANGE', `descriptor ${i} points to next ${next}, not below the queue size ${this.size}`, head);
      }
      i = next;
    }
    return { head, readable, writable, readableBytes, writableBytes };
  }

  /** Walks an indirect table (2.7.5.3); returns the updated [readable, writable] byte counts. */
  private walkIndirect(
    head: number, tableAddr: number, tableLen: number,
    readable: Uint8Array[], writable: Uint8Array[], readableBytes: number, writableBytes: number,
  ): [number, number] | ChainError {
    if (tableLen === 0 || tableLen % VIRTQ_DESC_SIZE !== 0) {
      return new ChainError('INDIRECT_BAD_LENGTH', `indirect table of chain ${head} is ${tableLen} bytes, not a non-zero multiple of 16`, head);
    }
    const table = this.indirectTable(tableAddr, tableLen);
    if (table === null) return outOfBounds(head, head, tableAddr, tableLen);
    const entries = tableLen / VIRTQ_DESC_SIZE;
    let i = 0;
    for (let steps = 0; ; steps++) {
      if (steps >= entries) {
        return new ChainError('CHAIN_LOOP', `indirect table of chain ${head} loops`, head);
      }
      const at = i * VIRTQ_DESC_SIZE;
      const hi = table.getUint32(at + 4, true);
      const addr = table.getUint32(at, true) + hi * 0x1_0000_0000;
      const len = table.getUint32(at + 8, true);
      const flags = table.getUint16(at + 12, true);
      const next = table.getUint16(at + 14, true);
      // 2.7.5.3.1: "MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor".
      if (flags & VIRTQ_DESC_F.INDIRECT) {
        return new ChainError('INDIRECT_NESTED', `indirect table of chain ${head} holds another indirect descriptor`, head);
      }
      const isWrite = (flags & VIRTQ_DESC_F.WRITE) !== 0;
      if (!isWrite && writableBytes > 0) {
        return new ChainError('READABLE_AFTER_WRITABLE', `indirect descriptor ${i} of chain ${head} is device-readable but follows a device-writable one`, head);
      }
      if (hi >= 0x20_0000 || !this.memory.gather(addr, len, isWrite ? writable : readable)) {
        return outOfBounds(head, i, addr, len);
      }
      if (isWrite) writableBytes += len;
      else readableBytes += len;
      if (readableBytes + writableBytes > MAX_CHAIN_BYTES) {
        return new ChainError('CHAIN_TOO_LARGE', `chain at head ${head} describes more than ${MAX_CHAIN_BYTES} bytes`, head);
      }
      if (!(flags & VIRTQ_DESC_F.NEXT)) return [readableBytes, writableBytes];
      if (next >= entries) {
        return new ChainError('NEXT_OUT_OF_RANGE', `indirect descriptor ${i} of chain ${head} points to ${next}, past the table's ${entries} entries`, head);
      }
      i = next;
    }
  }

  /** The indirect table as a DataView (copied when it spans regions), or null if outside memory. */
  private indirectTable(addr: number, len: number): DataView | null {
    const view = this.memory.view(addr, len);
    if (view) return new DataView(view.buffer, view.byteOffset, view.byteLength);
    // Check before allocating: the length is the guest's (up to 4 GiB), and an
    // allocation that large can throw, or cost gigabytes per hostile chain.
    if (!this.memory.contains(addr, len)) return null;
    const copy = new Uint8Array(len);
    return this.memory.read(addr, copy) ? new DataView(copy.buffer) : null;
  }

  private fail(e: ChainError): ChainError {
    this.brokenBy = e;
    return e;
  }

  /**
   * Puts a used element for chain `head` with `written` bytes written into its
   * device-writable buffers. Not visible to the driver until {@link publishUsed}.
   */
  pushUsed(head: number, written: number): void {
    const slot = this.usedIdx & this.mask;
    this.v.usedU32[1 + 2 * slot] = head;
    this.v.usedU32[2 + 2 * slot] = written;
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    if (this.inflight) this.batch.push(head);
  }

  /**
   * Publishes every used element pushed since the last call, then says whether the
   * driver wants a used-buffer notification for them (2.7.10).
   */
  publishUsed(): boolean {
    const old = this.publishedUsed;
    const next = this.usedIdx;
    if (old === next) return false;
    publishIndex(this.v.usedU16, IDX, next);
    this.publishedUsed = next;
    if (this.inflight) {
      // After the index store: a crash in between is recovered from the used ring.
      this.inflight.published(this.batch, next);
      this.batch.length = 0;
    }
    if (this.eventIdx) return vringNeedEvent(loadIndex(this.v.availU16, this.usedEventAt), next, old);
    return (loadIndex(this.v.availU16, FLAGS) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** Asks the driver not to notify us: we are about to drain the ring anyway. */
  disableNotifications(): void {
    if (!this.eventIdx) publishIndex(this.v.usedU16, FLAGS, VIRTQ_USED_F_NO_NOTIFY);
  }

  /**
   * Asks the driver to notify us of new buffers, then re-checks the ring: returns true
   * when buffers arrived meanwhile, so the caller must drain again instead of sleeping.
   */
  enableNotifications(): boolean {
    if (this.eventIdx) publishIndex(this.v.usedU16, this.availEventAt, this.lastAvail);
    else publishIndex(this.v.usedU16, FLAGS, 0);
    return !this.brokenBy && (this.resubmit.length > 0 || loadIndex(this.v.availU16, IDX) !== this.lastAvail);
  }
}

function outOfBounds(head: number, index: number, addr: number, len: number): ChainError {
  return new ChainError('OUT_OF_BOUNDS', `descriptor ${index} of chain ${head} (0x${addr.toString(16)}, ${len} bytes) is not in guest memory`, head);
}
