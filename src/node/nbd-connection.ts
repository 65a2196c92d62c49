/**
 * One connection of the NBD backend (nbd-backend.ts) to the server: its socket (clear or
 * TLS), the handshake and the transmission of the sans-IO client, write corking and held
 * write completions, stall detection, and reconnection with exponential backoff. What
 * it carries and where its requests go when it breaks are its owner's business
 * ({@link ConnectionOwner}).
 */
import { readFileSync } from 'node:fs';
import { createConnection, isIP, type Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import { NbdHandshake, type NbdExportInfo } from '../backends/nbd/handshake.js';
import { NBD_CMD, NBD_ERRNO, NbdProtocolError, type NbdRequestError } from '../backends/nbd/protocol.js';
import { NbdTransmission, type NbdRequest } from '../backends/nbd/transmission.js';
import type { NbdUri } from '../backends/nbd/uri.js';
import type { NbdBackendOptions } from './nbd-backend.js';
import { NbdBackendError } from './nbd-errors.js';

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
export const DEFAULT_STALL_TIMEOUT_MS = 60_000;
/** Stall checks per stall timeout: a stall is noticed after 3/4 to all of it. */
export const STALL_TICKS = 4;
const DEFAULT_MAX_IN_FLIGHT = 512;
/** Reconnection backoff: the first retry, and the longest wait between tries. */
const FIRST_RETRY_MS = 50;
const MAX_RETRY_MS = 2_000;
/** Socket read buffer, reused for every read of a clear-text connection. */
const READ_BUFFER_BYTES = 256 * 1024;

/** What a connection needs of the backend it serves. */
export interface ConnectionOwner<R extends NbdRequest> {
  readonly uri: NbdUri;
  /** The URI, canonical, for messages. */
  readonly uriText: string;
  readonly options: NbdBackendOptions;
  readonly isClosed: boolean;
  /** Why a reconnection's export will not do (smaller, a capability gone), or null. */
  mismatch(info: NbdExportInfo): string | null;
  /** The server answered `op`: done, or failed with its error. */
  completed(op: R, error: NbdRequestError | null): void;
  /** Requests the connection can no longer carry, to resubmit. */
  requeue(ops: R[]): void;
  /** The connection has room again. */
  pump(): void;
  connectionUp(c: Connection<R>, again: boolean, downMs: number): void;
  connectionDown(c: Connection<R>, reason: string): void;
}

const enum ConnState {
  Idle,
  Handshaking,
  Ready,
  /** ESHUTDOWN: no new requests; DISC once the ones in flight are done. */
  Draining,
  Down,
  Closed,
}

/** One connection to the server: its socket, handshake and transmission, and its reconnection. */
export class Connection<R extends NbdRequest> {
  private state = ConnState.Idle;
  private socket: Socket | TLSSocket | null = null;
  private tx: NbdTransmission | null = null;
  private handshake: NbdHandshake | null = null;
  private readonly readBuffer: Buffer | null;
  /** Writes handed to the socket whose callback has not run yet. */
  private unflushed = 0;
  /** Completions of writes held until the socket has sent all our bytes. */
  private deferred: { op: R; error: NbdRequestError | null }[] = [];
  private corked = false;
  private retryMs = FIRST_RETRY_MS;
  private retryTimer: NodeJS.Timeout | null = null;
  private downSince = 0;
  private lastFailure = '';
  /** Socket reads so far, and as the last stall check saw them. */
  private reads = 0;
  private readsSeen = 0;
  /** Stall checks in a row that found requests in flight and nothing read. */
  private quietTicks = 0;
  private readonly maxInFlight: number;

  private readonly sink = (bytes: Uint8Array): void => {
    const s = this.socket as Socket;
    if (!this.corked) {
      this.corked = true;
      s.cork();
      process.nextTick(this.uncork);
    }
    this.unflushed++;
    s.write(bytes, this.afterWrite);
  };
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket?.uncork();
  };
  private readonly afterWrite = (): void => {
    if (--this.unflushed === 0 && this.deferred.length > 0) this.releaseDeferred();
  };
  private readonly onComplete = (req: NbdRequest, error: NbdRequestError | null): void => {
    const op = req as R;
    if (error !== null && error.errno === NBD_ERRNO.ESHUTDOWN) {
      // The server is going away: the request is retried on another connection, or on
      // this one once it is back ("If the client receives an NBD_ESHUTDOWN error it
      // MUST initiate a soft disconnect").
      this.backend.requeue([op]);
      this.drain();
      return;
    }
    // The server answers: reconnect quickly again the next time it is lost. (Not at the
    // reconnection itself: one that takes the handshake and then drops every request
    // would be retried in a tight loop.)
    this.retryMs = FIRST_RETRY_MS;
    if (op.type === NBD_CMD.WRITE && this.unflushed > 0) this.deferred.push({ op, error });
    else this.backend.completed(op, error);
    if (this.state === ConnState.Draining && this.inFlight === 0) this.drained();
    else this.backend.pump();
  };
  private readonly onBytes = (bytes: Uint8Array): void => {
    this.reads++;
    if (this.tx !== null) {
      const e = this.tx.receive(bytes);
      if (e !== null) this.lost(`protocol error: ${e.message}`);
    } else if (this.handshake !== null) {
      this.handshakeEvents(this.handshake.receive(bytes));
    }
  };
  private handshakeDone: ((info: NbdExportInfo) => void) | null = null;
  private handshakeFailed: ((e: Error) => void) | null = null;

  constructor(private readonly backend: ConnectionOwner<R>, readonly index: number) {
    this.readBuffer = backend.uri.tls ? null : Buffer.allocUnsafe(READ_BUFFER_BYTES);
    this.maxInFlight = backend.options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
  }

  get isReady(): boolean {
    return this.state === ConnState.Ready;
  }

  /** Ready, with a free cookie. */
  get canTake(): boolean {
    return this.state === ConnState.Ready && (this.tx as NbdTransmission).hasRoom;
  }

  get inFlight(): number {
    return this.tx === null ? 0 : this.tx.inFlight + this.deferred.length;
  }

  submit(op: R): void {
    (this.tx as NbdTransmission).submit(op);
  }

  /** Opens the socket and runs the handshake; resolves in transmission phase. */
  connect(): Promise<NbdExportInfo> {
    this.state = ConnState.Handshaking;
    const uri = this.backend.uri;
    const opts = this.backend.options;
    const hs = new NbdHandshake({ exportName: uri.exportName, tls: uri.tls });
    this.handshake = hs;
    return new Promise<NbdExportInfo>((resolve, reject) => {
      let settled = false;
      const timer = setTimeout(() => fail(new NbdBackendError('CONNECT_FAILED', `no NBD handshake within ${((opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS) / 1000).toFixed(0)} s`)),
        opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
      const fail = (e: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.destroySocket();
        this.handshake = null;
        reject(e);
      };
      this.handshakeFailed = fail;
      this.handshakeDone = (info) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(info);
      };
      const a = uri.address;
      const onread = this.readBuffer === null ? undefined : {
        buffer: this.readBuffer,
        callback: (n: number, buf: Uint8Array): boolean => {
          this.onBytes(buf.subarray(0, n));
          // Keep reading: requests in flight are bounded by the cookie table.
          return true;
        },
      };
      const socket = a.kind === 'unix'
        ? createConnection({ path: a.socket, onread })
        : createConnection({ host: a.host, port: a.port, onread, noDelay: true });
      this.socket = socket;
      this.watch(socket, fail);
      if (onread === undefined) socket.on('data', this.onBytes);
    });
  }

  /** Close and error handling of a socket, before and after the handshake. */
  private watch(socket: Socket, failHandshake: (e: Error) => void): void {
    let error: Error | null = null;
    socket.on('error', (e) => {
      error = e;
    });
    socket.on('close', () => {
      if (this.socket !== socket) return;
      if (this.tx === null && this.handshake !== null) {
        failHandshake(error !== null ? new NbdBackendError('CONNECT_FAILED', error.message) : this.handshake.closedError());
        return;
      }
      this.lost(error !== null ? error.message : 'the server closed the connection');
    });
  }

  private handshakeEvents(events: ReturnType<NbdHandshake['receive']>): void {
    for (const e of events) {
      const s = this.socket as Socket;
      if (e.type === 'send') s.write(e.bytes);
      else if (e.type === 'starttls') this.startTls();
      else if (e.type === 'failed') {
        // The ABORT (if any) goes out first: end() closes once it is written.
        this.socket = null;
        s.end();
        setTimeout(() => s.destroy(), 1000).unref();
        this.handshakeFailed?.(e.error);
      } else {
        this.handshake = null;
        this.tx = new NbdTransmission({
          structuredReplies: e.info.structuredReplies, maxInFlight: this.maxInFlight, sink: this.sink, onComplete: this.onComplete,
        });
        this.handshakeDone?.(e.info);
        if (e.rest.length > 0) this.onBytes(e.rest);
      }
    }
  }

  private startTls(): void {
    const raw = this.socket as Socket;
    const uri = this.backend.uri;
    const opts: ConnectionOptions = { socket: raw, rejectUnauthorized: uri.tlsVerifyPeer };
    const dir = this.backend.options.tlsCertificates;
    try {
      if (dir !== undefined) {
        opts.ca = readOptional(join(dir, 'ca-cert.pem'));
        opts.cert = readOptional(join(dir, 'client-cert.pem'));
        opts.key = readOptional(join(dir, 'client-key.pem'));
      }
    } catch (e) {
      this.handshakeFailed?.(new NbdBackendError('CONNECT_FAILED', `TLS credentials in ${dir}: ${messageOf(e)}`));
      return;
    }
    const name = uri.tlsHostname ?? (uri.address.kind === 'tcp' ? uri.address.host : undefined);
    if (name === undefined) {
      // A unix socket has no host name to check the certificate against: the chain is
      // still verified (unless tls-verify-peer=0); tls-hostname names one to check.
      opts.checkServerIdentity = () => undefined;
    } else {
      // With a socket given, `host` only names whom the certificate must be for.
      opts.host = name;
      if (isIP(name) === 0) opts.servername = name;
    }
    raw.removeListener('data', this.onBytes);
    const secure = tlsConnect(opts);
    this.socket = secure;
    this.watch(secure, (e) => this.handshakeFailed?.(e));
    secure.on('data', this.onBytes);
    secure.once('secureConnect', () => {
      if (this.handshake !== null) this.handshakeEvents(this.handshake.tlsReady());
    });
  }

  /** The handshake succeeded and the backend accepted the export: take requests. */
  ready(): void {
    const again = this.downSince !== 0;
    const downMs = again ? Date.now() - this.downSince : 0;
    this.state = ConnState.Ready;
    this.lastFailure = '';
    this.downSince = 0;
    this.backend.connectionUp(this, again, downMs);
  }

  /** Called every stall timeout / STALL_TICKS: drops a connection that keeps requests unanswered. */
  checkStall(): void {
    if ((this.state !== ConnState.Ready && this.state !== ConnState.Draining) || this.tx === null || this.tx.inFlight === 0 ||
        this.reads !== this.readsSeen) {
      this.readsSeen = this.reads;
      this.quietTicks = 0;
      return;
    }
    if (++this.quietTicks < STALL_TICKS) return;
    const ms = this.backend.options.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
    this.lost(`nothing received for ${(ms / 1000).toFixed(1)} s with ${this.tx.inFlight} requests in flight`);
  }

  /** The connection broke: hand its requests back, and reconnect. */
  private lost(reason: string): void {
    if (this.state === ConnState.Down || this.state === ConnState.Closed) return;
    this.state = ConnState.Down;
    this.downSince = Date.now();
    this.quietTicks = 0;
    this.destroySocket();
    this.backend.requeue(this.takeAll());
    this.backend.connectionDown(this, reason);
    this.scheduleRetry();
  }

  /** Everything in flight or held, with the transmission gone. */
  private takeAll(): R[] {
    const ops: R[] = [];
    // Held completions of writes the server did answer: report them, they are done.
    const held = this.deferred;
    this.deferred = [];
    for (const d of held) this.backend.completed(d.op, d.error);
    if (this.tx !== null) for (const r of this.tx.takeAll()) ops.push(r as R);
    this.tx = null;
    this.unflushed = 0;
    return ops;
  }

  private releaseDeferred(): void {
    const held = this.deferred;
    this.deferred = [];
    for (const d of held) this.backend.completed(d.op, d.error);
    if (this.state === ConnState.Draining && this.inFlight === 0) this.drained();
    else this.backend.pump();
  }

  /** ESHUTDOWN seen: stop taking requests; the soft disconnect follows once idle. */
  drain(): void {
    if (this.state !== ConnState.Ready) return;
    this.state = ConnState.Draining;
    if (this.inFlight === 0) this.drained();
  }

  private drained(): void {
    const s = this.socket;
    if (s !== null && this.tx !== null) s.end(NbdTransmission.disconnectBytes());
    this.lost('the server is shutting down (NBD_ESHUTDOWN)');
  }

  private scheduleRetry(): void {
    if (this.backend.isClosed) return;
    const wait = this.retryMs;
    this.retryMs = Math.min(MAX_RETRY_MS, this.retryMs * 2);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (this.backend.isClosed) return;
      this.connect().then((info) => {
        const bad = this.backend.mismatch(info);
        if (bad !== null) throw new NbdProtocolError('EXPORT_CHANGED', bad);
        if (this.backend.isClosed) {
          void this.disconnect();
          return;
        }
        this.ready();
      }).catch((e: unknown) => {
        this.destroySocket();
        this.tx = null;
        this.state = ConnState.Down;
        const why = messageOf(e);
        if (why !== this.lastFailure) {
          this.lastFailure = why;
          this.backend.options.log?.(`${this.backend.uriText}: connection ${this.index + 1}: reconnecting failed (${why}); retrying every ${(MAX_RETRY_MS / 1000).toFixed(0)} s at most`, { level: 'warn' });
        }
        this.scheduleRetry();
      });
    }, wait);
  }

  /**
   * A soft disconnect (NBD_CMD_DISC) when connected and idle; a hard one when requests
   * are still in flight (the socket goes first, so none of their buffers is referenced
   * any more when they fail). Then no more reconnecting.
   */
  async disconnect(): Promise<void> {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    const s = this.socket;
    const soft = (this.state === ConnState.Ready || this.state === ConnState.Draining) && this.tx !== null && this.inFlight === 0;
    this.state = ConnState.Closed;
    if (!soft) this.destroySocket();
    this.backend.requeue(this.takeAll());
    this.socket = null;
    if (s === null || !soft) return;
    await new Promise<void>((resolve) => {
      s.once('close', () => resolve());
      // "A client MUST NOT send anything to the server after sending an NBD_CMD_DISC."
      s.end(NbdTransmission.disconnectBytes());
      // A server that never closes its side is not waited for long.
      setTimeout(() => s.destroy(), 1000).unref();
    });
  }

  /** Forgets the connection without a word (a failed start). */
  close(): void {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.state = ConnState.Closed;
    this.destroySocket();
  }

  private destroySocket(): void {
    const s = this.socket;
    this.socket = null;
    this.corked = false;
    s?.destroy();
  }
}

function readOptional(path: string): Buffer | undefined {
  try {
    return readFileSync(path);
  } catch (e) {
    if ((e as { code?: unknown }).code === 'ENOENT') return undefined;
    throw e;
  }
}

export function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
