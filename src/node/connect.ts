/**
 * A virtio-blk disk on a vhost-user socket, from a program: connect, probe, and close in
 * the order that never frees memory the device may still use (the driver first, then
 * the frontend, which unmaps last). `vblk info | read | write | bench --socket` use it.
 */
import { BlkDriver, DEFAULT_RECONNECT_TIMEOUT_MS, type BlkDriverOptions } from '../blk/driver.js';
import type { VhostUserFrontend } from '../transport/vhost-user/frontend.js';
import { connectVhostUser, type ConnectOptions } from './vhost-user-client.js';

/**
 * How {@link connect} sets up the socket (memory size, reply timeout) and the driver
 * (queues, timeouts). `reconnectTimeoutMs` defaults to {@link DEFAULT_RECONNECT_TIMEOUT_MS}
 * here: a device restarted on the same socket is reconnected to, and requests not
 * completed are sent again.
 */
export interface ConnectDiskOptions extends BlkDriverOptions, ConnectOptions {}

/** A disk driven over a vhost-user socket by {@link connect}. */
export interface ConnectedDisk {
  /** The driver: read, write, flush, discard … */
  readonly driver: BlkDriver;
  /** The vhost-user frontend under it. */
  readonly transport: VhostUserFrontend;
  /** Removes the disk (its requests in flight fail) and closes the connection. */
  close(): Promise<void>;
}

/**
 * Connects to the vhost-user-blk device listening at `socketPath` (`vblk serve`,
 * qemu-storage-daemon, any libvhost-user device) and probes the disk. Fails with one
 * readable error when nothing listens there, the peer is not a vhost-user device, or
 * the disk cannot be driven; the connection is closed then.
 */
export async function connect(socketPath: string, options: ConnectDiskOptions = {}): Promise<ConnectedDisk> {
  // One object for both: the transport and the driver each read their own fields.
  const transport = await connectVhostUser(socketPath, options);
  let driver: BlkDriver;
  try {
    driver = await BlkDriver.probe(transport, { reconnectTimeoutMs: DEFAULT_RECONNECT_TIMEOUT_MS, ...options });
  } catch (e) {
    await transport.close();
    throw e;
  }
  return {
    driver, transport,
    close: async () => {
      try {
        await driver.remove();
      } finally {
        await transport.close();
      }
    },
  };
}
