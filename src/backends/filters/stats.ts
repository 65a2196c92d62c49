/**
 * The statistics filter: counts what passes through it — operations, bytes and failures
 * per kind of operation — and hands out a snapshot. Placed at the top of a stack it sees
 * what the guest asked for; below another filter (a cache, say), what reached the layer
 * beneath.
 */
import { totalLength, type BackendResult, type BlockBackend } from '../backend.js';
import { FilterBackend } from './filter.js';
import type { FilterOp } from './options.js';

/** The counters of one kind of operation. */
export interface OpCounts {
  /** Operations issued (failed ones included). */
  readonly ops: number;
  /** Bytes they covered: read or written, or discarded / zeroed; 0 for flushes. */
  readonly bytes: number;
  /** Operations that failed (thrown or rejected). */
  readonly errors: number;
}

/** Counters per kind of operation, at one moment. */
export type StatsSnapshot = { readonly [op in FilterOp]: OpCounts };

/** The live counters of one kind of operation. */
class Counter implements OpCounts {
  ops = 0;
  bytes = 0;
  errors = 0;
  /** Counts a failure and passes it on (rethrows); bound once, so no closure per operation. */
  readonly failed = (e: unknown): never => {
    this.errors++;
    throw e;
  };

  /** Counts one operation of `bytes`, before it starts. */
  begin(bytes: number): void {
    this.ops++;
    this.bytes += bytes;
  }

  /** Counts a rejection of the operation's result when it comes; a synchronous result passes as it is. */
  settle(r: BackendResult): BackendResult {
    return r === undefined ? r : r.then(undefined, this.failed);
  }

  snapshot(): OpCounts {
    return { ops: this.ops, bytes: this.bytes, errors: this.errors };
  }
}

/**
 * Counts operations, bytes and errors per kind of operation. A synchronous operation
 * stays synchronous; an asynchronous one costs one derived promise (to count a
 * rejection).
 */
export class StatsFilter extends FilterBackend {
  private readonly counters: { readonly [op in FilterOp]: Counter } = {
    read: new Counter(), write: new Counter(), flush: new Counter(), discard: new Counter(), zero: new Counter(),
  };

  /** Wraps `inner`; every counter starts at 0. */
  constructor(inner: BlockBackend) {
    super(inner);
  }

  /** The counters now: a copy, which later operations leave as it is. */
  snapshot(): StatsSnapshot {
    const c = this.counters;
    return {
      read: c.read.snapshot(), write: c.write.snapshot(), flush: c.flush.snapshot(),
      discard: c.discard.snapshot(), zero: c.zero.snapshot(),
    };
  }

  // Each operation is spelled out rather than passed as a closure: no allocation per
  // request on a synchronous backend.
  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    const c = this.counters.read;
    c.begin(totalLength(buffers));
    try {
      return c.settle(this.inner.read(offset, buffers));
    } catch (e) {
      return c.failed(e);
    }
  }

  override write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
    const c = this.counters.write;
    c.begin(totalLength(buffers));
    try {
      return c.settle(this.inner.write(offset, buffers, fua));
    } catch (e) {
      return c.failed(e);
    }
  }

  override flush(): BackendResult {
    const c = this.counters.flush;
    c.begin(0);
    try {
      return c.settle(this.inner.flush());
    } catch (e) {
      return c.failed(e);
    }
  }

  override discard(offset: number, length: number): BackendResult {
    const c = this.counters.discard;
    c.begin(length);
    try {
      return c.settle(this.inner.discard(offset, length));
    } catch (e) {
      return c.failed(e);
    }
  }

  override writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    const c = this.counters.zero;
    c.begin(length);
    try {
      return c.settle(this.inner.writeZeroes(offset, length, unmap));
    } catch (e) {
      return c.failed(e);
    }
  }
}
