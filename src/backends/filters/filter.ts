/**
 * What every filter shares (nbdkit's filter shape): a filter is a {@link BlockBackend}
 * wrapping another, calling the next layer for what it does not change. The base class
 * forwards everything, capabilities included, so that a filter states only what it
 * changes and a capability added to the interface later is forwarded by all of them.
 *
 * A filter owns what it wraps: closing the filter closes it.
 */
import type {
  BackendConcurrency, BackendResult, BlockBackend, BlockSizeHints, Extent,
} from '../backend.js';

/**
 * Time for the filters that wait (delay, throttle), injectable so that tests run on a
 * clock they move by hand instead of on the machine's speed.
 */
export interface FilterClock {
  /** Milliseconds from an arbitrary origin; never decreases. */
  now(): number;
  /** Runs `task` once, `ms` milliseconds from now (at the earliest); returns a handle for {@link clearTimer}. */
  setTimer(task: () => void, ms: number): unknown;
  /** Cancels a timer that has not run yet. */
  clearTimer(handle: unknown): void;
}

/** The clock of the platform: `performance.now()` and the global timers (Node and browsers alike). */
export const systemClock: FilterClock = {
  now: () => performance.now(),
  setTimer: (task, ms) => setTimeout(task, ms),
  clearTimer: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/**
 * A backend that forwards every member to `inner`. Subclasses override what they
 * change. Capabilities are getters, read from `inner` when asked: a backend with
 * `open` may learn them only once opened.
 *
 * The optional operations (`resize`, `open`, `extents`) exist on a filter exactly when
 * they exist on `inner`, so the device sees the same capabilities through a filter as
 * without it; a subclass that changes one assigns or clears it in its constructor.
 */
export abstract class FilterBackend implements BlockBackend {
  /** Present when `inner` can resize; see {@link BlockBackend.resize}. */
  resize?: (newSize: number) => BackendResult;
  /** Present when `inner` has an open step; see {@link BlockBackend.open}. */
  open?: () => BackendResult;
  /** Present when `inner` reports allocation; see {@link BlockBackend.extents}. */
  extents?: (offset: number, length: number) => Extent[] | Promise<Extent[]>;

  /** @param inner The backend this filter wraps (and owns). */
  constructor(readonly inner: BlockBackend) {
    const { resize, open, extents } = inner;
    if (resize) this.resize = (newSize) => resize.call(inner, newSize);
    if (open) this.open = () => open.call(inner);
    if (extents) this.extents = (offset, length) => extents.call(inner, offset, length);
  }

  get size(): number {
    return this.inner.size;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  get canFlush(): boolean {
    return this.inner.canFlush;
  }

  get canDiscard(): boolean {
    return this.inner.canDiscard;
  }

  get canWriteZeroes(): boolean {
    return this.inner.canWriteZeroes;
  }

  /** Forwarded with the `fua` of {@link write}, so a filter keeps an NBD source's single durable writes. */
  get canFua(): boolean {
    return this.inner.canFua === true;
  }

  get blockSize(): BlockSizeHints | undefined {
    return this.inner.blockSize;
  }

  get concurrency(): BackendConcurrency | undefined {
    return this.inner.concurrency;
  }

  read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.inner.read(offset, buffers);
  }

  write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
    return this.inner.write(offset, buffers, fua);
  }

  flush(): BackendResult {
    return this.inner.flush();
  }

  discard(offset: number, length: number): BackendResult {
    return this.inner.discard(offset, length);
  }

  writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    return this.inner.writeZeroes(offset, length, unmap);
  }

  close(): BackendResult {
    return this.inner.close();
  }
}
