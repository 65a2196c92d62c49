/**
 * The socket side of the vhost-user backend: listens on a unix socket, serves one
 * frontend at a time with a {@link VhostUserBackendSession}, and keeps listening when a
 * frontend goes away (guest reboot, QEMU quitting, `reconnect=`). Messages are read as
 * VHOST-USER-NOTES.md says: exactly the 12-byte header with its fds, then exactly the
 * payload; never ahead.
 *
 * One at a time, like qemu-storage-daemon: from accepting a frontend until its session
 * is cleaned up (requests in flight completed, device reset, memory unmapped) the server
 * accepts nobody. A frontend that connects meanwhile waits in the listen backlog — its
 * connect succeeds and what it sends is kept by the kernel — and is served next. So one
 * that reconnects right after hanging up (QEMU's `reconnect=`, `vblk info` and then
 * QEMU) is never turned away, however the close and the connect race on the event loop;
 * one that connects while another really is connected is logged as waiting.
 */
import { chmodSync } from 'node:fs';
import { isMainThread } from 'node:worker_threads';
import { VblkError } from '../errors.js';
import type { LogSink } from '../log.js';
import { VHOST_USER_HEADER_SIZE, VHOST_USER_MAX_FDS } from '../spec/vhost-user.js';
import { decodeFrontendRequest, decodeHeader, encodeBackendReply } from '../transport/vhost-user/codec.js';
import {
  VhostUserBackendSession,
  type BackendIo, type RegionMapping, type Stoppable,
} from '../transport/vhost-user/backend.js';
import type { BackendReply, EncodedMessage } from '../transport/vhost-user/messages.js';
import type { VirtioDevice } from '../virtqueue/device.js';
import { EventFd } from './eventfd.js';
import { FdWatcher } from './fd-watcher.js';
import { MappedRegion } from './mapped-memory.js';
import * as native from './native.js';
import { MAX_READ_TIMEOUT_MS, UnixConnection, UnixSocketServer } from './unix-socket.js';

/** How {@link VhostUserServer.listen} serves a device: the socket, the device, the limits. */
export interface VhostUserServerOptions {
  /** Path of the unix socket to listen on. */
  readonly socketPath: string;
  /** The device model served (a `BlkDevice`), to one frontend at a time; reset between them. */
  readonly device: VirtioDevice;
  /** File mode of the socket (default 0o600: only the owner may connect). */
  readonly socketMode?: number;
  /**
   * Protocol features to offer (default: all the backend offers by default, the dirty log
   * for live migration among them; without VHOST_USER_PROTOCOL_F_LOG_SHMFD QEMU refuses to
   * migrate the guest).
   */
  readonly protocolFeatures?: bigint;
  /** One line per connection and per error. */
  readonly log?: LogSink;
  /**
   * How long a frontend may leave a message unfinished before the connection is dropped:
   * its header must be whole this many milliseconds after its first byte, and its payload
   * this long after the header (default 20 000: 20 s). Time between
   * messages is not limited: QEMU sends nothing for hours while its guest runs.
   */
  readonly messageTimeoutMs?: number;
  /**
   * Map memory regions whose fd is not sealed against shrinking (memory-backend-file on
   * /dev/shm or hugetlbfs, `memory-backend-memfd,seal=off`). Dangerous: a frontend that
   * then shrinks the file kills this process with SIGBUS, which no JavaScript can catch;
   * a memfd sealed with F_SEAL_SHRINK can never be shrunk. Default false.
   */
  readonly allowUnsealedMemory?: boolean;
}

/**
 * A frontend writes each message with one sendmsg, and we wait for the rest of one only
 * while the socket holds nothing more, so a live frontend's message is whole within
 * microseconds. Twenty seconds leaves room for a frontend descheduled or swapped out
 * mid-write, while one that stalls (or attacks) cannot hold the one-at-a-time server.
 */
export const DEFAULT_MESSAGE_TIMEOUT_MS = 20_000;

export type RegionMappingErrorCode = 'UNSEALED_MEMORY' | 'REGION_PAST_EOF';

