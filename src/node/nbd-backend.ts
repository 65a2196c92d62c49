/**
 * An NBD export as a block backend: the sockets, TLS and timers around the sans-IO NBD
 * client of src/backends/nbd/ (handshake.ts, transmission.ts). Here the requests: their
 * checks, splitting, queueing over the connections and the outage clock; each
 * connection (socket, TLS, handshake, stalls, reconnecting) is nbd-connection.ts.
 *
 * - **Connections.** One, or several when the server advertises `NBD_FLAG_CAN_MULTI_CONN`
 *   (its caches are shared, so a flush on one connection covers writes on all): each
 *   request goes to the ready connection with the fewest requests in flight, so the
 *   device's queues spread over them. Without that flag one connection is used, as the
 *   protocol asks ("clients SHOULD NOT multiplex their commands over more than one
 *   connection").
 * - **Zero copy where Node allows.** Writes go from guest memory to the socket (gathered
 *   into one writev per event-loop turn by corking); reads are copied once, from the
 *   socket's reusable read buffer into guest memory. A write's reply is acted on only
 *   once the socket holds none of our bytes: a server that answers before reading the
 *   data cannot make us release guest memory a pending write still points into.
 * - **Reconnection.** When a connection drops (or the server breaks the protocol, or
 *   answers `NBD_ESHUTDOWN`), its requests in flight are resubmitted — NBD requests are
 *   idempotent — on another connection, or on this one once it is back: it reconnects
 *   with exponential backoff. A request handed back by a lost connection is resubmitted
 *   until `reconnectTimeoutMs` (default a minute) has passed since it was first handed
 *   back; then it fails. Once no connection has been up for that long, new requests
 *   fail at once too, until one is back. Reconnecting goes on for as long as the backend
 *   is open. A reconnection that finds the export smaller, or without a capability in
 *   use, is refused like a failed attempt.
 * - **Stalls.** A connection with requests in flight from which nothing arrives for
 *   `stallTimeoutMs` (a server that stopped mid-reply, or stopped answering) is treated
 *   as lost: its requests are resubmitted elsewhere or after reconnecting.
 * - **Capabilities** follow the export's transmission flags: read-only, flush, FUA,
 *   trim (discard), write zeroes (`NBD_CMD_FLAG_NO_HOLE` when the caller must not
 *   deallocate). Requests are checked against the server's minimum block size and split
 *   at its maximum payload.
 */
import { BackendError, checkRange, totalLength, type BlockBackend } from '../backends/backend.js';
import type { NbdBlockSizes, NbdExportInfo } from '../backends/nbd/handshake.js';
import { NBD_CMD, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_FLAG, NBD_NO_PAYLOAD_LIMIT, NbdRequestError } from '../backends/nbd/protocol.js';
import { NbdRequest } from '../backends/nbd/transmission.js';
import { formatNbdUri, parseNbdUri, type NbdUri } from '../backends/nbd/uri.js';
import type { LogSink } from '../log.js';
import { sliceBuffers } from '../virtqueue/chain.js';
import { Connection, DEFAULT_STALL_TIMEOUT_MS, STALL_TICKS, messageOf, type ConnectionOwner } from './nbd-connection.js';
import { NbdBackendError } from './nbd-errors.js';

export { NbdBackendError, type NbdBackendErrorCode } from './nbd-errors.js';

