/**
 * Waiting in tests without depending on the machine's speed. Something produced by
 * asynchronous work (a callback, an I/O event, another process) is waited for, never
 * assumed to have happened after a fixed sleep: under load a timer can fire before
 * pending I/O and immediate callbacks run. Every wait has a generous bound, a hang guard
 * many times what the slowest machine needs, and says what never happened.
 */

/** The default bound on a wait: far beyond anything a working test needs. */
export const HANG_GUARD_MS = 10_000;

export interface WaitOptions {
  /** What is waited for, for the failure message ("the late reap to complete the two held requests"). */
  readonly what: string;
  /** Default {@link HANG_GUARD_MS}. */
  readonly timeoutMs?: number;
}

/** Polls after immediates first (cheap, lets I/O callbacks run), then backs off to this. */
const IMMEDIATE_POLLS = 16;
const MAX_POLL_MS = 20;

/**
 * Resolves once `cond()` holds, checking it after microtasks, I/O callbacks and timers
 * have had their turn; rejects with a message naming `what` after `timeoutMs`.
 */
export async function waitUntil(cond: () => boolean, { what, timeoutMs = HANG_GUARD_MS }: WaitOptions): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  let pollMs = 1;
  for (let polls = 0; !cond(); polls++) {
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    if (polls < IMMEDIATE_POLLS) {
      await new Promise<void>((resolve) => setImmediate(resolve));
    } else {
      await new Promise<void>((resolve) => setTimeout(resolve, pollMs));
      pollMs = Math.min(pollMs * 2, MAX_POLL_MS);
    }
  }
}

/** Settles as `p` does, or rejects with a message naming `what` if it has not within `timeoutMs`. */
export async function within<T>(p: Promise<T>, { what, timeoutMs = HANG_GUARD_MS }: WaitOptions): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
  });
  try {
    return await Promise.race([p, guard]);
  } finally {
    clearTimeout(timer);
  }
}
