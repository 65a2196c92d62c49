/**
 * Loopback transport: a driver and a device in one process over one guest memory (an
 * ArrayBuffer), wired like a real transport — status and feature negotiation through
 * the device-side state machine, config reads, kicks and used-buffer notifications
 * delivered asynchronously and coalesced, configuration change notifications. For tests,
 * benchmarks and browsers.
 */
import { UsageError } from '../errors.js';
import { DmaAllocator } from '../memory/dma-allocator.js';
import { GuestMemory } from '../memory/guest-memory.js';
import { pageAlignedBytes } from '../memory/page-aligned.js';
import { VIRTIO_CONFIG_S, VIRTIO_F, hasFeature } from '../spec/virtio.js';
import { contiguousRingLayout, VIRTQ_DESC_SIZE } from '../spec/split-ring.js';
import type { ChainError } from '../virtqueue/chain.js';
import type { DeviceHost, DriverQueueBinding, DriverTransport, VirtioDevice } from '../virtqueue/device.js';
import { SplitDeviceQueue } from '../virtqueue/split-device.js';
import { SplitDriverQueue } from '../virtqueue/split-driver.js';
import { QueueSetupError } from '../virtqueue/ring-views.js';
import { StatusMachine } from '../virtqueue/status.js';
import { soon } from '../soon.js';

/** Where a {@link LoopbackTransport} puts its guest memory; both fields have defaults. */
export interface LoopbackOptions {
  /** Bytes of guest memory (a power of two). Default 64 MiB. */
  memorySize?: number;
  /** Guest address of the memory. Default 1 MiB, so that address 0 is never valid. */
  guestAddress?: number;
}

interface LiveQueue {
  readonly ringAddr: number;
  readonly indirectAddr: number;
  kickPending: boolean;
  usedPending: boolean;
  onUsed: () => void;
}

/**
 * A device and a driver in one process: construct it over a {@link VirtioDevice} (a
 * {@link BlkDevice}), then probe a {@link BlkDriver} on it. It is the device's host and
 * the driver's transport at once.
 */
export class LoopbackTransport implements DriverTransport, DeviceHost {
  readonly memory: GuestMemory;
  readonly dma: DmaAllocator;
  private readonly status: StatusMachine;
  private readonly queues = new Map<number, LiveQueue>();
  private readonly configListeners: (() => void)[] = [];
  private readonly lostListeners: ((reason: Error) => void)[] = [];
  private configPending = false;
  private closed = false;
  /** Why a queue broke, for tests and logs. */
  lastNeedsReset: {
    /** The queue that met the broken ring. */
    index: number;
    /** What was wrong with it. */
    reason: ChainError;
  } | null = null;

  constructor(
    /** The device served; the transport attaches itself to it. */
    readonly device: VirtioDevice,
    options: LoopbackOptions = {},
  ) {
    const size = options.memorySize ?? 64 * 1024 * 1024;
    const base = options.guestAddress ?? 0x10_0000;
    // Page-aligned like a VM's memory: DMA buffers then start on host pages too, and a
    // device copies a block to or from them a page at a time (page-aligned.ts). It is
    // not a SharedArrayBuffer: no other thread can touch it, so the rings over it need
    // no atomic accesses (ring-index.ts).
    this.memory = new GuestMemory([{ guestAddress: base, bytes: pageAlignedBytes(size) }], { exclusive: true });
    this.dma = new DmaAllocator(base, size);
    this.status = new StatusMachine(device.deviceFeatures);
    device.attach(this);
  }

  configChanged(): void {
    if (this.configPending) return;
    this.configPending = true;
    soon(() => {
      this.configPending = false;
      for (const l of this.configListeners) l();
    });
  }

  needsReset(index: number, reason: ChainError): void {
    this.lastNeedsReset = { index, reason };
    this.status.markNeedsReset();
  }

  async reset(): Promise<void> {
    this.assertOpen();
    await this.device.reset();
    this.freeQueues();
    this.status.write(0);
  }

  async getStatus(): Promise<number> {
    return this.status.status;
  }

  async setStatus(status: number): Promise<void> {
    this.assertOpen();
    const wasFeaturesOk = (this.status.status & VIRTIO_CONFIG_S.FEATURES_OK) !== 0;
    const err = this.status.write(status);
    if (err) throw err;
    if (!wasFeaturesOk && status & VIRTIO_CONFIG_S.FEATURES_OK) this.device.setDriverFeatures(this.status.negotiated);
  }

