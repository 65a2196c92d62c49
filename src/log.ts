/**
 * Log lines with their context, so that one sink can print them for people (text) or for
 * log shippers (JSON lines with stable keys: `vblk serve --log-format json`).
 */

/** The fields a log line carries besides its message, where they apply. */
export interface LogContext {
  /** The vhost-user socket the line is about, in a process that serves one disk on several. */
  readonly socket?: string;
  /** The frontend connection, numbered from 1 in the order they connected. */
  readonly frontend?: number;
  /** The virtqueue (ring) index. */
  readonly queue?: number;
  /** Default `info`. */
  readonly level?: 'info' | 'warn' | 'error';
}

/** Takes one human-readable line and its context. */
export type LogSink = (message: string, context?: LogContext) => void;
