/**
 * The vhost-user frontend: a {@link DriverTransport} whose device is a vhost-user backend
 * on the other end of a socket (qemu-storage-daemon, `vblk serve`, any libvhost-user
 * device) — what libblkio's virtio-blk-vhost-user driver does. The message sequence is
 * the one VHOST-USER-NOTES.md found to work against qemu-storage-daemon 7.2.
 *
 * Sockets, eventfds and shared memory come from a {@link FrontendIo}; this module only
 * sequences the protocol.
 */
import { VblkError, UsageError } from '../../errors.js';
import { DmaAllocator } from '../../memory/dma-allocator.js';
import { GuestMemory } from '../../memory/guest-memory.js';
import { contiguousRingLayout, VIRTQ_DESC_SIZE } from '../../spec/split-ring.js';
import { VIRTIO_CONFIG_S, VIRTIO_F, hasFeature } from '../../spec/virtio.js';
import { VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_MAX_CONFIG_SIZE, VHOST_USER_PROTOCOL_F } from '../../spec/vhost-user.js';
import type { DriverQueueBinding, DriverTransport } from '../../virtqueue/device.js';
import { QueueSetupError } from '../../virtqueue/ring-views.js';
import { SplitDriverQueue } from '../../virtqueue/split-driver.js';
import type { Stoppable } from './backend.js';
import type { BackendReply, FrontendRequest } from './messages.js';

/** The request/reply channel to the backend. */
export interface FrontendChannel {
  /**
   * Sends `req` and resolves with the reply it owes: its own reply for GET_* requests, a
   * REPLY_ACK when `req.needReply`, else null. Rejects when the connection fails.
   */
  call(req: FrontendRequest): Promise<BackendReply | null>;
  /** Runs `listener` once when the connection ends for any reason but {@link close}. */
  onLost(listener: (reason: Error) => void): void;
  close(): void;
}

/** An eventfd of ours (kick or call). */
export interface Notifier {
  readonly fd: number;
  signal(): void;
  /** Runs `onSignal` each time the other side signals. */
  watch(onSignal: () => void): Stoppable;
  close(): void;
}

/** Memory we share with the backend: one mapped memfd. */
export interface SharedMemory {
  readonly fd: number;
  /** Its address in this process: used as both guest and user address (NOTES). */
  readonly address: number;
  readonly bytes: Uint8Array;
  /** Unmaps and closes; views read as empty afterwards. */
  release(): void;
}

/** The platform effects a frontend needs. Node's is in `src/node/`. */
export interface FrontendIo {
  readonly channel: FrontendChannel;
  /**
   * Optional: a new connection to the same backend (its socket path), for a backend that
   * went away and came back. Rejects when nothing answers there yet.
   */
  reconnect?(): Promise<FrontendChannel>;
  createNotifier(): Notifier;
  createSharedMemory(size: number): SharedMemory;
  /**
   * Creates the backend channel: returns the fd to hand over with SET_BACKEND_REQ_FD,
   * and runs `onConfigChange` on each CONFIG_CHANGE_MSG (acking it when asked).
   */
  openBackendChannel(onConfigChange: () => void): { fd: number; close(): void };
}

export interface FrontendOptions {
  /** Bytes of shared memory for rings and buffers (a power of two). Default 64 MiB. */
  memorySize?: number;
  /**
   * Config space bytes to fetch at least, whatever a read asks for, so that small reads
   * (the writeback byte) are served from one GET_CONFIG; a read reaching further fetches
   * up to its end. qemu-storage-daemon 7.2 refuses more than 60 (NOTES). Default 60.
   */
  configSize?: number;
  /** Largest queue size to use. Default 256. */
  maxQueueSize?: number;
}

const PROTOCOL_WANTED = [
  VHOST_USER_PROTOCOL_F.MQ, VHOST_USER_PROTOCOL_F.REPLY_ACK, VHOST_USER_PROTOCOL_F.CONFIG, VHOST_USER_PROTOCOL_F.BACKEND_REQ,
];

interface LiveRing {
  readonly ringAddr: number;
  readonly indirectAddr: number;
  readonly kick: Notifier;
  readonly call: Notifier;
  readonly callWatch: Stoppable;
}

/**
 * A {@link DriverTransport} to a vhost-user backend over a connected socket: probe a
 * `BlkDriver` on it to drive the device. {@link connectVhostUser} opens one.
 */
