/**
 * Shared setup for the driver's cross-layer tests: BlkDriver → LoopbackTransport →
 * BlkDevice → a backend, and a logger that records what the driver says.
 */
import { BlkDevice, type BlkDeviceOptions } from '../src/blk/device.js';
import { BlkDriver, type BlkDriverOptions, type BlkLogger } from '../src/blk/driver.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import type { BlockBackend } from '../src/backends/backend.js';
import { LoopbackTransport, type LoopbackOptions } from '../src/transport/loopback.js';

export interface Rig {
  readonly driver: BlkDriver;
  readonly device: BlkDevice;
  readonly backend: BlockBackend;
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

export async function rig(options: RigOptions = {}): Promise<Rig> {
  const backend = options.backend ?? new MemoryBackend({ size: options.size ?? 1 << 20 });
  const device = new BlkDevice({ backend, ...options.device });
  const transport = new LoopbackTransport(device, options.loopback);
  const log: Rig['log'] = [];
  const driver = await BlkDriver.probe(transport, { logger: recordingLogger(log), ...options.driver });
  return {
    driver, device, backend, transport, log,
    async close() {
      await driver.remove();
      await transport.close();
    },
  };
}

/** A buffer of `length` bytes whose content depends on `seed`. */
export function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}
