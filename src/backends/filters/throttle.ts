/**
 * The throttle filter: limits operations per second and bytes per second, as QEMU's
 * throttle groups do, with token buckets. Each limit is a bucket that fills at its rate
 * up to its burst; an operation takes one token from each operation bucket that applies
 * to it and its byte count from each byte bucket, and waits until they hold that much.
 *
 * - `iops` and `bps` count reads and writes together; `read-*` and `write-*` one
 *   direction. Discard and write-zeroes count as writes, with their length as bytes (as
 *   QEMU counts them); flushes are never throttled.
 * - A bucket holds `burst` seconds of its rate (default a tenth of a second, at least
 *   {@link MIN_BURST_MS} so a late timer still lets the full rate through). An operation
 *   larger than a whole bucket goes once the bucket is full, and leaves it in debt: over
 *   any span of time, what passes stays within rate × span + burst.
 * - Waiting operations queue in arrival order, one queue for all of them: an operation
 *   never overtakes one that came before, so none can starve behind a stream of smaller
 *   ones. (A read may thus wait behind a write held by a write limit.) An operation that
 *   no limit applies to does not queue.
 * - One timer at most, set for when the first waiting operation can go; no polling.
 *
 * Below its limits the filter passes operations straight through, synchronously when
 * the layer below is, for the price of a few comparisons.
 */
import { BackendError, totalLength, type BackendResult, type BlockBackend } from '../backend.js';
import { Fifo } from '../fifo.js';
import { FilterBackend, systemClock, type FilterClock } from './filter.js';

/** Limits, per second; absent or 0: no limit. */
export interface ThrottleOptions {
  /** Operations per second, reads and writes together. */
  readonly iops?: number;
  /** Read operations per second. */
  readonly readIops?: number;
  /** Write operations per second, discards and write-zeroes included. */
  readonly writeIops?: number;
  /** Bytes per second, reads and writes together. */
  readonly bps?: number;
  /** Bytes read per second. */
  readonly readBps?: number;
  /** Bytes written per second, discarded and zeroed bytes included. */
  readonly writeBps?: number;
  /** Seconds of each rate a bucket holds: the burst allowed after a quiet spell. Default 0.1. */
  readonly burst?: number;
}

const DEFAULT_BURST_S = 0.1;
/**
 * The smallest bucket, in milliseconds of its rate: timers fire late (by a millisecond
 * and more on a busy loop), and a bucket must hold what accrues meanwhile or the rate
 * would sag below the limit.
 */
export const MIN_BURST_MS = 20;
const MS_PER_S = 1000;
/** Token shortfalls below this are rounding, not a reason to wait another timer. */
const TOKEN_EPSILON = 1e-6;

/** One limit: tokens accrue at `perMs` up to `capacity`. */
class Bucket {
  private tokens: number;
  private last: number;

  constructor(
    private readonly perMs: number,
    private readonly capacity: number,
    /** Costs bytes rather than one token per operation. */
    readonly perByte: boolean,
    now: number,
  ) {
    this.tokens = capacity;
    this.last = now;
  }

  /** Milliseconds until an operation of `bytes` may take from this bucket; 0 if now. */
  wait(bytes: number, now: number): number {
    if (now > this.last) {
      this.tokens = Math.min(this.capacity, this.tokens + (now - this.last) * this.perMs);
      this.last = now;
    }
    // More than a full bucket goes once the bucket is full (see the module comment).
    const need = Math.min(this.perByte ? bytes : 1, this.capacity);
    const short = need - this.tokens;
    return short <= TOKEN_EPSILON ? 0 : short / this.perMs;
  }

  take(bytes: number): void {
    this.tokens -= this.perByte ? bytes : 1;
  }
}

/** An operation waiting for tokens. */
interface Waiting {
  readonly limits: readonly Bucket[];
  readonly bytes: number;
  readonly run: () => BackendResult;
  readonly resolve: () => void;
  readonly reject: (e: unknown) => void;
}

/** Limits operations and bytes per second; see the module comment. */
export class ThrottleFilter extends FilterBackend {
  private readonly readLimits: Bucket[] = [];
  private readonly writeLimits: Bucket[] = [];
  private readonly waiting = new Fifo<Waiting>();
  private timer: unknown = null;
  private closed = false;
  private readonly onTimer = (): void => {
    this.timer = null;
    this.release();
  };

