/**
 * The error injection filter: fails the operations a test chooses, with the status the
 * guest should see, and passes every other one through untouched.
 *
 * An operation fails when all the triggers given hold (none given: every chosen
 * operation fails):
 * - its kind is one of `ops` (default: all);
 * - it touches one of the `sectors` ranges (a flush touches none, so it never fails
 *   under `sectors`);
 * - it is the `nth` operation (from 1) that passed the two checks above;
 * - a draw from a seeded generator falls below `rate`.
 *
 * A virtio-blk request succeeds or fails whole, so a request that covers a chosen sector
 * and others fails whole: a guest that reads sector by sector sees errors on exactly
 * the chosen sectors. The failure is a {@link BackendError}: `IO_ERROR`, which the device
 * completes with VIRTIO_BLK_S_IOERR, or `UNSUPPORTED`, completed with
 * VIRTIO_BLK_S_UNSUPP.
 */
import { BackendError, totalLength, type BackendResult, type BlockBackend } from '../backend.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../../spec/virtio-blk.js';
import { FilterBackend } from './filter.js';
import { FILTER_OPS, type FilterOp, type SectorSpan } from './options.js';

/** What the guest sees for an injected failure. */
export type InjectedStatus = 'ioerr' | 'unsupp';

/** Which operations fail; see the module comment for how the triggers combine. */
export interface ErrorOptions {
  /** Kinds of operation that may fail. Default all. */
  readonly ops?: readonly FilterOp[];
  /** Fail only operations touching one of these sector ranges. */
  readonly sectors?: readonly SectorSpan[];
  /** Fail only the nth qualifying operation, counted from 1. */
  readonly nth?: number;
  /** Fail this fraction (0 … 1) of qualifying operations, drawn from a generator seeded with `seed`. */
  readonly rate?: number;
  /** Seed of the draws (any integer); default 1, so a run is repeatable. */
  readonly seed?: number;
  /** Default `ioerr`. */
  readonly status?: InjectedStatus;
}

/** 2^32: turns a 32-bit draw into a fraction of 1. */
const U32_RANGE = 2 ** 32;

/** Fails chosen operations with a chosen status; see the module comment. */
export class ErrorFilter extends FilterBackend {
  private readonly ops: ReadonlySet<FilterOp>;
  /** Ranges as byte offsets, [start, end) pairs, for a test without division per operation. */
  private readonly byteRanges: Float64Array | null;
  private readonly nth: number;
  private readonly rate: number;
  private readonly code: 'IO_ERROR' | 'UNSUPPORTED';
  /** Qualifying operations seen so far (for `nth`). */
  private seen = 0;
  /** xorshift32 state. */
  private state: number;

  /** Throws `RangeError` for options out of range. */
  constructor(inner: BlockBackend, options: ErrorOptions = {}) {
    super(inner);
    for (const op of options.ops ?? []) if (!FILTER_OPS.includes(op)) throw new RangeError(`no operation is called ${op}`);
    this.ops = new Set(options.ops ?? FILTER_OPS);
    const spans = options.sectors;
    if (spans !== undefined) {
      const ranges = new Float64Array(spans.length * 2);
      spans.forEach((s, i) => {
        if (!Number.isSafeInteger(s.first) || !Number.isSafeInteger(s.last) || s.first < 0 || s.last < s.first) {
          throw new RangeError(`sector range ${s.first}-${s.last} is not a range of sectors`);
        }
        // Byte offsets past 2^53 lose precision, but only for sectors no disk has: the
        // device refuses requests beyond the capacity before they get here.
        ranges[2 * i] = s.first * VIRTIO_BLK_SECTOR_SIZE;
        ranges[2 * i + 1] = (s.last + 1) * VIRTIO_BLK_SECTOR_SIZE;
      });
      this.byteRanges = ranges;
    } else this.byteRanges = null;
    this.nth = options.nth ?? 0;
    if (!Number.isSafeInteger(this.nth) || this.nth < 0) throw new RangeError(`nth ${options.nth} is not a count`);
    this.rate = options.rate ?? 1;
    if (!(this.rate >= 0 && this.rate <= 1)) throw new RangeError(`rate ${options.rate} is not a fraction from 0 to 1`);
    this.state = (options.seed ?? 1) >>> 0 || 1;
    this.code = (options.status ?? 'ioerr') === 'unsupp' ? 'UNSUPPORTED' : 'IO_ERROR';
  }

  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    this.check('read', offset, totalLength(buffers));
    return this.inner.read(offset, buffers);
  }

  override write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
    this.check('write', offset, totalLength(buffers));
    return this.inner.write(offset, buffers, fua);
  }

  override flush(): BackendResult {
    this.check('flush', 0, 0);
    return this.inner.flush();
  }

  override discard(offset: number, length: number): BackendResult {
    this.check('discard', offset, length);
    return this.inner.discard(offset, length);
  }

  override writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    this.check('zero', offset, length);
    return this.inner.writeZeroes(offset, length, unmap);
  }

  /** Throws the injected error when the operation is chosen. */
  private check(op: FilterOp, offset: number, length: number): void {
    if (!this.ops.has(op)) return;
    const ranges = this.byteRanges;
    if (ranges !== null && !touches(ranges, offset, length)) return;
    if (this.nth > 0 && ++this.seen !== this.nth) return;
    if (this.rate < 1 && this.draw() >= this.rate) return;
    const what = op === 'flush' ? 'flush' : `${op} of ${length} bytes at ${offset}`;
    throw new BackendError(this.code, `injected error: ${what}`);
  }

  /** The next draw, a fraction in [0, 1): xorshift32 (Marsaglia), cheap and repeatable. */
  private draw(): number {
    let x = this.state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.state = x >>> 0;
    return this.state / U32_RANGE;
  }
}

/** Whether `[offset, offset + length)` overlaps one of the [start, end) pairs; an empty range touches nothing. */
function touches(ranges: Float64Array, offset: number, length: number): boolean {
  if (length === 0) return false;
  const end = offset + length;
  for (let i = 0; i < ranges.length; i += 2) {
    if (offset < ranges[i + 1] && end > ranges[i]) return true;
  }
  return false;
}
