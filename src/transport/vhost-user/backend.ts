/**
 * The vhost-user backend as a state machine (vhost-user.rst; VHOST-USER-NOTES.md has what
 * QEMU 7.2 really sends). It takes decoded frontend requests one at a time and answers
 * them; every effect on the outside world — mapping a region fd, watching a kick eventfd,
 * signalling a call eventfd, writing to the backend channel — goes through the
 * {@link BackendIo} it is given, so this module stays free of Node and sockets.
 *
 * The device model behind it is any {@link VirtioDevice}: the session turns rings that
 * the frontend set up into {@link SplitDeviceQueue}s and hands them to the device.
 */
import { VblkError } from '../../errors.js';
import type { LogSink } from '../../log.js';
import { VIRTIO_F, features as featureSet, hasFeature } from '../../spec/virtio.js';
import {
  VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_MAX_CONFIG_SIZE, VHOST_USER_PROTOCOL_F, VHOST_VRING_F_LOG,
} from '../../spec/vhost-user.js';
import type { ChainError } from '../../virtqueue/chain.js';
import type { DeviceHost, VirtioDevice } from '../../virtqueue/device.js';
import { QueueSetupError, type QueueDirtyLog } from '../../virtqueue/ring-views.js';
import { inflightQueueBytes } from '../../virtqueue/inflight.js';
import { SplitDeviceQueue } from '../../virtqueue/split-device.js';
import { encodeBackendRequest, getConfigReply } from './codec.js';
import { InflightState } from './inflight-state.js';
import { MemoryTable, memoryTableProblem } from './memory-table.js';
import { MigrationLog, MigrationLogError } from './migration-log.js';
import {
  requestFds,
  type BackendReply, type EncodedMessage, type FrontendRequest, type FrontendRequestOf, type MappedMemoryRegion,
  type RequestWithReply,
} from './messages.js';

/** A mapped region: views of its bytes in order (several when it is larger than one window). */
export interface RegionMapping {
  readonly chunks: readonly Uint8Array[];
  /** Unmaps; views taken from `chunks` read as empty afterwards. */
  unmap(): void;
}

/** Something that can be stopped (an fd watch). */
export interface Stoppable {
  stop(): void;
}

/** The platform effects a backend session needs. Node's is in `src/node/`. */
export interface BackendIo {
  /**
   * Maps `size` bytes from `mmapOffset` of a region fd, shared and writable. Throws a
   * {@link VblkError} that says why when the fd cannot back the region (too small, not
   * mappable, unsealed when seals are required).
   */
  mapRegion(fd: number, size: number, mmapOffset: number): RegionMapping;
  closeFd(fd: number): void;
  /** Creates `size` bytes of zeroed shared memory: its fd (ours to close) and a mapping. */
  createSharedMemory(size: number): { fd: number; mapping: RegionMapping };
  /**
   * Throws when `fd` is not an eventfd (a hostile frontend may send a pipe or a file,
   * which would spin a watcher or block a write); makes it non-blocking otherwise.
   */
  checkEventFd(fd: number): void;
  /** Watches an eventfd; `onReady` runs (after the count is drained) whenever it fires. */
  watchEventFd(fd: number, onReady: () => void): Stoppable;
  /** Adds 1 to an eventfd. */
  signalEventFd(fd: number): void;
  /** Sends a message on the backend channel (best effort: a dead channel is logged, not thrown). */
  sendOnBackendChannel(fd: number, message: EncodedMessage): void;
  log: LogSink;
}

export type BackendSessionErrorCode =
  | 'BAD_FEATURES'
  | 'NOT_NEGOTIATED'
  | 'BAD_RING_INDEX'
  | 'BAD_RING'
  | 'BAD_MEMORY_TABLE'
  | 'NO_MEMORY'
  | 'RING_BUSY'
  | 'BAD_LOG';

/** A frontend request that is well-formed but cannot be honoured in this session's state. */
export class BackendSessionError extends VblkError {
  declare readonly code: BackendSessionErrorCode;
  constructor(code: BackendSessionErrorCode, message: string) {
    super(code, message);
  }
}