/** How to reach and use an export. */
export interface NbdBackendOptions {
  /** The export: an NBD URI (`nbd://…`, `nbd+unix://…`, `nbds://…`) or a parsed one. */
  readonly uri: string | NbdUri;
  /** Refuse writes even when the export takes them. */
  readonly readOnly?: boolean;
  /** Connections to open when the server advertises CAN_MULTI_CONN (default 1). */
  readonly connections?: number;
  /**
   * How long requests wait for a lost server before they fail, in ms (default 60 000),
   * counted from when the last connection was lost.
   */
  readonly reconnectTimeoutMs?: number;
  /** Longest a connection may take to reach transmission, in ms (default 10 000). */
  readonly connectTimeoutMs?: number;
  /**
   * A connection with requests in flight that receives nothing for this long, in ms, is
   * dropped and its requests resubmitted (default 60 000).
   */
  readonly stallTimeoutMs?: number;
  /**
   * TLS credentials: a directory laid out as QEMU's and nbdkit's `--tls-certificates`
   * (`ca-cert.pem`, and for client authentication `client-cert.pem`,
   * `client-key.pem`). Without it the system's certificate authorities are trusted.
   */
  readonly tlsCertificates?: string;
  /** Most requests in flight per connection (default 512); more wait their turn. */
  readonly maxInFlight?: number;
  /** Where connection losses, reconnections and refused replies are reported. */
  readonly log?: LogSink;
}

const DEFAULT_RECONNECT_TIMEOUT_MS = 60_000;
/**
 * Most bytes one TRIM or WRITE_ZEROES asks for: the length field is 32 bits, and this
 * bound is a multiple of every minimum block size (at most 64 KiB).
 */
const MAX_EFFECT_LENGTH = 0x8000_0000;
const NO_BUFFERS: readonly Uint8Array[] = [];

/** What {@link openNbdBackend} returns: a {@link BlockBackend} with what the export said of itself. */
export interface NbdExportBackend extends BlockBackend {
  /** Writes can be made durable one by one (NBD_CMD_FLAG_FUA). */
  readonly canFua: boolean;
  /** The export says it behaves like a rotational disk (virtio-blk has no way to say so). */
  readonly rotational: boolean;
  /** The server's size constraints (the protocol's defaults when it advertised none). */
  readonly blockSizes: NbdBlockSizes;
  /** The export as the first handshake found it. */
  readonly info: NbdExportInfo | null;
  /** The URI, canonical, for messages. */
  readonly uriText: string;
  /** Connections in transmission now (fewer than opened while some reconnect). */
  readonly connectionsUp: number;
  // Every operation goes over the network: each returns a promise.
  read(offset: number, buffers: readonly Uint8Array[]): Promise<void>;
  write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): Promise<void>;
  flush(): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  writeZeroes(offset: number, length: number, unmap: boolean): Promise<void>;
  close(): Promise<void>;
}

/**
 * Opens the export: connects (one connection, or `connections` when the server allows
 * several), negotiates, and returns the backend. Throws {@link NbdBackendError}
 * `CONNECT_FAILED` with the reason (unreachable server, unknown export, TLS refused, a
 * protocol violation…), or an NbdUriError for a bad URI.
 */
export async function openNbdBackend(options: NbdBackendOptions): Promise<NbdExportBackend> {
  const uri = typeof options.uri === 'string' ? parseNbdUri(options.uri) : options.uri;
  const wanted = options.connections ?? 1;
  if (!Number.isInteger(wanted) || wanted < 1 || wanted > 64) {
    throw new NbdBackendError('UNSUPPORTED', `connections ${wanted} is not an integer from 1 to 64`);
  }
  const backend = new NbdBackend(uri, options);
  await backend.start(wanted);
  return backend;
}

/** A request as the backend tracks it: the NBD request and who waits for it. */
class Op extends NbdRequest {
  resolve: () => void = noop;
  reject: (e: unknown) => void = noop;
  /** The split request this is a piece of, or null. */
  parent: Split | null = null;
  /** When a lost connection first handed it back (ms, performance.now), 0 if never. */
  lostAt = 0;
  /** Binds a new promise's settle functions here without a closure per request. */
  readonly executor = (resolve: () => void, reject: (e: unknown) => void): void => {
    this.resolve = resolve;
    this.reject = reject;
  };
}

/**
 * A request cut into pieces (beyond the server's maximum payload): settled once every
 * piece is, with the first failure. Never before: a read's pieces still in flight write
 * into the caller's buffers, which are the caller's again once it is settled.
 */
class Split {
  left: number;
  error: unknown = null;
  constructor(pieces: number, readonly resolve: () => void, readonly reject: (e: unknown) => void) {
    this.left = pieces;
  }
}

function noop(): void {}

