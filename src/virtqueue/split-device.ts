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
import { ChainError, type DescriptorChain, type ReusableChain } from './chain.js';
import { InflightLog, type InflightRecovery } from './inflight.js';
import { loadIndex, publishIndex } from './ring-index.js';
import type { DirtyLog } from '../memory/dirty-log.js';
import { QueueSetupError, ringViews, type QueueDirtyLog, type RingViews, type SplitQueueConfig } from './ring-views.js';

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
  /** Ring indices need atomic accesses (ring-index.ts). */
  private readonly ordered: boolean;
  private readonly mask: number;
  /** Offset (u16 words) of used_event in the avail ring and avail_event in the used ring. */
  private readonly usedEventAt: number;
  private readonly availEventAt: number;
  private lastAvail = 0;
  /**
   * avail.idx as last loaded: while lastAvail is behind it, the entries in between are
   * known published and the next pop need not load the index again.
   */
  private availSeen = 0;
  /** Next used index to publish (our shadow of used.idx). */
  private usedIdx: number;
  /** used.idx as last published, for the EVENT_IDX "did we cross used_event" test. */
  private publishedUsed: number;
  private brokenBy: ChainError | null = null;
  /** Inflight log (vhost-user INFLIGHT_SHMFD), heads to resubmit, heads pushed since the last publish. */
  private inflight: InflightLog | null = null;
  private resubmit: number[] = [];
  private readonly batch: number[] = [];
  /**
   * Per descriptor index, the range it described last and the one view that range gave
   * (address -1: none yet, or it gave no single view). Drivers post the same buffers in
   * the same descriptors again and again (a request slot's header and status, a lane's
   * data buffer), and a compare here is cheaper than the memory's view cache, whose
   * slots are spread over 96 KiB that the data copies keep evicting (measured: CPU per
   * request −6% with a null backend). A range that differs in any way is looked up and
   * checked afresh, so a guest changing descriptors only misses.
   */
  /** Per descriptor index i: the address at 2i, the length at 2i + 1 (one line holds both). */
  private readonly seenRange: Float64Array;
  private readonly seenView: (Uint8Array | null)[];
  /**
   * Migration (vhost-user's dirty log): where every write into guest memory is marked,
   * after it is made and before the used index that exposes it is published; null while
   * not migrating, and then the hot path pays one compare per pop, push and publish.
   */
  readonly dirtyLog: QueueDirtyLog | null;
  private readonly dirty: DirtyLog | null;
  /** With a log, per head: the (guest address, length) pairs its chain lets the device write. */
  private readonly writes: number[][];

  private constructor(private readonly memory: GuestMemory, config: SplitQueueConfig, views: RingViews) {
    this.size = config.size;
    this.mask = config.size - 1;
    this.eventIdx = config.eventIdx;
    this.indirect = config.indirect;
    this.v = views;
    this.ordered = views.ordered;
    this.seenRange = new Float64Array(2 * config.size).fill(-1);
    this.seenView = new Array<Uint8Array | null>(config.size).fill(null);
    this.dirtyLog = config.dirtyLog ?? null;
    this.dirty = this.dirtyLog?.log ?? null;
    this.writes = [];
    this.usedEventAt = RING + config.size;
    this.availEventAt = RING + 4 * config.size;
    // A queue may start on rings that are already in use (vhost-user reconnect, or a
    // restart after GET_VRING_BASE): continue from the used index the driver sees.
    this.usedIdx = loadIndex(views.usedU16, IDX, this.ordered);
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
    this.availSeen = this.lastAvail;
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
    const r = log.recover(loadIndex(this.v.usedU16, IDX, this.ordered), (k) => usedU32[1 + 2 * (k & mask)], this.lastAvail);
    this.inflight = log;
    this.resubmit = r.resubmit;
    this.lastAvail = r.nextAvail;
    this.availSeen = r.nextAvail;
    return r;
  }

  /** The fault that broke this queue, or null. */
  get broken(): ChainError | null {
    return this.brokenBy;
  }

  /** Available entries not yet popped (0 when the queue is broken). */
  pending(): number {
    if (this.brokenBy) return 0;
    const n = (loadIndex(this.v.availU16, IDX, this.ordered) - this.lastAvail) & 0xffff;
    return (n > this.size ? 0 : n) + this.resubmit.length;
  }

  /**
   * The next available chain, null when there is none, or the {@link ChainError} that
   * broke the queue (now or earlier). With `into`, the chain is that object, its lists
   * emptied and refilled (a device that pools its requests allocates nothing here);
   * without it, a new one.
   */
  pop(into?: ReusableChain): DescriptorChain | ChainError | null {
    if (this.brokenBy) return this.brokenBy;
    if (this.resubmit.length > 0) {
      const again = this.walk(this.resubmit.shift()!, into ?? newChain());
      if (again instanceof ChainError) return this.fail(again);
      if (this.dirty !== null) this.recordWrites(again);
      return again;
    }
    let availIdx = this.availSeen;
    if (availIdx === this.lastAvail) {
      availIdx = loadIndex(this.v.availU16, IDX, this.ordered);
      this.availSeen = availIdx;
    }
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
    const chain = this.walk(head, into ?? newChain());
    if (chain instanceof ChainError) return this.fail(chain);
    this.inflight?.popped(head);
    if (this.dirty !== null) this.recordWrites(chain);
    return chain;
  }

  /**
   * Remembers which guest ranges `chain` may write, to mark them when it completes: the
   * device writes them between now and {@link pushUsed}, and marking earlier could be
   * undone by the frontend's sync (dirty-log.ts).
   */
  private recordWrites(chain: DescriptorChain): void {
    let w = this.writes[chain.head];
    if (w === undefined) this.writes[chain.head] = w = [];
    w.length = 0;
    for (const view of chain.writable) w.push(this.memory.guestAddressOf(view), view.length);
  }

  /** Marks what completing `head` wrote: its chain's writable ranges and used element `slot`. */
  private logCompletion(dirty: DirtyLog, head: number, slot: number): void {
    const w = this.writes[head];
    if (w !== undefined) {
      for (let i = 0; i < w.length; i += 2) dirty.mark(w[i], w[i + 1]);
      w.length = 0;
    }
    dirty.mark(this.usedLogAt(4 + 8 * slot), 8);
  }

  /** Guest address at which the used ring's byte `offset` is logged. */
  private usedLogAt(offset: number): number {
    return (this.dirtyLog as QueueDirtyLog).usedAt + offset;
  }

  /** Walks and validates the chain at `head` (2.7.5, 2.7.5.3) into `chain`. */
  private walk(head: number, chain: ReusableChain): DescriptorChain | ChainError {
    const { descU32, descU16 } = this.v;
    const readable = chain.readable;
    const writable = chain.writable;
    // pop(), not `length = 0`: V8 runs the length setter in its runtime, pop() inline.
    while (readable.length > 0) readable.pop();
    while (writable.length > 0) writable.pop();
    chain.head = head;
    let readableBytes = 0;
    let writableBytes = 0;
    // For the device's own limits (virtio-blk's seg_max and size_max): counted here, where
    // each descriptor is read anyway, rather than re-walked.
    let descriptors = 0;
    let longest = 0;
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
        chain.readableBytes = readableBytes;
        chain.writableBytes = writableBytes;
        chain.descriptors = descriptors;
        chain.longestDescriptor = longest;
        const e = this.walkIndirect(head, addr, len, chain);
        return e ?? chain;
      }
      const target = flags & VIRTQ_DESC_F.WRITE ? writable : readable;
      if (!(flags & VIRTQ_DESC_F.WRITE) && writableBytes > 0) {
        return new ChainError('READABLE_AFTER_WRITABLE', `descriptor ${i} is device-readable but follows a device-writable one`, head);
      }
      if (hi >= 0x20_0000) return outOfBounds(head, i, addr, len);
      const seen = this.seenRange;
      if (seen[2 * i] === addr && seen[2 * i + 1] === len) {
        target.push(this.seenView[i] as Uint8Array);
      } else {
        const before = target.length;
        if (!this.memory.gather(addr, len, target)) return outOfBounds(head, i, addr, len);
        const one = target.length === before + 1;
        seen[2 * i] = one ? addr : -1;
        seen[2 * i + 1] = len;
        this.seenView[i] = one ? target[before] : null;
      }
      if (flags & VIRTQ_DESC_F.WRITE) writableBytes += len;
      else readableBytes += len;
      descriptors++;
      if (len > longest) longest = len;
      if (readableBytes + writableBytes > MAX_CHAIN_BYTES) {
        return new ChainError('CHAIN_TOO_LARGE', `chain at head ${head} describes more than ${MAX_CHAIN_BYTES} bytes`, head);
      }
      if (!(flags & VIRTQ_DESC_F.NEXT)) break;
      if (next >= this.size) {
        return new ChainError('NEXT_OUT_OF_RANGE', `descriptor ${i} points to next ${next}, not below the queue size ${this.size}`, head);
      }
      i = next;
    }
    chain.readableBytes = readableBytes;
    chain.writableBytes = writableBytes;
    chain.descriptors = descriptors;
    chain.longestDescriptor = longest;
    return chain;
  }

  /**
   * Walks an indirect table (2.7.5.3), adding to `chain`'s lists and byte counts; null
   * when it is valid. The table is read through word views of guest memory in place
   * when it lies in one region at a 4-byte aligned offset (drivers align tables to 16
   * bytes), else through an aligned copy: no DataView, and no allocation per chain.
   */
  private walkIndirect(head: number, tableAddr: number, tableLen: number, chain: ReusableChain): ChainError | null {
    if (tableLen === 0 || tableLen % VIRTQ_DESC_SIZE !== 0) {
      return new ChainError('INDIRECT_BAD_LENGTH', `indirect table of chain ${head} is ${tableLen} bytes, not a non-zero multiple of 16`, head);
    }
    const memory = this.memory;
    const region = memory.regionIndex(tableAddr, tableLen);
    const words = region >= 0 ? memory.regionWords(region) : null;
    const offset = region >= 0 ? tableAddr - memory.regions[region].guestAddress : 0;
    let u32: Uint32Array;
    let u16: Uint16Array;
    /** u32 index of the table's first word. */
    let base: number;
    if (words !== null && offset % 4 === 0) {
      u32 = words.u32;
      u16 = words.u16;
      base = offset / 4;
    } else {
      const copy = this.copyTable(tableAddr, tableLen);
      if (copy === null) return outOfBounds(head, head, tableAddr, tableLen);
      u32 = new Uint32Array(copy.buffer, copy.byteOffset, tableLen / 4);
      u16 = new Uint16Array(copy.buffer, copy.byteOffset, tableLen / 2);
      base = 0;
    }
    const { readable, writable } = chain;
    let readableBytes = chain.readableBytes;
    let writableBytes = chain.writableBytes;
    let descriptors = chain.descriptors;
    let longest = chain.longestDescriptor;
    const entries = tableLen / VIRTQ_DESC_SIZE;
    let i = 0;
    for (let steps = 0; ; steps++) {
      if (steps >= entries) {
        return new ChainError('CHAIN_LOOP', `indirect table of chain ${head} loops`, head);
      }
      // Descriptor i: u32 words w … w + 3 (addr lo, addr hi, len, flags | next << 16).
      const w = base + i * 4;
      const hi = u32[w + 1];
      const addr = u32[w] + hi * 0x1_0000_0000;
      const len = u32[w + 2];
      const flags = u16[2 * w + 6];
      const next = u16[2 * w + 7];
      // 2.7.5.3.1: "MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor".
      if (flags & VIRTQ_DESC_F.INDIRECT) {
        return new ChainError('INDIRECT_NESTED', `indirect table of chain ${head} holds another indirect descriptor`, head);
      }
      const isWrite = (flags & VIRTQ_DESC_F.WRITE) !== 0;
      if (!isWrite && writableBytes > 0) {
        return new ChainError('READABLE_AFTER_WRITABLE', `indirect descriptor ${i} of chain ${head} is device-readable but follows a device-writable one`, head);
      }
      if (hi >= 0x20_0000 || !memory.gather(addr, len, isWrite ? writable : readable)) {
        return outOfBounds(head, i, addr, len);
      }
      if (isWrite) writableBytes += len;
      else readableBytes += len;
      descriptors++;
      if (len > longest) longest = len;
      if (readableBytes + writableBytes > MAX_CHAIN_BYTES) {
        return new ChainError('CHAIN_TOO_LARGE', `chain at head ${head} describes more than ${MAX_CHAIN_BYTES} bytes`, head);
      }
      if (!(flags & VIRTQ_DESC_F.NEXT)) {
        chain.readableBytes = readableBytes;
        chain.writableBytes = writableBytes;
        chain.descriptors = descriptors;
        chain.longestDescriptor = longest;
        return null;
      }
      if (next >= entries) {
        return new ChainError('NEXT_OUT_OF_RANGE', `indirect descriptor ${i} of chain ${head} points to ${next}, past the table's ${entries} entries`, head);
      }
      i = next;
    }
  }

  /**
   * A copy of an indirect table that spans regions or sits misaligned in host memory
   * (rare: only a hostile or odd driver does that), or null if it is outside memory.
   */
  private copyTable(addr: number, len: number): Uint8Array | null {
    // Check before allocating: the length is the guest's (up to 4 GiB), and an
    // allocation that large can throw, or cost gigabytes per hostile chain.
    if (!this.memory.contains(addr, len)) return null;
    const copy = new Uint8Array(len);
    return this.memory.read(addr, copy) ? copy : null;
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
    if (this.dirty !== null) this.logCompletion(this.dirty, head, slot);
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
    publishIndex(this.v.usedU16, IDX, next, this.ordered);
    if (this.dirty !== null) this.dirty.mark(this.usedLogAt(2 * IDX), 2);
    this.publishedUsed = next;
    if (this.inflight) {
      // After the index store: a crash in between is recovered from the used ring.
      this.inflight.published(this.batch, next);
      this.batch.length = 0;
    }
    if (this.eventIdx) return vringNeedEvent(loadIndex(this.v.availU16, this.usedEventAt, this.ordered), next, old);
    return (loadIndex(this.v.availU16, FLAGS, this.ordered) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /** Asks the driver not to notify us: we are about to drain the ring anyway. */
  disableNotifications(): void {
    if (this.eventIdx) return;
    publishIndex(this.v.usedU16, FLAGS, VIRTQ_USED_F_NO_NOTIFY, this.ordered);
    if (this.dirty !== null) this.dirty.mark(this.usedLogAt(2 * FLAGS), 2);
  }

  /**
   * Asks the driver to notify us of new buffers, then re-checks the ring: returns true
   * when buffers arrived meanwhile, so the caller must drain again instead of sleeping.
   */
  enableNotifications(): boolean {
    const at = this.eventIdx ? this.availEventAt : FLAGS;
    publishIndex(this.v.usedU16, at, this.eventIdx ? this.lastAvail : 0, this.ordered);
    if (this.dirty !== null) this.dirty.mark(this.usedLogAt(2 * at), 2);
    return !this.brokenBy && (this.resubmit.length > 0 || loadIndex(this.v.availU16, IDX, this.ordered) !== this.lastAvail);
  }
}

function outOfBounds(head: number, index: number, addr: number, len: number): ChainError {
  return new ChainError('OUT_OF_BOUNDS', `descriptor ${index} of chain ${head} (0x${addr.toString(16)}, ${len} bytes) is not in guest memory`, head);
}

/** A fresh chain for callers of {@link SplitDeviceQueue.pop} that do not bring one. */
function newChain(): ReusableChain {
  return { head: 0, readable: [], writable: [], readableBytes: 0, writableBytes: 0, descriptors: 0, longestDescriptor: 0 };
}