/**
 * Protocol features this backend offers by default. LOG_SHMFD (the shared-memory dirty
 * log, and with it VHOST_F_LOG_ALL) is what QEMU needs to live-migrate the guest: without
 * it QEMU refuses to.
 */
export const BACKEND_PROTOCOL_FEATURES = featureSet(
  VHOST_USER_PROTOCOL_F.MQ,
  VHOST_USER_PROTOCOL_F.LOG_SHMFD,
  VHOST_USER_PROTOCOL_F.REPLY_ACK,
  VHOST_USER_PROTOCOL_F.BACKEND_REQ,
  VHOST_USER_PROTOCOL_F.CONFIG,
  VHOST_USER_PROTOCOL_F.INFLIGHT_SHMFD,
);

/** How a {@link VhostUserBackendSession} negotiates. */
export interface BackendSessionOptions {
  /**
   * Protocol features to offer: a subset of {@link BACKEND_PROTOCOL_FEATURES} (default:
   * all of them). Leaving LOG_SHMFD out keeps the guest from being migrated: SET_LOG_BASE
   * and SET_LOG_FD are then refused as not negotiated.
   */
  readonly protocolFeatures?: bigint;
}

/** Virtio feature bits that are vhost's, not the device's: never passed to the device model. */
const VHOST_ONLY_FEATURES = (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)) | (1n << BigInt(VHOST_F_LOG_ALL));

interface Vring {
  num: number;
  /**
   * Frontend user addresses, as SET_VRING_ADDR gave them, with its flags and the
   * guest-physical address to log used-ring writes at; null until then.
   */
  addr: { desc: number; avail: number; used: number; flags: number; log: number } | null;
  base: number;
  kickFd: number | null;
  kickWatch: Stoppable | null;
  callFd: number | null;
  errFd: number | null;
  enabled: boolean;
  /** The running device queue, or null while stopped. */
  queue: SplitDeviceQueue | null;
}

/** One frontend connection's state. Create one per connection; call {@link close} at the end. */
export class VhostUserBackendSession implements DeviceHost {
  private readonly vrings: Vring[] = [];
  private readonly table: MemoryTable;
  private acked = 0n;
  private protocol = 0n;
  private backendChannel: number | null = null;
  /** The inflight buffer and the frontend's copy of the config space recorded in it. */
  private readonly inflight: InflightState;
  private readonly migration: MigrationLog;
  /** Protocol features offered in GET_PROTOCOL_FEATURES. */
  private readonly offeredProtocol: bigint;
  private closed = false;
  /** {@link isDirtyLogging} when last noted in the log. */
  private wasDirtyLogging = false;
  /** Requests a previous backend left in flight that this session resubmitted. */
  resubmitted = 0;

  constructor(
    private readonly device: VirtioDevice,
    private readonly io: BackendIo,
    options: BackendSessionOptions = {},
  ) {
    this.offeredProtocol = (options.protocolFeatures ?? BACKEND_PROTOCOL_FEATURES) & BACKEND_PROTOCOL_FEATURES;
    for (let i = 0; i < device.numQueues; i++) {
      this.vrings.push({
        num: 0, addr: null, base: 0, kickFd: null, kickWatch: null, callFd: null, errFd: null, enabled: false, queue: null,
      });
    }
    this.migration = new MigrationLog(io);
    this.inflight = new InflightState(io);
    this.table = new MemoryTable(io);
    device.attach(this);
  }

  /**
   * Features offered in GET_FEATURES: the device's, VHOST_USER_F_PROTOCOL_FEATURES, and
   * VHOST_F_LOG_ALL when the shared-memory log (LOG_SHMFD, the only kind implemented) is
   * offered.
   */
  get offeredFeatures(): bigint {
    const log = hasFeature(this.offeredProtocol, VHOST_USER_PROTOCOL_F.LOG_SHMFD) ? 1n << BigInt(VHOST_F_LOG_ALL) : 0n;
    return this.device.deviceFeatures | (1n << BigInt(VHOST_USER_F_PROTOCOL_FEATURES)) | log;
  }

  private hasProtocol(bit: number): boolean {
    return hasFeature(this.protocol, bit);
  }

