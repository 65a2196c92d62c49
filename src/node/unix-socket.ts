/**
 * AF_UNIX stream sockets that carry fds, for vhost-user. A message loop on top is:
 *
 * ```ts
 * for (;;) {
 *   const header = await conn.readExact(12, 8);   // the fds ride on the header
 *   if (header === null) break;                    // peer closed between messages
 *   const size = parse(header.data);               // validate before reading on
 *   const payload = await conn.readExact(size, 0);
 *   if (payload === null) throw ...;               // cut short: see readExact
 *   conn.send(reply);                              // header + payload + fds, one sendmsg
 * }
 * ```
 *
 * Reads take exactly the bytes asked for and never read ahead: a read spanning two
 * messages would take the second message's fds with the first. Partial reads (a
 * 12-byte header can arrive split) are buffered inside the connection. Sends go out in
 * one sendmsg each, queued in order while the socket buffer is full.
 */
import { lstatSync, statSync, unlinkSync } from 'node:fs';
import { UsageError, VblkError } from '../errors.js';
import { FdWatcher, READABLE, WRITABLE } from './fd-watcher.js';
import type { WatchEvents } from './fd-watcher.js';
import * as native from './native.js';
import { isNativeError } from './native.js';

/** A message (or part of one) read by {@link UnixConnection.readExact}. */
export interface ReceivedBytes {
  /** Exactly the bytes asked for. */
  readonly data: Uint8Array;
  /** fds that arrived with these bytes; the caller owns (and must close) them. */
  readonly fds: number[];
  /** More fds arrived than `maxFds` allowed; the extra ones were closed. A protocol layer should reject the message. */
  readonly truncatedFds: boolean;
}

/** Options of {@link UnixConnection.readExact}. */
export interface ReadOptions {
  /**
   * Fail the read with code `READ_TIMEOUT`, closing the connection, when its bytes have
   * not all arrived this many milliseconds after the read began (at most
   * {@link MAX_READ_TIMEOUT_MS}).
   * Default: no limit.
   */
  readonly timeoutMs?: number;
  /**
   * Start the {@link timeoutMs} clock at the first byte instead: a peer may take as long
   * as it likes to begin a message, but not to finish one.
   */
  readonly idleUntilFirstByte?: boolean;
}

interface PendingRead {
  readonly data: Uint8Array;
  filled: number;
  readonly maxFds: number;
  readonly fds: number[];
  truncatedFds: boolean;
  readonly timeoutMs: number | undefined;
  readonly idleUntilFirstByte: boolean;
  timer: NodeJS.Timeout | null;
  readonly resolve: (r: ReceivedBytes | null) => void;
  readonly reject: (e: Error) => void;
}

/** The largest {@link ReadOptions.timeoutMs}: setTimeout's largest delay (a longer one fires at once). */
export const MAX_READ_TIMEOUT_MS = 2 ** 31 - 1;

interface QueuedSend {
  data: Uint8Array;
  /** Our own duplicates of the caller's fds, closed once sent. */
  fds: number[];
}

/** How long {@link UnixConnection.connect} retries while the listener's backlog is full. */
const CONNECT_RETRY_MS = 2000;

/**
 * One connected AF_UNIX stream socket (owned: {@link close} closes it). Errors of the
 * socket (EPIPE, ECONNRESET, ...) close it and are reported by the pending or next
 * {@link readExact} and by {@link drain}; {@link send} never throws them, so replying
 * to a peer that vanished is not an exception in the message handler.
 */
export class UnixConnection {
  readonly fd: number;
  private watcher: FdWatcher | null = null;
  private reading: PendingRead | null = null;
  private readonly queue: QueuedSend[] = [];
  private drainWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private closed = false;
  private atEof = false;
  private failure: Error | null = null;

  /** Takes ownership of a connected, non-blocking socket fd. */
  constructor(fd: number) {
    this.fd = fd;
  }

