/**
 * Node plumbing for the vhost-user frontend: the socket and its replies, eventfds, a
 * sealed memfd shared with the backend, and the backend channel (a socketpair whose
 * other end we hand over with SET_BACKEND_REQ_FD).
 */
import { VblkError } from '../errors.js';
import { VHOST_USER_HEADER_SIZE, VHOST_USER_MAX_FDS } from '../spec/vhost-user.js';
import {
  decodeBackendReply, decodeBackendRequest, decodeHeader, encodeFrontendReply, encodeFrontendRequest,
} from '../transport/vhost-user/codec.js';
import {
  VhostUserFrontend, type FrontendChannel, type FrontendIo, type FrontendOptions, type Notifier, type SharedMemory,
} from '../transport/vhost-user/frontend.js';
import type { BackendReply, FrontendRequest, Header, RequestWithReply } from '../transport/vhost-user/messages.js';
import { EventFd } from './eventfd.js';
import { MappedRegion } from './mapped-memory.js';
import * as native from './native.js';
import { UnixConnection } from './unix-socket.js';

const OWN_REPLY: ReadonlySet<RequestWithReply> = new Set<RequestWithReply>([
  'GET_FEATURES', 'GET_PROTOCOL_FEATURES', 'GET_VRING_BASE', 'GET_QUEUE_NUM', 'GET_CONFIG', 'GET_INFLIGHT_FD',
  'GET_MAX_MEM_SLOTS', 'GET_STATUS',
]);

/**
 * How {@link connectVhostUser} connects: the frontend's shared memory size, config read
 * size and largest queue size, and how long to wait for a reply.
 */
export interface ConnectOptions extends FrontendOptions {
  /** How long to wait for each reply before giving up on the backend. Default 10 s. */
  replyTimeoutMs?: number;
}

interface RawReply {
  readonly header: Header;
  readonly payload: Uint8Array;
  readonly fds: number[];
}

/**
 * Requests go out one at a time. One read loop owns the socket: each reply is read
 * exactly (header, then payload) and handed to the request waiting for it. A backend
 * never speaks unasked on this socket, so end-of-file, a socket error, or a message
 * nobody waits for means the device is gone.
 */
class SocketChannel implements FrontendChannel {
  private tail: Promise<unknown> = Promise.resolve();
  private waiting: { resolve: (r: RawReply) => void; reject: (e: Error) => void } | null = null;
  private lost: Error | null = null;
  private readonly lostListeners: ((reason: Error) => void)[] = [];
  private closing = false;
  private hasReplied = false;

  constructor(private readonly conn: UnixConnection, private readonly timeoutMs: number) {
    void this.readLoop();
  }

  private async readLoop(): Promise<void> {
    let reason: Error;
    try {
      for (;;) {
        const head = await this.conn.readExact(VHOST_USER_HEADER_SIZE, VHOST_USER_MAX_FDS);
        if (head === null) {
          reason = new VblkError('DISCONNECTED', 'the vhost-user backend closed the connection');
          break;
        }
        const header = decodeHeader(head.data);
        if (!header.ok) {
          head.fds.forEach((fd) => native.close(fd));
          reason = header.error;
          break;
        }
        const payload = await this.conn.readExact(header.value.size, 0);
        if (payload === null) {
          head.fds.forEach((fd) => native.close(fd));
          reason = new VblkError('DISCONNECTED', 'the vhost-user backend closed the connection mid-reply');
          break;
        }
        const w = this.waiting;
        if (!w) {
          head.fds.forEach((fd) => native.close(fd));
          reason = new VblkError('PROTOCOL_ERROR', `the vhost-user backend sent request ${header.value.request} nobody asked for`);
          break;
        }
        this.waiting = null;
        this.hasReplied = true;
        w.resolve({ header: header.value, payload: payload.data, fds: head.fds });
      }
    } catch (e) {
      reason = e instanceof Error ? e : new Error(String(e));
    }
    this.fail(reason);
  }

  private fail(reason: Error): void {
    if (this.lost) return;
    this.lost = reason;
    this.conn.close();
    this.waiting?.reject(reason);
    this.waiting = null;
    if (!this.closing) for (const l of this.lostListeners.splice(0)) l(reason);
  }

  onLost(listener: (reason: Error) => void): void {
    this.lostListeners.push(listener);
  }

  call(req: FrontendRequest): Promise<BackendReply | null> {
    const run = this.tail.then(() => this.exchange(req));
    this.tail = run.catch(() => {});
    return run;
  }

