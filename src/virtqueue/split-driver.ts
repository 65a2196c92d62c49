/**
 * The driver side of a split virtqueue (VIRTIO 1.2, 2.7): adds chains of
 * device-readable then device-writable buffers (direct, or through an indirect table),
 * decides when to notify the device, and reaps used buffers — distrusting the device:
 * a used id that is not in flight, or a used length beyond what was posted, is reported
 * and breaks the queue (Linux's virtio_ring does the same with BAD_RING).
 *
 * The descriptor free list and each chain's bookkeeping are kept in JavaScript arrays,
 * never read back from ring memory the device can write.
 */
import { VblkError } from '../errors.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import {
  VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F, VIRTQ_DESC_SIZE, VIRTQ_USED_F_NO_NOTIFY, vringNeedEvent,
} from '../spec/split-ring.js';
import { loadIndex, publishIndex } from './ring-index.js';
import { QueueSetupError, ringViews, type RingViews, type SplitQueueConfig } from './ring-views.js';

const FLAGS = 0;
const IDX = 1;
const RING = 2;

/** One buffer in guest memory. */
export interface Segment {
  readonly addr: number;
  readonly len: number;
}

/** Per-queue space for indirect tables: one table of `entries` descriptors per head. */
export interface IndirectArea {
  /** Guest address of `size × entries × 16` bytes, 16-byte aligned. */
  readonly addr: number;
  readonly entries: number;
}

export type DriverQueueErrorCode = 'USED_ID_NOT_IN_FLIGHT' | 'USED_LENGTH_TOO_LARGE' | 'USED_INDEX_JUMP' | 'QUEUE_BROKEN';

export class DriverQueueError<T = unknown> extends VblkError {
  declare readonly code: DriverQueueErrorCode;
  constructor(
    code: DriverQueueErrorCode,
    message: string,
    /** The request this error belongs to, when the device named one in flight. */
    readonly token?: T,
  ) {
    super(code, message);
  }
}

interface IndirectTable {
  readonly u32: Uint32Array;
  readonly u16: Uint16Array;
}

/** One used buffer: what was posted with it, and how many bytes the device wrote. */
export interface UsedBuffer<T> {
  readonly token: T;
  readonly len: number;
}

export class SplitDriverQueue<T> {
  readonly size: number;
  readonly eventIdx: boolean;
  private readonly v: RingViews;
  /** Ring indices need atomic accesses (ring-index.ts). */
  private readonly ordered: boolean;
  private readonly mask: number;
  private readonly usedEventAt: number;
  private readonly availEventAt: number;
  /** Free descriptors, linked through `nextFree`. */
  private freeHead = 0;
  private freeCount: number;
  private readonly nextFree: Uint16Array;
  /** Per head: the token in flight (undefined when free), descriptors used, writable bytes posted. */
  private readonly tokens: (T | undefined)[];
  private readonly chainDescs: Uint16Array;
  private readonly postedWritable: Float64Array;
  /** Per head: its indirect table as u32 and u16 views, taken once (no allocation per add). */
  private readonly indirectTables: IndirectTable[] | null;
  private readonly indirectEntries: number;
  private readonly indirectBase: number;
  private availIdx = 0;
  private kickedAvail = 0;
  private lastUsed = 0;
  /** used.idx as last loaded: entries up to it are known published (see takeUsed). */
  private usedSeen = 0;
  private inFlight = 0;
  private brokenBy: DriverQueueError<T> | null = null;
  /** Bytes the device wrote into the chain {@link takeUsed} returned last. */
  usedLen = 0;

  private constructor(config: SplitQueueConfig, views: RingViews, indirect: IndirectArea | null, tables: IndirectTable[] | null) {
    this.size = config.size;
    this.mask = config.size - 1;
    this.eventIdx = config.eventIdx;
    this.v = views;
    this.ordered = views.ordered;
    this.usedEventAt = RING + config.size;
    this.availEventAt = RING + 4 * config.size;
    this.freeCount = config.size;
    this.nextFree = new Uint16Array(config.size);
    for (let i = 0; i < config.size; i++) this.nextFree[i] = i + 1;
    this.tokens = new Array<T | undefined>(config.size);
    this.chainDescs = new Uint16Array(config.size);
    this.postedWritable = new Float64Array(config.size);
    views.availU16.fill(0);
    views.usedU16.fill(0);
    this.indirectTables = tables;
    this.indirectEntries = tables && indirect ? indirect.entries : 0;
    this.indirectBase = tables && indirect ? indirect.addr : 0;
  }