/** An NBD export as a {@link BlockBackend}. Build it with {@link openNbdBackend}. */
export class NbdBackend implements NbdExportBackend, ConnectionOwner<Op> {
  size = 0;
  readOnly = false;
  canFlush = false;
  canDiscard = false;
  canWriteZeroes = false;
  /** Writes can be made durable one by one (NBD_CMD_FLAG_FUA). */
  canFua = false;
  /** The export says it behaves like a rotational disk (virtio-blk has no way to say so). */
  rotational = false;
  /** The server's size constraints (defaults when it advertised none). */
  blockSizes: NbdBlockSizes = { minimum: 1, preferred: 4096, maximum: 1 << 25 };
  /** The export as the first handshake found it. */
  info: NbdExportInfo | null = null;
  /** The URI, canonical, for messages. */
  readonly uriText: string;

  private readonly connections: Connection<Op>[] = [];
  /** Requests waiting for a connection with room, oldest first (from `pendingHead`). */
  private pending: Op[] = [];
  private pendingHead = 0;
  private readonly free: Op[] = [];
  private readonly log: LogSink;
  private readonly reconnectTimeoutMs: number;
  /** When no connection is up: the timer that fails waiting requests. */
  private outageTimer: NodeJS.Timeout | null = null;
  /** No connection is up and the reconnect timeout has passed: requests fail at once. */
  private failFast = false;
  private closed = false;
  private stallTimer: NodeJS.Timeout | null = null;
  /** Most bytes per read or write request: the server's maximum, on whole minimum blocks. */
  private maxPayload = 1 << 25;

  /** Use {@link openNbdBackend}. */
  constructor(readonly uri: NbdUri, readonly options: NbdBackendOptions) {
    this.uriText = formatNbdUri(uri);
    this.log = options.log ?? noop;
    this.reconnectTimeoutMs = options.reconnectTimeoutMs ?? DEFAULT_RECONNECT_TIMEOUT_MS;
  }

  /** Connects the first connection, then the others the server allows. */
  async start(wanted: number): Promise<void> {
    const first = new Connection(this, 0);
    this.connections.push(first);
    let info: NbdExportInfo;
    try {
      info = await first.connect();
    } catch (e) {
      first.close();
      throw new NbdBackendError('CONNECT_FAILED', `cannot use ${this.uriText}: ${messageOf(e)}`);
    }
    this.adopt(info);
    first.ready();
    const stallMs = this.options.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
    // unref: a library user's process may exit with the backend open.
    this.stallTimer = setInterval(() => {
      for (const c of this.connections) c.checkStall();
    }, Math.max(1, Math.floor(stallMs / STALL_TICKS)));
    this.stallTimer.unref();
    const extra = (info.flags & NBD_FLAG.CAN_MULTI_CONN) !== 0 ? wanted - 1 : 0;
    if (wanted > 1 && extra === 0) this.log(`${this.uriText}: the server does not advertise multi-conn: using 1 connection, not ${wanted}`, { level: 'warn' });
    const more = Array.from({ length: extra }, (_, i) => new Connection(this, i + 1));
    const results = await Promise.allSettled(more.map((c) => c.connect()));
    results.forEach((r, i) => {
      const c = more[i];
      const bad = r.status === 'rejected' ? messageOf(r.reason) : this.mismatch(r.value);
      if (bad === null) {
        this.connections.push(c);
        c.ready();
      } else {
        c.close();
        this.log(`${this.uriText}: connection ${i + 2} of ${wanted} failed (${bad}); going on with fewer`, { level: 'warn' });
      }
    });
  }

