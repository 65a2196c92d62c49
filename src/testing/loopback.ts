/**
 * The loopback harness of the testing kit: a whole disk in one process — the driver,
 * the loopback transport and a device over the backend under test — so a backend (or a
 * filter stack) can be exercised through real virtio-blk requests, with their
 * validation, splitting and status mapping, and no VM.
 */
import type { BlockBackend } from '../backends/backend.js';
import { BlkDevice, type BlkDeviceOptions } from '../blk/device.js';
import { BlkDriver, type BlkDriverOptions } from '../blk/driver.js';
import { LoopbackTransport, type LoopbackOptions } from '../transport/loopback.js';

/** What {@link openLoopbackDisk} builds. */
export interface LoopbackDisk {
  /** The guest side: read, write, flush, discard … by sector. */
  readonly driver: BlkDriver;
  /** The device side, over the backend: its config, cache mode, `resize` and statistics. */
  readonly device: BlkDevice;
  /** What joins the two, and holds the guest memory. */
  readonly transport: LoopbackTransport;
  /** Removes the disk and closes the transport; the backend stays open (its owner closes it). */
  close(): Promise<void>;
}

/** How {@link openLoopbackDisk} builds the disk; every field is optional. */
export interface LoopbackDiskOptions {
  /** Device options other than the backend. */
  readonly device?: Omit<BlkDeviceOptions, 'backend'>;
  /** How the driver probes the device (queues, timeout, features left out …). */
  readonly driver?: BlkDriverOptions;
  /** The guest memory's size and address. */
  readonly loopback?: LoopbackOptions;
}

/**
 * Opens `backend` (its `open`, when it has one, as a server would) and serves it to a
 * driver over the loopback transport. The driver has probed the device when this
 * resolves.
 */
export async function openLoopbackDisk(backend: BlockBackend, options: LoopbackDiskOptions = {}): Promise<LoopbackDisk> {
  await backend.open?.();
  const device = new BlkDevice({ ...options.device, backend });
  const transport = new LoopbackTransport(device, options.loopback);
  let driver: BlkDriver;
  try {
    driver = await BlkDriver.probe(transport, options.driver);
  } catch (e) {
    await transport.close();
    throw e;
  }
  return {
    driver, device, transport,
    async close() {
      await driver.remove();
      await transport.close();
    },
  };
}