  /** Whether a ring marks its writes in the dirty log now: the frontend is migrating the guest. */
  get isDirtyLogging(): boolean {
    return this.vrings.some((v) => v.queue?.dirtyLog != null);
  }

  /**
   * Handles one request and returns the reply to send (its own reply, or a REPLY_ACK
   * when the frontend asked for one), or null when none is owed. A request that cannot
   * be honoured throws {@link BackendSessionError}: the caller answers a failed
   * REPLY_ACK when one is owed ({@link failureReply}) and otherwise drops the connection.
   */
  async handle(req: FrontendRequest): Promise<BackendReply | null> {
    const own = await this.dispatch(req);
    this.noteLogging();
    if (own) return own;
    return req.needReply && this.hasProtocol(VHOST_USER_PROTOCOL_F.REPLY_ACK)
      ? { request: req.request as Exclude<FrontendRequest['request'], RequestWithReply>, success: true }
      : null;
  }

  /** Says in the log when the rings start or stop marking the dirty log: a migration began or ended. */
  private noteLogging(): void {
    const now = this.isDirtyLogging;
    if (now === this.wasDirtyLogging) return;
    this.wasDirtyLogging = now;
    this.io.log(now ? `dirty log on (${this.migration.dirty.size} bytes): the frontend is live-migrating the guest` : 'dirty log off: the migration ended or failed');
  }

  /** The failed REPLY_ACK owed for `req`, or null when the frontend did not ask for one. */
  failureReply(req: FrontendRequest): BackendReply | null {
    if (!req.needReply || !this.hasProtocol(VHOST_USER_PROTOCOL_F.REPLY_ACK)) return null;
    switch (req.request) {
      case 'GET_FEATURES': case 'GET_PROTOCOL_FEATURES': case 'GET_VRING_BASE': case 'GET_QUEUE_NUM':
      case 'GET_CONFIG': case 'GET_INFLIGHT_FD': case 'GET_MAX_MEM_SLOTS': case 'GET_STATUS':
        return null;
      default:
        return { request: req.request, success: false };
    }
  }

  private async dispatch(req: FrontendRequest): Promise<BackendReply | null> {
    switch (req.request) {
      case 'GET_FEATURES':
        return { request: 'GET_FEATURES', features: this.offeredFeatures };
      case 'SET_FEATURES':
        this.setFeatures(req.features);
        await this.refreshLogging();
        return null;
      case 'GET_PROTOCOL_FEATURES':
        return { request: 'GET_PROTOCOL_FEATURES', features: this.offeredProtocol };
      case 'SET_PROTOCOL_FEATURES':
        if ((req.features & ~this.offeredProtocol) !== 0n) {
          throw new BackendSessionError('BAD_FEATURES', `frontend accepted protocol features 0x${(req.features & ~this.offeredProtocol).toString(16)} that were not offered`);
        }
        this.protocol = req.features;
        return null;
      case 'SET_OWNER':
        return null;
      case 'RESET_OWNER':
      case 'RESET_DEVICE':
        await this.resetRings();
        return null;
      case 'GET_QUEUE_NUM':
        return { request: 'GET_QUEUE_NUM', queues: this.device.numQueues };
      case 'SET_MEM_TABLE':
        await this.setMemTable(req.regions);
        return null;
      case 'SET_VRING_NUM':
        this.setVringNum(req.index, req.num);
        return null;
      case 'SET_VRING_ADDR':
        await this.setVringAddr(req);
        return null;
      case 'SET_LOG_BASE':
        return this.setLogBase(req);
      case 'SET_LOG_FD':
        this.setLogFd(req.fd);
        return null;
      case 'SET_VRING_BASE':
        this.idleVring(req.index, 'SET_VRING_BASE').base = req.num & 0xffff;
        return null;
      case 'GET_VRING_BASE':
        return { request: 'GET_VRING_BASE', index: req.index, num: await this.stopVring(req.index) };
      case 'SET_VRING_KICK':
        this.setKick(req.index, req.fd);
        return null;
      case 'SET_VRING_CALL': {
        const v = this.eventFdVring(req.index, req.fd);
        this.replaceFd(v.callFd, req.fd);
        v.callFd = req.fd;
        return null;
      }
      case 'SET_VRING_ERR': {
        const v = this.eventFdVring(req.index, req.fd);
        this.replaceFd(v.errFd, req.fd);
        v.errFd = req.fd;
        return null;
      }
      case 'SET_VRING_ENABLE':
        this.setEnable(req.index, req.enable);
        return null;
      case 'SET_BACKEND_REQ_FD':
        if (!this.hasProtocol(VHOST_USER_PROTOCOL_F.BACKEND_REQ)) {
          this.io.closeFd(req.fd);
          throw new BackendSessionError('NOT_NEGOTIATED', 'SET_BACKEND_REQ_FD without VHOST_USER_PROTOCOL_F_BACKEND_REQ');
        }
        this.replaceFd(this.backendChannel, req.fd);
        this.backendChannel = req.fd;
        return null;
      case 'GET_INFLIGHT_FD':
        return this.getInflight(req.numQueues, req.queueSize);
      case 'SET_INFLIGHT_FD':
        this.setInflight(req);
        return null;
      case 'GET_CONFIG':
        return this.getConfig(req);
      case 'SET_CONFIG':
        this.requireProtocol(VHOST_USER_PROTOCOL_F.CONFIG, 'SET_CONFIG');
        this.setConfig(req.offset, req.data);
        return null;
      default:
        for (const fd of requestFds(req)) this.io.closeFd(fd);
        throw new BackendSessionError('NOT_NEGOTIATED', `VHOST_USER_${req.request} needs a protocol feature this backend does not offer`);
    }
  }

