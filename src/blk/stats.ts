/**
 * Request statistics of a {@link BlkDevice}, per queue: completed requests by type and
 * status, data bytes, and how long each request took from being taken off the ring to
 * its used entry being published. Plain numbers in typed arrays, counted on the data
 * path at the cost of a few stores per request and one clock read per batch; readers
 * (a metrics endpoint, `vblk stats`) copy them when asked and never hold the data path.
 */
import { VIRTIO_BLK_T } from '../spec/virtio-blk.js';

/** Request types as counted, in counter order. */
export const STAT_TYPES = ['read', 'write', 'flush', 'discard', 'write_zeroes', 'secure_erase', 'get_id', 'unsupported'] as const;
export type StatType = (typeof STAT_TYPES)[number];
/** Completion statuses as counted, in counter order: VIRTIO_BLK_S_OK, _IOERR, _UNSUPP. */
export const STAT_STATUSES = ['ok', 'ioerr', 'unsupp'] as const;
export type StatStatus = (typeof STAT_STATUSES)[number];

/** Powers of two of microseconds the latency histogram's bounds reach: 2^24 µs is 16.8 s. */
const LAST_BUCKET_LOG2 = 24;
/**
 * Upper bounds of the latency histogram's buckets, in seconds (the last bucket, +Inf, is
 * implied): powers of two from 1 µs to 16.8 s. Powers of two, because a request's bucket
 * is then one `Math.clz32` of its whole microseconds instead of a search of the bounds:
 * the data path pays a few instructions per request for its histogram.
 */
export const LATENCY_BUCKETS: readonly number[] = Array.from({ length: LAST_BUCKET_LOG2 + 1 }, (_, b) => 2 ** b / 1e6);

const UNSUPPORTED = STAT_TYPES.indexOf('unsupported');
/** VIRTIO_BLK_T_* → counter index; every other type value counts as unsupported. */
const TYPE_INDEX = new Uint8Array(16).fill(UNSUPPORTED);
TYPE_INDEX[VIRTIO_BLK_T.IN] = STAT_TYPES.indexOf('read');
TYPE_INDEX[VIRTIO_BLK_T.OUT] = STAT_TYPES.indexOf('write');
TYPE_INDEX[VIRTIO_BLK_T.FLUSH] = STAT_TYPES.indexOf('flush');
TYPE_INDEX[VIRTIO_BLK_T.DISCARD] = STAT_TYPES.indexOf('discard');
TYPE_INDEX[VIRTIO_BLK_T.WRITE_ZEROES] = STAT_TYPES.indexOf('write_zeroes');
TYPE_INDEX[VIRTIO_BLK_T.SECURE_ERASE] = STAT_TYPES.indexOf('secure_erase');
TYPE_INDEX[VIRTIO_BLK_T.GET_ID] = STAT_TYPES.indexOf('get_id');

/** A copy of one queue's statistics at one moment. */
export interface QueueStatsSnapshot {
  /** Completed requests, `[type][status]` flattened: `requests[t * STAT_STATUSES.length + s]`. */
  readonly requests: readonly number[];
  /** Data bytes of successful reads. */
  readonly bytesRead: number;
  /** Data bytes of successful writes. */
  readonly bytesWritten: number;
  /** Requests per latency bucket (not cumulative), the last one past every bound. */
  readonly latencyBuckets: readonly number[];
  /** Sum of the latencies counted, in seconds. */
  readonly latencySum: number;
  /** Requests taken and not yet completed. */
  readonly inFlight: number;
}

/** One queue's statistics; they outlive the queue's restarts (counters only grow). */
export class QueueStats {
  private readonly requests = new Float64Array(STAT_TYPES.length * STAT_STATUSES.length);
  private bytesRead = 0;
  private bytesWritten = 0;
  private readonly buckets = new Float64Array(LATENCY_BUCKETS.length + 1);
  private latencySum = 0;
  /**
   * Completions not yet published, as runs of one start time (ms) and how many share it:
   * requests taken in one drain share their start, so a batch is usually one run, and a
   * request costs a compare and an increment here instead of a store and, when published,
   * a bucket search of its own.
   */
  private runStarts = new Float64Array(16);
  private readonly runCounts: number[] = [];
  private runCount = 0;
  /** The queue's current in-flight count, read when a snapshot is taken. */
  inFlight: () => number = () => 0;

  constructor(
    /** The clock requests are timed with, in milliseconds: the device's `statsClock`. */
    readonly now: () => number,
  ) {}

  /** A request completed with `status` (VIRTIO_BLK_S_*); `takenAt` from {@link now}. */
  completed(type: number, status: number, dataBytes: number, takenAt: number): void {
    const t = type < 16 ? TYPE_INDEX[type] : UNSUPPORTED;
    const s = status < STAT_STATUSES.length ? status : 1;
    this.requests[t * STAT_STATUSES.length + s]++;
    if (s === 0) {
      if (t === 0) this.bytesRead += dataBytes;
      else if (t === 1) this.bytesWritten += dataBytes;
    }
    const last = this.runCount - 1;
    if (last >= 0 && this.runStarts[last] === takenAt) {
      this.runCounts[last]++;
      return;
    }
    if (this.runCount === this.runStarts.length) {
      const grown = new Float64Array(this.runStarts.length * 2);
      grown.set(this.runStarts);
      this.runStarts = grown;
    }
    this.runStarts[this.runCount] = takenAt;
    this.runCounts[this.runCount++] = 1;
  }

  /** The used entries of every completion so far were published at `now`, a reading of the statistics' clock. */
  published(now: number): void {
    const n = this.runCount;
    if (n === 0) return;
    let sumMs = 0;
    for (let i = 0; i < n; i++) {
      const ms = now - this.runStarts[i];
      const count = this.runCounts[i];
      sumMs += ms * count;
      // Whole microseconds u lie in [2^(b-1), 2^b) for b = 32 - clz32(u): at most 2^b µs,
      // bucket b (u = 0, under 1 µs, is bucket 0). Capped below 2^31 µs so `| 0` cannot wrap.
      const b = 32 - Math.clz32(Math.min(ms * 1000, 0x7fff_ffff) | 0);
      this.buckets[b <= LAST_BUCKET_LOG2 ? b : LAST_BUCKET_LOG2 + 1] += count;
    }
    this.latencySum += sumMs / 1000;
    this.runCount = 0;
  }

  /** A copy of the counters as they are now; taking one never holds the data path. */
  snapshot(): QueueStatsSnapshot {
    return {
      requests: Array.from(this.requests),
      bytesRead: this.bytesRead,
      bytesWritten: this.bytesWritten,
      latencyBuckets: Array.from(this.buckets),
      latencySum: this.latencySum,
      inFlight: this.inFlight(),
    };
  }
}

/** Requests of `type` (any status, or one) in a snapshot. */
export function requestCount(s: QueueStatsSnapshot, type: StatType, status?: StatStatus): number {
  const t = STAT_TYPES.indexOf(type);
  const row = s.requests.slice(t * STAT_STATUSES.length, (t + 1) * STAT_STATUSES.length);
  return status === undefined ? row.reduce((a, b) => a + b, 0) : row[STAT_STATUSES.indexOf(status)];
}