  /**
   * A driver queue over zeroed-or-not ring memory that the caller owns (it is reset
   * here). `indirect` gives room for indirect tables; without it every chain is direct.
   */
  static create<T>(memory: GuestMemory, config: SplitQueueConfig, indirect: IndirectArea | null = null): SplitDriverQueue<T> | QueueSetupError {
    const views = ringViews(memory, config);
    if (views instanceof QueueSetupError) return views;
    let tables: IndirectTable[] | null = null;
    if (indirect && config.indirect) {
      tables = [];
      const bytes = indirect.entries * VIRTQ_DESC_SIZE;
      for (let h = 0; h < config.size; h++) {
        const t = memory.view(indirect.addr + h * bytes, bytes);
        if (t === null || t.byteOffset % 4 !== 0) {
          return new QueueSetupError('RING_OUT_OF_BOUNDS', `indirect table area at 0x${indirect.addr.toString(16)} is not aligned inside one memory region`);
        }
        tables.push({ u32: new Uint32Array(t.buffer, t.byteOffset, bytes / 4), u16: new Uint16Array(t.buffer, t.byteOffset, bytes / 2) });
      }
    }
    return new SplitDriverQueue<T>(config, views, indirect, tables);
  }

  /** Free descriptors. */
  get numFree(): number {
    return this.freeCount;
  }

  /** Chains posted and not yet used. */
  get numInFlight(): number {
    return this.inFlight;
  }

  get broken(): DriverQueueError<T> | null {
    return this.brokenBy;
  }

  /** Next available index (what SET_VRING_BASE should start from after a restart). */
  get nextAvail(): number {
    return this.availIdx;
  }

  /** Largest chain (descriptor count) {@link add} can take right now. */
  canAdd(count: number): boolean {
    if (this.brokenBy || this.freeCount === 0) return false;
    if (count > 1 && this.indirectTables && count <= this.indirectEntries) return true;
    return count <= this.freeCount;
  }

  /**
   * Posts `out` (device-readable) then `inp` (device-writable) buffers as one chain.
   * Returns false when there is no room now (the caller waits for used buffers, like the
   * seed's stop-queue). Not visible to the device until {@link kickPrepare}.
   */
  add(out: readonly Segment[], inp: readonly Segment[], token: T): boolean {
    const count = out.length + inp.length;
    if (count === 0) throw new VblkError('EMPTY_CHAIN', 'a chain needs at least one buffer');
    if (!this.canAdd(count)) return false;
    let writableBytes = 0;
    for (const s of inp) writableBytes += s.len;
    const head = this.freeHead;
    const { descU32, descU16 } = this.v;
    // Direct while the ring has room: the device then reads the chain where it reads the
    // ring, with no table to locate and check. Tables are for when the ring runs short,
    // where they let one descriptor carry a whole chain.
    const tables = this.indirectTables;
    if (count > this.freeCount && tables !== null) {
      const { u32: t32, u16: t16 } = tables[head];
      // Entry k links to k + 1; the last one ends the chain.
      const nOut = out.length;
      for (let k = 0; k < nOut; k++) {
        const s = out[k];
        writeDesc(t32, t16, k, s.addr, s.len, k === count - 1 ? 0 : VIRTQ_DESC_F.NEXT, k === count - 1 ? 0 : k + 1);
      }
      for (let k = nOut; k < count; k++) {
        const s = inp[k - nOut];
        writeDesc(t32, t16, k, s.addr, s.len, k === count - 1 ? VIRTQ_DESC_F.WRITE : VIRTQ_DESC_F.WRITE | VIRTQ_DESC_F.NEXT, k === count - 1 ? 0 : k + 1);
      }
      this.pointAtTable(head, count);
    } else {
      let i = head;
      for (let k = 0; k < count; k++) {
        const s = k < out.length ? out[k] : inp[k - out.length];
        const last = k === count - 1;
        const next = this.nextFree[i];
        writeDesc(descU32, descU16, i, s.addr, s.len, (k >= out.length ? VIRTQ_DESC_F.WRITE : 0) | (last ? 0 : VIRTQ_DESC_F.NEXT), last ? 0 : next);
        if (!last) i = next;
      }
      this.freeHead = this.nextFree[i];
      this.chainDescs[head] = count;
    }
    this.bookChain(head, token, writableBytes);
    return true;
  }