  /**
   * Connects to the socket at `path`. Retries for a while when the listener's backlog
   * is full (`EAGAIN`); every other failure (`ENOENT`, `ECONNREFUSED`, ...) rejects at
   * once with the errno code.
   */
  static async connect(path: string): Promise<UnixConnection> {
    const deadline = Date.now() + CONNECT_RETRY_MS;
    for (let delay = 1; ; delay = Math.min(delay * 2, 100)) {
      try {
        return new UnixConnection(native.connect(path));
      } catch (e) {
        if (!isNativeError(e, 'EAGAIN') || Date.now() >= deadline) throw e;
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  /** Two connected ends (tests, in-process peers). */
  static pair(): [UnixConnection, UnixConnection] {
    const [a, b] = native.socketpair();
    return [new UnixConnection(a), new UnixConnection(b)];
  }

  /** Whether the connection was closed, by {@link close} or by a socket error. */
  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Reads exactly `n` bytes, with the fds that came with them (at most `maxFds`; see
   * {@link ReceivedBytes.truncatedFds}). Resolves null when the peer closed the stream
   * before the first of these bytes: the clean end of a message loop. Rejects with code
   * `UNEXPECTED_EOF` when it closed after some of them (the fds received so far are
   * closed), with `READ_TIMEOUT` when `options.timeoutMs` passed first, and with the
   * socket's error if it failed. One read at a time: a second call before the first
   * settles throws `READ_PENDING`. `n` 0 resolves at once.
   */
  readExact(n: number, maxFds = 0, options: ReadOptions = {}): Promise<ReceivedBytes | null> {
    if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`readExact: n must be a non-negative integer, got ${n}`);
    if (!Number.isSafeInteger(maxFds) || maxFds < 0 || maxFds > native.RECV_MAX_FDS) {
      throw new RangeError(`readExact: maxFds must be an integer in [0, ${native.RECV_MAX_FDS}], got ${maxFds}`);
    }
    const { timeoutMs } = options;
    if (timeoutMs !== undefined && (!Number.isInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > MAX_READ_TIMEOUT_MS)) {
      throw new RangeError(`readExact: timeoutMs must be an integer in [1, ${MAX_READ_TIMEOUT_MS}], got ${timeoutMs}`);
    }
    if (this.reading !== null) throw new UsageError('READ_PENDING', 'readExact: a read is already pending on this connection');
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(closedError('readExact'));
    if (this.atEof) return Promise.resolve(null);
    if (n === 0) return Promise.resolve({ data: new Uint8Array(0), fds: [], truncatedFds: false });
    return new Promise((resolve, reject) => {
      this.reading = {
        data: new Uint8Array(n), filled: 0, maxFds, fds: [], truncatedFds: false,
        timeoutMs, idleUntilFirstByte: options.idleUntilFirstByte ?? false, timer: null, resolve, reject,
      };
      this.pumpRead();
    });
  }

  /**
   * Sends `data` with `fds` attached as one message (the fds ride on its first byte).
   * Returns at once: what the socket cannot take now is copied and queued, with
   * duplicates of the fds, so the caller may reuse `data` and close its fds right away.
   * Messages go out in call order. Use {@link drain} to wait until all are handed to
   * the kernel. After a socket error this does nothing (the error is reported by reads
   * and {@link drain}); after {@link close} it throws `CLOSED`.
   */
  send(data: Uint8Array, fds: readonly number[] = []): void {
    if (fds.length > native.SEND_MAX_FDS) throw new RangeError(`send: at most ${native.SEND_MAX_FDS} fds per message, got ${fds.length}`);
    if (data.length === 0 && fds.length > 0) throw new RangeError('send: fds need at least one byte of data to ride on');
    if (this.failure !== null) return;
    if (this.closed) throw closedError('send');
    if (data.length === 0) return;
    let sent = 0;
    if (this.queue.length === 0) {
      try {
        sent = native.sendmsg(this.fd, data, fds);
      } catch (e) {
        this.fail(e as Error);
        return;
      }
      if (sent === data.length) return;
    }
    // sent > 0: the fds went out with the first byte; only bytes remain.
    const rest = data.slice(Math.max(sent, 0));
    this.queue.push({ data: rest, fds: sent > 0 ? [] : fds.map((fd) => native.dup(fd)) });
    this.updateInterest();
  }

  /** Resolves once every queued message was handed to the kernel; rejects if the connection fails or is closed first. */
  drain(): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.queue.length === 0) return Promise.resolve();
    if (this.closed) return Promise.reject(closedError('drain'));
    return new Promise((resolve, reject) => this.drainWaiters.push({ resolve, reject }));
  }

  /**
   * Closes the socket: a pending read and {@link drain} reject with `CLOSED`, queued
   * messages are dropped. Idempotent.
   */
  close(): void {
    this.shutDown(closedError('read'));
  }

  private fail(error: Error): void {
    if (this.closed) return;
    this.failure = error;
    this.shutDown(error);
  }

