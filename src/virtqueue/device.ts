/**
 * The two interfaces that join a device model or a driver to a transport, whatever the
 * transport is (loopback, vhost-user, virtio-mmio). The device never knows which
 * transport it is on; neither does the driver (DESIGN.md, Layers).
 */
import type { DmaAllocator } from '../memory/dma-allocator.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import type { ChainError } from './chain.js';
import type { SplitDeviceQueue } from './split-device.js';
import type { SplitDriverQueue } from './split-driver.js';

/** What a device tells its transport. */
export interface DeviceHost {
  /** The config space changed: raise a configuration change notification (4.x). */
  configChanged(): void;
  /** Queue `index` met a broken ring: set NEEDS_RESET and say why (2.1.2). */
  needsReset(index: number, reason: ChainError): void;
}

/** A device model as a transport drives it. */
export interface VirtioDevice {
  /** Virtio device ID (VIRTIO 1.2, 5). */
  readonly deviceId: number;
  /** Queues the device offers. */
  readonly numQueues: number;
  /** Largest queue size the device accepts. */
  readonly maxQueueSize: number;
  /** Every feature bit the device offers, device-specific and reserved ones. */
  readonly deviceFeatures: bigint;
  /** Attaches the transport that receives the device's events (replacing any earlier one). */
  attach(host: DeviceHost): void;
  /** Bytes of the device config space; zero beyond the structure. */
  readConfig(offset: number, length: number): Uint8Array;
  /** A driver write into config space (guest input: validated, never throws). */
  writeConfig(offset: number, data: Uint8Array): void;
  /**
   * The driver's copy of the config space is unknown (a transport whose frontend caches
   * it, with a backend restarted under a running driver): set every driver-writable
   * field to the value safest for the driver's data. Devices without such fields omit it.
   */
  assumeCautiousConfig?(): void;
  /** Features the driver accepted; a subset of `deviceFeatures`. Called before queues start. */
  setDriverFeatures(features: bigint): void;
  /**
   * Starts serving queue `index` on `queue`. `notify` sends the driver a used-buffer
   * notification; the device calls it only when the queue's suppression rules allow.
   */
  startQueue(index: number, queue: SplitDeviceQueue, notify: () => void): void;
  /** An available-buffer notification (a kick) for queue `index`. */
  queueNotify(index: number): void;
  /**
   * Stops fetching from queue `index` and resolves once every request it popped has
   * completed into the used ring. Returns the next available index to process.
   */
  stopQueue(index: number): Promise<number>;
  /** Stops every queue (as `stopQueue`) and returns the device to its initial state. */
  reset(): Promise<void>;
}

/** A driver-side queue as its transport set it up. */
export interface DriverQueueBinding<T> {
  /** The driver's side of the split rings; `T` is what the driver posts with each chain. */
  readonly queue: SplitDriverQueue<T>;
  /** Sends an available-buffer notification (a kick) to the device. */
  notify(): void;
}

/** What a driver needs from its transport: 3.1.1's steps, config space and queues. */
export interface DriverTransport {
  /** Memory the device can reach; rings and buffers are placed here. */
  readonly memory: GuestMemory;
  /** Allocator over `memory` for rings, indirect tables and data buffers. */
  readonly dma: DmaAllocator;
  /** Resets the device: afterwards no queue is live and the status is 0. */
  reset(): Promise<void>;
  /** The device status field (VIRTIO_CONFIG_S bits). */
  getStatus(): Promise<number>;
  /**
   * Writes the device status field. Setting FEATURES_OK commits the features given to
   * {@link setDriverFeatures}; a write the device refuses rejects.
   */
  setStatus(status: number): Promise<void>;
  /** Every feature bit the device offers. */
  getDeviceFeatures(): Promise<bigint>;
  /** The features the driver accepts, a subset of the offer; written before FEATURES_OK. */
  setDriverFeatures(features: bigint): Promise<void>;
  /**
   * `length` bytes of config space from `offset`. Rejects with a VblkError of code
   * `CONFIG_REFUSED` when the device will not give that many (a vhost-user backend's
   * empty GET_CONFIG reply), never pads what it did not get.
   */
  readConfig(offset: number, length: number): Promise<Uint8Array>;
  /** Writes `data` into config space at `offset` (the only driver-writable field of virtio-blk is `writeback`). */
  writeConfig(offset: number, data: Uint8Array): Promise<void>;
  /** Queues the device offers (the transport's own count; virtio-blk also has num_queues). */
  maxQueues(): Promise<number>;
  /** Largest size the device accepts for queue `index`. */
  maxQueueSize(index: number): Promise<number>;
  /**
   * Creates queue `index` of `size` entries (rings in `memory`) with the ring features
   * negotiated so far, and tells the device. `onUsed` runs on every used-buffer
   * notification. `indirectEntries` > 0 reserves indirect tables of that many entries.
   */
  setupQueue<T>(index: number, size: number, indirectEntries: number, onUsed: () => void): Promise<DriverQueueBinding<T>>;
  /**
   * Stops every queue at the device and frees their rings. Chains still in flight are
   * abandoned by the device; the caller takes them back with `detachAll()` first.
   */
  teardownQueues(): Promise<void>;
  /** Runs `listener` on every configuration change notification. */
  onConfigChange(listener: () => void): void;
  /**
   * Runs `listener` once when the device is gone for good (a vhost-user backend hung up,
   * the transport was closed): nothing in flight will ever complete.
   */
  onDeviceLost(listener: (reason: Error) => void): void;
  /**
   * Optional: reaches the device again after it was lost (a vhost-user backend restarted
   * on the same socket). Afterwards the transport is as a fresh one: status 0, no queue
   * set up, the device knowing nothing of earlier rings; `memory` and `dma` are the same.
   * Rejects when the device cannot be reached yet (the caller retries). Listeners given to
   * {@link onDeviceLost} before the loss have run and are gone; register again.
   */
  reconnect?(): Promise<void>;
  /** Releases everything; the transport is unusable afterwards. */
  close(): Promise<void>;
}