  private setFeatures(features: bigint): void {
    const offered = this.offeredFeatures;
    if ((features & ~offered) !== 0n) {
      throw new BackendSessionError('BAD_FEATURES', `frontend accepted features 0x${(features & ~offered).toString(16)} that were not offered`);
    }
    if (!hasFeature(features, VIRTIO_F.VERSION_1)) {
      throw new BackendSessionError('BAD_FEATURES', 'frontend did not accept VIRTIO_F_VERSION_1; legacy virtio is not supported');
    }
    const ringFeatures = (1n << BigInt(VIRTIO_F.RING_EVENT_IDX)) | (1n << BigInt(VIRTIO_F.RING_INDIRECT_DESC));
    if (this.vrings.some((v) => v.queue) && ((features ^ this.acked) & ringFeatures) !== 0n) {
      throw new BackendSessionError('RING_BUSY', 'ring features cannot change while rings run');
    }
    this.acked = features;
    this.device.setDriverFeatures(features & ~VHOST_ONLY_FEATURES);
  }

  /**
   * SET_VRING_ADDR. On a running ring only the logging may change (QEMU turns the log
   * flag on and off this way while the guest runs): the addresses must stay as they are.
   */
  private async setVringAddr(req: FrontendRequestOf<'SET_VRING_ADDR'>): Promise<void> {
    const v = this.vring(req.index);
    if ((req.flags & ~(1 << VHOST_VRING_F_LOG)) !== 0) {
      throw new BackendSessionError('BAD_RING', `ring ${req.index}: SET_VRING_ADDR flags 0x${req.flags.toString(16)} set bits other than VHOST_VRING_F_LOG`);
    }
    const addr = { desc: req.desc, avail: req.avail, used: req.used, flags: req.flags, log: req.log };
    if (v.queue) {
      const a = v.addr;
      if (a === null || a.desc !== addr.desc || a.avail !== addr.avail || a.used !== addr.used) {
        throw new BackendSessionError('RING_BUSY', `SET_VRING_ADDR on ring ${req.index} while it runs moves the rings`);
      }
    }
    v.addr = addr;
    await this.refreshLogging();
  }

  /** SET_LOG_BASE (with LOG_SHMFD): the new log, then the u64 reply QEMU waits for. */
  private async setLogBase(req: FrontendRequestOf<'SET_LOG_BASE'>): Promise<BackendReply> {
    this.requireLogShmfd('SET_LOG_BASE', req.fd);
    try {
      this.migration.setBase(req.fd, req.mmapSize, req.mmapOffset, this.table.end());
    } catch (e) {
      if (e instanceof MigrationLogError) throw new BackendSessionError('BAD_LOG', e.message);
      throw e;
    }
    await this.refreshLogging();
    // With LOG_SHMFD, QEMU 7.2 waits for a reply (any payload; libvhost-user sends a u64)
    // before it relies on the log: it comes once the log is mapped and the rings use it.
    return { request: 'SET_LOG_BASE', success: true };
  }