  private shutDown(error: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher?.stop();
    this.watcher = null;
    native.close(this.fd);
    for (const q of this.queue) q.fds.forEach((fd) => native.close(fd));
    this.queue.length = 0;
    const reading = this.reading;
    this.reading = null;
    if (reading !== null) {
      if (reading.timer !== null) clearTimeout(reading.timer);
      reading.fds.forEach((fd) => native.close(fd));
      reading.reject(error);
    }
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    waiters.forEach((w) => w.reject(error));
  }

  private pumpRead(): void {
    const r = this.reading;
    if (r === null) return;
    while (r.filled < r.data.length) {
      let got: native.RecvResult | null;
      try {
        got = native.recvmsg(this.fd, r.data.subarray(r.filled), r.maxFds - r.fds.length);
      } catch (e) {
        this.fail(e as Error);
        return;
      }
      if (got === null) {
        this.updateInterest();
        this.armTimeout(r);
        return;
      }
      r.fds.push(...got.fds);
      r.truncatedFds ||= got.truncatedFds;
      if (got.bytes === 0) {
        this.atEof = true;
        this.reading = null;
        if (r.timer !== null) clearTimeout(r.timer);
        this.updateInterest();
        if (r.filled === 0) {
          r.resolve(null);
        } else {
          r.fds.forEach((fd) => native.close(fd));
          r.reject(new VblkError('UNEXPECTED_EOF', `the peer closed the connection after ${r.filled} of ${r.data.length} bytes`));
        }
        return;
      }
      r.filled += got.bytes;
    }
    this.reading = null;
    if (r.timer !== null) clearTimeout(r.timer);
    this.updateInterest();
    r.resolve({ data: r.data, fds: r.fds, truncatedFds: r.truncatedFds });
  }

  /**
   * Starts a read's timeout when it first has to wait (for its first byte, or with
   * `idleUntilFirstByte` for the rest once some arrived), so a read the socket satisfies
   * at once costs no timer.
   */
  private armTimeout(r: PendingRead): void {
    if (r.timeoutMs === undefined || r.timer !== null || (r.idleUntilFirstByte && r.filled === 0)) return;
    const ms = r.timeoutMs;
    r.timer = setTimeout(() => {
      if (this.reading === r) this.fail(new VblkError('READ_TIMEOUT', `only ${r.filled} of ${r.data.length} bytes arrived within ${ms} ms`));
    }, ms);
    // The socket's watcher keeps the process alive while the read waits; the timer need not.
    r.timer.unref();
  }

  private pumpWrite(): void {
    while (this.queue.length > 0) {
      const q = this.queue[0];
      let sent: number;
      try {
        sent = native.sendmsg(this.fd, q.data, q.fds);
      } catch (e) {
        this.fail(e as Error);
        return;
      }
      if (sent < 0) return; // still full: keep waiting for writability
      if (sent > 0) {
        q.fds.forEach((fd) => native.close(fd));
        q.fds = [];
      }
      if (sent === q.data.length) this.queue.shift();
      else q.data = q.data.subarray(sent);
    }
    this.updateInterest();
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    waiters.forEach((w) => w.resolve());
  }

  /** Waits for readability only while a read waits for data, for writability only while sends are queued. */
  private updateInterest(): void {
    if (this.closed) return;
    const read = this.reading !== null;
    const write = this.queue.length > 0;
    const events: WatchEvents = read ? (write ? 'rw' : 'r') : write ? 'w' : 'none';
    if (this.watcher === null) {
      if (events === 'none') return;
      this.watcher = new FdWatcher(this.fd, events, (error, ready) => this.onReady(error, ready));
    } else {
      this.watcher.setEvents(events);
    }
  }

  private onReady(error: Error | null, ready: number): void {
    if (error !== null) {
      this.fail(socketFailure(this.fd) ?? error);
      return;
    }
    if (ready & WRITABLE) this.pumpWrite();
    if (ready & READABLE) this.pumpRead();
  }
}

/**
 * What a poll error on a connection was. libuv reports an error condition on the socket
 * (POLLERR) as EBADF although the fd is open and fine; the socket's pending error names
 * the cause: ECONNRESET when the peer hung up with data of ours unread. Null when it has
 * none, or the fd is no socket (a backend channel is whatever fd a frontend sent).
 */
function socketFailure(fd: number): Error | null {
  try {
    return native.socketError(fd);
  } catch {
    return null;
  }
}

function closedError(what: string): VblkError {
  return new VblkError('CLOSED', `${what}: the connection was closed`);
}

