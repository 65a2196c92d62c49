/**
 * Shared setup for the driver's cross-layer tests: BlkDriver → LoopbackTransport →
 * BlkDevice → a backend, and a logger that records what the driver says.
 */
import { BlkDevice, type BlkDeviceOptions } from '../src/blk/device.js';
import { BlkDriver, type BlkDriverOptions, type BlkLogger } from '../src/blk/driver.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import type { BlockBackend } from '../src/backends/backend.js';
import { LoopbackTransport, type LoopbackOptions } from '../src/transport/loopback.js';
import { openLoopbackDisk } from '../src/testing/loopback.js';
import { encodeBlkConfig, type BlkConfig } from '../src/blk/config.js';
import { VIRTIO_BLK_F, VIRTIO_BLK_S } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, VIRTIO_ID, features } from '../src/spec/virtio.js';
import { getU64 } from '../src/spec/u64.js';
import { ChainError, type DescriptorChain } from '../src/virtqueue/chain.js';
import type { DeviceHost, VirtioDevice } from '../src/virtqueue/device.js';
import type { SplitDeviceQueue } from '../src/virtqueue/split-device.js';

export interface Rig<D extends VirtioDevice = BlkDevice> {
  readonly driver: BlkDriver;
  readonly device: D;
  readonly transport: LoopbackTransport;
  readonly log: { level: 'notice' | 'warn'; disk: string; message: string }[];
  /** Removes the disk and closes the transport. */
  close(): Promise<void>;
}

export interface RigOptions {
  /** Disk size in bytes (memory backend). Default 1 MiB. */
  size?: number;
  backend?: BlockBackend;
  device?: Omit<BlkDeviceOptions, 'backend'>;
  driver?: BlkDriverOptions;
  loopback?: LoopbackOptions;
}

export function recordingLogger(log: Rig['log']): BlkLogger {
  return {
    notice: (disk, message) => log.push({ level: 'notice', disk, message }),
    warn: (disk, message) => log.push({ level: 'warn', disk, message }),
  };
}

export async function rig(options: RigOptions = {}): Promise<Rig & { readonly backend: BlockBackend }> {
  const backend = options.backend ?? new MemoryBackend({ size: options.size ?? 1 << 20 });
  const log: Rig['log'] = [];
  const disk = await openLoopbackDisk(backend, {
    device: options.device, loopback: options.loopback, driver: { logger: recordingLogger(log), ...options.driver },
  });
  return { ...disk, backend, log };
}

export { pattern } from './support/pattern.js';

/** What a {@link ScriptedDevice} does with one request. */
export type ScriptedAnswer =
  | {
    /** Status byte to write (omit to write none). */
    readonly status?: number;
    /** Used length to report; default every writable byte. */
    readonly written?: number;
    /** Used id to report; default the chain's head (set it to lie). */
    readonly id?: number;
    /** Byte to fill the data buffers with before answering (reads). */
    readonly fill?: number;
  }
  | 'hold';

/** A request as the scripted device saw it. */
export interface ScriptedRequest {
  readonly queue: number;
  readonly type: number;
  readonly sector: number;
  readonly chain: DescriptorChain;
}

/**
 * A fake virtio-blk device for unit tests of the driver's own logic: it pops chains,
 * asks `answer` what to do with each, and can hold requests to finish them later — or
 * lie about used ids and lengths, which the real device never does.
 */
export class ScriptedDevice implements VirtioDevice {
  readonly deviceId = VIRTIO_ID.BLOCK;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly deviceFeatures: bigint;
  readonly config: Uint8Array;
  readonly seen: ScriptedRequest[] = [];
  readonly held: ScriptedRequest[] = [];
  private host: DeviceHost | null = null;
  private readonly queues: ({ queue: SplitDeviceQueue; notify: () => void } | null)[];

