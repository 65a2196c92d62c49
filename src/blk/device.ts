/**
 * The virtio-blk device model (VIRTIO 1.2, 5.2): serves the requests a driver places in
 * its queues from a {@link BlockBackend}. Transport-agnostic: loopback, vhost-user and
 * virtio-mmio all drive it through {@link VirtioDevice}.
 *
 * Policy (STYLE.md, principle 8): a bad request completes with IOERR or UNSUPP and the
 * queue goes on; a bad ring (a {@link ChainError} from the queue) stops that queue and
 * reports NEEDS_RESET once, while the other queues keep working.
 *
 * Hot path: requests are parsed in place into pooled request objects, backends that
 * finish synchronously pay no promise, and completions are batched: a used-index
 * publish every few completions during a drain (synchronous completions) or one per
 * microtask checkpoint (asynchronous ones), each notifying only as the driver asks.
 * Requests complete out of order, as the backend finishes them (5.2.6: "not
 * necessarily in order").
 */
import { BackendError, type BackendResult, type BlockBackend } from '../backends/backend.js';
import { SerialBackend } from '../backends/serial.js';
import { UsageError } from '../errors.js';
import {
  VIRTIO_BLK_CONFIG as CFG, VIRTIO_BLK_F, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S, VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T,
  VIRTIO_BLK_DWZ_SEGMENT, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from '../spec/virtio-blk.js';
import { setU64 } from '../spec/u64.js';
import { VIRTIO_F, VIRTIO_ID, features, hasFeature } from '../spec/virtio.js';
import { isValidQueueSize } from '../spec/split-ring.js';
import { ChainError, copyToBuffers, type ReusableChain } from '../virtqueue/chain.js';
import type { DeviceHost, VirtioDevice } from '../virtqueue/device.js';
import type { SplitDeviceQueue } from '../virtqueue/split-device.js';
import { encodeBlkConfig, type BlkGeometry, type BlkTopology } from './config.js';
import { topologyFromHints, type HintedTopology } from './block-size-hints.js';
import { isAligned } from './align.js';
import { BlkRequest, parseRequest, parseSegments, REQUEST_PARSE, type DwzSegment, type RequestParse } from './request.js';
import { soon } from '../soon.js';
import { QueueStats } from './stats.js';

/** Limits of one kind of discard / write-zeroes / secure-erase request. */
export interface BlkRangeLimits {
  /** Most sectors in one segment; a multiple of the logical block in sectors. */
  readonly maxSectors?: number;
  /** Most segments in one request, 1 … {@link MAX_RANGE_SEGMENTS}. */
  readonly maxSegments?: number;
}

/** How to build a {@link BlkDevice}; everything but the backend has a default. */
export interface BlkDeviceOptions {
  /** The storage served; the device's feature bits follow what it can do. */
  readonly backend: BlockBackend;
  /** The GET_ID string: printable ASCII, at most 20 bytes. Default empty. */
  readonly serial?: string;
  /** Request queues, 1 … 65535. Default 1. */
  readonly numQueues?: number;
  /** Largest queue size the device accepts: a power of two. Default 256. */
  readonly queueSize?: number;
  /**
   * Logical block size (blk_size). Requests must then start on a block and cover whole
   * blocks. Sectors on the wire stay 512 bytes. Default 512.
   */
  readonly blockSize?: 512 | 4096;
  /** Serve the disk read-only (also implied by a read-only backend). */
  readonly readOnly?: boolean;
  /** Cache mode after reset (the `writeback` field). Default `writeback`. */
  readonly cache?: 'writeback' | 'writethrough';
  /** Called whenever the `writeback` field changes (a driver's choice, a reset, an assumption), for logs. */
  readonly onWritebackChange?: (writeback: 0 | 1) => void;
  /** Discard limits, or false not to offer discard. */
  readonly discard?: false | BlkRangeLimits;
  /** Write-zeroes limits, or false not to offer write-zeroes. */
  readonly writeZeroes?: false | BlkRangeLimits;
  /** Secure-erase limits, or false not to offer secure erase (see {@link BlkDevice}). */
  readonly secureErase?: false | BlkRangeLimits;
  /** CHS geometry to advertise (VIRTIO_BLK_F_GEOMETRY); none by default. */
  readonly geometry?: BlkGeometry;
  /**
   * Topology hints, in logical blocks (VIRTIO_BLK_F_TOPOLOGY). Each field given wins;
   * the others come from the backend's `blockSize` hints (block-size-hints.ts has the
   * mapping), else 0: no hint.
   */
  readonly topology?: Partial<BlkTopology>;
  /**
   * Most data segments per request the driver may use (seg_max), counted as a request's
   * descriptors less two (header and status). Default queueSize - 2. A request with more
   * completes with IOERR.
   */
  readonly segMax?: number;
  /**
   * Longest descriptor in bytes the driver may use (size_max, VIRTIO_BLK_F_SIZE_MAX), at
   * least 512; none by default. A request with a longer one completes with IOERR.
   */
  readonly sizeMax?: number;
  /**
   * Keep request statistics ({@link BlkDevice.stats}), timing requests with this clock
   * (milliseconds, like `performance.now`). Off by default: the data path then pays one
   * null check per batch and per request.
   */
  readonly statsClock?: () => number;
  /**
   * Called with every backend failure, for logs. The request completes with UNSUPP for a
   * {@link BackendError} `UNSUPPORTED`, with IOERR for anything else.
   */
  readonly onBackendError?: (error: unknown, type: number, sector: number) => void;
  /**
   * Called the first time a queue meets a request beyond seg_max or size_max (it
   * completes with IOERR), for logs: once per queue start, so a driver that keeps
   * breaking them cannot flood the log.
   */
  readonly onLimitExceeded?: (queue: number, message: string) => void;
}

/**
 * Most segments accepted in one discard, write-zeroes or secure-erase request: Linux
 * never sends more (its block layer's MAX_DISCARD_SEGMENTS), and it bounds the work
 * and memory one request can ask of the device.
 */
export const MAX_RANGE_SEGMENTS = 256;
/**
 * Default most sectors per range segment: under 2 GiB, so one backend call (a
 * fallocate, or the zero-writing fallback) stays bounded. Rounded down to whole blocks.
 */
const DEFAULT_MAX_RANGE_SECTORS = Math.floor(0x7fff_ffff / VIRTIO_BLK_SECTOR_SIZE);
const DEFAULT_QUEUE_SIZE = 256;
/** Logical block sizes on offer: the classic sector and 4 KiB ("advanced format") disks. */
const BLOCK_SIZES: readonly number[] = [VIRTIO_BLK_SECTOR_SIZE, 4096];
/** Descriptors of a request that are not data: the header and the status byte. */
const REQUEST_FRAMING_DESCRIPTORS = 2;
/**
 * Smallest size_max on offer: one sector. Smaller would only cut blocks into pieces, and
 * at this size the header (16 bytes) and status (1 byte) descriptors are within it too,
 * so the device bounds every descriptor without telling framing from data.
 */
const MIN_SIZE_MAX = VIRTIO_BLK_SECTOR_SIZE;
const U8_MAX = 0xff;
const U16_MAX = 0xffff;
const U32_MAX = 0xffff_ffff;
/** Printable ASCII, the alphabet of the device ID string (5.2.6). */
const ASCII_FIRST_PRINTABLE = 0x20;
const ASCII_LAST_PRINTABLE = 0x7e;

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

const NO_HOST: DeviceHost = { configChanged: () => undefined, needsReset: () => undefined };

interface RangeLimits {
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
class QueueRunner {
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
class Engine {
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

/**
 * A virtio-blk device over a {@link BlockBackend}.
 *
 * Feature bits offered, each because it is implemented here and tested:
 * VERSION_1, RING_INDIRECT_DESC and RING_EVENT_IDX (the split queue handles both);
 * SEG_MAX, BLK_SIZE and TOPOLOGY (always: the values are accurate; the topology hints
 * come from the backend's block size hints, else are zero); SIZE_MAX and GEOMETRY when given; RO for a read-only disk; FLUSH and
 * CONFIG_WCE when the backend can flush; MQ when there is more than one queue
 * (num_queues is filled in regardless: with one queue the bit would add nothing, and
 * leaving it off keeps drivers without MQ support on their well-trodden path);
 * DISCARD, WRITE_ZEROES and SECURE_ERASE on a writable disk whose backend can do them.
 *
 * Secure erase is best effort and says so: each range is overwritten with zeroes
 * (write-zeroes without unmap), then discarded, then flushed, so it reads back as
 * zeroes and is deallocated in the image. What lower layers keep (filesystem
 * journals, snapshots, an SSD's remapped blocks) is beyond a file's reach.
 *
 * A backend that declares `concurrency: 'serial'` gets one operation at a time (flushes
 * and resizes included), the rest queued in arrival order; the queue exists only for
 * such a backend.
 *
 * Limits: a request with more data segments than seg_max, or a descriptor longer than
 * size_max, completes with IOERR. A disk whose size is not a whole number of logical
 * blocks exposes the whole blocks only.
 */
export class BlkDevice implements VirtioDevice {
  readonly deviceId = VIRTIO_ID.BLOCK;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly deviceFeatures: bigint;
  /** The backend served, as given in the options. */
  readonly backend: BlockBackend;
  /** Logical block size in bytes (blk_size): 512 or 4096. */
  readonly blockSize: number;
  /** The disk is served read-only (VIRTIO_BLK_F_RO): by the options or because the backend is. */
  readonly readOnly: boolean;
  private readonly engine: Engine;
  private readonly config: Uint8Array;
  private readonly configView: DataView;
  private readonly initialWriteback: 0 | 1;
  private readonly onWritebackChange: ((writeback: 0 | 1) => void) | null;
  private readonly runners: (QueueRunner | null)[];
  private readonly onLimitExceeded: ((queue: number, message: string) => void) | null;
  /** Request statistics per queue, when the device was built with a `statsClock`; else null. */
  readonly stats: readonly QueueStats[] | null;
  private host: DeviceHost = NO_HOST;
  private driverFeatures = 0n;

  /**
   * Throws {@link UsageError} `BAD_OPTION` for options out of range, and
   * `BAD_BLOCK_SIZE_HINTS` for a backend's invalid block size hints.
   */
  constructor(options: BlkDeviceOptions) {
    const backend = options.backend;
    this.backend = backend;
    // Decided once, here: a parallel backend is called directly, and its requests pay
    // nothing for the queue a serial one needs.
    const served = backend.concurrency === 'serial' ? new SerialBackend(backend) : backend;
    this.blockSize = options.blockSize ?? VIRTIO_BLK_SECTOR_SIZE;
    if (!BLOCK_SIZES.includes(this.blockSize)) bad(`block size ${this.blockSize} is not one of ${BLOCK_SIZES.join(', ')}`);
    const sectorsPerBlock = this.blockSize / VIRTIO_BLK_SECTOR_SIZE;
    this.numQueues = options.numQueues ?? 1;
    checkInt('numQueues', this.numQueues, 1, U16_MAX);
    this.maxQueueSize = options.queueSize ?? DEFAULT_QUEUE_SIZE;
    if (!isValidQueueSize(this.maxQueueSize)) bad(`queue size ${this.maxQueueSize} is not a power of two from 1 to 32768`);
    const segMax = options.segMax ?? Math.max(1, this.maxQueueSize - REQUEST_FRAMING_DESCRIPTORS);
    checkInt('segMax', segMax, 1, U32_MAX);
    if (options.sizeMax !== undefined) checkInt('sizeMax', options.sizeMax, MIN_SIZE_MAX, U32_MAX);
    this.readOnly = (options.readOnly ?? false) || backend.readOnly;
    if (backend.size < this.blockSize) bad(`the backend's ${backend.size} bytes hold no ${this.blockSize}-byte block`);

    const geometry = options.geometry;
    if (geometry) {
      checkInt('geometry.cylinders', geometry.cylinders, 0, U16_MAX);
      checkInt('geometry.heads', geometry.heads, 0, U8_MAX);
      checkInt('geometry.sectors', geometry.sectors, 0, U8_MAX);
    }
    const t = options.topology ?? {};
    const hinted: HintedTopology = backend.blockSize
      ? topologyFromHints(backend.blockSize, this.blockSize)
      : { physicalBlockExp: 0, minIoSize: 0, optIoSize: 0 };
    const topology: BlkTopology = {
      physicalBlockExp: t.physicalBlockExp ?? hinted.physicalBlockExp,
      alignmentOffset: t.alignmentOffset ?? 0,
      minIoSize: t.minIoSize ?? hinted.minIoSize,
      optIoSize: t.optIoSize ?? hinted.optIoSize,
    };
    checkInt('topology.physicalBlockExp', topology.physicalBlockExp, 0, U8_MAX);
    checkInt('topology.alignmentOffset', topology.alignmentOffset, 0, U8_MAX);
    checkInt('topology.minIoSize', topology.minIoSize, 0, U16_MAX);
    checkInt('topology.optIoSize', topology.optIoSize, 0, U32_MAX);

    const writable = !this.readOnly;
    const flush = backend.canFlush;
    const discard = writable && backend.canDiscard && options.discard !== false;
    const writeZeroes = writable && backend.canWriteZeroes && options.writeZeroes !== false;
    const secureErase = writable && backend.canDiscard && backend.canWriteZeroes && options.secureErase !== false;
    const discardLimits = rangeLimits('discard', options.discard, sectorsPerBlock);
    const writeZeroesLimits = rangeLimits('writeZeroes', options.writeZeroes, sectorsPerBlock);
    const secureEraseLimits = rangeLimits('secureErase', options.secureErase, sectorsPerBlock);
    this.initialWriteback = (options.cache ?? 'writeback') === 'writeback' ? 1 : 0;
    this.onWritebackChange = options.onWritebackChange ?? null;
    this.engine = new Engine(served, this.blockSize, this.readOnly, flush, encodeSerial(options.serial ?? ''),
      discardLimits, writeZeroesLimits, secureEraseLimits, segMax + REQUEST_FRAMING_DESCRIPTORS,
      options.sizeMax ?? U32_MAX, options.onBackendError ?? null);
    this.onLimitExceeded = options.onLimitExceeded ?? null;

    const bits: number[] = [
      VIRTIO_F.VERSION_1, VIRTIO_F.RING_INDIRECT_DESC, VIRTIO_F.RING_EVENT_IDX,
      VIRTIO_BLK_F.SEG_MAX, VIRTIO_BLK_F.BLK_SIZE, VIRTIO_BLK_F.TOPOLOGY,
    ];
    if (options.sizeMax !== undefined) bits.push(VIRTIO_BLK_F.SIZE_MAX);
    if (geometry) bits.push(VIRTIO_BLK_F.GEOMETRY);
    if (this.readOnly) bits.push(VIRTIO_BLK_F.RO);
    // 5.2.5.2: "Devices SHOULD always offer VIRTIO_BLK_F_FLUSH, and MUST offer it if they
    // offer VIRTIO_BLK_F_CONFIG_WCE" — both follow what the backend can do.
    if (flush) bits.push(VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.CONFIG_WCE);
    if (this.numQueues > 1) bits.push(VIRTIO_BLK_F.MQ);
    if (discard) bits.push(VIRTIO_BLK_F.DISCARD);
    if (writeZeroes) bits.push(VIRTIO_BLK_F.WRITE_ZEROES);
    if (secureErase) bits.push(VIRTIO_BLK_F.SECURE_ERASE);
    this.deviceFeatures = features(...bits);

    const off: RangeLimits = { maxSectors: 0, maxSegments: 0 };
    const dl = discard ? discardLimits : off;
    const wl = writeZeroes ? writeZeroesLimits : off;
    const sl = secureErase ? secureEraseLimits : off;
    this.config = encodeBlkConfig({
      capacity: this.engine.capacitySectors,
      sizeMax: options.sizeMax ?? 0,
      segMax,
      geometry: geometry ?? { cylinders: 0, heads: 0, sectors: 0 },
      blkSize: this.blockSize,
      topology,
      writeback: this.initialWriteback,
      numQueues: this.numQueues,
      maxDiscardSectors: dl.maxSectors,
      maxDiscardSeg: dl.maxSegments,
      // Alignment hints in sectors: one logical block, the unit every range must use.
      discardSectorAlignment: discard ? sectorsPerBlock : 0,
      maxWriteZeroesSectors: wl.maxSectors,
      maxWriteZeroesSeg: wl.maxSegments,
      // Write-zeroes with unmap deallocates exactly when the backend can discard.
      writeZeroesMayUnmap: writeZeroes && backend.canDiscard ? 1 : 0,
      maxSecureEraseSectors: sl.maxSectors,
      maxSecureEraseSeg: sl.maxSegments,
      secureEraseSectorAlignment: secureErase ? sectorsPerBlock : 0,
    });
    this.configView = new DataView(this.config.buffer, this.config.byteOffset, this.config.byteLength);
    this.runners = new Array<QueueRunner | null>(this.numQueues).fill(null);
    const clock = options.statsClock;
    this.stats = clock ? Array.from({ length: this.numQueues }, () => new QueueStats(clock)) : null;
    this.setDriverFeatures(0n);
  }

  /** Disk size in 512-byte sectors, as the config space reports it. */
  get capacity(): number {
    return this.engine.capacitySectors;
  }

  /** The cache mode in force: 1 writeback, 0 writethrough (the `writeback` field). */
  get writeback(): number {
    return this.config[CFG.writeback.offset];
  }

  attach(host: DeviceHost): void {
    this.host = host;
  }

  readConfig(offset: number, length: number): Uint8Array {
    if (!Number.isSafeInteger(length) || length < 0) return new Uint8Array(0);
    const out = new Uint8Array(length);
    if (Number.isSafeInteger(offset) && offset >= 0 && offset < this.config.length) {
      out.set(this.config.subarray(offset, Math.min(this.config.length, offset + length)));
    }
    return out;
  }

  /**
   * Only `writeback` is writable, and only with CONFIG_WCE negotiated (5.2.5): a write
   * covering it sets the cache mode to 0 or 1; any other value, and every other byte,
   * is ignored.
   */
  writeConfig(offset: number, data: Uint8Array): void {
    if (!hasFeature(this.driverFeatures, VIRTIO_BLK_F.CONFIG_WCE) || !Number.isSafeInteger(offset)) return;
    const at = CFG.writeback.offset - offset;
    if (at < 0 || at >= data.length) return;
    const value = data[at];
    if (value !== 0 && value !== 1) return;
    this.setWriteback(value);
  }

  /**
   * The driver's copy of the config space is unknown (a vhost-user backend restarted
   * under a running guest, with nothing recorded): take writethrough, the one mode in
   * which no acknowledged write can be lost whatever the driver believes. A driver that
   * believes writeback still flushes; one that switches modes tells us.
   */
  assumeCautiousConfig(): void {
    this.setWriteback(0);
  }

  private setWriteback(value: 0 | 1): void {
    const changed = this.config[CFG.writeback.offset] !== value;
    this.config[CFG.writeback.offset] = value;
    this.updateCacheMode();
    if (changed) this.onWritebackChange?.(value);
  }

  setDriverFeatures(accepted: bigint): void {
    const f = accepted & this.deviceFeatures;
    this.driverFeatures = f;
    // 5.2.5.2: "If VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is not,
    // the device MUST initialize writeback to 0."
    // Otherwise writeback keeps what reset or the driver set: a vhost-user frontend
    // renegotiates features at every driver start but keeps its own copy of the config
    // space across guest resets and never reads it again (QEMU 7.2: config-record.ts),
    // so a guest that chose writethrough before a reboot still believes it after.
    const wceWithoutFlush = hasFeature(f, VIRTIO_BLK_F.CONFIG_WCE) && !hasFeature(f, VIRTIO_BLK_F.FLUSH);
    this.engine.discardOn = hasFeature(f, VIRTIO_BLK_F.DISCARD);
    this.engine.writeZeroesOn = hasFeature(f, VIRTIO_BLK_F.WRITE_ZEROES);
    this.engine.secureEraseOn = hasFeature(f, VIRTIO_BLK_F.SECURE_ERASE);
    if (wceWithoutFlush) this.setWriteback(0);
    else this.updateCacheMode();
  }

  /**
   * 5.2.6.2: a completed write is stable when FLUSH was offered but neither FLUSH nor
   * CONFIG_WCE negotiated (case 1), or CONFIG_WCE negotiated with writeback 0 (case 2).
   * Without FLUSH offered the backend has no volatile cache to flush.
   */
  private updateCacheMode(): void {
    const f = this.driverFeatures;
    const wce = hasFeature(f, VIRTIO_BLK_F.CONFIG_WCE);
    const flush = hasFeature(f, VIRTIO_BLK_F.FLUSH);
    this.engine.writethrough = this.engine.flushOffered && (wce ? this.writeback === 0 : !flush);
  }

  startQueue(index: number, queue: SplitDeviceQueue, notify: () => void): void {
    this.checkIndex(index);
    if (this.runners[index]) throw new UsageError('QUEUE_BUSY', `queue ${index} is already started; stop it first`);
    // A broken ring is reported once (2.1.2), then the queue stays stopped.
    const onLimitExceeded = this.onLimitExceeded;
    this.runners[index] = new QueueRunner(this.engine, queue, notify, (e) => this.host.needsReset(index, e),
      onLimitExceeded && ((message) => onLimitExceeded(index, message)), this.stats?.[index] ?? null);
  }

  queueNotify(index: number): void {
    // A kick for a queue that is not started (or does not exist) is ignored.
    const runner = Number.isInteger(index) ? this.runners[index] : undefined;
    if (runner) runner.drain();
  }

  async stopQueue(index: number): Promise<number> {
    this.checkIndex(index);
    const runner = this.runners[index];
    if (!runner) return 0;
    const next = await runner.stop();
    if (this.runners[index] === runner) this.runners[index] = null;
    return next;
  }

  async reset(): Promise<void> {
    await Promise.all(this.runners.map((r, i) => (r ? this.stopQueue(i) : 0)));
    this.setDriverFeatures(0n);
    this.setWriteback(this.initialWriteback);
  }

  /**
   * Grows the disk to `newSize` bytes (the backend must implement `resize`), updates
   * `capacity` and raises a configuration change notification (5.2.6.2: "The device MAY
   * change the content of the capacity field during operation of the device. When this
   * happens, the device SHOULD trigger a configuration change notification."). Throws
   * {@link UsageError} when the backend cannot resize or the size is not a multiple of
   * 512 at least the current size.
   */
  async resize(newSize: number): Promise<void> {
    const backend = this.engine.backend;
    if (!backend.resize) throw new UsageError('RESIZE_UNSUPPORTED', 'this backend cannot be resized');
    if (!Number.isSafeInteger(newSize) || newSize % VIRTIO_BLK_SECTOR_SIZE !== 0 || newSize < backend.size) {
      throw new UsageError('BAD_SIZE', `cannot resize a ${backend.size}-byte disk to ${newSize} bytes: the new size must be a multiple of 512, no smaller`);
    }
    await backend.resize(newSize);
    this.backendResized();
  }

  /**
   * Takes up the backend's size after someone else grew it — another device serving the
   * same backend (one disk on several vhost-user sockets) — and raises a configuration
   * change notification, as {@link resize} does.
   */
  backendResized(): void {
    this.engine.capacitySectors = this.engine.capacityOf(this.engine.backend.size);
    setU64(this.configView, CFG.capacity.offset, this.engine.capacitySectors);
    this.host.configChanged();
  }

  private checkIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.numQueues) {
      throw new UsageError('BAD_QUEUE', `queue ${index} does not exist (the device has ${this.numQueues})`);
    }
  }
}

/** The status of a request whose backend operation failed with `error`. */
function failureStatus(error: unknown): number {
  return error instanceof BackendError && error.code === 'UNSUPPORTED' ? S_UNSUPP : S_IOERR;
}

function rangeLimits(name: string, given: false | BlkRangeLimits | undefined, sectorsPerBlock: number): RangeLimits {
  const g = given || {};
  const maxSectors = g.maxSectors ?? DEFAULT_MAX_RANGE_SECTORS - (DEFAULT_MAX_RANGE_SECTORS % sectorsPerBlock);
  const maxSegments = g.maxSegments ?? MAX_RANGE_SEGMENTS;
  checkInt(`${name}.maxSectors`, maxSectors, sectorsPerBlock, U32_MAX);
  if (maxSectors % sectorsPerBlock !== 0) bad(`${name}.maxSectors ${maxSectors} is not a whole number of logical blocks`);
  checkInt(`${name}.maxSegments`, maxSegments, 1, MAX_RANGE_SEGMENTS);
  return { maxSectors, maxSegments };
}

/** The GET_ID answer: the serial NUL-padded to 20 bytes (no terminator at 20). */
function encodeSerial(serial: string): Uint8Array {
  if (serial.length > VIRTIO_BLK_ID_BYTES) bad(`serial "${serial}" is longer than ${VIRTIO_BLK_ID_BYTES} bytes`);
  const id = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  for (let i = 0; i < serial.length; i++) {
    const c = serial.charCodeAt(i);
    if (c < ASCII_FIRST_PRINTABLE || c > ASCII_LAST_PRINTABLE) bad(`serial "${serial}" is not printable ASCII`);
    id[i] = c;
  }
  return id;
}

function checkInt(name: string, value: number, min: number, max: number): void {
  if (!Number.isInteger(value) || value < min || value > max) bad(`${name} ${value} is not an integer from ${min} to ${max}`);
}

function bad(message: string): never {
  throw new UsageError('BAD_OPTION', message);
}
