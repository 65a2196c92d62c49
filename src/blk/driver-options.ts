/**
 * What a caller of the virtio-blk driver chooses and sees besides the disk itself: the
 * options of {@link BlkDriver.probe}, the logger, per-request choices, the events, and
 * the checks that refuse a bad option before anything is set up.
 */
import { UsageError } from '../errors.js';
import { VIRTIO_BLK_F } from '../spec/virtio-blk.js';
import { VIRTIO_F, features } from '../spec/virtio.js';

/** Features this driver can use; the device's offer is intersected with these (3.1.1 step 4). */
export const BLK_DRIVER_FEATURES: bigint = features(
  VIRTIO_BLK_F.SIZE_MAX, VIRTIO_BLK_F.SEG_MAX, VIRTIO_BLK_F.GEOMETRY, VIRTIO_BLK_F.RO, VIRTIO_BLK_F.BLK_SIZE,
  VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.TOPOLOGY, VIRTIO_BLK_F.CONFIG_WCE, VIRTIO_BLK_F.MQ, VIRTIO_BLK_F.DISCARD,
  VIRTIO_BLK_F.WRITE_ZEROES, VIRTIO_BLK_F.SECURE_ERASE,
  VIRTIO_F.VERSION_1, VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.RING_INDIRECT_DESC,
);

/** Default entries per queue when the transport allows that many (QEMU's default virtio-blk queue size). */
export const DEFAULT_QUEUE_SIZE = 256;
/** Default upper bound on the data bytes of one chain; larger requests are split. */
export const DEFAULT_MAX_REQUEST_BYTES = 1 << 20;

/** Where the driver's notices go (the seed's dev_notice / dev_warn). */
export interface BlkLogger {
  /** Something worth knowing about `disk` (`vda` …) that needs no action, such as its new size. */
  notice(disk: string, message: string): void;
  /** Something wrong with `disk` that the driver survived, such as a broken queue. */
  warn(disk: string, message: string): void;
}

/** A logger that drops everything: the default, so a library never writes to a console. */
export const silentLogger: BlkLogger = { notice: () => {}, warn: () => {} };

/** How {@link BlkDriver.probe} sets the disk up; every field is optional. */
export interface BlkDriverOptions {
  /** Queues to use when VIRTIO_BLK_F_MQ is negotiated, capped by num_queues and the transport. Default 1. */
  queues?: number;
  /** Entries per queue (a power of two), capped by the transport's maximum. Default 256. */
  queueSize?: number;
  /**
   * Fail a request that has not completed after this many milliseconds with
   * `TimeoutError`. 0 (the default) waits forever, as Linux does.
   */
  timeoutMs?: number;
  /**
   * When the transport loses the device and can reach it again (a vhost-user backend
   * restarted on the same socket), reconnect for up to this many milliseconds: requests
   * not completed are sent again to the new device, new ones wait (a block device's
   * requests are idempotent). After that they fail with `RequestError`
   * `DEVICE_GONE`. 0, the default here, fails them at once; `connect` and the CLI
   * default to {@link DEFAULT_RECONNECT_TIMEOUT_MS}.
   */
  reconnectTimeoutMs?: number;
  /** Feature bits not to negotiate even when offered (e.g. VIRTIO_F.RING_EVENT_IDX). */
  excludeFeatures?: readonly number[];
  /** Upper bound on the data bytes of one chain; larger requests are split. Default 1 MiB. */
  maxRequestBytes?: number;
  /** Where notices (the "new size" line) and warnings (a broken queue) go. Default silent. */
  logger?: BlkLogger;
}

/** How long `connect` and the CLI wait for a lost vhost-user device to come back (ms). */
export const DEFAULT_RECONNECT_TIMEOUT_MS = 30_000;

/**
 * How {@link BlkDriver.submitRead} and {@link BlkDriver.submitWrite} report: null on
 * success, else the error the promise form would reject with. Never called synchronously
 * from the submit call; called once.
 */
export type Completion = (error: Error | null) => void;

/** Per-request choices. */
export interface RequestOptions {
  /** Queue to put the request on (0 … numQueues - 1); default round robin. */
  queue?: number;
}

/** A range of 512-byte sectors for discard, write-zeroes and secure erase. */
export interface SectorRange {
  /** First 512-byte sector of the range. */
  readonly sector: number;
  /** Number of 512-byte sectors, > 0. */
  readonly sectors: number;
}

/** The device's write cache: volatile until flushed (writeback), or stable at completion (writethrough). */
export type CacheMode = 'writeback' | 'writethrough';

/** What a `resize` listener receives. */
export interface ResizeEvent {
  /** New capacity in 512-byte sectors. */
  readonly capacity: number;
  /** Capacity before the change, in 512-byte sectors. */
  readonly previousCapacity: number;
}

/** Refuses options no disk could be set up with, before anything is allocated. */
export function checkOptions(o: BlkDriverOptions): void {
  const positiveInt = (name: string, v: number | undefined): void => {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 1)) {
      throw new UsageError('BAD_OPTION', `BlkDriver option ${name} must be a positive integer, got ${v}`);
    }
  };
  const nonNegative = (name: string, v: number | undefined): void => {
    if (v !== undefined && (!Number.isFinite(v) || v < 0)) {
      throw new UsageError('BAD_OPTION', `BlkDriver option ${name} must be a non-negative number, got ${v}`);
    }
  };
  positiveInt('queues', o.queues);
  positiveInt('queueSize', o.queueSize);
  positiveInt('maxRequestBytes', o.maxRequestBytes);
  nonNegative('timeoutMs', o.timeoutMs);
  nonNegative('reconnectTimeoutMs', o.reconnectTimeoutMs);
  if (o.excludeFeatures?.includes(VIRTIO_F.VERSION_1)) {
    throw new UsageError('BAD_OPTION', 'BlkDriver cannot do without VIRTIO_F_VERSION_1');
  }
}