  /** Makes descriptor `head` the whole chain: its indirect table, `count` entries written. */
  private pointAtTable(head: number, count: number): void {
    this.freeHead = this.nextFree[head];
    writeDesc(this.v.descU32, this.v.descU16, head, this.indirectBase + head * this.indirectEntries * VIRTQ_DESC_SIZE,
      count * VIRTQ_DESC_SIZE, VIRTQ_DESC_F.INDIRECT, 0);
    this.chainDescs[head] = 1;
  }

  /** Books the chain at `head` (its descriptors written) as in flight and puts it in the avail ring. */
  private bookChain(head: number, token: T, writableBytes: number): void {
    this.freeCount -= this.chainDescs[head];
    this.tokens[head] = token;
    this.postedWritable[head] = writableBytes;
    this.inFlight++;
    // The ring slot is written before the index that publishes it (ring-index.ts).
    this.v.availU16[RING + (this.availIdx & this.mask)] = head;
    this.availIdx = (this.availIdx + 1) & 0xffff;
  }

  /**
   * {@link add} for the commonest shape, without segment lists to build and read: a
   * device-readable head (a request header), a data buffer when `dataLen` > 0 (either
   * way), a device-writable tail (a status). The same rules and result as add().
   */
  addFramed(headAddr: number, headLen: number, dataAddr: number, dataLen: number, dataWritable: boolean,
    tailAddr: number, tailLen: number, token: T): boolean {
    const count = dataLen > 0 ? 3 : 2;
    if (!this.canAdd(count)) return false;
    const head = this.freeHead;
    const tables = this.indirectTables;
    const dataFlags = dataWritable ? VIRTQ_DESC_F.WRITE | VIRTQ_DESC_F.NEXT : VIRTQ_DESC_F.NEXT;
    // Direct while the ring has room, as in add().
    if (count > this.freeCount && tables !== null) {
      const { u32, u16 } = tables[head];
      writeDesc(u32, u16, 0, headAddr, headLen, VIRTQ_DESC_F.NEXT, 1);
      if (count === 3) writeDesc(u32, u16, 1, dataAddr, dataLen, dataFlags, 2);
      writeDesc(u32, u16, count - 1, tailAddr, tailLen, VIRTQ_DESC_F.WRITE, 0);
      this.pointAtTable(head, count);
    } else {
      const { descU32, descU16 } = this.v;
      let last = this.nextFree[head];
      writeDesc(descU32, descU16, head, headAddr, headLen, VIRTQ_DESC_F.NEXT, last);
      if (count === 3) {
        const data = last;
        last = this.nextFree[data];
        writeDesc(descU32, descU16, data, dataAddr, dataLen, dataFlags, last);
      }
      writeDesc(descU32, descU16, last, tailAddr, tailLen, VIRTQ_DESC_F.WRITE, 0);
      this.freeHead = this.nextFree[last];
      this.chainDescs[head] = count;
    }
    this.bookChain(head, token, dataWritable ? dataLen + tailLen : tailLen);
    return true;
  }

