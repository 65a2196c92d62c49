/**
 * The blk driver on a vhost-user socket, as `vblk info | read | write | bench --socket`
 * use it: {@link connect} with the CLI's request timeout.
 */
import { connect, type ConnectDiskOptions, type ConnectedDisk } from '../node/connect.js';

/** Per-request timeout of the CLI: a dead device fails a command instead of hanging it. */
export const CLI_REQUEST_TIMEOUT_MS = 30_000;

/** Connects and probes, failing any request that takes more than {@link CLI_REQUEST_TIMEOUT_MS} unless `options` says otherwise. */
export function openSocketDriver(path: string, options: ConnectDiskOptions = {}): Promise<ConnectedDisk> {
  return connect(path, { timeoutMs: CLI_REQUEST_TIMEOUT_MS, ...options });
}