/** A memory region fd the backend refuses to map; the message says why. */
export class RegionMappingError extends VblkError {
  declare readonly code: RegionMappingErrorCode;
  constructor(code: RegionMappingErrorCode, message: string) {
    super(code, message);
  }
}

/** Node's effects for a backend session: mmap, eventfds, the backend channel. */
export class NodeBackendIo implements BackendIo {
  /** Backend channels by fd: a connection queues what a full socket cannot take yet. */
  private readonly channels = new Map<number, UnixConnection>();

  constructor(
    readonly log: LogSink,
    private readonly allowUnsealedMemory = false,
  ) {}

  /**
   * The SIGBUS policy. Touching a shared mapping past the end of its file raises SIGBUS,
   * which no JavaScript can catch: the process dies. Checking the size when mapping is
   * not enough, since a hostile frontend can ftruncate the file after SET_MEM_TABLE and
   * kill us at the next ring access. So a region fd must carry F_SEAL_SHRINK, which
   * nobody can ever remove. QEMU's memory-backend-memfd seals by default: QEMU 7.2 sends
   * seals 0x7 (SEAL | SHRINK | GROW); with `seal=off`, or a memory-backend-file on
   * /dev/shm, it sends 0x1, and files that cannot carry seals at all (disk, pipes) fail
   * F_GET_SEALS. Those are refused with UNSEALED_MEMORY unless the server was told
   * `allowUnsealedMemory`, which trusts the frontend never to shrink the file.
   * Seals are read before the size, so a shrink between the two checks cannot slip by.
   */
  mapRegion(fd: number, size: number, mmapOffset: number): RegionMapping {
    if (!this.allowUnsealedMemory) {
      let seals: number;
      try {
        seals = native.getSeals(fd);
      } catch (e) {
        throw new RegionMappingError('UNSEALED_MEMORY', `region fd cannot carry seals (${(e as Error).message}): only memfds sealed with F_SEAL_SHRINK are mapped unless unsealed memory is allowed`);
      }
      if ((seals & native.F_SEAL_SHRINK) === 0) {
        throw new RegionMappingError('UNSEALED_MEMORY', `region fd is not sealed against shrinking (seals 0x${seals.toString(16)}): a frontend could shrink it under us (SIGBUS); use a sealed memfd or allow unsealed memory`);
      }
    }
    const fileSize = native.fstatSize(fd);
    // Touching a mapping past the end of its file raises SIGBUS, which kills the process.
    if (mmapOffset + size > fileSize) {
      throw new RegionMappingError('REGION_PAST_EOF', `region of ${size} bytes at offset ${mmapOffset} reaches past the end of its ${fileSize}-byte fd`);
    }
    const region = MappedRegion.map(fd, size, { fileOffset: mmapOffset });
    return { chunks: region.windows.map((w) => w.bytes), unmap: () => region.unmap() };
  }

  createSharedMemory(size: number): { fd: number; mapping: RegionMapping } {
    const fd = native.memfdCreate('vblk-inflight', size, { seal: true });
    try {
      const region = MappedRegion.map(fd, size);
      return { fd, mapping: { chunks: region.windows.map((w) => w.bytes), unmap: () => region.unmap() } };
    } catch (e) {
      native.close(fd);
      throw e;
    }
  }

  closeFd(fd: number): void {
    const channel = this.channels.get(fd);
    if (channel) {
      this.channels.delete(fd);
      channel.close();
      return;
    }
    try {
      native.close(fd);
    } catch (e) {
      this.log(`closing fd ${fd}: ${(e as Error).message}`);
    }
  }

  checkEventFd(fd: number): void {
    // Adopting checks the fd really is an eventfd and makes it non-blocking: a pipe or
    // file from a hostile frontend must neither spin the watcher nor block a write.
    EventFd.adopt(fd);
  }

  watchEventFd(fd: number, onReady: () => void): Stoppable {
    const watcher = new FdWatcher(fd, 'r', (error) => {
      if (error !== null) {
        this.log(`eventfd ${fd}: ${error.message}`);
        watcher.stop();
        return;
      }
      if (native.eventfdRead(fd) > 0) onReady();
    });
    return watcher;
  }