/** Options of {@link UnixSocketServer.listen}. */
export interface UnixServerOptions {
  /** listen(2) backlog (default 16). */
  readonly backlog?: number;
  /**
   * If a socket file is at the path but nobody listens on it (a previous server died),
   * remove it and listen anyway. A live socket, or anything that is not a socket,
   * still fails with `EADDRINUSE`.
   */
  readonly removeStale?: boolean;
}

/**
 * A listening AF_UNIX stream socket. Calls `onConnection` on the event loop for each
 * accepted connection; the callback owns the connection. {@link pause} stops accepting
 * for a while. Keeps the process alive until {@link close}.
 */
export class UnixSocketServer {
  readonly path: string;
  private fd: number;
  private readonly watcher: FdWatcher;
  /** Identity of the socket file we bound, so close() never unlinks someone else's. */
  private readonly inode: { dev: number; ino: number };
  private paused = false;
  private onWaiting: (() => void) | null = null;

  private constructor(path: string, fd: number, onConnection: (conn: UnixConnection) => void) {
    this.path = path;
    this.fd = fd;
    const st = statSync(path);
    this.inode = { dev: st.dev, ino: st.ino };
    this.watcher = new FdWatcher(fd, 'r', (error) => {
      if (error !== null) throw error; // the listening fd is ours: failing to poll it is a bug
      if (this.paused) {
        // Someone waits in the backlog: say so once, then stop polling (the level-triggered
        // watcher would call again on every loop iteration) until resume().
        this.watcher.setEvents('none');
        const onWaiting = this.onWaiting;
        this.onWaiting = null;
        onWaiting?.();
        return;
      }
      // onConnection may pause the server: accept no further than that.
      while (!this.paused) {
        const conn = native.accept(this.fd);
        if (conn < 0) return;
        onConnection(new UnixConnection(conn));
      }
    });
  }

  /** Listens on `path`. Throws `EADDRINUSE` when something is there (see {@link UnixServerOptions.removeStale}). */
  static listen(path: string, onConnection: (conn: UnixConnection) => void, options: UnixServerOptions = {}): UnixSocketServer {
    const backlog = options.backlog ?? 16;
    let fd: number;
    try {
      fd = native.listen(path, backlog);
    } catch (e) {
      if (!(options.removeStale ?? false) || !isNativeError(e, 'EADDRINUSE') || !removeIfStale(path)) throw e;
      fd = native.listen(path, backlog);
    }
    try {
      return new UnixSocketServer(path, fd, onConnection);
    } catch (e) {
      native.close(fd);
      throw e;
    }
  }

  /**
   * Stops accepting until {@link resume}. Peers that connect meanwhile wait in the listen
   * backlog: their connect succeeds and the kernel keeps what they send until they are
   * accepted; once the backlog is full, connect fails with `EAGAIN` (or blocks, on a
   * blocking socket). `onWaiting` is called once, on the event loop, when a peer is
   * waiting while paused.
   */
  pause(onWaiting?: () => void): void {
    this.paused = true;
    this.onWaiting = onWaiting ?? null;
    // Polled while paused only to notice a waiting peer (a second pause re-arms that).
    if (this.fd >= 0) this.watcher.setEvents('r');
  }

  /** Accepts again, starting with the peers that waited in the backlog. Does nothing after {@link close}. */
  resume(): void {
    this.paused = false;
    this.onWaiting = null;
    if (this.fd >= 0) this.watcher.setEvents('r');
  }

  /** Stops accepting, closes the socket and removes its file (if it is still ours). Connections stay open. Idempotent. */
  close(): void {
    if (this.fd < 0) return;
    this.watcher.stop();
    native.close(this.fd);
    this.fd = -1;
    try {
      const st = lstatSync(this.path);
      if (st.dev === this.inode.dev && st.ino === this.inode.ino) unlinkSync(this.path);
    } catch {
      // Already gone: nothing to remove.
    }
  }
}

/** Removes `path` when it is a socket nobody listens on; returns whether it did. */
function removeIfStale(path: string): boolean {
  try {
    if (!lstatSync(path).isSocket()) return false;
  } catch {
    return true; // vanished meanwhile: free to bind
  }
  try {
    native.close(native.connect(path));
    return false; // someone answered: live
  } catch (e) {
    if (!isNativeError(e, 'ECONNREFUSED')) return false;
  }
  unlinkSync(path);
  return true;
}