  constructor(options: {
    features?: bigint;
    config?: Partial<BlkConfig>;
    numQueues?: number;
    queueSize?: number;
    answer?: (r: ScriptedRequest) => ScriptedAnswer;
  } = {}) {
    this.numQueues = options.numQueues ?? 1;
    this.maxQueueSize = options.queueSize ?? 64;
    this.deviceFeatures = options.features ?? features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.FLUSH);
    this.config = encodeBlkConfig({ ...DEFAULT_SCRIPTED_CONFIG, numQueues: this.numQueues, ...options.config });
    this.answer = options.answer ?? (() => ({ status: VIRTIO_BLK_S.OK }));
    this.queues = new Array(this.numQueues).fill(null);
  }

  answer: (r: ScriptedRequest) => ScriptedAnswer;

  attach(host: DeviceHost): void {
    this.host = host;
  }

  readConfig(offset: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    out.set(this.config.subarray(offset, offset + length));
    return out;
  }

  writeConfig(offset: number, data: Uint8Array): void {
    this.config.set(data.subarray(0, Math.max(0, this.config.length - offset)), offset);
  }

  setDriverFeatures(): void {}

  startQueue(index: number, queue: SplitDeviceQueue, notify: () => void): void {
    this.queues[index] = { queue, notify };
  }

  queueNotify(index: number): void {
    const q = this.queues[index];
    if (!q) return;
    for (let chain = q.queue.pop(); chain !== null; chain = q.queue.pop()) {
      if (chain instanceof ChainError) {
        this.host?.needsReset(index, chain);
        return;
      }
      const header = new DataView(chain.readable[0].buffer, chain.readable[0].byteOffset, 16);
      const r: ScriptedRequest = {
        queue: index, chain, type: header.getUint32(0, true), sector: getU64(header, 8),
      };
      this.seen.push(r);
      const a = this.answer(r);
      if (a === 'hold') this.held.push(r);
      else this.respond(r, a, false);
    }
    if (q.queue.publishUsed()) q.notify();
  }

  /** Answers a request (a held one, or one being popped when `batch`). */
  respond(r: ScriptedRequest, a: Exclude<ScriptedAnswer, 'hold'>, publish = true): void {
    const q = this.queues[r.queue];
    if (!q) return;
    const w = r.chain.writable;
    if (a.fill !== undefined) for (let i = 0; i < w.length - 1; i++) w[i].fill(a.fill);
    const last = w[w.length - 1];
    if (a.status !== undefined && last) last[last.length - 1] = a.status;
    q.queue.pushUsed(a.id ?? r.chain.head, a.written ?? r.chain.writableBytes);
    if (publish && q.queue.publishUsed()) q.notify();
  }

  /** Answers every held request with `a`. */
  releaseHeld(a: Exclude<ScriptedAnswer, 'hold'> = { status: VIRTIO_BLK_S.OK }): void {
    for (const r of this.held.splice(0)) this.respond(r, a);
  }

  async stopQueue(index: number): Promise<number> {
    const q = this.queues[index];
    this.queues[index] = null;
    return q ? q.queue.nextAvail : 0;
  }

  async reset(): Promise<void> {
    this.queues.fill(null);
    this.held.length = 0;
  }
}

const DEFAULT_SCRIPTED_CONFIG: BlkConfig = {
  capacity: 2048,
  sizeMax: 0,
  segMax: 0,
  geometry: { cylinders: 0, heads: 0, sectors: 0 },
  blkSize: 512,
  topology: { physicalBlockExp: 0, alignmentOffset: 0, minIoSize: 0, optIoSize: 0 },
  writeback: 0,
  numQueues: 1,
  maxDiscardSectors: 0,
  maxDiscardSeg: 0,
  discardSectorAlignment: 0,
  maxWriteZeroesSectors: 0,
  maxWriteZeroesSeg: 0,
  writeZeroesMayUnmap: 0,
  maxSecureEraseSectors: 0,
  maxSecureEraseSeg: 0,
  secureEraseSectorAlignment: 0,
};

/** A scripted device behind a loopback transport, and a driver probed on it. */
export async function scriptedRig(device: ScriptedDevice, driver: BlkDriverOptions = {}): Promise<Rig<ScriptedDevice>> {
  const transport = new LoopbackTransport(device);
  const log: Rig['log'] = [];
  const d = await BlkDriver.probe(transport, { logger: recordingLogger(log), ...driver });
  return {
    driver: d, device, transport, log,
    async close() {
      await d.remove();
      await transport.close();
    },
  };
}