export class VhostUserFrontend implements DriverTransport {
  readonly memory: GuestMemory;
  readonly dma: DmaAllocator;
  private readonly shared: SharedMemory;
  private channel: FrontendChannel;
  private backendFeatures = 0n;
  private protocol = 0n;
  private queueCount = 1;
  private driverFeatures = 0n;
  private status = 0;
  private configCache: Uint8Array | null = null;
  private readonly configListeners: (() => void)[] = [];
  private readonly lostListeners: ((reason: Error) => void)[] = [];
  private lost: Error | null = null;
  private readonly rings = new Map<number, LiveRing>();
  private backendChannel: { fd: number; close(): void } | null = null;
  private closed = false;
  private readonly configSize: number;
  private readonly maxSize: number;

  private constructor(private readonly io: FrontendIo, options: FrontendOptions) {
    const size = options.memorySize ?? 64 * 1024 * 1024;
    this.configSize = options.configSize ?? 60;
    this.maxSize = options.maxQueueSize ?? 256;
    if (this.configSize <= 0 || this.configSize > VHOST_USER_MAX_CONFIG_SIZE) {
      throw new UsageError('BAD_OPTION', `configSize must be 1..${VHOST_USER_MAX_CONFIG_SIZE}, got ${this.configSize}`);
    }
    this.channel = io.channel;
    this.watchChannel(this.channel);
    this.shared = io.createSharedMemory(size);
    this.memory = new GuestMemory([{ guestAddress: this.shared.address, bytes: this.shared.bytes }]);
    this.dma = new DmaAllocator(this.shared.address, size);
  }

  /**
   * Opens a session with the backend on `io.channel`: ownership, features, protocol
   * features, queue count, the backend channel, and our memory table.
   */
  static async open(io: FrontendIo, options: FrontendOptions = {}): Promise<VhostUserFrontend> {
    const f = new VhostUserFrontend(io, options);
    try {
      await f.handshake();
    } catch (e) {
      await f.close().catch(() => {});
      throw e;
    }
    return f;
  }

  /** Reports the loss of `channel` while it is the one in use (a replaced one may still end). */
  private watchChannel(channel: FrontendChannel): void {
    channel.onLost((reason) => {
      if (channel === this.channel) this.deviceLost(reason);
    });
  }

  /**
   * Connects to the backend again after it was lost, with a new socket, and runs the
   * whole session again (ownership, features, backend channel, the same memfd in
   * SET_MEM_TABLE): a new backend process knows nothing of the old one. Rings still set
   * up are dropped. Rejects when nobody answers yet, or the new backend fails the
   * handshake; the frontend then stays lost and may try again.
   */
  async reconnect(): Promise<void> {
    if (this.closed) throw new UsageError('CLOSED', 'the vhost-user frontend is closed');
    if (this.io.reconnect === undefined) throw new UsageError('NOT_SUPPORTED', 'this vhost-user frontend cannot reconnect');
    // A connection still up (its backend failed an earlier reconnection's bring-up) is dropped.
    this.lost ??= new VblkError('DISCONNECTED', 'the vhost-user frontend is reconnecting');
    await this.teardownQueues();
    this.backendChannel?.close();
    this.backendChannel = null;
    const channel = await this.io.reconnect();
    this.channel.close();
    this.channel = channel;
    this.watchChannel(channel);
    this.backendFeatures = 0n;
    this.protocol = 0n;
    this.queueCount = 1;
    this.status = 0;
    this.driverFeatures = 0n;
    this.configCache = null;
    try {
      await this.handshake();
    } catch (e) {
      channel.close();
      throw e;
    }
    if (this.closed) throw new UsageError('CLOSED', 'the vhost-user frontend was closed while reconnecting');
    this.lost = null;
  }