  private requireLogShmfd(what: string, fd: number): void {
    if (this.hasProtocol(VHOST_USER_PROTOCOL_F.LOG_SHMFD)) return;
    this.io.closeFd(fd);
    throw new BackendSessionError('NOT_NEGOTIATED', `${what} needs protocol feature LOG_SHMFD (bit ${VHOST_USER_PROTOCOL_F.LOG_SHMFD}), not negotiated: the shared-memory log is the only one implemented`);
  }

  private setLogFd(fd: number): void {
    this.requireLogShmfd('SET_LOG_FD', fd);
    try {
      this.io.checkEventFd(fd);
    } catch (e) {
      this.io.closeFd(fd);
      throw new BackendSessionError('BAD_LOG', `SET_LOG_FD: ${e instanceof Error ? e.message : String(e)}`);
    }
    this.migration.setFd(fd);
  }

  /**
   * How ring `v` logs, if it does: while a log is mapped and the frontend asked for
   * logging, with VHOST_F_LOG_ALL or the ring's VHOST_VRING_F_LOG. Used-ring writes are
   * logged at the ring's `log` address when its flag says so, else (LOG_ALL alone) where
   * the used ring is in guest-physical memory.
   */
  private queueLogOf(v: Vring): QueueDirtyLog | null {
    const a = v.addr;
    if (a === null || !this.migration.dirty.active) return null;
    const ringFlag = (a.flags & (1 << VHOST_VRING_F_LOG)) !== 0;
    if (!ringFlag && !hasFeature(this.acked, VHOST_F_LOG_ALL)) return null;
    return { log: this.migration.dirty, usedAt: ringFlag ? a.log : this.table.toGuest(a.used) };
  }

  /**
   * Restarts every running ring whose logging is not what it should be now. A queue logs
   * from the requests it pops, so one started before logging began would not mark the
   * writes of requests already in flight: stopping it waits for them (their writes land
   * before our reply, and QEMU's first migration pass copies all memory after it).
   */
  private async refreshLogging(): Promise<void> {
    for (let i = 0; i < this.vrings.length; i++) {
      const v = this.vrings[i];
      if (!v.queue) continue;
      const want = this.queueLogOf(v);
      const have = v.queue.dirtyLog;
      if (want?.usedAt === have?.usedAt) continue;
      v.base = await this.device.stopQueue(i);
      v.queue = null;
      this.maybeStart(i);
    }
  }

  private requireProtocol(bit: number, what: string): void {
    if (!this.hasProtocol(bit)) throw new BackendSessionError('NOT_NEGOTIATED', `${what} needs protocol feature bit ${bit}, not negotiated`);
  }

  private getConfig(req: FrontendRequestOf<'GET_CONFIG'>): BackendReply {
    this.requireProtocol(VHOST_USER_PROTOCOL_F.CONFIG, 'GET_CONFIG');
    const reply = getConfigReply(req, this.device.readConfig(0, req.offset + req.size));
    // A frontend's first read is the copy it keeps; QEMU takes only the capacity from
    // later ones (a resize), so they change nothing it believes of the writable fields.
    if (this.inflight.frontendConfig === null) this.inflight.setFrontendConfig(this.device.readConfig(0, VHOST_USER_MAX_CONFIG_SIZE));
    return reply;
  }

  /** SET_CONFIG: the device takes what it accepts; the frontend's copy takes the bytes as written. */
  private setConfig(offset: number, data: Uint8Array): void {
    this.device.writeConfig(offset, data);
    const view = this.inflight.frontendConfig ?? this.device.readConfig(0, VHOST_USER_MAX_CONFIG_SIZE);
    // The codec bounds offset + size by VHOST_USER_MAX_CONFIG_SIZE.
    view.set(data.subarray(0, Math.max(0, view.length - offset)), offset);
    this.inflight.setFrontendConfig(view);
  }

