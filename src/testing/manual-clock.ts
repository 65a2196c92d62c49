/**
 * A {@link FilterClock} that moves only when a test moves it: timers run in due order,
 * each at its due time, inside {@link ManualClock.advance}. Tests of the delay and
 * throttle filters (and of anything else that takes a clock) then depend on the order
 * of events, never on how fast the machine is.
 */
import type { FilterClock } from '../backends/filters/filter.js';

interface Timer {
  readonly due: number;
  /** Order of creation: timers due together run in the order they were set. */
  readonly seq: number;
  readonly task: () => void;
}

/** A clock for tests; starts at 0 ms. */
export class ManualClock implements FilterClock {
  private time = 0;
  private seq = 0;
  private timers: Timer[] = [];

  now(): number {
    return this.time;
  }

  setTimer(task: () => void, ms: number): unknown {
    const timer: Timer = { due: this.time + Math.max(0, ms), seq: this.seq++, task };
    this.timers.push(timer);
    return timer;
  }

  clearTimer(handle: unknown): void {
    this.timers = this.timers.filter((t) => t !== handle);
  }

  /** Timers set and not yet run. */
  get pending(): number {
    return this.timers.length;
  }

  /** When the next timer is due, or null when none is set. */
  get nextDue(): number | null {
    return this.timers.length === 0 ? null : Math.min(...this.timers.map((t) => t.due));
  }

  /**
   * Moves time forward by `ms`, running every timer that falls due on the way, in due
   * order, with the clock at its due time; after each, pending promise reactions run
   * (so a backend's continuation can set the next timer before time moves on).
   */
  async advance(ms: number): Promise<void> {
    const end = this.time + ms;
    for (;;) {
      await settle();
      const next = this.earliest();
      if (next === null || next.due > end) break;
      this.timers = this.timers.filter((t) => t !== next);
      this.time = next.due;
      next.task();
    }
    this.time = end;
    await settle();
  }

  private earliest(): Timer | null {
    let best: Timer | null = null;
    for (const t of this.timers) if (best === null || t.due < best.due || (t.due === best.due && t.seq < best.seq)) best = t;
    return best;
  }
}

/**
 * Lets pending promise reactions run: a turn of the event loop, which begins only once
 * the microtask queue is empty (setImmediate under Node, which has no 1 ms floor).
 */
function settle(): Promise<void> {
  // Looked up on globalThis: browsers have no setImmediate, and this module type-checks without Node's types.
  const immediate = (globalThis as { setImmediate?: (task: () => void) => unknown }).setImmediate;
  return new Promise((resolve) => {
    if (immediate) immediate(() => resolve());
    else setTimeout(resolve, 0);
  });
}
