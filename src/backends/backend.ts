/**
 * The storage behind a virtio-blk device: a small capability interface that anyone can
 * implement (Firecracker / Cloud Hypervisor style). The device derives its feature bits
 * from the capabilities a backend declares, validates every request against the disk
 * size before calling it, and turns any failure into VIRTIO_BLK_S_IOERR for that request.
 *
 * Built-in implementations: `MemoryBackend` (memory-backend.ts, sparse, runs anywhere)
 * and `FileBackend` (src/node/file-backend.ts, a raw image file). Filters
 * (./filters/) wrap one backend and are one.
 *
 * Only the members every disk needs are required. The optional ones (block size hints,
 * allocation status, an open step, a declared concurrency model) let a backend say
 * more; a backend written before they existed keeps working unchanged, and the device
 * pays nothing on its request path for a member a backend leaves out.
 */
import { VblkError } from '../errors.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../spec/virtio-blk.js';

/**
 * What a backend operation returns: nothing when it completed synchronously, or a
 * promise when it completes later. A backend that finishes at once should return
 * nothing, so the device's hot path pays no promise (and no microtask) per request.
 * Failure is a thrown exception or a rejected promise.
 */
export type BackendResult = void | Promise<void>;

/**
 * What block sizes suit a backend, in bytes (nbdkit's block_size triple): below
 * `minimum` it must read, modify and write; `preferred` and its multiples, aligned, are
 * served best; past `maximum` a request is worth splitting. The device turns them into
 * its topology hints (see `BlkDevice`); a backend still serves every 512-byte-aligned
 * request the device passes on.
 */
export interface BlockSizeHints {
  /** A power of two, 1 to 64 KiB: the backend's physical block. */
  readonly minimum: number;
  /** A power of two, from the larger of 512 and `minimum` to 32 MiB. */
  readonly preferred: number;
  /**
   * A multiple of `minimum`, at least `preferred`. {@link NO_MAXIMUM_BLOCK_SIZE} (or
   * more) says there is no limit.
   */
  readonly maximum: number;
}

/** A {@link BlockSizeHints.maximum} that sets no limit: nbdkit's 0xffffffff. */
export const NO_MAXIMUM_BLOCK_SIZE = 0xffff_ffff;

/**
 * How a run of the disk is stored: `data` is allocated and may hold anything, `zero` is
 * allocated and reads as zeroes, `hole` holds no storage and reads as zeroes (the two
 * bits of NBD's base:allocation, without its unallocated-but-not-zero case, which a
 * whole disk never has).
 */
export type ExtentKind = 'data' | 'zero' | 'hole';

/** One run of {@link BlockBackend.extents}. */
export interface Extent {
  /** Bytes in the run, more than 0. */
  readonly length: number;
  /** How the run is stored. */
  readonly kind: ExtentKind;
}

/**
 * One operation at a time, or any number. nbdkit's thread models, reduced to what one
 * JavaScript thread can tell apart: a `serial` backend's asynchronous operations are
 * never overlapped by the device, which queues the rest in arrival order; a `parallel`
 * backend takes them as they come (the default).
 */
export type BackendConcurrency = 'parallel' | 'serial';

/**
 * A block backend. Offsets and lengths are in bytes; the device only ever asks for
 * whole 512-byte sectors inside `[0, size)`, and backends check that again (a range
 * error is a failure, never a short I/O).
 *
 * Buffers passed to `read` and `write` are views straight into guest memory (zero
 * copy). They are valid only until the operation completes: never keep them.
 * Operations on overlapping ranges may be in flight at once; their order is undefined,
 * as it is for the driver (VIRTIO 1.2, 5.2.6: requests are served "not necessarily in
 * order").
 */
export interface BlockBackend {
  /** Size in bytes, a multiple of 512. Changes only through {@link resize}. */
  readonly size: number;
  /** Refuses every write, discard and write-zeroes; the device offers VIRTIO_BLK_F_RO. */
  readonly readOnly: boolean;
  /**
   * The backend has a volatile cache (a page cache, say) and {@link flush} makes
   * completed writes durable. The device then offers VIRTIO_BLK_F_FLUSH and
   * VIRTIO_BLK_F_CONFIG_WCE. When false, a write must be durable when it completes.
   */
  readonly canFlush: boolean;
  /** {@link discard} is implemented; the device may offer VIRTIO_BLK_F_DISCARD. */
  readonly canDiscard: boolean;
  /** {@link writeZeroes} is implemented; the device may offer VIRTIO_BLK_F_WRITE_ZEROES. */
  readonly canWriteZeroes: boolean;

