/**
 * A raw frontend with running rings over memory it wrote by hand: the stage for a
 * hostile guest (broken descriptors, index jumps) and for frontends that change memory
 * or rings under running queues.
 */
import * as native from '../../src/node/native.js';
import { VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_PROTOCOL_F } from '../../src/spec/vhost-user.js';
import { VIRTIO_F } from '../../src/spec/virtio.js';
import { GuestRing, RawFrontend, SharedRegion, bit } from './raw-frontend.js';
import { sleep } from './server-process.js';

/** Where ring `i` sits in guest memory: far enough apart for its requests' data. */
export const RING_STRIDE = 256 * 1024;
export const RING_SIZE = 16;

export interface GuestOptions {
  /** Rings to start (default 2). */
  readonly rings?: number;
  /** Guest memory bytes (default 1 MiB). */
  readonly memorySize?: number;
  /** Seal the memfd against shrinking (default true). */
  readonly seal?: boolean;
  /** Use this fd (a file of at least `memorySize` bytes, say) as guest memory instead of a memfd. */
  readonly memoryFd?: number;
  /** Virtio features to accept (default VERSION_1 and PROTOCOL_FEATURES). */
  readonly features?: bigint;
  /**
   * An inflight buffer to hand over with SET_INFLIGHT_FD before the rings start
   * (negotiating VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD); the guest keeps our fd.
   */
  readonly inflight?: { readonly fd: number; readonly mmapSize: number; readonly numQueues: number; readonly queueSize: number };
  /** Protocol features to negotiate besides REPLY_ACK, CONFIG and MQ (LOG_SHMFD, say). */
  readonly protocol?: bigint;
}

export class RunningGuest {
  readonly kicks: number[] = [];
  readonly calls: number[] = [];
  readonly errs: number[] = [];
  readonly rings: GuestRing[] = [];

  private constructor(readonly f: RawFrontend, readonly mem: SharedRegion) {}

  /**
   * Connects, negotiates (REPLY_ACK, CONFIG, MQ), registers `mem` and starts the rings,
   * each with its own kick, call and err eventfd; every step must be acked.
   */
  static async start(socketPath: string, opts: GuestOptions = {}): Promise<RunningGuest> {
    const f = await RawFrontend.connect(socketPath);
    const mem = new SharedRegion(opts.memorySize ?? 1 << 20, { seal: opts.seal ?? true, fd: opts.memoryFd });
    const g = new RunningGuest(f, mem);
    try {
      const inflight = opts.inflight;
      await f.handshake({
        features: opts.features ?? (bit(VIRTIO_F.VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES)),
        protocol: bit(VHOST_USER_PROTOCOL_F.REPLY_ACK) | bit(VHOST_USER_PROTOCOL_F.CONFIG) | bit(VHOST_USER_PROTOCOL_F.MQ) |
          (inflight ? bit(VHOST_USER_PROTOCOL_F.INFLIGHT_SHMFD) : 0n) | (opts.protocol ?? 0n),
      });
      if (inflight) await g.must({ request: 'SET_INFLIGHT_FD', needReply: true, mmapOffset: 0, ...inflight });
      await g.must({ request: 'SET_MEM_TABLE', needReply: true, regions: [mem.region] });
      for (let i = 0; i < (opts.rings ?? 2); i++) await g.startRing(i);
    } catch (e) {
      g.release();
      throw e;
    }
    return g;
  }

  private async must(req: Parameters<RawFrontend['acked']>[0]): Promise<void> {
    const ok = await this.f.acked(req);
    if (ok !== true) throw new Error(`setup: VHOST_USER_${req.request} was ${ok === null ? 'not answered' : 'refused'}`);
  }

  /** Sets up and enables ring `i` at `i × RING_STRIDE`. */
  async startRing(i: number): Promise<GuestRing> {
    const ring = new GuestRing(this.mem, i * RING_STRIDE, RING_SIZE);
    this.rings[i] = ring;
    this.kicks[i] = native.eventfd();
    this.calls[i] = native.eventfd();
    this.errs[i] = native.eventfd();
    await this.must({ request: 'SET_VRING_NUM', needReply: true, index: i, num: RING_SIZE });
    await this.must({ request: 'SET_VRING_BASE', needReply: true, index: i, num: 0 });
    await this.must({ request: 'SET_VRING_ADDR', needReply: true, index: i, flags: 0, ...ring.userAddresses, log: 0 });
    await this.must({ request: 'SET_VRING_KICK', needReply: true, index: i, fd: this.kicks[i] });
    await this.must({ request: 'SET_VRING_CALL', needReply: true, index: i, fd: this.calls[i] });
    await this.must({ request: 'SET_VRING_ERR', needReply: true, index: i, fd: this.errs[i] });
    await this.must({ request: 'SET_VRING_ENABLE', needReply: true, index: i, enable: true });
    return ring;
  }

  kick(i: number): void {
    native.eventfdWrite(this.kicks[i], 1);
  }

  /** Waits until ring `i`'s used index reaches `idx`; false after `timeoutMs`. */
  async waitUsed(i: number, idx: number, timeoutMs = 10_000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.rings[i].usedIdx !== (idx & 0xffff)) {
      if (Date.now() > deadline) return false;
      await sleep(2);
    }
    return true;
  }

  /** Reads and resets ring `i`'s err eventfd count. */
  errCount(i: number): number {
    return native.eventfdRead(this.errs[i]);
  }

  /** Closes the connection, our eventfds, and our mapping of guest memory. */
  release(): void {
    this.f.close();
    for (const fd of [...this.kicks, ...this.calls, ...this.errs]) native.close(fd);
    this.kicks.length = 0;
    this.calls.length = 0;
    this.errs.length = 0;
    this.mem.release();
  }
}
