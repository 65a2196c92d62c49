/**
 * The request engine of BlkDevice (device.ts): what runs between a driver making a
 * request available and its status byte coming back. A {@link QueueRunner} per started
 * queue takes chains off the ring and publishes completions; the one {@link Engine} of a
 * device checks each request against the disk and the negotiated features and calls the
 * backend; its flusher makes writes durable.
 *
 * Hot path: requests are parsed in place into pooled request objects, backends that
 * finish synchronously pay no promise, and completions are batched: a used-index
 * publish every few completions during a drain (synchronous completions) or one per
 * microtask checkpoint (asynchronous ones), each notifying only as the driver asks.
 * Requests complete out of order, as the backend finishes them (5.2.6: "not
 * necessarily in order").
 */
import { BackendError, type BackendResult, type BlockBackend } from '../backends/backend.js';
import {
  VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S, VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T,
  VIRTIO_BLK_DWZ_SEGMENT, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from '../spec/virtio-blk.js';
import { ChainError, copyToBuffers, type ReusableChain } from '../virtqueue/chain.js';
import type { SplitDeviceQueue } from '../virtqueue/split-device.js';
import { isAligned } from './align.js';
import { BlkRequest, parseRequest, parseSegments, REQUEST_PARSE, type DwzSegment, type RequestParse } from './request.js';
import { soon } from '../soon.js';
import type { QueueStats } from './stats.js';

/** Descriptors of a request that are not data: the header and the status byte. */
export const REQUEST_FRAMING_DESCRIPTORS = 2;

/**
 * While a drain completes requests synchronously, the used ring is published every this
 * many completions rather than once at the end: a driver on another CPU (vhost-user) can
 * take and refill the first ones while the rest are served, instead of the two sides
 * taking turns. Whether a publish notifies stays the driver's choice (used_event).
 */
const PUBLISH_EVERY = 4;
const S_OK = VIRTIO_BLK_S.OK;
const S_IOERR = VIRTIO_BLK_S.IOERR;
const S_UNSUPP = VIRTIO_BLK_S.UNSUPP;

/**
 * Runs `task` at the next turn of the event loop, after pending I/O: setImmediate where
 * there is one (Node), else a zero timeout (browsers; Node's would wait a millisecond,
 * which stalls a busy queue).
 */
const hostSetImmediate = (globalThis as { setImmediate?: (task: () => void) => unknown }).setImmediate;
const nextTurn: (task: () => void) => void = typeof hostSetImmediate === 'function'
  ? (task) => hostSetImmediate(task)
  : (task) => setTimeout(task, 0);

export interface RangeLimits {
  readonly maxSectors: number;
  readonly maxSegments: number;
}

/**
 * A request in flight: the chain it came in (refilled by each pop: no chain allocated
 * per request, and one object fewer to touch), the parsed request, its progress.
 * Pooled per queue.
 */
class Job extends BlkRequest implements ReusableChain {
  readonly readable: Uint8Array[] = [];
  readonly writable: Uint8Array[] = [];
  readableBytes = 0;
  writableBytes = 0;
  descriptors = 0;
  longestDescriptor = 0;
  /** Byte offset on the disk (IN, OUT). */
  offset = 0;
  /** Backend operations to run, and the next one. */
  ops = 0;
  nextOp = 0;
  /** Complete only after a backend flush that starts after the operations are done. */
  flushAfter = false;
  /** A write made durable by the backend itself (its FUA) rather than by a flush after it. */
  fua = false;
  /** Bytes written into device-writable buffers on success, the status byte included. */
  written = 0;
  /** When a drain took it off the ring (statistics' clock), when statistics are kept. */
  takenAt = 0;
  /** How its chain parsed. */
  parsed: RequestParse = REQUEST_PARSE.OK;
  segments: DwzSegment[] | null = null;
  /** Continuations for asynchronous backend results, bound once per pooled object. */
  readonly resume: () => void;
  readonly failed: (e: unknown) => void;

  constructor(readonly runner: QueueRunner) {
    super();
    this.resume = () => runner.engine.runOps(this);
    this.failed = (e) => runner.engine.backendFailed(this, e);
  }
}

/** The device side of one started queue. */
export class QueueRunner {
  inFlight = 0;
  stopping = false;
  private draining = false;
  private publishScheduled = false;
  private reportedBroken = false;
  private reportedOverLimit = false;
  private readonly free: Job[] = [];
  /** Jobs a drain has taken off the ring and not yet started. */
  private readonly taken: Job[] = [];
  private idle: (() => void)[] = [];
  private readonly publishTask = (): void => {
    this.publishScheduled = false;
    if (!this.draining) this.publish();
  };
  private resumeScheduled = false;
  /** Completions pushed since the last publish. */
  private unpublished = 0;
  private readonly resumeTask = (): void => {
    this.resumeScheduled = false;
    this.drain();
  };

  constructor(
    readonly engine: Engine,
    readonly queue: SplitDeviceQueue,
    private readonly notify: () => void,
    /** Reports the broken ring to the transport (NEEDS_RESET). */
    private readonly onBroken: (e: ChainError) => void,
    /** Reports the first request beyond seg_max or size_max, or null not to. */
    private readonly onOverLimit: ((message: string) => void) | null,
    private readonly stats: QueueStats | null,
  ) {
    if (stats) stats.inFlight = () => this.inFlight;
  }

  /** Pops and starts every available request; re-arms notifications (2.7.10) and re-checks. */
  drain(): void {
    if (this.draining || this.stopping) return;
    const q = this.queue;
    this.draining = true;
    // A guest that keeps making buffers available must not hold the one JavaScript thread
    // (every queue and connection) for ever: after a ring's worth, yield and come back.
    let budget = q.size;
    try {
      for (;;) {
        q.disableNotifications();
        const fault = this.take(budget);
        budget -= this.taken.length;
        this.startTaken();
        if (fault !== null) {
          this.broken(fault);
          break;
        }
        if (budget === 0) {
          // A ring's worth this turn: re-arm notifications as when sleeping, and come
          // back on the next turn if the ring still has work.
          if (q.enableNotifications() && !this.resumeScheduled) {
            this.resumeScheduled = true;
            nextTurn(this.resumeTask);
          }
          break;
        }
        if (!q.enableNotifications()) break;
      }
    } finally {
      // Guest input never throws; this only keeps a device bug from wedging the queue.
      this.draining = false;
      while (this.taken.length > 0) this.taken.pop();
    }
    this.publish();
  }

  /**
   * Takes (pops and parses) up to `budget` available requests into `taken`, before any
   * of them starts: the backend's copies then run back to back instead of each between
   * descriptor walks that push its data out of the caches. Returns the fault that broke
   * the ring, else null (the ring ran empty or the budget out).
   */
  private take(budget: number): ChainError | null {
    const q = this.queue;
    const taken = this.taken;
    // One clock read per batch: requests taken together share their start.
    const takenAt = this.stats !== null ? this.stats.now() : 0;
    while (taken.length < budget) {
      const job = this.free.pop() ?? new Job(this);
      const chain = q.pop(job);
      if (chain === null || chain instanceof ChainError) {
        this.free.push(job);
        return chain;
      }
      this.inFlight++;
      job.takenAt = takenAt;
      job.parsed = parseRequest(chain, job);
      taken.push(job);
    }
    return null;
  }

  /** Starts every taken request, in ring order. */
  private startTaken(): void {
    const taken = this.taken;
    for (let i = 0; i < taken.length; i++) this.start(taken[i]);
    while (taken.length > 0) taken.pop();
  }

  private start(job: Job): void {
    const parsed = job.parsed;
    const e = this.engine;
    if (parsed === REQUEST_PARSE.OK) {
      // Two compares on what the chain walk counted.
      if (job.descriptors > e.maxDescriptors || job.longestDescriptor > e.sizeMax) this.overLimit(job);
      else e.start(job);
    } else if (parsed === REQUEST_PARSE.NO_STATUS) this.completeWithoutStatus(job);
    else this.complete(job, S_IOERR);
  }

  /**
   * A request beyond the limits the device advertised (5.2.3: seg_max, the most segments
   * in a request; size_max, the largest segment): malformed, so IOERR (STYLE.md,
   * principle 8), reported once per queue. Enforced so that a driver breaking them shows
   * in a test instead of passing against a device that serves anything.
   */
  private overLimit(job: Job): void {
    if (!this.reportedOverLimit && this.onOverLimit !== null) {
      this.reportedOverLimit = true;
      const e = this.engine;
      // A parsed request has a device-readable header and a device-writable status, so
      // at least two descriptors: `segments` is not negative.
      const segments = job.descriptors - REQUEST_FRAMING_DESCRIPTORS;
      const segMax = e.maxDescriptors - REQUEST_FRAMING_DESCRIPTORS;
      this.onOverLimit(segments > segMax
        ? `request ${job.head} has ${segments} data segments, more than seg_max ${segMax}; it completes with IOERR (reported once)`
        : `request ${job.head} has a ${job.longestDescriptor}-byte segment, more than size_max ${e.sizeMax}; it completes with IOERR (reported once)`);
    }
    this.complete(job, S_IOERR);
  }

  /** A broken ring: stop fetching and report it once (2.1.2); requests in flight still complete. */
  private broken(e: ChainError): void {
    if (this.reportedBroken) return;
    this.reportedBroken = true;
    this.onBroken(e);
  }

  /** Writes the status, returns the chain to the driver, and recycles the job. */
  complete(job: Job, status: number): void {
    (job.statusBuffer as Uint8Array)[job.statusAt] = status;
    this.queue.pushUsed(job.head, status === S_OK ? job.written : 1);
    if (this.stats !== null) this.stats.completed(job.type, status, job.dataBytes, job.takenAt);
    this.release(job);
  }

  /** A chain with no device-writable byte carries no status: used length 0 (counted as an I/O error). */
  private completeWithoutStatus(job: Job): void {
    this.queue.pushUsed(job.head, 0);
    if (this.stats !== null) this.stats.completed(job.type, S_IOERR, 0, job.takenAt);
    this.release(job);
  }

  private release(job: Job): void {
    job.clear();
    job.segments = null;
    // Drop the views of guest memory (the chain object itself is reused; pop() is
    // cheaper than `length = 0`, which V8 runs in its runtime).
    const { readable, writable } = job;
    while (readable.length > 0) readable.pop();
    while (writable.length > 0) writable.pop();
    this.free.push(job);
    this.inFlight--;
    if (this.draining) {
      // Only with EVENT_IDX, where the driver says when it wants a notification: without
      // it every publish could notify, and the batch stays whole.
      if (++this.unpublished >= PUBLISH_EVERY && this.queue.eventIdx) this.publish();
      return;
    }
    if (this.stopping && this.inFlight === 0) {
      this.publish();
      const waiters = this.idle;
      this.idle = [];
      for (const w of waiters) w();
      return;
    }
    if (!this.publishScheduled) {
      this.publishScheduled = true;
      soon(this.publishTask);
    }
  }

  /** Publishes the used entries pushed so far and notifies if the driver wants it. */
  publish(): void {
    this.unpublished = 0;
    if (this.queue.publishUsed()) this.notify();
    if (this.stats !== null) this.stats.published(this.stats.now());
  }

  /** Stops fetching; resolves once every popped request has completed and been published. */
  stop(): Promise<number> {
    this.stopping = true;
    if (this.inFlight === 0) {
      this.publish();
      return Promise.resolve(this.queue.nextAvail);
    }
    return new Promise((resolve) => this.idle.push(() => resolve(this.queue.nextAvail)));
  }
}

/**
 * Serialises backend flushes and shares each among every request waiting for one: a
 * request joins the next flush to start, never one already running (that flush may
 * not cover its write), so bursts of writethrough writes cost one or two fdatasyncs.
 */
class Flusher {
  private running: Job[] = [];
  private waiting: Job[] = [];
  private busy = false;
  private readonly done = (): void => this.settle(S_OK, null);
  private readonly failed = (e: unknown): void => this.settle(failureStatus(e), e);

  constructor(private readonly engine: Engine) {}

  add(job: Job): void {
    this.waiting.push(job);
    if (!this.busy) this.startFlush();
  }

  private startFlush(): void {
    const batch = this.waiting;
    this.waiting = this.running;
    this.running = batch;
    this.busy = true;
    let r: BackendResult;
    try {
      r = this.engine.backend.flush();
    } catch (e) {
      this.settle(failureStatus(e), e);
      return;
    }
    if (r !== undefined) r.then(this.done, this.failed);
    else this.settle(S_OK, null);
  }

  private settle(status: number, error: unknown): void {
    const batch = this.running;
    this.busy = false;
    for (const job of batch) {
      if (status !== S_OK) this.engine.reportBackendError(job, error);
      job.runner.complete(job, status);
    }
    batch.length = 0;
    if (this.waiting.length > 0) this.startFlush();
  }
}

/**
 * Request execution, shared by every queue of one device: validation against the disk
 * and the negotiated features, backend calls, durability. The device updates its
 * mutable state (capacity, cache mode, negotiated request types) on the control path.
 */
export class Engine {
  readonly sectorsPerBlock: number;
  readonly flusher = new Flusher(this);
  /** Disk size in 512-byte sectors, whole logical blocks only. */
  capacitySectors: number;
  /** Writes must be durable when they complete (5.2.6.2, stable writes, cases 1 and 2). */
  writethrough = false;
  /** The backend makes single writes durable (canFua), so write-through writes need no flush. */
  readonly fua: boolean;
  discardOn = false;
  writeZeroesOn = false;
  secureEraseOn = false;

  constructor(
    readonly backend: BlockBackend,
    readonly blockSize: number,
    readonly readOnly: boolean,
    readonly flushOffered: boolean,
    private readonly id: Uint8Array,
    private readonly discardLimits: RangeLimits,
    private readonly writeZeroesLimits: RangeLimits,
    private readonly secureEraseLimits: RangeLimits,
    /** Most descriptors in a request: seg_max data segments, a header and a status. */
    readonly maxDescriptors: number,
    /** Longest descriptor in bytes: size_max, or the u32 maximum when none is advertised. */
    readonly sizeMax: number,
    private readonly onBackendError: ((error: unknown, type: number, sector: number) => void) | null,
  ) {
    this.sectorsPerBlock = blockSize / VIRTIO_BLK_SECTOR_SIZE;
    this.capacitySectors = this.capacityOf(backend.size);
    this.fua = flushOffered && backend.canFua === true;
  }

  /** Sectors of a disk of `size` bytes, counting whole logical blocks only. */
  capacityOf(size: number): number {
    return Math.floor(size / this.blockSize) * this.sectorsPerBlock;
  }

  /** Starts a parsed request. */
  start(job: Job): void {
    switch (job.type) {
      case VIRTIO_BLK_T.IN:
        if (!this.checkIo(job)) return job.runner.complete(job, S_IOERR);
        job.offset = job.sector * VIRTIO_BLK_SECTOR_SIZE;
        job.written = job.dataBytes + 1;
        return this.begin(job, 1, false);
      case VIRTIO_BLK_T.OUT:
        // 5.2.6.2: "A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a write
        // request if the VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data."
        if (this.readOnly || !this.checkIo(job)) return job.runner.complete(job, S_IOERR);
        job.offset = job.sector * VIRTIO_BLK_SECTOR_SIZE;
        job.written = 1;
        // Write-through with a backend that has FUA: one durable write, no flush after.
        job.fua = this.writethrough && this.fua;
        return this.begin(job, 1, this.writethrough && !job.fua);
      case VIRTIO_BLK_T.FLUSH:
        if (!this.flushOffered) return job.runner.complete(job, S_UNSUPP);
        job.written = 1;
        return this.begin(job, 0, true);
      case VIRTIO_BLK_T.GET_ID: {
        // A NUL-padded string of 20 bytes, cut to the room the driver gave (5.2.6).
        const n = Math.min(VIRTIO_BLK_ID_BYTES, job.dataBytes);
        copyToBuffers(job.data, 0, this.id.subarray(0, n));
        job.written = n + 1;
        return job.runner.complete(job, S_OK);
      }
      case VIRTIO_BLK_T.DISCARD:
        return this.startRange(job, this.discardOn, this.discardLimits);
      case VIRTIO_BLK_T.WRITE_ZEROES:
        return this.startRange(job, this.writeZeroesOn, this.writeZeroesLimits);
      case VIRTIO_BLK_T.SECURE_ERASE:
        return this.startRange(job, this.secureEraseOn, this.secureEraseLimits);
      default:
        // SCSI_CMD, GET_LIFETIME, zoned commands and anything unknown (5.2.6).
        return job.runner.complete(job, S_UNSUPP);
    }
  }

  /**
   * IN / OUT bounds: whole logical blocks, starting on one, inside the capacity. Written
   * as a subtraction so that a huge guest sector cannot overflow precision.
   */
  private checkIo(job: Job): boolean {
    const sector = job.sector;
    return sector >= 0 && isAligned(job.dataBytes, this.blockSize) && isAligned(sector, this.sectorsPerBlock) &&
      sector <= this.capacitySectors && job.dataBytes / VIRTIO_BLK_SECTOR_SIZE <= this.capacitySectors - sector;
  }

  /**
   * DISCARD, WRITE_ZEROES, SECURE_ERASE: every segment is validated before any runs.
   * UNSUPP, which 5.2.6.2 demands for unknown flags and for unmap on a discard or secure
   * erase, takes precedence over IOERR.
   */
  private startRange(job: Job, negotiated: boolean, limits: RangeLimits): void {
    // "Not negotiated" covers a read-only disk too: these are never offered on one.
    if (!negotiated) return job.runner.complete(job, S_UNSUPP);
    const bytes = job.dataBytes;
    const count = bytes / VIRTIO_BLK_DWZ_SEGMENT.size;
    if (bytes === 0 || !Number.isInteger(count) || count > limits.maxSegments) {
      return job.runner.complete(job, S_IOERR);
    }
    const segments = parseSegments(job.data, count);
    const unmapAllowed = job.type === VIRTIO_BLK_T.WRITE_ZEROES;
    let unsupported = false;
    let invalid = false;
    for (const s of segments) {
      if ((s.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) unsupported = true;
      if (!unmapAllowed && (s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) unsupported = true;
      if (s.sector < 0 || !isAligned(s.sector, this.sectorsPerBlock) || !isAligned(s.numSectors, this.sectorsPerBlock) ||
          s.numSectors > limits.maxSectors || s.sector > this.capacitySectors ||
          s.numSectors > this.capacitySectors - s.sector) {
        invalid = true;
      }
    }
    if (unsupported) return job.runner.complete(job, S_UNSUPP);
    if (invalid) return job.runner.complete(job, S_IOERR);
    job.segments = segments;
    job.written = 1;
    if (job.type === VIRTIO_BLK_T.SECURE_ERASE) {
      // Zero, then deallocate, each segment; then flush whatever the cache mode: erased
      // data left in a volatile cache is not erased (see BlkDevice).
      return this.begin(job, 2 * count, this.flushOffered);
    }
    return this.begin(job, count, this.writethrough);
  }

  private begin(job: Job, ops: number, flushAfter: boolean): void {
    job.ops = ops;
    job.nextOp = 0;
    job.flushAfter = flushAfter;
    this.runOps(job);
  }

  /** Runs the job's backend operations in order until one goes asynchronous, then finishes it. */
  runOps(job: Job): void {
    while (job.nextOp < job.ops) {
      let r: BackendResult;
      try {
        r = this.op(job, job.nextOp++);
      } catch (e) {
        return this.backendFailed(job, e);
      }
      if (r !== undefined) {
        r.then(job.resume, job.failed);
        return;
      }
    }
    if (job.flushAfter) this.flusher.add(job);
    else job.runner.complete(job, S_OK);
  }

  private op(job: Job, i: number): BackendResult {
    const b = this.backend;
    switch (job.type) {
      case VIRTIO_BLK_T.IN:
        return b.read(job.offset, job.data);
      case VIRTIO_BLK_T.OUT:
        return job.fua ? b.write(job.offset, job.data, true) : b.write(job.offset, job.data);
      case VIRTIO_BLK_T.DISCARD: {
        const s = (job.segments as DwzSegment[])[i];
        return b.discard(s.sector * VIRTIO_BLK_SECTOR_SIZE, s.numSectors * VIRTIO_BLK_SECTOR_SIZE);
      }
      case VIRTIO_BLK_T.WRITE_ZEROES: {
        const s = (job.segments as DwzSegment[])[i];
        const unmap = (s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0;
        return b.writeZeroes(s.sector * VIRTIO_BLK_SECTOR_SIZE, s.numSectors * VIRTIO_BLK_SECTOR_SIZE, unmap);
      }
      default: {
        // SECURE_ERASE: operation 2k zeroes segment k, operation 2k + 1 discards it.
        const s = (job.segments as DwzSegment[])[i >> 1];
        const offset = s.sector * VIRTIO_BLK_SECTOR_SIZE;
        const length = s.numSectors * VIRTIO_BLK_SECTOR_SIZE;
        return (i & 1) === 0 ? b.writeZeroes(offset, length, false) : b.discard(offset, length);
      }
    }
  }

  /** A backend operation failed: IOERR for the request (5.2.6: "device or driver error"), or UNSUPP when the backend says so. */
  backendFailed(job: Job, error: unknown): void {
    this.reportBackendError(job, error);
    job.runner.complete(job, failureStatus(error));
  }

  reportBackendError(job: Job, error: unknown): void {
    if (this.onBackendError) this.onBackendError(error, job.type, job.sector);
  }
}

/** The status of a request whose backend operation failed with `error`. */
function failureStatus(error: unknown): number {
  return error instanceof BackendError && error.code === 'UNSUPPORTED' ? S_UNSUPP : S_IOERR;
}
