/**
 * The device's side of a `serial` backend (nbdkit's SERIALIZE_REQUESTS, enforced by the
 * server rather than trusted to the plugin): one operation in flight at a time, the
 * others queued in the order they came.
 */
import type { BackendConcurrency, BackendResult, BlockBackend, Extent } from './backend.js';
import { Fifo } from './fifo.js';
import { FilterBackend } from './filters/filter.js';

/** An operation waiting for its turn. */
interface Waiting {
  readonly run: () => BackendResult;
  readonly resolve: () => void;
  readonly reject: (e: unknown) => void;
}

/**
 * Wraps a backend so that its operations never overlap: takes any number at once and
 * starts each only when the one before has finished. While the backend completes
 * synchronously nothing is ever queued and a call costs a flag test; an asynchronous
 * operation costs one derived promise, and each queued one a closure and a promise —
 * a price only `serial` backends pay, as the device wraps only those.
 *
 * Every operation goes through the queue, `resize`, `extents` and `close` included (a
 * close waits for what is in flight); `open` does not, as nothing runs before it.
 */
export class SerialBackend extends FilterBackend {
  private busy = false;
  private readonly waiting = new Fifo<Waiting>();
  private readonly release = (): void => this.startNext();

  constructor(inner: BlockBackend) {
    super(inner);
    const { resize, extents } = inner;
    if (resize) this.resize = (newSize) => this.gate(() => resize.call(inner, newSize));
    if (extents) {
      this.extents = (offset, length) => this.gateExtents(() => extents.call(inner, offset, length));
    }
  }

  /** Overlapping calls are safe through the gate. */
  override get concurrency(): BackendConcurrency {
    return 'parallel';
  }

  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    if (this.busy) return this.enqueue(() => this.inner.read(offset, buffers));
    return this.started(this.inner.read(offset, buffers));
  }

  override write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
    if (this.busy) return this.enqueue(() => this.inner.write(offset, buffers, fua));
    return this.started(this.inner.write(offset, buffers, fua));
  }

  override flush(): BackendResult {
    return this.gate(() => this.inner.flush());
  }

  override discard(offset: number, length: number): BackendResult {
    return this.gate(() => this.inner.discard(offset, length));
  }

  override writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    return this.gate(() => this.inner.writeZeroes(offset, length, unmap));
  }

  override close(): BackendResult {
    return this.gate(() => this.inner.close());
  }

  /** Runs `op` now if nothing is in flight, else after what is queued. */
  private gate(op: () => BackendResult): BackendResult {
    if (this.busy) return this.enqueue(op);
    return this.started(op());
  }

  /** {@link gate} for `extents`, whose result is a value rather than nothing. */
  private gateExtents(op: () => Extent[] | Promise<Extent[]>): Extent[] | Promise<Extent[]> {
    if (!this.busy) {
      const r = op();
      if (!(r instanceof Promise)) return r;
      this.busy = true;
      return r.finally(this.release);
    }
    let result: Extent[] = [];
    return this.enqueue(() => {
      const r = op();
      if (!(r instanceof Promise)) {
        result = r;
        return;
      }
      return r.then((v) => {
        result = v;
      });
    }).then(() => result);
  }

  /**
   * An operation started while idle: a synchronous one (returned or thrown) leaves the
   * gate open; an asynchronous one closes it until it settles.
   */
  private started(r: BackendResult): BackendResult {
    if (r === undefined) return;
    this.busy = true;
    return r.finally(this.release);
  }

  private enqueue(run: () => BackendResult): Promise<void> {
    return new Promise<void>((resolve, reject) => this.waiting.push({ run, resolve, reject }));
  }

  /** The operation in flight has settled: start queued ones until one goes asynchronous. */
  private startNext(): void {
    const waiting = this.waiting;
    while (!waiting.isEmpty) {
      const w = waiting.shift();
      let r: BackendResult;
      try {
        r = w.run();
      } catch (e) {
        w.reject(e);
        continue;
      }
      if (r === undefined) {
        w.resolve();
        continue;
      }
      r.then(w.resolve, w.reject).finally(this.release);
      return;
    }
    this.busy = false;
  }
}