  /**
   * Publishes every chain added since the last call and says whether the device wants a
   * notification for them (2.7.13.3, 2.7.10).
   */
  kickPrepare(): boolean {
    const old = this.kickedAvail;
    const next = this.availIdx;
    publishIndex(this.v.availU16, IDX, next, this.ordered);
    this.kickedAvail = next;
    if (old === next) return false;
    if (this.eventIdx) return vringNeedEvent(loadIndex(this.v.usedU16, this.availEventAt, this.ordered), next, old);
    return (loadIndex(this.v.usedU16, FLAGS, this.ordered) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /** Whether the device has used buffers we have not reaped. */
  hasUsed(): boolean {
    return !this.brokenBy && loadIndex(this.v.usedU16, IDX, this.ordered) !== this.lastUsed;
  }

  /**
   * The next used buffer, null when there is none, or a {@link DriverQueueError} when
   * the device broke the rules — after which the queue is broken for good.
   */
  getUsed(): UsedBuffer<T> | DriverQueueError<T> | null {
    const token = this.takeUsed();
    if (token === null) return null;
    if (token instanceof DriverQueueError) return token as DriverQueueError<T>;
    return { token: token as T, len: this.usedLen };
  }

  /**
   * {@link getUsed} without an object per buffer, for hot loops: the token, whose used
   * length is then in {@link usedLen}. (Hence tokens are never null or a DriverQueueError.)
   */
  takeUsed(): T | DriverQueueError<T> | null {
    if (this.brokenBy) return this.brokenBy;
    let usedIdx = this.usedSeen;
    if (usedIdx === this.lastUsed) {
      usedIdx = loadIndex(this.v.usedU16, IDX, this.ordered);
      this.usedSeen = usedIdx;
    }
    const pending = (usedIdx - this.lastUsed) & 0xffff;
    if (pending === 0) return null;
    if (pending > this.inFlight) {
      return this.fail(new DriverQueueError('USED_INDEX_JUMP', `used index moved by ${pending} with only ${this.inFlight} chains in flight`));
    }
    const slot = this.lastUsed & this.mask;
    const id = this.v.usedU32[1 + 2 * slot];
    const len = this.v.usedU32[2 + 2 * slot];
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    const token = id < this.size ? this.tokens[id] : undefined;
    if (token === undefined) {
      return this.fail(new DriverQueueError('USED_ID_NOT_IN_FLIGHT', `device returned id ${id}, which is not in flight`));
    }
    this.detach(id);
    if (len > this.postedWritable[id]) {
      return this.fail(new DriverQueueError('USED_LENGTH_TOO_LARGE',
        `device wrote ${len} bytes into chain ${id}, which has ${this.postedWritable[id]} writable bytes`, token));
    }
    this.usedLen = len;
    return token;
  }

  private fail(e: DriverQueueError<T>): DriverQueueError<T> {
    this.brokenBy = e;
    return e;
  }

  /** Returns chain `head`'s descriptors to the free list. */
  private detach(head: number): void {
    let i = head;
    const n = this.chainDescs[head];
    for (let k = 1; k < n; k++) i = this.nextFree[i];
    this.nextFree[i] = this.freeHead;
    this.freeHead = head;
    this.freeCount += n;
    this.tokens[head] = undefined;
    this.inFlight--;
  }

  /** Asks the device not to notify us of used buffers (we are polling or draining). */
  disableInterrupts(): void {
    if (!this.eventIdx) publishIndex(this.v.availU16, FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT, this.ordered);
  }

  /**
   * Asks for a notification at the next used buffer, then re-checks: true when used
   * buffers arrived meanwhile and the caller must reap again instead of sleeping.
   *
   * With EVENT_IDX, `delay` > 0 asks instead to be notified only once `delay + 1` more
   * buffers are used (Linux's `virtqueue_enable_cb_delayed`, 2.7.10.2): fewer
   * notifications when many chains are in flight. `delay` must be below the chains in
   * flight, or the notification may never come; the re-check still sees every buffer
   * already used. Without EVENT_IDX the flag can only say "now", and `delay` is ignored.
   */
  enableInterrupts(delay = 0): boolean {
    // used_event is a wrapping u16 like the indices it is compared with (vringNeedEvent).
    if (this.eventIdx) publishIndex(this.v.availU16, this.usedEventAt, (this.lastUsed + Math.min(delay, Math.max(0, this.inFlight - 1))) & 0xffff, this.ordered);
    else publishIndex(this.v.availU16, FLAGS, 0, this.ordered);
    return this.hasUsed();
  }

  /**
   * Takes back every chain in flight, returning their tokens, and resets the queue to
   * empty: for device reset, freeze and remove, once the device no longer uses the rings.
   */
  detachAll(): T[] {
    const tokens: T[] = [];
    for (let h = 0; h < this.size; h++) {
      const t = this.tokens[h];
      if (t !== undefined) tokens.push(t);
      this.tokens[h] = undefined;
      this.nextFree[h] = h + 1;
    }
    this.freeHead = 0;
    this.freeCount = this.size;
    this.inFlight = 0;
    return tokens;
  }
}

function writeDesc(u32: Uint32Array, u16: Uint16Array, i: number, addr: number, len: number, flags: number, next: number): void {
  // addr is a safe integer: `>>> 0` keeps its low 32 bits, and the subtraction leaves an
  // exact multiple of 2^32 to divide (a division only addresses above 4 GiB pay for).
  const lo = addr >>> 0;
  u32[i * 4] = lo;
  u32[i * 4 + 1] = addr === lo ? 0 : (addr - lo) / 0x1_0000_0000;
  u32[i * 4 + 2] = len;
  u16[i * 8 + 6] = flags;
  u16[i * 8 + 7] = next;
}
