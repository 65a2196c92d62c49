/**
 * A {@link BlockBackend} served as a vhost-user-blk device from a program: what `vblk
 * serve` does once it has its backend, without the command line around it. QEMU
 * (`-device vhost-user-blk-pci`), qemu-storage-daemon's peers and {@link connect} use
 * the socket.
 *
 * One backend may be served on several sockets at once, like qemu-storage-daemon's
 * several exports of one node: each socket has its own device (queues, negotiated
 * features, cache mode, statistics) and serves its own frontend, and all of them read
 * and write the one backend. Live migration needs this: the destination QEMU connects
 * while the source still runs.
 */
import { BackendError, type BlockBackend } from '../backends/backend.js';
import { SerialBackend } from '../backends/serial.js';
import { BlkDevice, type BlkDeviceOptions } from '../blk/device.js';
import { describeThrown, UsageError } from '../errors.js';
import type { LogSink } from '../log.js';
import { VIRTIO_BLK_T } from '../spec/virtio-blk.js';
import { VhostUserServer, type VhostUserServerOptions } from './vhost-user-server.js';

/** How {@link serve} serves a backend: the sockets' options, the backend, the devices' options. */
export interface ServeOptions extends Omit<VhostUserServerOptions, 'device' | 'socketPath'> {
  /**
   * The unix socket to listen on, or several: each serves its own frontend (one at a
   * time) with its own device, all on the one backend.
   */
  readonly socketPath: string | readonly string[];
  /** The storage to serve, opened here when it has an open step; {@link ServedDisk.close} flushes it but leaves it open. */
  readonly backend: BlockBackend;
  /**
   * Every device's options (serial, queues, block size …). Without an `onBackendError`,
   * `onWritebackChange` or `onLimitExceeded`, each event is a `log` line naming its socket.
   */
  readonly device?: Omit<BlkDeviceOptions, 'backend'>;
}

/** One socket of a {@link ServedDisk}: its device and its server. */
export interface ServedSocket {
  /** The unix socket it listens on. */
  readonly socketPath: string;
  /** The device its frontend drives: its own queues, features and statistics. */
  readonly device: BlkDevice;
  /** The vhost-user server accepting that socket's frontends. */
  readonly server: VhostUserServer;
}

/** A backend being served by {@link serve}. */
export interface ServedDisk {
  /** The backend served, as given in the options (opened by now). */
  readonly backend: BlockBackend;
  /** The first socket's device model (the only one's, with one socket). */
  readonly device: BlkDevice;
  /** The first socket's server. */
  readonly server: VhostUserServer;
  /** Every socket, in the order given. */
  readonly sockets: readonly ServedSocket[];
  /**
   * Grows the disk to `bytes` (the backend must be resizable) and tells every connected
   * frontend. Throws the device's {@link UsageError} for a size it refuses.
   */
  resize(bytes: number): Promise<void>;
  /**
   * Stops listening on every socket, lets the connected frontends' requests complete,
   * then flushes the backend once when it is writable and has a cache. The backend stays
   * open: it is the caller's to close. Rejects with a {@link BackendError} `IO_ERROR`
   * when that flush fails: what the guests wrote may not all be durable.
   */
  close(): Promise<void>;
}

/**
 * Serves `options.backend` as a vhost-user-blk device on the unix socket(s)
 * `options.socketPath`, one frontend at a time per socket, across disconnects, until
 * {@link ServedDisk.close}. Fails when a socket cannot be bound (a live server on the
 * path is `EADDRINUSE`), or a path is given twice; the backend is left open then too.
 */
export async function serve(options: ServeOptions): Promise<ServedDisk> {
  const { backend, device: deviceOptions, socketPath, ...serverOptions } = options;
  const paths: readonly string[] = typeof socketPath === 'string' ? [socketPath] : socketPath;
  if (paths.length === 0) throw new UsageError('BAD_OPTION', 'serve needs at least one socket path');
  const twice = paths.find((p, i) => paths.indexOf(p) !== i);
  if (twice !== undefined) throw new UsageError('BAD_OPTION', `socket ${twice} is given twice`);
  // A backend may learn its size and capabilities when it opens (a filter's base, a network export).
  await backend.open?.();
  const log = options.log ?? (() => {});
  // A device keeps a serial backend's operations from overlapping by wrapping it; devices
  // sharing one must share that wrapper too, or their operations would overlap after all.
  const shared = paths.length > 1 && backend.concurrency === 'serial' ? new SerialBackend(backend) : backend;
  const sockets: ServedSocket[] = [];
  try {
    for (const path of paths) {
      const socketLog: LogSink = (message, context) => log(message, { ...context, socket: path });
      const device = new BlkDevice({
        onBackendError: (e, type, sector) => socketLog(`I/O error (${describeRequest(type, sector)}): ${describeThrown(e)}`, { level: 'error' }),
        onWritebackChange: (wb) => socketLog(`cache mode: ${wb ? 'write-back' : 'write-through'}`),
        onLimitExceeded: (queue, message) => socketLog(`ring ${queue}: ${message}`, { queue, level: 'warn' }),
        ...deviceOptions,
        backend: shared,
      });
      sockets.push({ socketPath: path, device, server: VhostUserServer.listen({ ...serverOptions, log: socketLog, socketPath: path, device }) });
    }
  } catch (e) {
    await Promise.all(sockets.map((s) => s.server.close()));
    throw e;
  }
  const [first, ...others] = sockets;
  return {
    backend, device: first.device, server: first.server, sockets,
    async resize(bytes) {
      // The first device checks the size and grows the backend; the others take up the
      // size it now has.
      await first.device.resize(bytes);
      for (const s of others) s.device.backendResized();
    },
    async close() {
      await Promise.all(sockets.map((s) => s.server.close()));
      if (shared.readOnly || !shared.canFlush) return;
      try {
        await shared.flush();
      } catch (e) {
        throw new BackendError('IO_ERROR', `the final flush failed, so data the guest wrote may not be on stable storage: ${describeThrown(e)}`);
      }
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