  signalEventFd(fd: number): void {
    try {
      native.eventfdWrite(fd, 1);
    } catch (e) {
      this.log(`signalling eventfd ${fd}: ${(e as Error).message}`);
    }
  }

  sendOnBackendChannel(fd: number, message: EncodedMessage): void {
    let channel = this.channels.get(fd);
    if (!channel) {
      try {
        native.setNonBlocking(fd);
      } catch (e) {
        this.log(`backend channel: ${(e as Error).message}`);
        return;
      }
      channel = new UnixConnection(fd);
      this.channels.set(fd, channel);
    }
    // A dead channel closes the connection and is reported to readers; nothing reads
    // this one, so a failed send is only worth a log line.
    if (channel.isClosed) this.log('backend channel is closed; configuration change not sent');
    else channel.send(message.bytes, message.fds);
  }
}

/** The log's reason for a connection that ended with `e`, in the frontend's terms. */
function whyConnectionFailed(e: unknown): string {
  if (e instanceof VblkError && e.code === 'READ_TIMEOUT') return `frontend stopped mid-message: ${e.message}`;
  // On an AF_UNIX socket ECONNRESET means the peer closed it with our data unread, and
  // EPIPE that we wrote after it closed: either way the frontend hung up.
  if (native.isNativeError(e, 'ECONNRESET')) return 'frontend hung up, leaving a reply unread (connection reset)';
  if (native.isNativeError(e, 'EPIPE')) return 'frontend hung up before its reply was sent (EPIPE)';
  return e instanceof Error ? e.message : String(e);
}

/** A listening vhost-user backend. */
export class VhostUserServer {
  private readonly log: LogSink;
  private active: Promise<void> | null = null;
  private current: UnixConnection | null = null;
  private connections = 0;
  private session: VhostUserBackendSession | null = null;
  private resubmittedBefore = 0;

  private constructor(private readonly options: VhostUserServerOptions, private readonly server: UnixSocketServer) {
    this.log = options.log ?? (() => {});
  }

  /**
   * Listens on `options.socketPath`. A stale socket file (nobody listening) is replaced;
   * a live one fails with `EADDRINUSE`.
   */
  static listen(options: VhostUserServerOptions): VhostUserServer {
    const timeout = options.messageTimeoutMs;
    if (timeout !== undefined && (!Number.isInteger(timeout) || timeout < 1 || timeout > MAX_READ_TIMEOUT_MS)) {
      throw new RangeError(`messageTimeoutMs must be an integer from 1 to ${MAX_READ_TIMEOUT_MS}, got ${timeout}`);
    }
    let self: VhostUserServer | null = null;
    const mode = options.socketMode ?? 0o600;
    // bind() creates the socket file as 0777 & ~umask, and a peer that connects before the
    // chmod is queued and served whatever the mode says afterwards: narrow the umask
    // around bind so the file is never more open than `mode`. (Workers cannot set the
    // umask; there the chmod alone applies.)
    const umask = isMainThread ? process.umask(0o777 & ~mode) : null;
    let server: UnixSocketServer;
    try {
      server = UnixSocketServer.listen(options.socketPath, (conn) => self?.accept(conn), { removeStale: true });
    } finally {
      if (umask !== null) process.umask(umask);
    }
    chmodSync(options.socketPath, mode);
    self = new VhostUserServer(options, server);
    return self;
  }

  /** Number of frontends served so far. */
  get connectionCount(): number {
    return this.connections;
  }

  /** Whether a frontend is connected now. */
  get isConnected(): boolean {
    return this.current !== null;
  }

  /** Whether the connected frontend has the dirty log on: it is live-migrating its guest. */
  get isDirtyLogging(): boolean {
    return this.session?.isDirtyLogging ?? false;
  }

  /** Requests that previous backends left in flight and this server resubmitted (vhost-user inflight tracking). */
  get resubmittedRequests(): number {
    return this.resubmittedBefore + (this.session?.resubmitted ?? 0);
  }

