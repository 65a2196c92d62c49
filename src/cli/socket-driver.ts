/**
 * The blk driver on a vhost-user socket, as `vblk info | read | write | bench --socket`
 * use it: {@link connect} with the CLI's request timeout.
 */
import { DEFAULT_RECONNECT_TIMEOUT_MS } from '../blk/driver.js';
import { connect, type ConnectDiskOptions, type ConnectedDisk } from '../node/connect.js';

/** Per-request timeout of the CLI: a dead device fails a command instead of hanging it. */
export const CLI_REQUEST_TIMEOUT_MS = 30_000;

/** Connects and probes, failing any request that takes more than {@link CLI_REQUEST_TIMEOUT_MS} unless `options` says otherwise. */
export function openSocketDriver(path: string, options: ConnectDiskOptions = {}): Promise<ConnectedDisk> {
  return connect(path, { timeoutMs: CLI_REQUEST_TIMEOUT_MS, ...options });
}

/**
 * `--reconnect-timeout SECONDS` of `vblk bench | read | write --socket`: how long to wait
 * for a device that went away (killed, restarted on the same socket) before requests fail.
 */
export const RECONNECT_TIMEOUT_OPTION = {
  kind: 'number', valueName: 'SECONDS', allowZero: true, default: DEFAULT_RECONNECT_TIMEOUT_MS / 1000,
  description: 'when the device goes away, reconnect and resend requests for this long (0: fail at once)',
} as const;

/** `--reconnect-timeout` in milliseconds. */
export function reconnectTimeoutMs(seconds: number): number {
  return Math.round(seconds * 1000);
}
