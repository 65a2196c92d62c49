/**
 * EventFd: vhost-user's kick (driver → device) and call (device → driver)
 * notifications. Writes add to a counter and coalesce; a read returns and resets it.
 * Readiness only means "look at the ring": the count itself carries no meaning.
 */
import { readlinkSync } from 'node:fs';
import { UsageError } from '../errors.js';
import { FdWatcher } from './fd-watcher.js';
import type { FdWatcherOptions } from './fd-watcher.js';
import * as native from './native.js';

/** Options of {@link EventFd.watch}. */
export type EventFdWatchOptions = FdWatcherOptions;

/** An owned eventfd. {@link close} it; use after close throws `CLOSED`. */
export class EventFd {
  private fdOrClosed: number;
  private watcher: FdWatcher | null = null;

  private constructor(fd: number) {
    this.fdOrClosed = fd;
  }

  /** A new non-blocking eventfd. */
  static create(initial = 0): EventFd {
    return new EventFd(native.eventfd(initial));
  }

  /**
   * Takes ownership of an eventfd received from a peer (SET_VRING_KICK/CALL). Refuses
   * (and leaves open) an fd that is not an eventfd: reading 8 bytes from a pipe or a
   * file would not mean anything. Makes it non-blocking, since the peer may have sent
   * it blocking and a read must never stall the event loop.
   */
  static adopt(fd: number): EventFd {
    let target: string;
    try {
      target = readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      throw new UsageError('NOT_AN_EVENTFD', `fd ${fd} is not an open file descriptor`);
    }
    if (target !== 'anon_inode:[eventfd]') throw new UsageError('NOT_AN_EVENTFD', `fd ${fd} is ${target}, not an eventfd`);
    native.setNonBlocking(fd);
    return new EventFd(fd);
  }

  /** The fd (for passing to a peer). Throws once closed. */
  get fd(): number {
    if (this.fdOrClosed < 0) throw new UsageError('CLOSED', 'EventFd used after close()');
    return this.fdOrClosed;
  }

  get isClosed(): boolean {
    return this.fdOrClosed < 0;
  }

  /** Takes the count written since the last read; 0 when there was none. */
  read(): number {
    return native.eventfdRead(this.fd);
  }

  /** Signals the other side: adds `n` (default 1). */
  write(n = 1): void {
    native.eventfdWrite(this.fd, n);
  }

  /**
   * Calls `onSignal(count)` on the event loop each time the eventfd was written. The
   * watcher drains the count before calling, as a level-triggered watcher must; a
   * spurious wakeup with nothing to read calls nothing. One watcher per eventfd; it
   * ends with {@link close} or its own `stop()`.
   */
  watch(onSignal: (count: number) => void, options: EventFdWatchOptions = {}): FdWatcher {
    const fd = this.fd;
    if (this.watcher !== null && !this.watcher.isStopped) throw new UsageError('ALREADY_WATCHED', `EventFd ${fd} is already watched`);
    this.watcher = new FdWatcher(fd, 'r', (error) => {
      // Polling an eventfd only fails if it was closed under us: a bug, so make it loud.
      if (error !== null) throw error;
      const count = native.eventfdRead(fd);
      if (count > 0) onSignal(count);
    }, options);
    return this.watcher;
  }

  /** Stops the watcher and closes the fd. Idempotent. */
  close(): void {
    if (this.fdOrClosed < 0) return;
    this.watcher?.stop();
    this.watcher = null;
    native.close(this.fdOrClosed);
    this.fdOrClosed = -1;
  }
}
