/**
 * The delay filter: holds each operation for a fixed time before passing it on — a slow
 * disk or a distant server, on demand, for tests of timeouts, queue depth and
 * back-pressure. Each kind of operation has its own delay; 0 passes it straight through
 * (synchronously, when the layer below is).
 */
import type { BackendResult, BlockBackend } from '../backend.js';
import { FilterBackend, systemClock, type FilterClock } from './filter.js';
import type { FilterOp } from './options.js';

/** Milliseconds per kind of operation; absent means no delay. */
export type DelayOptions = { readonly [op in FilterOp]?: number };

/** Delays each operation by a fixed time per kind, then runs it. */
export class DelayFilter extends FilterBackend {
  private readonly ms: { readonly [op in FilterOp]: number };

  /**
   * Throws `RangeError` for a delay that is not a finite number of milliseconds from 0.
   * @param clock Whose timers to wait on; the system's by default (tests pass their own).
   */
  constructor(inner: BlockBackend, delays: DelayOptions, private readonly clock: FilterClock = systemClock) {
    super(inner);
    const ms = (op: FilterOp): number => {
      const d = delays[op] ?? 0;
      if (!Number.isFinite(d) || d < 0) throw new RangeError(`delay of ${op}: ${d} is not a number of milliseconds from 0`);
      return d;
    };
    this.ms = { read: ms('read'), write: ms('write'), flush: ms('flush'), discard: ms('discard'), zero: ms('zero') };
  }

  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    const ms = this.ms.read;
    // The buffers stay the device's until this operation completes, so they are still
    // valid when the timer fires.
    return ms === 0 ? this.inner.read(offset, buffers) : this.after(ms, () => this.inner.read(offset, buffers));
  }

  override write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
    const ms = this.ms.write;
    return ms === 0 ? this.inner.write(offset, buffers, fua) : this.after(ms, () => this.inner.write(offset, buffers, fua));
  }

  override flush(): BackendResult {
    const ms = this.ms.flush;
    return ms === 0 ? this.inner.flush() : this.after(ms, () => this.inner.flush());
  }

  override discard(offset: number, length: number): BackendResult {
    const ms = this.ms.discard;
    return ms === 0 ? this.inner.discard(offset, length) : this.after(ms, () => this.inner.discard(offset, length));
  }

  override writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    const ms = this.ms.zero;
    return ms === 0 ? this.inner.writeZeroes(offset, length, unmap) : this.after(ms, () => this.inner.writeZeroes(offset, length, unmap));
  }

  /** Runs `op` in `ms` milliseconds; settles as it does. */
  private after(ms: number, op: () => BackendResult): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.clock.setTimer(() => {
        try {
          const r = op();
          if (r === undefined) resolve();
          else r.then(resolve, reject);
        } catch (e) {
          reject(e);
        }
      }, ms);
    });
  }
}
