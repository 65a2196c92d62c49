/**
 * FdWatcher: readiness of a file descriptor on Node's event loop, the only way the
 * loop learns about kick/call eventfds and vhost-user sockets. Level-triggered: the
 * callback runs again on every loop iteration for as long as the condition holds, so a
 * reader must drain (or pause the watcher) before returning.
 */
import { getSystemErrorName } from 'node:util';
import { UsageError } from '../errors.js';
import * as native from './native.js';
import type { NativeError, WatchHandle } from './native.js';

/** What to wait for: readable, writable, both, or nothing (paused). */
export type WatchEvents = 'r' | 'w' | 'rw' | 'none';

/**
 * Called with the events that are ready: test `events & READABLE` / `events & WRITABLE`
 * (plain numbers, so the hot path allocates nothing). `error` is set, and `events` 0,
 * when polling the fd failed (for instance it was closed under the watcher). libuv
 * reports an error condition on an open fd (POLLERR: a socket whose peer reset it) as
 * EBADF too; a socket's own error says what it was (`socketError` in native.ts).
 */
export type FdWatchCallback = (error: NativeError | null, events: number) => void;

/** Options of {@link FdWatcher}. */
export interface FdWatcherOptions {
  /** Whether the watcher keeps the process alive while it waits (default true). */
  readonly ref?: boolean;
}

/** Ready bit of {@link FdWatchCallback}'s `events`: the fd can be read. */
export const READABLE: number = native.READABLE;
/** Ready bit of {@link FdWatchCallback}'s `events`: the fd can be written. */
export const WRITABLE: number = native.WRITABLE;

function eventBits(events: WatchEvents): number {
  switch (events) {
    case 'r': return native.READABLE;
    case 'w': return native.WRITABLE;
    case 'rw': return native.READABLE | native.WRITABLE;
    case 'none': return 0;
  }
}

function pollError(fd: number, status: number): NativeError {
  const code = getSystemErrorName(status);
  return Object.assign(new Error(`uv_poll (fd ${fd}): ${code}`), { code, errno: -status, syscall: 'uv_poll' });
}

/**
 * Watches one fd (libuv allows one watcher per fd). Stop it before closing the fd.
 * `stop()` is idempotent and may be called from inside the callback; a stopped watcher
 * never calls back again and does not keep the process alive.
 */
export class FdWatcher {
  readonly fd: number;
  private handle: WatchHandle | null;
  private events: number;

  constructor(fd: number, events: WatchEvents, callback: FdWatchCallback, options: FdWatcherOptions = {}) {
    this.fd = fd;
    this.events = eventBits(events);
    this.handle = native.watch(fd, this.events, (status, ready) => {
      callback(status < 0 ? pollError(fd, status) : null, ready);
    }, options.ref ?? true);
  }

  /** Whether {@link stop} was called. */
  get isStopped(): boolean {
    return this.handle === null;
  }

  /** Changes what the watcher waits for; 'none' pauses it. Cheap when unchanged. */
  setEvents(events: WatchEvents): void {
    const bits = eventBits(events);
    if (bits === this.events) return;
    native.watchSetEvents(this.live('setEvents'), bits);
    this.events = bits;
  }

  /** Lets the process exit while this watcher waits. */
  unref(): void {
    native.watchRef(this.live('unref'), false);
  }

  /** Keeps the process alive while this watcher waits (the default). */
  ref(): void {
    native.watchRef(this.live('ref'), true);
  }

  /** Stops watching for good. Idempotent. */
  stop(): void {
    if (this.handle === null) return;
    native.watchStop(this.handle);
    this.handle = null;
  }

  private live(what: string): WatchHandle {
    if (this.handle === null) throw new UsageError('WATCHER_STOPPED', `FdWatcher.${what}: the watcher of fd ${this.fd} was stopped`);
    return this.handle;
  }
}