  private async exchange(req: FrontendRequest): Promise<BackendReply | null> {
    if (this.lost) throw this.lost;
    const expectsReply = OWN_REPLY.has(req.request as RequestWithReply) || req.needReply;
    const reply = expectsReply
      ? new Promise<RawReply>((resolve, reject) => (this.waiting = { resolve, reject }))
      : null;
    const msg = encodeFrontendRequest(req);
    this.conn.send(msg.bytes, msg.fds);
    if (!reply) return null;
    const timer = setTimeout(() => {
      // A backend busy with another frontend leaves us waiting in its listen backlog
      // (vblk serve and qemu-storage-daemon serve one at a time): silent from the start.
      const hint = this.hasReplied ? 'is this a vhost-user device?'
        : 'is this a vhost-user device, and is it free? (a backend serves one frontend at a time; the next waits)';
      this.fail(new VblkError('TIMEOUT', `no reply to VHOST_USER_${req.request} within ${this.timeoutMs} ms: ${hint}`));
    }, this.timeoutMs);
    try {
      const raw = await reply;
      const decoded = decodeBackendReply(raw.header, raw.payload, raw.fds, req);
      if (!decoded.ok) {
        decoded.fds.forEach((fd) => native.close(fd));
        this.fail(decoded.error);
        throw decoded.error;
      }
      return decoded.value;
    } finally {
      clearTimeout(timer);
    }
  }

  close(): void {
    this.closing = true;
    this.fail(new VblkError('CLOSED', 'the vhost-user connection was closed'));
  }
}

class NodeFrontendIo implements FrontendIo {
  readonly channel: FrontendChannel;

  constructor(conn: UnixConnection, private readonly socketPath: string, private readonly timeoutMs: number) {
    this.channel = new SocketChannel(conn, timeoutMs);
  }

  async reconnect(): Promise<FrontendChannel> {
    return new SocketChannel(await connectSocket(this.socketPath), this.timeoutMs);
  }

  createNotifier(): Notifier {
    const e = EventFd.create();
    return {
      fd: e.fd,
      signal: () => e.write(1),
      watch: (onSignal) => e.watch(() => onSignal()),
      close: () => e.close(),
    };
  }

  createSharedMemory(size: number): SharedMemory {
    // Sealed against shrinking: a backend that maps it can never take SIGBUS from us.
    const fd = native.memfdCreate('vblk-frontend', size, { seal: true });
    try {
      const region = MappedRegion.map(fd, size);
      if (region.windows.length !== 1) throw new VblkError('BAD_OPTION', `shared memory of ${size} bytes needs more than one mapping window`);
      const w = region.windows[0];
      return {
        fd,
        address: Number(w.address),
        bytes: w.bytes,
        release: () => {
          region.unmap();
          native.close(fd);
        },
      };
    } catch (e) {
      native.close(fd);
      throw e;
    }
  }

  openBackendChannel(onConfigChange: () => void): { fd: number; close(): void } {
    const [ours, theirs] = native.socketpair();
    const conn = new UnixConnection(ours);
    const loop = async (): Promise<void> => {
      for (;;) {
        const head = await conn.readExact(VHOST_USER_HEADER_SIZE, VHOST_USER_MAX_FDS);
        if (head === null) return;
        const header = decodeHeader(head.data);
        if (!header.ok) throw header.error;
        const payload = await conn.readExact(header.value.size, 0);
        if (payload === null) return;
        const req = decodeBackendRequest(header.value, payload.data, head.fds);
        if (!req.ok) {
          req.fds.forEach((fd) => native.close(fd));
          throw req.error;
        }
        onConfigChange();
        if (req.value.needReply) {
          const ack = encodeFrontendReply({ request: req.value.request, success: true });
          conn.send(ack.bytes, ack.fds);
        }
      }
    };
    loop().catch(() => conn.close());
    return {
      fd: theirs,
      close: () => {
        conn.close();
        native.close(theirs);
      },
    };
  }
}

/**
 * Connects to a vhost-user device at `socketPath` and opens a frontend session on it.
 * Fails with one readable error when nothing listens there or the peer is not a
 * vhost-user device.
 */
export async function connectVhostUser(socketPath: string, options: ConnectOptions = {}): Promise<VhostUserFrontend> {
  const conn = await connectSocket(socketPath);
  return VhostUserFrontend.open(new NodeFrontendIo(conn, socketPath, options.replyTimeoutMs ?? 10_000), options);
}

async function connectSocket(socketPath: string): Promise<UnixConnection> {
  try {
    return await UnixConnection.connect(socketPath);
  } catch (e) {
    throw new VblkError('CONNECT_FAILED', `cannot connect to ${socketPath}: ${(e as Error).message}`);
  }
}
