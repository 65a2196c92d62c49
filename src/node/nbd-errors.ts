import { VblkError } from '../errors.js';

/**
 * `CONNECT_FAILED`: the export could not be opened; `MISALIGNED`: a request off the
 * server's minimum block; `SERVER_ERROR`: the server failed the request (its error value
 * in the message); `SERVER_GONE`: no server within the reconnect timeout;
 * `UNSUPPORTED`: an operation the export does not offer.
 */
export type NbdBackendErrorCode = 'CONNECT_FAILED' | 'MISALIGNED' | 'SERVER_ERROR' | 'SERVER_GONE' | 'UNSUPPORTED';

/** Why an NBD export cannot be opened, or a request to it failed. */
export class NbdBackendError extends VblkError {
  declare readonly code: NbdBackendErrorCode;
  constructor(code: NbdBackendErrorCode, message: string) {
    super(code, message);
  }
}
