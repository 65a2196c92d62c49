/**
 * The blk driver on a vhost-user socket, as `vblk info | read | write | bench --socket`
 * use it: connect, probe, and close in the order that never frees memory the device may
 * still use (driver first, then the frontend, which unmaps last).
 */
import { BlkDriver, type BlkDriverOptions } from '../blk/driver.js';
import { connectVhostUser } from '../node/vhost-user-client.js';

/** Per-request timeout of the CLI: a dead device fails a command instead of hanging it. */
export const CLI_REQUEST_TIMEOUT_MS = 30_000;

export interface SocketDriver {
  readonly driver: BlkDriver;
  close(): Promise<void>;
}

export interface SocketDriverOptions extends BlkDriverOptions {
  /** Shared memory for rings and bounce buffers; default 64 MiB. */
  memorySize?: number;
}

export async function openSocketDriver(path: string, options: SocketDriverOptions = {}): Promise<SocketDriver> {
  const { memorySize, ...driverOptions } = options;
  const transport = await connectVhostUser(path, { memorySize });
  let driver: BlkDriver;
  try {
    driver = await BlkDriver.probe(transport, { timeoutMs: CLI_REQUEST_TIMEOUT_MS, ...driverOptions });
  } catch (e) {
    await transport.close();
    throw e;
  }
  return {
    driver,
    close: async () => {
      try {
        await driver.remove();
      } finally {
        await transport.close();
      }
    },
  };
}