  /**
   * Before a ring serves requests: the device's writable config as the frontend believes
   * it, so the guest gets the settings it believes it chose. Unknown (a backend restarted under a running driver, with nothing recorded), the
   * device takes its cautious settings, and the frontend's copy is taken to be those.
   */
  private applyFrontendConfig(): void {
    // Without the CONFIG protocol feature a frontend has no copy: the device's own stands.
    if (!this.hasProtocol(VHOST_USER_PROTOCOL_F.CONFIG)) return;
    const known = this.inflight.frontendConfig;
    if (known !== null) {
      this.device.writeConfig(0, known);
      return;
    }
    this.io.log('the frontend\'s copy of the config space is unknown (no GET_CONFIG on this connection, none recorded in the inflight buffer): assuming the cautious settings', { level: 'warn' });
    this.device.assumeCautiousConfig?.();
    this.inflight.setFrontendConfig(this.device.readConfig(0, VHOST_USER_MAX_CONFIG_SIZE));
  }

  private checkInflightShape(numQueues: number, queueSize: number): number {
    if (numQueues < 1 || numQueues > this.vrings.length || queueSize < 1 || queueSize > this.device.maxQueueSize ||
        (queueSize & (queueSize - 1)) !== 0) {
      throw new BackendSessionError('BAD_RING', `inflight buffer for ${numQueues} queues of ${queueSize} does not fit this device`);
    }
    return inflightQueueBytes(queueSize);
  }

  /** GET_INFLIGHT_FD: a fresh, zeroed inflight buffer, shared with the frontend, which keeps it across our restarts. */
  private getInflight(numQueues: number, queueSize: number): BackendReply {
    this.requireProtocol(VHOST_USER_PROTOCOL_F.INFLIGHT_SHMFD, 'GET_INFLIGHT_FD');
    const perQueue = this.checkInflightShape(numQueues, queueSize);
    this.requireRingsStopped();
    const { fd, mmapSize } = this.inflight.create({ numQueues, queueSize, perQueue });
    return { request: 'GET_INFLIGHT_FD', fd, mmapSize, mmapOffset: 0, numQueues, queueSize };
  }

  /** SET_INFLIGHT_FD: the buffer to log in, possibly left by a backend that died. */
  private setInflight(req: FrontendRequestOf<'SET_INFLIGHT_FD'>): void {
    try {
      this.requireProtocol(VHOST_USER_PROTOCOL_F.INFLIGHT_SHMFD, 'SET_INFLIGHT_FD');
      const perQueue = this.checkInflightShape(req.numQueues, req.queueSize);
      if (req.mmapSize < perQueue * req.numQueues) {
        throw new BackendSessionError('BAD_RING', `inflight buffer of ${req.mmapSize} bytes is smaller than ${req.numQueues} queues of ${req.queueSize} need`);
      }
      this.requireRingsStopped();
      this.inflight.adopt(req.fd, req.mmapSize, req.mmapOffset, { numQueues: req.numQueues, queueSize: req.queueSize, perQueue });
    } catch (e) {
      if (e instanceof BackendSessionError) throw e;
      throw new BackendSessionError('BAD_RING', `cannot map the inflight buffer: ${e instanceof Error ? e.message : String(e)}`);
    } finally {
      this.io.closeFd(req.fd);
    }
  }

  /**
   * Rings read the inflight buffer when they start: it cannot change under a running one.
   * Checked before the buffer is created or mapped, so that a refusal leaks neither.
   */
  private requireRingsStopped(): void {
    if (this.vrings.some((v) => v.queue)) throw new BackendSessionError('RING_BUSY', 'the inflight buffer cannot change while rings run');
  }

  private vring(index: number, fdToCloseOnError: number | null = null): Vring {
    const v = this.vrings[index];
    if (!v) {
      if (fdToCloseOnError !== null) this.io.closeFd(fdToCloseOnError);
      throw new BackendSessionError('BAD_RING_INDEX', `ring ${index} does not exist (the device has ${this.vrings.length})`);
    }
    return v;
  }

