/**
 * The disk's lifecycle: bring-up (3.1.1: reset, ACKNOWLEDGE, DRIVER, features,
 * FEATURES_OK, config, queues, DRIVER_OK), config changes (the seed's
 * `virtblk_config_changed`), freeze and restore, removal, and the loss of the device.
 * It owns the phase and tells the {@link RequestEngine} whether to post, queue or hold.
 *
 * Reconnection: when a transport that can reach its device again (a vhost-user backend
 * restarted on the same socket) loses it, the disk holds every request not completed
 * and new ones, connects again with backoff, negotiates the features in use (a device
 * without one of them, or with a different logical block or smaller chains, is refused
 * like a failed attempt), reads the config (a new capacity is a config change), sets up
 * fresh rings and sends the held requests again — a block device's requests, flush
 * included, are idempotent. After `reconnectTimeoutMs` they fail with `DEVICE_GONE`.
 */
import { UsageError } from '../errors.js';
import { VIRTIO_BLK_CONFIG, VIRTIO_BLK_F, virtioBlkConfigSize } from '../spec/virtio-blk.js';
import { VIRTIO_CONFIG_S, VIRTIO_F, hasFeature } from '../spec/virtio.js';
import { isValidQueueSize } from '../spec/split-ring.js';
import type { DriverTransport } from '../virtqueue/device.js';
import { DriverQueueError } from '../virtqueue/split-driver.js';
import { decodeBlkConfig, BlkConfigError } from './config.js';
import { ProbeError, QueueBrokenError, RequestError } from './driver-errors.js';
import type { RequestEngine } from './driver-engine.js';
import { DiskLimits, newSizeMessage } from './driver-limits.js';
import type { BlkDriverOptions, BlkLogger, ResizeEvent } from './driver-options.js';

export type Phase = 'probing' | 'running' | 'reconnecting' | 'freezing' | 'frozen' | 'removing' | 'removed' | 'failed';

/** Reconnection backoff: the first retry, and the longest wait between tries (ms). */
const FIRST_RETRY_MS = 20;
const MAX_RETRY_MS = 1000;

/** What a device reached again after a loss must still offer for the disk to carry on. */
interface InUse {
  readonly negotiated: bigint;
  readonly blockSize: number;
  readonly maxChainBytes: number;
}

export class DiskLifecycle {
  phase: Phase = 'probing';
  private configEnabled = false;
  private configBusy = false;
  private configDirty = false;
  readonly resizeListeners: ((e: ResizeEvent) => void)[] = [];
  private removal: Promise<void> | null = null;
  private freezing: Promise<void> | null = null;
  /** The reconnection under way, if any, and how to cut its wait short when the disk is removed. */
  private reconnection: Promise<void> | null = null;
  private isReconnectAborted = false;
  private wakeReconnect: (() => void) | null = null;
  /** Why requests fail once reconnecting gave up. */
  private lostError: RequestError | null = null;
  private readonly reconnectMs: number;

  constructor(
    private readonly name: string,
    private readonly transport: DriverTransport,
    private readonly limits: DiskLimits,
    private readonly engine: RequestEngine,
    private readonly logger: BlkLogger,
    private readonly options: BlkDriverOptions,
    /** The features to ask for: the driver's, less the excluded ones. */
    private readonly wanted: bigint,
    /** Frees the disk's index once it is removed. */
    private readonly releaseIndex: () => void,
  ) {
    this.reconnectMs = options.reconnectTimeoutMs ?? 0;
    // Listening before DRIVER_OK loses no change; the listener ignores them until running.
    transport.onConfigChange(() => this.configChanged());
    transport.onDeviceLost((reason) => this.deviceLost(reason));
  }

  /** Brings the device up for the first time; the phase is `failed` when it throws. */
  async probe(): Promise<void> {
    try {
      await this.bringUp();
    } catch (e) {
      this.phase = 'failed';
      throw e;
    }
    this.run();
  }

  private run(): void {
    this.phase = 'running';
    this.engine.mode = 'post';
    this.configEnabled = true;
  }

  /** Why the disk no longer takes requests, or null while it does. */
  goneError(): RequestError | null {
    const phase = this.phase;
    if (phase === 'running' || phase === 'reconnecting' || phase === 'freezing' || phase === 'frozen') return null;
    if (this.lostError !== null) return this.lostError;
    return new RequestError('DISK_REMOVED', `${this.name}: the disk is ${phase === 'failed' ? 'failed' : 'removed'}`);
  }