  /**
   * Throws `RangeError` for a limit or burst that is not a finite number from 0.
   * @param clock Time and timers; the system's by default (tests pass their own).
   */
  constructor(inner: BlockBackend, options: ThrottleOptions, private readonly clock: FilterClock = systemClock) {
    super(inner);
    const burst = options.burst ?? DEFAULT_BURST_S;
    if (!Number.isFinite(burst) || burst < 0) throw new RangeError(`burst ${burst} is not a number of seconds from 0`);
    const now = clock.now();
    const add = (perSecond: number | undefined, perByte: boolean, ...lists: Bucket[][]): void => {
      if (perSecond === undefined || perSecond === 0) return;
      if (!Number.isFinite(perSecond) || perSecond < 0) throw new RangeError(`limit ${perSecond} is not a rate from 0`);
      const perMs = perSecond / MS_PER_S;
      const capacity = Math.max(1, perSecond * burst, perMs * MIN_BURST_MS);
      const bucket = new Bucket(perMs, capacity, perByte, now);
      for (const list of lists) list.push(bucket);
    };
    add(options.iops, false, this.readLimits, this.writeLimits);
    add(options.readIops, false, this.readLimits);
    add(options.writeIops, false, this.writeLimits);
    add(options.bps, true, this.readLimits, this.writeLimits);
    add(options.readBps, true, this.readLimits);
    add(options.writeBps, true, this.writeLimits);
  }

  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    const bytes = totalLength(buffers);
    if (this.admit(this.readLimits, bytes)) return this.inner.read(offset, buffers);
    return this.enqueue(this.readLimits, bytes, () => this.inner.read(offset, buffers));
  }

  override write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
    const bytes = totalLength(buffers);
    if (this.admit(this.writeLimits, bytes)) return this.inner.write(offset, buffers, fua);
    return this.enqueue(this.writeLimits, bytes, () => this.inner.write(offset, buffers, fua));
  }

  override discard(offset: number, length: number): BackendResult {
    if (this.admit(this.writeLimits, length)) return this.inner.discard(offset, length);
    return this.enqueue(this.writeLimits, length, () => this.inner.discard(offset, length));
  }

  override writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    if (this.admit(this.writeLimits, length)) return this.inner.writeZeroes(offset, length, unmap);
    return this.enqueue(this.writeLimits, length, () => this.inner.writeZeroes(offset, length, unmap));
  }

  /** Fails what waits with `CLOSED`, then closes the layer below. */
  override close(): BackendResult {
    this.closed = true;
    if (this.timer !== null) this.clock.clearTimer(this.timer);
    this.timer = null;
    const error = new BackendError('CLOSED', 'the throttle filter is closed');
    while (!this.waiting.isEmpty) this.waiting.shift().reject(error);
    return this.inner.close();
  }

  /**
   * Takes the tokens for an operation that arrives now, when nothing waits before it
   * and every bucket holds enough; else leaves them.
   */
  private admit(limits: readonly Bucket[], bytes: number): boolean {
    if (limits.length === 0) return true;
    if (!this.waiting.isEmpty || this.closed) return false;
    return this.waitFor(limits, bytes, this.clock.now()) === 0;
  }

  /** Milliseconds until every bucket of `limits` can pay for `bytes`; when 0, it has paid. */
  private waitFor(limits: readonly Bucket[], bytes: number, now: number): number {
    let wait = 0;
    for (let i = 0; i < limits.length; i++) wait = Math.max(wait, limits[i].wait(bytes, now));
    if (wait === 0) for (let i = 0; i < limits.length; i++) limits[i].take(bytes);
    return wait;
  }

  private enqueue(limits: readonly Bucket[], bytes: number, run: () => BackendResult): Promise<void> {
    if (this.closed) return Promise.reject(new BackendError('CLOSED', 'the throttle filter is closed'));
    return new Promise<void>((resolve, reject) => {
      this.waiting.push({ limits, bytes, run, resolve, reject });
      if (this.timer === null) this.release();
    });
  }

  /** Starts waiting operations, in order, while their tokens are there; then sets the timer for the next. */
  private release(): void {
    const waiting = this.waiting;
    const now = this.clock.now();
    while (!waiting.isEmpty) {
      const w = waiting.peek();
      const wait = this.waitFor(w.limits, w.bytes, now);
      if (wait > 0) {
        this.timer = this.clock.setTimer(this.onTimer, wait);
        return;
      }
      waiting.shift();
      try {
        const r = w.run();
        if (r === undefined) w.resolve();
        else r.then(w.resolve, w.reject);
      } catch (e) {
        w.reject(e);
      }
    }
  }
}