  private adopt(info: NbdExportInfo): void {
    const f = info.flags;
    this.info = info;
    this.size = info.size;
    this.readOnly = (this.options.readOnly ?? false) || (f & NBD_FLAG.READ_ONLY) !== 0;
    const writable = !this.readOnly;
    this.canFlush = writable && (f & NBD_FLAG.SEND_FLUSH) !== 0;
    this.canFua = writable && (f & NBD_FLAG.SEND_FUA) !== 0;
    this.canDiscard = writable && (f & NBD_FLAG.SEND_TRIM) !== 0;
    this.canWriteZeroes = writable && (f & NBD_FLAG.SEND_WRITE_ZEROES) !== 0;
    this.rotational = (f & NBD_FLAG.ROTATIONAL) !== 0;
    this.blockSizes = info.blockSizes;
    const max = info.blockSizes.maximum;
    // "No fixed limit" still splits at the document's portable 32 MiB; every piece of a
    // split request stays on whole minimum blocks.
    const limit = max === NBD_NO_PAYLOAD_LIMIT ? 1 << 25 : max;
    this.maxPayload = Math.max(info.blockSizes.minimum, limit - (limit % info.blockSizes.minimum));
  }

  /**
   * Why a later handshake's export cannot stand in for the first one's, or null: it
   * must be as large, and keep every capability in use.
   */
  mismatch(info: NbdExportInfo): string | null {
    const first = this.info as NbdExportInfo;
    if (info.size < first.size) return `the export shrank from ${first.size} to ${info.size} bytes`;
    const used = NBD_FLAG.SEND_FLUSH | NBD_FLAG.SEND_FUA | NBD_FLAG.SEND_TRIM | NBD_FLAG.SEND_WRITE_ZEROES | NBD_FLAG.CAN_MULTI_CONN;
    const lost = first.flags & used & ~info.flags;
    if (lost !== 0) return `the export lost capabilities (transmission flags 0x${first.flags.toString(16)} became 0x${info.flags.toString(16)})`;
    if (!this.readOnly && (info.flags & NBD_FLAG.READ_ONLY) !== 0) return 'the export became read-only';
    if (info.blockSizes.minimum > first.blockSizes.minimum || info.blockSizes.maximum < this.maxPayload) {
      return `the export's block sizes changed (${JSON.stringify(first.blockSizes)} became ${JSON.stringify(info.blockSizes)})`;
    }
    return null;
  }

  /** Connections in transmission now. */
  get connectionsUp(): number {
    let n = 0;
    for (const c of this.connections) if (c.isReady) n++;
    return n;
  }

  // ---- BlockBackend ----------------------------------------------------------------