  // ---- Bring-up ------------------------------------------------------------------

  /** Brings the device up; after a loss, `inUse` is what the new device must still offer. */
  private async bringUp(inUse: InUse | null = null): Promise<void> {
    const t = this.transport;
    const S = VIRTIO_CONFIG_S;
    try {
      await t.reset();
      await t.setStatus(S.ACKNOWLEDGE);
      await t.setStatus(S.ACKNOWLEDGE | S.DRIVER);
      const offered = await t.getDeviceFeatures();
      if (!hasFeature(offered, VIRTIO_F.VERSION_1)) {
        throw new ProbeError('NO_VERSION_1',
          `${this.name}: the device does not offer VIRTIO_F_VERSION_1; legacy (pre-1.0) devices are not supported`);
      }
      const negotiated = offered & (inUse?.negotiated ?? this.wanted);
      if (inUse !== null && negotiated !== inUse.negotiated) {
        throw new ProbeError('INCOMPATIBLE_DEVICE',
          `${this.name}: the device came back without features 0x${(inUse.negotiated & ~negotiated).toString(16)} the disk uses`);
      }
      await t.setDriverFeatures(negotiated);
      await t.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
      // 3.1.1 step 6: re-read the status; without FEATURES_OK the device refused our subset.
      if (((await t.getStatus()) & S.FEATURES_OK) === 0) {
        throw new ProbeError('FEATURES_NOT_ACCEPTED', `${this.name}: the device did not accept features 0x${negotiated.toString(16)}`);
      }
      const config = decodeBlkConfig(await this.readConfigFor(negotiated));
      if (config instanceof BlkConfigError) throw new ProbeError('BAD_CONFIG', `${this.name}: ${config.message}`, { cause: config });
      // The disk's limits change only once the device is known to suit: requests submitted
      // meanwhile (while reconnecting) are checked and cut by the ones in use.
      const next = new DiskLimits(this.name);
      next.apply(negotiated, config);
      const plan = await this.planQueues(next);
      // Held requests were checked and cut by the old limits: the new device must take them.
      if (inUse !== null && (next.blockSize !== inUse.blockSize || next.maxChainBytes < inUse.maxChainBytes)) {
        throw new ProbeError('INCOMPATIBLE_DEVICE', `${this.name}: the device came back with ${next.blockSize}-byte blocks and ` +
          `${next.maxChainBytes}-byte chains; the disk uses ${inUse.blockSize} and ${inUse.maxChainBytes}`);
      }
      this.limits.adopt(next);
      for (let i = 0; i < plan.sizes.length; i++) await this.engine.addQueue(i, plan.sizes[i], plan.indirectEntries);
      this.engine.queuesReady(plan.sizes.length);
      await t.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    } catch (e) {
      const err = e instanceof ProbeError ? e
        : new ProbeError('TRANSPORT', `${this.name}: bringing up the device failed: ${(e as Error).message}`, { cause: e });
      await this.failDevice();
      throw err;
    }
  }

  /**
   * The config space the negotiated features define (5.2.4). A device that will not give
   * it all fails the probe: zeroes in place of the secure-erase limits would read as "any
   * size, one segment" and send requests the device refuses; QEMU too gives up on a
   * vhost-user-blk backend whose GET_CONFIG fails.
   */
  private async readConfigFor(negotiated: bigint): Promise<Uint8Array> {
    const size = virtioBlkConfigSize(negotiated);
    try {
      return await this.transport.readConfig(0, size);
    } catch (e) {
      if ((e as { code?: unknown }).code !== 'CONFIG_REFUSED') throw e;
      const why = hasFeature(negotiated, VIRTIO_BLK_F.SECURE_ERASE)
        ? `VIRTIO_BLK_F_SECURE_ERASE's limits are bytes ${VIRTIO_BLK_CONFIG.max_secure_erase_sectors.offset}-${size - 1}` : 'the VIRTIO 1.1 structure';
      throw new ProbeError('BAD_CONFIG',
        `${this.name}: the device refused the ${size} bytes of config space the negotiated features need (${why}): ${(e as Error).message}`, { cause: e });
    }
  }