  async getDeviceFeatures(): Promise<bigint> {
    return this.device.deviceFeatures;
  }

  async setDriverFeatures(features: bigint): Promise<void> {
    const err = this.status.setFeatures(features);
    if (err) throw err;
  }

  async readConfig(offset: number, length: number): Promise<Uint8Array> {
    return this.device.readConfig(offset, length);
  }

  async writeConfig(offset: number, data: Uint8Array): Promise<void> {
    this.device.writeConfig(offset, data);
  }

  async maxQueues(): Promise<number> {
    return this.device.numQueues;
  }

  async maxQueueSize(): Promise<number> {
    return this.device.maxQueueSize;
  }

  async setupQueue<T>(index: number, size: number, indirectEntries: number, onUsed: () => void): Promise<DriverQueueBinding<T>> {
    this.assertOpen();
    if (index >= this.device.numQueues || this.queues.has(index)) {
      throw new UsageError('BAD_QUEUE', `queue ${index} does not exist or is already set up`);
    }
    if (size > this.device.maxQueueSize) {
      throw new UsageError('BAD_QUEUE', `queue size ${size} is above the device's maximum ${this.device.maxQueueSize}`);
    }
    const negotiated = this.status.negotiated;
    const eventIdx = hasFeature(negotiated, VIRTIO_F.RING_EVENT_IDX);
    const indirect = hasFeature(negotiated, VIRTIO_F.RING_INDIRECT_DESC) && indirectEntries > 0;
    const layout = contiguousRingLayout(size);
    const ringAddr = this.dma.alloc(layout.total);
    const indirectAddr = indirect ? this.dma.alloc(size * indirectEntries * VIRTQ_DESC_SIZE) : -1;
    if (ringAddr < 0 || (indirect && indirectAddr < 0)) {
      throw new UsageError('NO_MEMORY', `no room for queue ${index} of size ${size} in loopback memory`);
    }
    const config = {
      size, desc: ringAddr + layout.desc, avail: ringAddr + layout.avail, used: ringAddr + layout.used, eventIdx, indirect,
    };
    const driverQueue = SplitDriverQueue.create<T>(this.memory, config, indirect ? { addr: indirectAddr, entries: indirectEntries } : null);
    const deviceQueue = SplitDeviceQueue.create(this.memory, config);
    if (driverQueue instanceof QueueSetupError) throw driverQueue;
    if (deviceQueue instanceof QueueSetupError) throw deviceQueue;
    const live: LiveQueue = { ringAddr, indirectAddr, kickPending: false, usedPending: false, onUsed };
    this.queues.set(index, live);
    this.device.startQueue(index, deviceQueue, () => {
      if (live.usedPending) return;
      live.usedPending = true;
      soon(() => {
        live.usedPending = false;
        if (this.queues.get(index) === live) live.onUsed();
      });
    });
    return {
      queue: driverQueue,
      notify: () => {
        if (live.kickPending) return;
        live.kickPending = true;
        soon(() => {
          live.kickPending = false;
          if (this.queues.get(index) === live) this.device.queueNotify(index);
        });
      },
    };
  }

  async teardownQueues(): Promise<void> {
    for (const index of this.queues.keys()) await this.device.stopQueue(index);
    this.freeQueues();
  }

  private freeQueues(): void {
    for (const q of this.queues.values()) {
      this.dma.release(q.ringAddr);
      if (q.indirectAddr >= 0) this.dma.release(q.indirectAddr);
    }
    this.queues.clear();
  }

  onConfigChange(listener: () => void): void {
    this.configListeners.push(listener);
  }

  onDeviceLost(listener: (reason: Error) => void): void {
    this.lostListeners.push(listener);
  }

  /** Resets the device and frees the rings; a driver still holding requests is told the device is gone. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.device.reset();
    this.freeQueues();
    this.closed = true;
    const reason = new UsageError('CLOSED', 'the loopback transport was closed');
    for (const l of this.lostListeners.splice(0)) l(reason);
  }

  private assertOpen(): void {
    if (this.closed) throw new UsageError('CLOSED', 'the loopback transport is closed');
  }
}