  private async handshake(): Promise<void> {
    await this.call({ request: 'SET_OWNER', needReply: false });
    const features = await this.call({ request: 'GET_FEATURES', needReply: false });
    if (features?.request !== 'GET_FEATURES') throw notDevice('GET_FEATURES');
    this.backendFeatures = features.features;
    if (hasFeature(this.backendFeatures, VHOST_USER_F_PROTOCOL_FEATURES)) {
      const pf = await this.call({ request: 'GET_PROTOCOL_FEATURES', needReply: false });
      if (pf?.request !== 'GET_PROTOCOL_FEATURES') throw notDevice('GET_PROTOCOL_FEATURES');
      let wanted = 0n;
      for (const bit of PROTOCOL_WANTED) wanted |= 1n << BigInt(bit);
      this.protocol = pf.features & wanted;
      await this.call({ request: 'SET_PROTOCOL_FEATURES', needReply: false, features: this.protocol });
    }
    if (!this.hasProtocol(VHOST_USER_PROTOCOL_F.CONFIG)) {
      throw new VblkError('NOT_SUPPORTED', 'the vhost-user backend does not offer VHOST_USER_PROTOCOL_F_CONFIG: cannot read a block device config');
    }
    if (this.hasProtocol(VHOST_USER_PROTOCOL_F.MQ)) {
      const q = await this.call({ request: 'GET_QUEUE_NUM', needReply: false });
      if (q?.request !== 'GET_QUEUE_NUM') throw notDevice('GET_QUEUE_NUM');
      this.queueCount = Math.max(1, q.queues);
    }
    if (this.hasProtocol(VHOST_USER_PROTOCOL_F.BACKEND_REQ)) {
      this.backendChannel = this.io.openBackendChannel(() => {
        this.configCache = null;
        for (const l of this.configListeners) l();
      });
      await this.call({ request: 'SET_BACKEND_REQ_FD', needReply: this.ack, fd: this.backendChannel.fd });
    }
    await this.call({
      request: 'SET_MEM_TABLE', needReply: this.ack,
      regions: [{ guestAddress: this.shared.address, size: this.shared.bytes.length, userAddress: this.shared.address, mmapOffset: 0, fd: this.shared.fd }],
    });
  }

  private hasProtocol(bit: number): boolean {
    return hasFeature(this.protocol, bit);
  }

  /** Whether to ask for a REPLY_ACK on SET_* requests (so failures are not silent). */
  private get ack(): boolean {
    return this.hasProtocol(VHOST_USER_PROTOCOL_F.REPLY_ACK);
  }

  /** Calls the backend; a failed REPLY_ACK becomes an error naming the request. */
  private async call(req: FrontendRequest): Promise<BackendReply | null> {
    if (this.closed) throw new UsageError('CLOSED', 'the vhost-user frontend is closed');
    const reply = await this.channel.call(req);
    if (reply && 'success' in reply && !reply.success) {
      throw new VblkError('BACKEND_REFUSED', `the vhost-user backend refused VHOST_USER_${req.request}`);
    }
    return reply;
  }

  async reset(): Promise<void> {
    await this.teardownQueues();
    this.status = 0;
    this.driverFeatures = 0n;
  }

  async getStatus(): Promise<number> {
    return this.status;
  }