  private accept(conn: UnixConnection): void {
    const n = ++this.connections;
    this.log(`frontend ${n} connected`, { frontend: n });
    this.current = conn;
    this.server.pause(() => {
      // A frontend that hung up and reconnected at once can make the listening socket
      // ready before its old connection's end is read: let the event loop read that
      // first, and report only a frontend that waits for one still connected.
      setImmediate(() => {
        if (this.current === conn) this.log(`a frontend is waiting to connect: it is served once frontend ${n} has gone`, { level: 'warn' });
      });
    });
    this.active = this.serve(conn, n).finally(() => {
      this.active = null;
      this.server.resume();
    });
  }

  private async serve(conn: UnixConnection, n: number): Promise<void> {
    const io = new NodeBackendIo((line, context) => this.log(line, { frontend: n, ...context }), this.options.allowUnsealedMemory ?? false);
    const session = new VhostUserBackendSession(this.options.device, io, {
      protocolFeatures: this.options.protocolFeatures,
    });
    this.session = session;
    let reason = 'frontend closed the connection';
    const timeoutMs = this.options.messageTimeoutMs ?? DEFAULT_MESSAGE_TIMEOUT_MS;
    try {
      for (;;) {
        // Idle until a message begins; from its first byte it must arrive whole in time.
        const head = await conn.readExact(VHOST_USER_HEADER_SIZE, VHOST_USER_MAX_FDS, { timeoutMs, idleUntilFirstByte: true });
        if (head === null) break;
        const header = decodeHeader(head.data);
        if (!header.ok) {
          head.fds.forEach((fd) => io.closeFd(fd));
          reason = header.error.message;
          break;
        }
        // The header's fds are ours until the message is decoded: close them when the
        // payload never arrives (EOF or a socket error mid-message), not only on null.
        const payload = await conn.readExact(header.value.size, 0, { timeoutMs }).catch((e: unknown) => {
          head.fds.forEach((fd) => io.closeFd(fd));
          throw e;
        });
        if (payload === null || payload.truncatedFds) {
          head.fds.forEach((fd) => io.closeFd(fd));
          reason = payload === null ? 'frontend closed the connection mid-message' : 'fds attached inside a payload';
          break;
        }
        if (head.truncatedFds) {
          head.fds.forEach((fd) => io.closeFd(fd));
          reason = `more than ${VHOST_USER_MAX_FDS} fds on one message`;
          break;
        }
        const decoded = decodeFrontendRequest(header.value, payload.data, head.fds);
        if (!decoded.ok) {
          decoded.fds.forEach((fd) => io.closeFd(fd));
          reason = decoded.error.message;
          break;
        }
        const req = decoded.value;
        let reply: BackendReply | null;
        try {
          reply = await session.handle(req);
        } catch (e) {
          if (!(e instanceof VblkError)) throw e;
          this.log(`frontend ${n}: VHOST_USER_${req.request} refused: ${e.message}`, { frontend: n, level: 'warn' });
          reply = session.failureReply(req);
          if (!reply) {
            reason = `cannot honour VHOST_USER_${req.request}: ${e.message}`;
            break;
          }
        }
        if (reply) {
          const msg = encodeBackendReply(reply);
          conn.send(msg.bytes, msg.fds);
          // send() took its own copies of the fds (GET_INFLIGHT_FD's buffer).
          msg.fds.forEach((fd) => io.closeFd(fd));
        }
      }
    } catch (e) {
      reason = whyConnectionFailed(e);
    } finally {
      this.log(`frontend ${n} disconnected: ${reason}`, { frontend: n });
      conn.close();
      if (this.current === conn) this.current = null;
      await session.close().catch((e: unknown) => this.log(`frontend ${n}: cleanup failed: ${(e as Error).message}`, { frontend: n, level: 'error' }));
      this.resubmittedBefore += session.resubmitted;
      if (this.session === session) this.session = null;
    }
  }

  /** Stops listening and drops the current frontend after its requests complete. */
  async close(): Promise<void> {
    this.server.close();
    this.current?.close();
    await this.active;
  }
}