  /** Ring `index` for a SET_VRING_KICK/CALL/ERR, after checking its fd is an eventfd. */
  private eventFdVring(index: number, fd: number | null): Vring {
    const v = this.vring(index, fd);
    if (fd !== null) {
      try {
        this.io.checkEventFd(fd);
      } catch (e) {
        this.io.closeFd(fd);
        throw new BackendSessionError('BAD_RING', `ring ${index}: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
    return v;
  }

  private idleVring(index: number, what: string): Vring {
    const v = this.vring(index);
    if (v.queue) throw new BackendSessionError('RING_BUSY', `${what} on ring ${index} while it runs`);
    return v;
  }

  private setVringNum(index: number, num: number): void {
    const v = this.idleVring(index, 'SET_VRING_NUM');
    if (num === 0 || num > this.device.maxQueueSize || (num & (num - 1)) !== 0) {
      throw new BackendSessionError('BAD_RING', `ring ${index} size ${num} is not a power of two up to ${this.device.maxQueueSize}`);
    }
    v.num = num;
  }

  private replaceFd(old: number | null, next: number | null): void {
    if (old !== null && old !== next) this.io.closeFd(old);
  }

  private setKick(index: number, fd: number | null): void {
    const v = this.eventFdVring(index, fd);
    v.kickWatch?.stop();
    v.kickWatch = null;
    this.replaceFd(v.kickFd, fd);
    v.kickFd = fd;
    if (fd !== null) {
      // Kicks may come before SET_VRING_ENABLE (NOTES): the watch drains them either way,
      // and enabling rescans the ring, so none is lost.
      v.kickWatch = this.io.watchEventFd(fd, () => {
        // A disabled ring is not processed (vhost-user.rst, "Ring states"); enabling rescans it.
        if (v.queue && v.enabled) this.device.queueNotify(index);
      });
    }
    // Without PROTOCOL_FEATURES a ring starts on its kick (vhost-user.rst, "Starting and stopping rings").
    if (!hasFeature(this.acked, VHOST_USER_F_PROTOCOL_FEATURES)) v.enabled = true;
    this.maybeStart(index);
  }

  private setEnable(index: number, enable: boolean): void {
    const v = this.vring(index);
    v.enabled = enable;
    if (!enable) return;
    if (v.queue) this.device.queueNotify(index);
    else this.maybeStart(index);
  }

  /** Starts ring `index` when it has everything it needs: memory, size, addresses, a kick, enabled. */
  private maybeStart(index: number): void {
    const v = this.vrings[index];
    const memory = this.table.memory;
    if (v.queue || !v.enabled || v.kickFd === null || v.addr === null || v.num === 0 || memory === null) return;
    const desc = this.table.toGuest(v.addr.desc);
    const avail = this.table.toGuest(v.addr.avail);
    const used = this.table.toGuest(v.addr.used);
    if (desc < 0 || avail < 0 || used < 0) {
      throw new BackendSessionError('BAD_RING', `ring ${index} addresses are outside every memory region`);
    }
    const queue = SplitDeviceQueue.create(memory, {
      size: v.num, desc, avail, used,
      eventIdx: hasFeature(this.acked, VIRTIO_F.RING_EVENT_IDX),
      indirect: hasFeature(this.acked, VIRTIO_F.RING_INDIRECT_DESC),
      dirtyLog: this.queueLogOf(v),
    });
    if (queue instanceof QueueSetupError) throw new BackendSessionError('BAD_RING', `ring ${index}: ${queue.message}`);
    queue.nextAvail = v.base;
    const log = this.inflight.logOf(index, v.num);
    if (log) {
      const r = queue.attachInflight(log);
      if (r.discarded) this.io.log(`ring ${index}: ${r.discarded}`, { queue: index, level: 'warn' });
      if (r.resubmit.length) this.io.log(`ring ${index}: resubmitting ${r.resubmit.length} requests a previous backend left in flight`, { queue: index });
      this.resubmitted += r.resubmit.length;
    }
    v.queue = queue;
    this.applyFrontendConfig();
    this.device.startQueue(index, queue, () => {
      if (v.callFd !== null) this.io.signalEventFd(v.callFd);
    });
    // Rescan: buffers may have been made available (and kicked) before we started.
    this.device.queueNotify(index);
  }

  /** Stops ring `index` (GET_VRING_BASE) once its requests are done; returns the next avail index. */
  private async stopVring(index: number): Promise<number> {
    const v = this.vring(index);
    v.kickWatch?.stop();
    v.kickWatch = null;
    if (v.kickFd !== null) this.io.closeFd(v.kickFd);
    v.kickFd = null;
    v.enabled = false;
    if (v.queue) {
      v.base = await this.device.stopQueue(index);
      v.queue = null;
    }
    return v.base;
  }

  private async resetRings(): Promise<void> {
    for (let i = 0; i < this.vrings.length; i++) await this.stopVring(i);
    await this.device.reset();
    for (const v of this.vrings) {
      v.num = 0;
      v.addr = null;
      v.base = 0;
    }
  }

  private async setMemTable(table: readonly MappedMemoryRegion[]): Promise<void> {
    const problem = memoryTableProblem(table);
    if (problem !== null) {
      for (const r of table) this.io.closeFd(r.fd);
      throw new BackendSessionError('BAD_MEMORY_TABLE', problem);
    }

    // Rings run on views of the old mappings: stop them (their requests finish first),
    // swap the table, then restart them where they stopped (NOTES: SET_MEM_TABLE may
    // arrive while rings run).
    const running = this.vrings.map((v, i) => (v.queue ? i : -1)).filter((i) => i >= 0);
    for (const i of running) {
      const v = this.vrings[i];
      v.base = await this.device.stopQueue(i);
      v.queue = null;
    }
    try {
      this.table.replace(table);
    } catch (e) {
      // The old table stays: the rings stopped for the swap go on with it. The finally
      // below closes the fds, once: closing one twice could close an fd opened meanwhile.
      for (const i of running) this.maybeStart(i);
      throw new BackendSessionError('BAD_MEMORY_TABLE', `cannot map memory region: ${e instanceof Error ? e.message : String(e)}`);
    } finally {
      // The mapping keeps the memory; the fds are not needed any more.
      for (const r of table) this.io.closeFd(r.fd);
    }
    if (!this.migration.covers(this.table.end())) {
      this.io.log(`the migration log (${this.migration.dirty.size} bytes) does not cover guest memory up to 0x${this.table.end().toString(16)}: writes beyond it cannot be logged until the frontend sends a larger one`, { level: 'warn' });
    }
    // Restart the rings that ran, and start those that had everything but memory (a
    // frontend may set a ring up before its first table). Every ring gets its chance
    // before the first failure is reported.
    let failure: unknown = null;
    for (let i = 0; i < this.vrings.length; i++) {
      try {
        this.maybeStart(i);
      } catch (e) {
        failure ??= e;
      }
    }
    if (failure !== null) throw failure;
  }

  // DeviceHost

  configChanged(): void {
    if (this.closed || this.backendChannel === null || !this.hasProtocol(VHOST_USER_PROTOCOL_F.CONFIG)) return;
    // No NEED_REPLY: QEMU 7.2 sends GET_CONFIG before it acks (NOTES), and this channel
    // must never hold up the main socket.
    this.io.sendOnBackendChannel(this.backendChannel, encodeBackendRequest({ request: 'CONFIG_CHANGE_MSG', needReply: false }));
  }

  needsReset(index: number, reason: ChainError): void {
    this.io.log(`ring ${index} stopped, the driver must reset the device: ${reason.message}`, { queue: index, level: 'warn' });
    const v = this.vrings[index];
    if (v?.errFd != null) this.io.signalEventFd(v.errFd);
  }

  /**
   * Ends the session (the frontend disconnected): stops every ring once its requests
   * have completed, resets the device for the next frontend, unmaps memory, closes fds.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (let i = 0; i < this.vrings.length; i++) await this.stopVring(i);
    await this.device.reset();
    this.table.unmap();
    this.inflight.close();
    this.migration.close();
    for (const v of this.vrings) {
      for (const fd of [v.callFd, v.errFd]) if (fd !== null) this.io.closeFd(fd);
      v.callFd = null;
      v.errFd = null;
    }
    if (this.backendChannel !== null) this.io.closeFd(this.backendChannel);
    this.backendChannel = null;
  }
}