  /** Status is ours to keep (no STATUS protocol feature); FEATURES_OK sends SET_FEATURES. */
  async setStatus(status: number): Promise<void> {
    const adding = status & ~this.status;
    if (adding & VIRTIO_CONFIG_S.FEATURES_OK) {
      let f = this.driverFeatures;
      if (hasFeature(this.backendFeatures, VHOST_USER_F_PROTOCOL_FEATURES)) f |= 1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES);
      await this.call({ request: 'SET_FEATURES', needReply: this.ack, features: f });
      // The config may follow the features (5.2.5.2: writeback does), and which fields
      // exist does: what was read before this negotiation is stale.
      this.configCache = null;
    }
    this.status = status;
  }

  async getDeviceFeatures(): Promise<bigint> {
    return this.backendFeatures & ~(1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES));
  }

  async setDriverFeatures(features: bigint): Promise<void> {
    this.driverFeatures = features;
  }

  /**
   * Exactly the bytes asked for, from one GET_CONFIG at offset 0 (cached until a change).
   * A backend that will not give them all fails the read with `CONFIG_REFUSED` rather
   * than have the caller take zeroes for limits the device never stated.
   */
  async readConfig(offset: number, length: number): Promise<Uint8Array> {
    const end = offset + length;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || end > VHOST_USER_MAX_CONFIG_SIZE) {
      throw new UsageError('BAD_CONFIG_RANGE', `config reads must lie within ${VHOST_USER_MAX_CONFIG_SIZE} bytes, got ${length} bytes at ${offset}`);
    }
    if (!this.configCache || this.configCache.length < end) {
      const size = Math.max(this.configSize, end);
      const r = await this.call({ request: 'GET_CONFIG', needReply: false, offset: 0, size, flags: 0 });
      // The codec already refused a reply of another size; an empty one is the refusal.
      if (r?.request !== 'GET_CONFIG' || r.config === null) {
        throw new VblkError('CONFIG_REFUSED', `the vhost-user backend refused to read ${size} bytes of config space (empty GET_CONFIG reply)`);
      }
      this.configCache = r.config.data;
    }
    return this.configCache.slice(offset, end);
  }

  async writeConfig(offset: number, data: Uint8Array): Promise<void> {
    await this.call({ request: 'SET_CONFIG', needReply: this.ack, offset, flags: 0, data });
    this.configCache = null;
  }

  async maxQueues(): Promise<number> {
    return this.queueCount;
  }

  async maxQueueSize(): Promise<number> {
    return this.maxSize;
  }

  async setupQueue<T>(index: number, size: number, indirectEntries: number, onUsed: () => void): Promise<DriverQueueBinding<T>> {
    if (index >= this.queueCount || this.rings.has(index)) {
      throw new UsageError('BAD_QUEUE', `queue ${index} does not exist or is already set up`);
    }
    const eventIdx = hasFeature(this.driverFeatures, VIRTIO_F.RING_EVENT_IDX);
    const indirect = hasFeature(this.driverFeatures, VIRTIO_F.RING_INDIRECT_DESC) && indirectEntries > 0;
    const layout = contiguousRingLayout(size);
    const ringAddr = this.dma.alloc(layout.total);
    const indirectAddr = indirect ? this.dma.alloc(size * indirectEntries * VIRTQ_DESC_SIZE) : -1;
    if (ringAddr < 0 || (indirect && indirectAddr < 0)) {
      if (ringAddr >= 0) this.dma.release(ringAddr);
      throw new UsageError('NO_MEMORY', `no room for queue ${index} of size ${size} in shared memory`);
    }
    const config = { size, desc: ringAddr + layout.desc, avail: ringAddr + layout.avail, used: ringAddr + layout.used, eventIdx, indirect };
    const queue = SplitDriverQueue.create<T>(this.memory, config, indirect ? { addr: indirectAddr, entries: indirectEntries } : null);
    if (queue instanceof QueueSetupError) throw queue;
    const kick = this.io.createNotifier();
    const call = this.io.createNotifier();
    const ring: LiveRing = { ringAddr, indirectAddr, kick, call, callWatch: call.watch(onUsed) };
    this.rings.set(index, ring);
    const ack = this.ack;
    await this.call({ request: 'SET_VRING_NUM', needReply: ack, index, num: size });
    await this.call({ request: 'SET_VRING_BASE', needReply: ack, index, num: 0 });
    await this.call({ request: 'SET_VRING_ADDR', needReply: ack, index, flags: 0, desc: config.desc, used: config.used, avail: config.avail, log: 0 });
    await this.call({ request: 'SET_VRING_KICK', needReply: ack, index, fd: kick.fd });
    await this.call({ request: 'SET_VRING_CALL', needReply: ack, index, fd: call.fd });
    if (hasFeature(this.backendFeatures, VHOST_USER_F_PROTOCOL_FEATURES)) {
      await this.call({ request: 'SET_VRING_ENABLE', needReply: ack, index, enable: true });
    }
    return { queue, notify: () => kick.signal() };
  }

  /** Stops every ring with GET_VRING_BASE (the backend finishes its requests first). */
  async teardownQueues(): Promise<void> {
    for (const [index, ring] of this.rings) {
      if (!this.closed) {
        await this.channel.call({ request: 'SET_VRING_ENABLE', needReply: false, index, enable: false }).catch(() => null);
        await this.channel.call({ request: 'GET_VRING_BASE', needReply: false, index }).catch(() => null);
      }
      ring.callWatch.stop();
      ring.kick.close();
      ring.call.close();
      this.dma.release(ring.ringAddr);
      if (ring.indirectAddr >= 0) this.dma.release(ring.indirectAddr);
    }
    this.rings.clear();
  }

  onConfigChange(listener: () => void): void {
    this.configListeners.push(listener);
  }

  onDeviceLost(listener: (reason: Error) => void): void {
    if (this.lost) listener(this.lost);
    else this.lostListeners.push(listener);
  }

  private deviceLost(reason: Error): void {
    if (this.lost) return;
    this.lost = reason;
    for (const l of this.lostListeners.splice(0)) l(reason);
  }

  /** Stops the rings, closes the connection, then unmaps our memory (never before). */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.teardownQueues().catch(() => {});
    this.closed = true;
    this.backendChannel?.close();
    this.channel.close();
    this.deviceLost(new VblkError('CLOSED', 'the vhost-user frontend was closed'));
    this.shared.release();
  }
}

function notDevice(what: string): VblkError {
  return new VblkError('NOT_VHOST_USER', `the peer did not answer VHOST_USER_${what}: not a vhost-user device`);
}