  read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    const length = totalLength(buffers);
    this.check(offset, length, false);
    return this.io(NBD_CMD.READ, 0, offset, length, buffers);
  }

  /** With `fua` (only when {@link canFua}) the write is durable when it completes. */
  write(offset: number, buffers: readonly Uint8Array[], fua = false): Promise<void> {
    const length = totalLength(buffers);
    this.check(offset, length, true);
    return this.io(NBD_CMD.WRITE, fua && this.canFua ? NBD_CMD_FLAG_FUA : 0, offset, length, buffers);
  }

  flush(): Promise<void> {
    this.check(0, 0, false);
    // Without NBD_FLAG_SEND_FLUSH there is no cache to flush: writes are durable as they complete.
    if (!this.canFlush) return Promise.resolve();
    return this.submit(this.op(NBD_CMD.FLUSH, 0, 0, 0, NO_BUFFERS));
  }

  discard(offset: number, length: number): Promise<void> {
    this.check(offset, length, true);
    if (!this.canDiscard) return Promise.reject(new NbdBackendError('UNSUPPORTED', `${this.uriText} does not take NBD_CMD_TRIM`));
    return this.ranges(NBD_CMD.TRIM, 0, offset, length);
  }

  /**
   * NBD_CMD_WRITE_ZEROES; without `unmap` with NBD_CMD_FLAG_NO_HOLE, so the server
   * keeps the range allocated.
   */
  writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    this.check(offset, length, true);
    if (!this.canWriteZeroes) return Promise.reject(new NbdBackendError('UNSUPPORTED', `${this.uriText} does not take NBD_CMD_WRITE_ZEROES`));
    return this.ranges(NBD_CMD.WRITE_ZEROES, unmap ? 0 : NBD_CMD_FLAG_NO_HOLE, offset, length);
  }

  /**
   * Fails what still waits, sends NBD_CMD_DISC on every connection (the server then
   * finishes what it has, and closes), and stops reconnecting.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopOutage();
    if (this.stallTimer !== null) clearInterval(this.stallTimer);
    this.failPending(new BackendError('CLOSED', `the NBD backend for ${this.uriText} is closed`));
    await Promise.all(this.connections.map((c) => c.disconnect()));
  }

  private check(offset: number, length: number, writes: boolean): void {
    if (this.closed) throw new BackendError('CLOSED', `the NBD backend for ${this.uriText} is closed`);
    if (writes && this.readOnly) throw new BackendError('READ_ONLY', `${this.uriText} is read-only`);
    checkRange(this.size, offset, length);
    const min = this.blockSizes.minimum;
    if (min > 1 && (offset % min !== 0 || length % min !== 0)) {
      throw new NbdBackendError('MISALIGNED', `${length} bytes at ${offset} are not whole ${min}-byte blocks, the export's minimum`);
    }
  }

  // ---- requests ----------------------------------------------------------------------

  private op(type: number, flags: number, offset: number, length: number, buffers: readonly Uint8Array[]): Op {
    const op = this.free.pop() ?? new Op();
    op.set(type, flags, offset, length, buffers);
    op.parent = null;
    op.lostAt = 0;
    return op;
  }

  private submit(op: Op): Promise<void> {
    const p = new Promise<void>(op.executor);
    this.dispatch(op);
    return p;
  }

  /** A read or write, split at the maximum payload. */
  private io(type: number, flags: number, offset: number, length: number, buffers: readonly Uint8Array[]): Promise<void> {
    if (length <= this.maxPayload) return this.submit(this.op(type, flags, offset, length, buffers));
    const step = this.maxPayload;
    return this.split(Math.ceil(length / step), (op, i) => {
      const at = i * step;
      const n = Math.min(step, length - at);
      op.set(type, flags, offset + at, n, sliceBuffers(buffers, at, n) ?? NO_BUFFERS);
    });
  }

  /** A trim or write-zeroes, split where its 32-bit length would overflow. */
  private ranges(type: number, flags: number, offset: number, length: number): Promise<void> {
    if (length <= MAX_EFFECT_LENGTH) return this.submit(this.op(type, flags, offset, length, NO_BUFFERS));
    return this.split(Math.ceil(length / MAX_EFFECT_LENGTH), (op, i) => {
      const at = i * MAX_EFFECT_LENGTH;
      op.set(type, flags, offset + at, Math.min(MAX_EFFECT_LENGTH, length - at), NO_BUFFERS);
    });
  }

  private split(pieces: number, describe: (op: Op, i: number) => void): Promise<void> {
    return new Promise((resolve, reject) => {
      const s = new Split(pieces, resolve, reject);
      for (let i = 0; i < pieces; i++) {
        const op = this.free.pop() ?? new Op();
        describe(op, i);
        op.parent = s;
        op.lostAt = 0;
        this.dispatch(op);
      }
    });
  }

  /** Sends `op` on the least busy ready connection, or queues it. */
  private dispatch(op: Op): void {
    if (this.failFast) {
      this.settle(op, this.goneError());
      return;
    }
    const c = this.pickConnection();
    if (c === null || this.pendingHead < this.pending.length) this.pending.push(op);
    else c.submit(op);
  }

  private pickConnection(): Connection<Op> | null {
    let best: Connection<Op> | null = null;
    const cs = this.connections;
    for (let i = 0; i < cs.length; i++) {
      const c = cs[i];
      if (c.canTake && (best === null || c.inFlight < best.inFlight)) best = c;
    }
    return best;
  }

  /** Moves waiting requests onto connections with room; fails those that waited too long. */
  pump(): void {
    let now = 0;
    while (this.pendingHead < this.pending.length) {
      const c = this.pickConnection();
      if (c === null) break;
      const op = this.pending[this.pendingHead];
      (this.pending as (Op | undefined)[])[this.pendingHead++] = undefined;
      if (op.lostAt !== 0) {
        // Handed back by a lost connection: bounded however often connections come
        // back and drop it again (a server that breaks on every request).
        if (now === 0) now = performance.now();
        if (now - op.lostAt > this.reconnectTimeoutMs) {
          this.settle(op, this.gaveUpError());
          continue;
        }
      }
      c.submit(op);
    }
    if (this.pendingHead === this.pending.length && this.pendingHead > 0) {
      this.pending.length = 0;
      this.pendingHead = 0;
    }
  }

  /** A request finished on a connection. */
  completed(op: Op, error: NbdRequestError | null): void {
    this.settle(op, error === null ? null : new NbdBackendError('SERVER_ERROR', error.message));
  }

  private settle(op: Op, error: Error | null): void {
    const parent = op.parent;
    const resolve = op.resolve;
    const reject = op.reject;
    op.resolve = noop;
    op.reject = noop;
    op.parent = null;
    op.lostAt = 0;
    op.buffers = NO_BUFFERS;
    this.free.push(op);
    if (parent !== null) {
      parent.error ??= error;
      if (--parent.left > 0) return;
      if (parent.error === null) parent.resolve();
      else parent.reject(parent.error);
      return;
    }
    if (error === null) resolve();
    else reject(error);
  }

  /** Requests a lost connection had in flight, to go first when a connection has room. */
  requeue(ops: Op[]): void {
    if (ops.length === 0) return;
    if (this.closed) {
      for (const op of ops) this.settle(op, new BackendError('CLOSED', `the NBD backend for ${this.uriText} is closed`));
      return;
    }
    const now = performance.now();
    for (const op of ops) if (op.lostAt === 0) op.lostAt = now;
    const waiting = this.pending.slice(this.pendingHead);
    this.pending = ops.concat(waiting);
    this.pendingHead = 0;
  }

  // ---- connection state ----------------------------------------------------------------

  /** A connection reached transmission (again). */
  connectionUp(c: Connection<Op>, again: boolean, downMs: number): void {
    if (again) this.log(`${this.uriText}: connection ${c.index + 1} is back after ${(downMs / 1000).toFixed(1)} s; resubmitting ${this.pending.length - this.pendingHead} requests`);
    this.stopOutage();
    this.failFast = false;
    this.pump();
  }

  /** A connection is gone; it reconnects by itself. */
  connectionDown(c: Connection<Op>, reason: string): void {
    if (this.closed) return;
    this.log(`${this.uriText}: connection ${c.index + 1} lost (${reason}); reconnecting, requests wait up to ${(this.reconnectTimeoutMs / 1000).toFixed(0)} s`, { level: 'warn' });
    if (this.connectionsUp > 0) {
      this.pump();
      return;
    }
    if (this.outageTimer === null && !this.failFast) {
      this.outageTimer = setTimeout(() => {
        this.outageTimer = null;
        this.failFast = true;
        const n = this.pending.length - this.pendingHead;
        this.log(`${this.uriText}: no connection for ${(this.reconnectTimeoutMs / 1000).toFixed(0)} s: failing ${n} requests, and new ones until the server is back`, { level: 'error' });
        this.failPending(this.goneError());
      }, this.reconnectTimeoutMs);
    }
  }

  private gaveUpError(): NbdBackendError {
    return new NbdBackendError('SERVER_GONE', `${this.uriText}: the request was resubmitted for more than ${(this.reconnectTimeoutMs / 1000).toFixed(0)} s without an answer`);
  }

  private goneError(): NbdBackendError {
    return new NbdBackendError('SERVER_GONE', `${this.uriText}: no connection to the server for more than ${(this.reconnectTimeoutMs / 1000).toFixed(0)} s`);
  }

  private stopOutage(): void {
    if (this.outageTimer !== null) clearTimeout(this.outageTimer);
    this.outageTimer = null;
  }

  private failPending(error: Error): void {
    const ops = this.pending.slice(this.pendingHead);
    this.pending = [];
    this.pendingHead = 0;
    for (const op of ops) this.settle(op, error);
  }

  get isClosed(): boolean {
    return this.closed;
  }
}
