/**
 * Errors of the virtio-blk driver. Each has a stable `code`; request errors say which
 * disk and which request. The status mapping follows the seed's `blk_done`:
 * VIRTIO_BLK_S_OK → success, VIRTIO_BLK_S_UNSUPP → -ENOTTY (here {@link NotSupportedError}),
 * anything else → -EIO (here {@link IoError}).
 */
import { VblkError } from '../errors.js';
import { VIRTIO_BLK_S } from '../spec/virtio-blk.js';

/** The device answered VIRTIO_BLK_S_IOERR, or a status byte the spec does not define. */
export class IoError extends VblkError {
  constructor(
    message: string,
    /** The status byte the device answered: VIRTIO_BLK_S_IOERR, or the undefined value. */
    readonly status: number,
  ) {
    super('IO_ERROR', message);
  }
}

/**
 * The device answered VIRTIO_BLK_S_UNSUPP (the seed's -ENOTTY), or the feature the request
 * needs was not negotiated, so it never reached the ring.
 */
export class NotSupportedError extends VblkError {
  constructor(message: string) {
    super('NOT_SUPPORTED', message);
  }
}

/** A write, discard, write-zeroes or secure erase on a read-only disk (VIRTIO_BLK_F_RO). */
export class ReadOnlyError extends VblkError {
  constructor(message: string) {
    super('READ_ONLY', message);
  }
}

/** The request did not complete within the driver's `timeoutMs`. */
export class TimeoutError extends VblkError {
  constructor(message: string) {
    super('TIMEOUT', message);
  }
}

/**
 * The queue the request was on broke: the device returned a used id not in flight, a
 * used length beyond what was posted, or moved the used index too far. `cause` is the
 * virtqueue's own error, a {@link VblkError} whose code says which
 * (`USED_ID_NOT_IN_FLIGHT`, `USED_LENGTH_TOO_LARGE`, `USED_INDEX_JUMP`, or `QUEUE_BROKEN`
 * when the device was lost).
 */
export class QueueBrokenError extends VblkError {
  constructor(message: string, options?: { cause: unknown }) {
    super('QUEUE_BROKEN', message);
    if (options) this.cause = options.cause;
  }
}

/** Why a request was refused before reaching a ring. */
export type RequestErrorCode = 'MISALIGNED' | 'OUT_OF_RANGE' | 'DISK_REMOVED' | 'BAD_QUEUE_INDEX' | 'NO_DMA_MEMORY' | 'DEVICE_GONE';

/**
 * A request the driver refuses before it reaches a ring (host-facing misuse or state), or
 * fails because the device it was sent to was lost and did not come back in time
 * (`DEVICE_GONE`, see `reconnectTimeoutMs`).
 */
export class RequestError extends VblkError {
  /** Why it was refused: {@link RequestErrorCode}. */
  declare readonly code: RequestErrorCode;
  constructor(code: RequestErrorCode, message: string) {
    super(code, message);
  }
}

/** Why bringing the device up failed. */
export type ProbeErrorCode =
  | 'NO_VERSION_1' | 'FEATURES_NOT_ACCEPTED' | 'BAD_CONFIG' | 'QUEUE_SETUP' | 'TRANSPORT' | 'NO_DISK_INDEX'
  /** A device reached again after a loss cannot carry on the disk: a feature or limit in use is gone. */
  | 'INCOMPATIBLE_DEVICE';

/** Bringing the device up (probe or restore) failed; the device status has FAILED set. */
export class ProbeError extends VblkError {
  /** Which step failed: {@link ProbeErrorCode}. */
  declare readonly code: ProbeErrorCode;
  constructor(code: ProbeErrorCode, message: string, options?: { cause: unknown }) {
    super(code, message);
    if (options) this.cause = options.cause;
  }
}

/**
 * The error for a request's status byte, or null for VIRTIO_BLK_S_OK. `what` names the
 * request in the message ("vda: read of 8 sectors at 0").
 */
export function statusToError(status: number, what: string): IoError | NotSupportedError | null {
  switch (status) {
    case VIRTIO_BLK_S.OK:
      return null;
    case VIRTIO_BLK_S.UNSUPP:
      return new NotSupportedError(`${what}: the device does not support this request (VIRTIO_BLK_S_UNSUPP)`);
    case VIRTIO_BLK_S.IOERR:
      return new IoError(`${what}: I/O error (VIRTIO_BLK_S_IOERR)`, status);
    default:
      return new IoError(`${what}: the device returned undefined status ${status}`, status);
  }
}
