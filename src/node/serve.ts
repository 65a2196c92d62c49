/**
 * A {@link BlockBackend} served as a vhost-user-blk device from a program: what `vblk
 * serve` does once it has its backend, without the command line around it. QEMU
 * (`-device vhost-user-blk-pci`), qemu-storage-daemon's peers and {@link connect} use
 * the socket.
 */
import type { BlockBackend } from '../backends/backend.js';
import { BlkDevice, type BlkDeviceOptions } from '../blk/device.js';
import { describeThrown } from '../errors.js';
import { VIRTIO_BLK_T } from '../spec/virtio-blk.js';
import { VhostUserServer, type VhostUserServerOptions } from './vhost-user-server.js';

/** How {@link serve} serves a backend: the socket's options, the backend, the device's options. */
export interface ServeOptions extends Omit<VhostUserServerOptions, 'device'> {
  /** The storage to serve, opened here when it has an open step; {@link ServedDisk.close} flushes it but leaves it open. */
  readonly backend: BlockBackend;
  /**
   * The virtio-blk device's options (serial, queues, block size …). Without an
   * `onBackendError`, every backend failure is a `log` line naming the request.
   */
  readonly device?: Omit<BlkDeviceOptions, 'backend'>;
}

/** A backend being served by {@link serve}. */
export interface ServedDisk {
  /** The backend served, as given in the options (opened by now). */
  readonly backend: BlockBackend;
  /** The device model: `device.resize(bytes)` grows the disk and tells the guest. */
  readonly device: BlkDevice;
  /** The listening socket. */
  readonly server: VhostUserServer;
  /**
   * Stops listening, lets the connected frontend's requests complete, then flushes the
   * backend when it is writable and has a cache. The backend stays open: it is the
   * caller's to close.
   */
  close(): Promise<void>;
}

/**
 * Serves `options.backend` as a vhost-user-blk device on the unix socket
 * `options.socketPath`, one frontend at a time, across disconnects, until
 * {@link ServedDisk.close}. Fails when the socket cannot be bound (a live server on the
 * path is `EADDRINUSE`); the backend is left open then too.
 */
export async function serve(options: ServeOptions): Promise<ServedDisk> {
  const { backend, device: deviceOptions, ...serverOptions } = options;
  // A backend may learn its size and capabilities when it opens (a filter's base, a network export).
  await backend.open?.();
  const log = options.log ?? (() => {});
  const device = new BlkDevice({
    onBackendError: (e, type, sector) => log(`I/O error (${describeRequest(type, sector)}): ${describeThrown(e)}`, { level: 'error' }),
    ...deviceOptions,
    backend,
  });
  const server = VhostUserServer.listen({ ...serverOptions, device });
  return {
    backend, device, server,
    async close() {
      await server.close();
      if (!backend.readOnly && backend.canFlush) await backend.flush();
    },
  };
}

/** The requests that reach a backend, by type. */
const REQUEST_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_BLK_T.IN]: 'read', [VIRTIO_BLK_T.OUT]: 'write', [VIRTIO_BLK_T.DISCARD]: 'discard',
  [VIRTIO_BLK_T.WRITE_ZEROES]: 'write-zeroes', [VIRTIO_BLK_T.SECURE_ERASE]: 'secure-erase',
};

function describeRequest(type: number, sector: number): string {
  if (type === VIRTIO_BLK_T.FLUSH) return 'flush';
  return `${REQUEST_NAMES[type] ?? `request type ${type}`} at sector ${sector}`;
}