  /** Fills `buffers`, in order, with exactly their total length of bytes from `offset`. */
  read(offset: number, buffers: readonly Uint8Array[]): BackendResult;
  /**
   * Writes can be made durable one at a time: `write(offset, buffers, true)` completes
   * only once the data is on stable storage (NBD's FUA). The device then serves a
   * write-through write that way instead of as a write followed by a flush. Absent: false.
   */
  readonly canFua?: boolean;

  /**
   * Writes all of `buffers`, in order, at `offset`. `fua` is true only when
   * {@link canFua} is: the write must be durable when it completes.
   */
  write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult;
  /** Makes every write completed before this call durable. */
  flush(): BackendResult;
  /**
   * Deallocates `[offset, offset + length)` where the storage can. Afterwards the range
   * reads as zeroes (both built-in backends guarantee it, and the device's secure erase
   * relies on it only together with {@link writeZeroes}).
   */
  discard(offset: number, length: number): BackendResult;
  /**
   * Makes `[offset, offset + length)` read as zeroes. With `unmap` the backend may
   * deallocate the range (as {@link discard}); without it the range stays allocated.
   */
  writeZeroes(offset: number, length: number, unmap: boolean): BackendResult;
  /** Grows the disk to `newSize` bytes (a multiple of 512); shrinking is refused. */
  resize?(newSize: number): BackendResult;
  /**
   * Connects to or opens the storage. A backend with `open` may not know its size or
   * capabilities before it: whoever serves it (the CLI, a server, the testing kit) awaits
   * `open()` once before reading any other member or building a device over it. A
   * backend without `open` is ready when constructed.
   */
  open?(): BackendResult;
  /** Releases the storage; every later call fails. */
  close(): BackendResult;

  /** Block size hints; none when absent. The device makes its topology of them. */
  readonly blockSize?: BlockSizeHints;
  /** How many operations may be in flight at once. Default `parallel`. */
  readonly concurrency?: BackendConcurrency;
  /**
   * Allocation status of `[offset, offset + length)`, a non-empty range inside the disk: runs in
   * order, contiguous from `offset`, none empty, covering at least the first byte and
   * never past the range. A backend may stop early (the caller asks again from where the
   * runs end), as NBD's block status may.
   */
  extents?(offset: number, length: number): Extent[] | Promise<Extent[]>;
}

/** The stable codes of {@link BackendError}. */
export type BackendErrorCode = 'READ_ONLY' | 'OUT_OF_RANGE' | 'CLOSED' | 'BAD_SIZE' | 'SHORT_IO' | 'IO_ERROR' | 'UNSUPPORTED';

/**
 * Why a backend refused an operation. The device completes the request with
 * VIRTIO_BLK_S_UNSUPP for `UNSUPPORTED` and with VIRTIO_BLK_S_IOERR for every other
 * failure, of this class or any other.
 */
export class BackendError extends VblkError {
  /** Which refusal: {@link BackendErrorCode}. */
  declare readonly code: BackendErrorCode;
  constructor(code: BackendErrorCode, message: string) {
    super(code, message);
  }
}

/** Total bytes of a buffer list. */
export function totalLength(buffers: readonly Uint8Array[]): number {
  let n = 0;
  for (let i = 0; i < buffers.length; i++) n += buffers[i].length;
  return n;
}

/** Throws unless `[offset, offset + length)` lies inside a disk of `size` bytes. */
export function checkRange(size: number, offset: number, length: number): void {
  // Written as two comparisons so that offset + length cannot overflow precision.
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 ||
      offset > size || length > size - offset) {
    throw new BackendError('OUT_OF_RANGE', `range of ${length} bytes at ${offset} is outside the disk of ${size} bytes`);
  }
}

/** Throws unless `size` is a usable disk size: a positive safe multiple of 512 bytes. */
export function checkDiskSize(size: number): void {
  if (!Number.isSafeInteger(size) || size < VIRTIO_BLK_SECTOR_SIZE || size % VIRTIO_BLK_SECTOR_SIZE !== 0) {
    throw new BackendError('BAD_SIZE', `disk size ${size} is not a positive multiple of ${VIRTIO_BLK_SECTOR_SIZE} bytes`);
  }
}

/** Throws unless a resize from `size` to `newSize` grows (or keeps) a valid disk size. */
export function checkGrow(size: number, newSize: number): void {
  checkDiskSize(newSize);
  if (newSize < size) {
    throw new BackendError('BAD_SIZE', `cannot shrink the disk from ${size} to ${newSize} bytes: data past the new end would be lost`);
  }
}