  /** After a failed bring-up: release what was set up and tell the device FAILED (3.1.1 step 8's alternative). */
  private async failDevice(): Promise<void> {
    try {
      if (this.engine.queues.length > 0) await this.engine.teardown();
      await this.transport.setStatus((await this.transport.getStatus()) | VIRTIO_CONFIG_S.FAILED);
    } catch {
      // The transport is already failing; the ProbeError being thrown says why.
    }
  }

  /** The queues `limits` call for: their sizes and indirect table entries (completing `limits`' chain limits). */
  private async planQueues(limits: DiskLimits): Promise<{ sizes: number[]; indirectEntries: number }> {
    const t = this.transport;
    let count = 1;
    if (limits.has(VIRTIO_BLK_F.MQ)) {
      count = Math.max(1, Math.min(limits.cfg.numQueues || 1, this.options.queues ?? 1, await t.maxQueues()));
    }
    const sizes: number[] = [];
    for (let i = 0; i < count; i++) {
      const size = limits.queueSize(await t.maxQueueSize(i), this.options);
      if (!isValidQueueSize(size)) throw new ProbeError('QUEUE_SETUP', `${this.name}: queue ${i} has no usable size`);
      sizes.push(size);
    }
    return { sizes, indirectEntries: limits.planChains(sizes, this.options) };
  }

  // ---- Config changes ------------------------------------------------------------

  /** The transport's configuration change notification (the seed's `virtblk_config_changed`). */
  private configChanged(): void {
    if (!this.configEnabled) return;
    if (this.configBusy) {
      this.configDirty = true;
      return;
    }
    this.configBusy = true;
    void this.rereadConfig();
  }

  /**
   * Re-reads capacity and cache mode, logs the seed's "new size" line and tells `resize`
   * listeners when the capacity changed (the seed's `virtblk_config_changed_work`).
   */
  private async rereadConfig(): Promise<void> {
    do {
      this.configDirty = false;
      try {
        const config = decodeBlkConfig(await this.transport.readConfig(0, virtioBlkConfigSize(this.limits.negotiated)));
        if (!this.configEnabled) break;
        if (config instanceof BlkConfigError) {
          this.logger.warn(this.name, `ignoring config change: ${config.message}`);
          continue;
        }
        const previous = this.limits.capacitySectors;
        this.limits.update(config);
        this.logger.notice(this.name, newSizeMessage(config.capacity, this.limits.blockSize));
        if (config.capacity !== previous) this.emitResize(previous);
      } catch (e) {
        this.logger.warn(this.name, `reading the config space after a change failed: ${(e as Error).message}`);
      }
    } while (this.configDirty);
    this.configBusy = false;
  }

  private emitResize(previousCapacity: number): void {
    const event: ResizeEvent = { capacity: this.limits.capacitySectors, previousCapacity };
    for (const l of [...this.resizeListeners]) l(event);
  }

  // ---- Freeze, restore, removal, loss ----------------------------------------------

  /** See {@link BlkDriver.freeze}. */
  freeze(): Promise<void> {
    if (this.phase !== 'running') {
      return Promise.reject(new UsageError('BAD_STATE', `${this.name}: cannot freeze a disk that is ${this.phase}`));
    }
    this.phase = 'freezing';
    this.engine.mode = 'queue';
    this.configEnabled = false;
    this.freezing = this.doFreeze();
    return this.freezing;
  }

  private async doFreeze(): Promise<void> {
    const engine = this.engine;
    await engine.waitFor(() => engine.liveChains === 0);
    try {
      await engine.teardown();
      await this.transport.reset();
    } catch (e) {
      // The transport failed under us: nothing held can be sent any more.
      this.phase = 'failed';
      engine.failHeld(e as Error);
      throw e;
    }
    this.phase = 'frozen';
    engine.mode = 'hold';
  }

  /**
   * The transport lost the device: reconnect when it can and the disk was running (see
   * the module's comment), else every request in flight, queued or held fails now, not
   * at its timeout.
   */
  private deviceLost(reason: Error): void {
    // The reconnection's own attempts fail as they may: it decides when to give up.
    if (this.phase === 'reconnecting') return;
    if (this.phase === 'running' && this.reconnectMs > 0 && this.transport.reconnect !== undefined) {
      this.reconnection = this.reconnect(reason);
      return;
    }
    this.logger.warn(this.name, `device lost: ${reason.message}`);
    for (const qs of this.engine.queues) {
      if (!qs.broken) this.engine.breakQueue(qs, new DriverQueueError('QUEUE_BROKEN', `device lost: ${reason.message}`));
    }
    this.engine.failHeld(new QueueBrokenError(`${this.name}: device lost: ${reason.message}`, { cause: reason }));
  }

  private async reconnect(reason: Error): Promise<void> {
    const engine = this.engine;
    const ms = this.reconnectMs;
    this.phase = 'reconnecting';
    engine.mode = 'hold';
    this.configEnabled = false;
    this.logger.warn(this.name, `device lost: ${reason.message}; reconnecting for up to ${ms / 1000} s`);
    const { negotiated, blockSize, maxChainBytes, capacitySectors } = this.limits;
    const deadline = Date.now() + ms;
    let last: Error = reason;
    // What the device completed before it went counts; every other chain goes out again.
    engine.reapAll();
    await engine.teardown(true).catch((e: unknown) => (last = e as Error));
    for (let wait = FIRST_RETRY_MS; !this.isReconnectAborted; wait = Math.min(MAX_RETRY_MS, wait * 2)) {
      try {
        await (this.transport.reconnect as () => Promise<void>)();
        this.transport.onDeviceLost((r) => this.deviceLost(r));
        await this.bringUp({ negotiated, blockSize, maxChainBytes });
        this.run();
        this.logger.notice(this.name, 'device back: resubmitting the requests not completed');
        engine.releaseHeld();
        if (this.limits.capacitySectors !== capacitySectors) {
          this.logger.notice(this.name, newSizeMessage(this.limits.capacitySectors, this.limits.blockSize));
          this.emitResize(capacitySectors);
        }
        return;
      } catch (e) {
        last = e as Error;
      }
      const left = deadline - Date.now();
      if (left <= 0 || this.isReconnectAborted) break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(wait, left));
        this.wakeReconnect = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wakeReconnect = null;
    }
    const error = this.isReconnectAborted
      ? new RequestError('DISK_REMOVED', `${this.name}: the disk was removed while reconnecting`)
      : new RequestError('DEVICE_GONE', `${this.name}: the device was lost and not back within ${ms / 1000} s (${last.message})`);
    this.logger.warn(this.name, error.message);
    this.phase = 'failed';
    this.lostError = error;
    engine.mode = 'queue';
    engine.failHeld(error);
  }

  /** See {@link BlkDriver.restore}. */
  async restore(): Promise<void> {
    if (this.phase !== 'frozen') throw new UsageError('BAD_STATE', `${this.name}: cannot restore a disk that is ${this.phase}`);
    const previousCapacity = this.limits.capacitySectors;
    try {
      await this.bringUp();
    } catch (e) {
      this.phase = 'failed';
      this.engine.failHeld(e as Error);
      throw e;
    }
    this.run();
    this.engine.releaseHeld();
    if (this.limits.capacitySectors !== previousCapacity) this.emitResize(previousCapacity);
  }

  /** See {@link BlkDriver.remove}. */
  remove(): Promise<void> {
    this.removal ??= this.doRemove();
    return this.removal;
  }

  private async doRemove(): Promise<void> {
    if (this.phase === 'freezing') await this.freezing;
    if (this.phase === 'reconnecting') {
      this.isReconnectAborted = true;
      this.wakeReconnect?.();
      await this.reconnection;
    }
    const wasFrozen = this.phase === 'frozen';
    const engine = this.engine;
    this.phase = 'removing';
    engine.mode = 'post';
    this.configEnabled = false;
    try {
      if (wasFrozen || engine.queues.length === 0) {
        engine.failHeld(new RequestError('DISK_REMOVED', `${this.name}: the disk was removed while frozen`));
      } else {
        await engine.waitFor(() => engine.liveOps === 0);
        await engine.teardown();
        await this.transport.reset();
      }
    } finally {
      // Even when the transport fails here, the disk is gone and its name free again.
      engine.stopTimer();
      engine.drainPool();
      this.releaseIndex();
      this.phase = 'removed';
      engine.mode = 'queue';
    }
  }
}
