/**
 * A raw image file as a block backend. Reads and writes are vectored (preadv/pwritev
 * through the addon) straight into the guest-memory views the device hands over: no
 * copy. Flush is fdatasync. Discard punches holes (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE) and
 * write-zeroes uses FALLOC_FL_ZERO_RANGE, each falling back to writing zeroes where the
 * filesystem refuses the mode (tmpfs has no ZERO_RANGE, some filesystems no holes).
 *
 * The addon is used rather than node:fs because its asynchronous calls pin the guest
 * memory mapping they write into: an mmap'd region cannot be unmapped under a request
 * still running on the thread pool (a vhost-user frontend that vanishes mid-I/O).
 */
import { closeSync, constants, fstatSync, ftruncateSync, openSync } from 'node:fs';
import {
  BackendError, checkGrow, checkRange, totalLength, type BlockBackend,
} from '../backends/backend.js';
import { VblkError } from '../errors.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../spec/virtio-blk.js';
import { sliceBuffers } from '../virtqueue/chain.js';
import * as native from './native.js';

/**
 * How reads and writes run. `sync`: on the event loop, blocking it for the duration of
 * each call — fastest when the image sits in the page cache, which is the common case.
 * `async`: on the libuv thread pool, so a slow disk never stalls the other queues.
 * `auto`: a read is first tried on the event loop without waiting for the disk
 * (preadv2 with RWF_NOWAIT); what the page cache did not hold goes to the thread pool.
 * Page-cache hits cost what `sync` costs, and a miss never stalls the loop. Everything
 * else runs as in `sync` (writes land in the page cache). Where the filesystem has no
 * RWF_NOWAIT, reads fall back to `sync`. `mmap`: reads copy out of a read-only shared
 * mapping of the image, with no syscall per read — the cheapest read of a page-cached
 * image by far, but one of data the page cache lacks blocks the loop for the disk, as
 * in `sync`; writes run as in `sync`. A page that cannot be read fails that request
 * (the addon catches the SIGBUS). The pages read stay mapped, so the process's resident
 * set (RssFile) grows with the part of the image read — page cache, shared and
 * reclaimable, not memory of its own. Flushes always run on the thread pool: an
 * fdatasync can take milliseconds.
 */
export type FileIoMode = 'sync' | 'async' | 'auto' | 'mmap';

/** How {@link openFileBackend} opens an image. */
export interface FileBackendOptions {
  /** Open the image O_RDONLY and refuse every write. */
  readonly readOnly?: boolean;
  /**
   * Create the image when it is missing and grow it (sparsely, with ftruncate) to at
   * least this many bytes, a multiple of 512. A larger image keeps its size.
   */
  readonly size?: number;
  /** Default `sync`. */
  readonly io?: FileIoMode;
}

/**
 * The stable codes of {@link FileBackendError}: the image is missing, cannot be opened,
 * is not a regular file, is too small (under one sector, or under `size` when opened
 * read-only) or is not a multiple of 512 bytes; or `size` itself is not a positive
 * multiple of 512.
 */
export type FileBackendErrorCode =
  | 'IMAGE_MISSING' | 'IMAGE_UNREADABLE' | 'IMAGE_NOT_FILE' | 'IMAGE_TOO_SMALL' | 'IMAGE_MISALIGNED' | 'BAD_SIZE';

/** Why an image cannot be served; the message is one line a user can act on. */
export class FileBackendError extends VblkError {
  declare readonly code: FileBackendErrorCode;
  constructor(code: FileBackendErrorCode, message: string) {
    super(code, message);
  }
}

/** New image files are private: a disk image holds whatever its guest wrote. */
const IMAGE_MODE = 0o600;
/** Bytes written per call when a range must be zeroed by writing. */
const ZERO_BLOCK = 1024 * 1024;
let zeroBlock: Uint8Array | null = null;

/**
 * Opens the image at `path`. Throws {@link FileBackendError} when it is missing (and no
 * `size` asks to create it), unreadable, not a regular file, smaller than 512 bytes or
 * not a multiple of 512 bytes.
 */
export function openFileBackend(path: string, options: FileBackendOptions = {}): FileBackend {
  const readOnly = options.readOnly ?? false;
  const want = options.size;
  if (want !== undefined && (!Number.isSafeInteger(want) || want < VIRTIO_BLK_SECTOR_SIZE || want % VIRTIO_BLK_SECTOR_SIZE !== 0)) {
    throw new FileBackendError('BAD_SIZE', `image size ${want} is not a positive multiple of ${VIRTIO_BLK_SECTOR_SIZE} bytes`);
  }
  const create = want !== undefined && !readOnly;
  const flags = readOnly ? constants.O_RDONLY : constants.O_RDWR | (create ? constants.O_CREAT : 0);
  let fd: number;
  try {
    fd = openNoAtime(path, flags);
  } catch (e) {
    throw openError(path, e);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new FileBackendError('IMAGE_NOT_FILE', `image ${path} is not a regular file`);
    let size = st.size;
    if (want !== undefined && size < want) {
      if (readOnly) {
        throw new FileBackendError('IMAGE_TOO_SMALL', `image ${path} is ${size} bytes, smaller than the ${want} asked for, and is opened read-only`);
      }
      ftruncateSync(fd, want);
      size = want;
    }
    if (size < VIRTIO_BLK_SECTOR_SIZE) {
      throw new FileBackendError('IMAGE_TOO_SMALL', `image ${path} is ${size} bytes, less than one ${VIRTIO_BLK_SECTOR_SIZE}-byte sector`);
    }
    if (size % VIRTIO_BLK_SECTOR_SIZE !== 0) {
      throw new FileBackendError('IMAGE_MISALIGNED', `image ${path} is ${size} bytes, not a multiple of ${VIRTIO_BLK_SECTOR_SIZE}`);
    }
    return new FileBackend(fd, size, { readOnly, io: options.io ?? 'sync' });
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/**
 * Opens with O_NOATIME where allowed: the kernel then skips the access-time check on
 * every read (a few percent of a page-cache read). Only the file's owner may ask for it
 * (EPERM otherwise), and then the image is opened as usual.
 */
export function openNoAtime(path: string, flags: number): number {
  const noAtime = constants.O_NOATIME ?? 0;
  if (noAtime !== 0) {
    try {
      return openSync(path, flags | noAtime, IMAGE_MODE);
    } catch (e) {
      if ((e as { code?: unknown }).code !== 'EPERM') throw e;
    }
  }
  return openSync(path, flags, IMAGE_MODE);
}

/** The one-line error for a failed open of image `path`. */
export function openError(path: string, e: unknown): FileBackendError {
  const code = (e as { code?: unknown }).code;
  if (code === 'ENOENT') return new FileBackendError('IMAGE_MISSING', `image ${path} does not exist`);
  if (code === 'EISDIR') return new FileBackendError('IMAGE_NOT_FILE', `image ${path} is a directory`);
  const reason = e instanceof Error ? e.message.split('\n')[0] : String(e);
  return new FileBackendError('IMAGE_UNREADABLE', `cannot open image ${path}: ${reason}`);
}

/** Errors with which fallocate says "not this mode here" (fallocate(2)): fall back to writing zeroes. */
export function isUnsupported(e: unknown): boolean {
  return native.isNativeError(e) && (e.code === 'EOPNOTSUPP' || e.code === 'ENOTSUP' || e.code === 'EINVAL' || e.code === 'ENOSYS');
}

/** Fills every byte of `buffers` from byte `from` on with zeroes (what a read past end of file gives). */
export function zeroFrom(buffers: readonly Uint8Array[], from: number): void {
  let skip = from;
  for (const b of buffers) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    b.fill(0, skip);
    skip = 0;
  }
}

/** `buffers` cut into lists the addon accepts in one call (the addon's limit is far above any chain's). */
export function batches(buffers: readonly Uint8Array[]): (readonly Uint8Array[])[] {
  if (buffers.length <= native.MAX_SEGMENTS) return [buffers];
  const out: Uint8Array[][] = [];
  for (let i = 0; i < buffers.length; i += native.MAX_SEGMENTS) out.push(buffers.slice(i, i + native.MAX_SEGMENTS));
  return out;
}

/**
 * Reads `buffers` (`total` bytes) from `offset` on the event loop. preadv returns short
 * only at end of file: past it an image (sparse, truncated behind our back, or a format's
 * cluster allocated at the end and not yet written to its end) reads as zeroes.
 */
function readZeroFilled(fd: number, buffers: readonly Uint8Array[], offset: number, total: number): void {
  if (buffers.length <= native.MAX_SEGMENTS) {
    const n = native.preadv(fd, buffers, offset);
    if (n < total) zeroFrom(buffers, n);
    return;
  }
  let pos = offset;
  for (const batch of batches(buffers)) {
    const want = totalLength(batch);
    const n = native.preadv(fd, batch, pos);
    if (n < want) zeroFrom(batch, n);
    pos += want;
  }
}

/** {@link readZeroFilled} on the thread pool. */
async function readZeroFilledAsync(fd: number, buffers: readonly Uint8Array[], offset: number): Promise<void> {
  let pos = offset;
  for (const batch of batches(buffers)) {
    const want = totalLength(batch);
    const n = await native.preadvAsync(fd, batch, pos);
    if (n < want) zeroFrom(batch, n);
    pos += want;
  }
}

/**
 * One RWF_NOWAIT read: the bytes the page cache held (0 when none, or at end of file), or
 * -1 when the filesystem cannot do it (the caller then stops trying for good).
 */
function tryReadCached(fd: number, buffers: readonly Uint8Array[], offset: number): number {
  let n: number;
  try {
    n = native.tryPreadv(fd, buffers, offset);
  } catch (e) {
    if (!isUnsupported(e)) throw e;
    return -1;
  }
  return n < 0 ? 0 : n;
}

/**
 * Reads of a file in `sync`, `async` or `auto` I/O mode, the end of file as zeroes, shared
 * by {@link FileBackend} and the qcow2 image file: `auto` takes what the page cache holds
 * on the event loop (RWF_NOWAIT) and reads the rest on the thread pool; a filesystem that
 * cannot try turns trying off for good, and reads then go as `sync`.
 */
export class FileReader {
  private canTry: boolean;

  constructor(private readonly fd: number, private readonly io: 'sync' | 'async' | 'auto') {
    this.canTry = io === 'auto';
  }

  /** Fills `buffers` (`total` bytes) from `offset`. */
  read(offset: number, buffers: readonly Uint8Array[], total: number): void | Promise<void> {
    if (this.io === 'async') return readZeroFilledAsync(this.fd, buffers, offset);
    if (this.canTry && buffers.length <= native.MAX_SEGMENTS) {
      const n = tryReadCached(this.fd, buffers, offset);
      if (n === total) return;
      // Not all of it cached (or the file ends early): the rest on the thread pool.
      if (n >= 0) return readZeroFilledAsync(this.fd, n === 0 ? buffers : sliceBuffers(buffers, n, total - n) ?? [], offset + n);
      this.canTry = false;
    }
    readZeroFilled(this.fd, buffers, offset, total);
  }
}

/** A shared block of zeroes, for writing zeroes where fallocate cannot (never written into). */
export function zeroes(): Uint8Array {
  zeroBlock ??= new Uint8Array(ZERO_BLOCK);
  return zeroBlock;
}

/** A raw image file as a {@link BlockBackend}. */
export class FileBackend implements BlockBackend {
  size: number;
  readonly readOnly: boolean;
  readonly canFlush = true;
  /** Always: by punching holes, or by writing zeroes where the filesystem cannot. */
  readonly canDiscard = true;
  readonly canWriteZeroes = true;
  /** How reads and writes run: the {@link FileBackendOptions.io} it was opened with. */
  readonly io: FileIoMode;
  private readonly fd: number;
  private closed = false;
  /** Whether the filesystem still seems to take these fallocate modes (cleared at the first refusal). */
  private punchHoles = true;
  private zeroRanges = true;
  /** Reads, but for `mmap` mode. */
  private readonly reader: FileReader;
  /** `mmap` mode: the image's mapping. */
  private map: native.FileMap | null = null;

  /** Serves the open file `fd` of `size` bytes; takes ownership of `fd`. Use {@link openFileBackend}. */
  constructor(fd: number, size: number, options: { readonly readOnly: boolean; readonly io: FileIoMode }) {
    this.fd = fd;
    this.size = size;
    this.readOnly = options.readOnly;
    this.io = options.io;
    if (this.io === 'mmap') this.map = native.mapFile(fd, size);
    this.reader = new FileReader(fd, this.io === 'mmap' ? 'sync' : this.io);
  }

  read(offset: number, buffers: readonly Uint8Array[]): void | Promise<void> {
    const total = totalLength(buffers);
    this.check(offset, total, false);
    if (this.map !== null) {
      // The mapping covers the whole image and check() kept the read inside it.
      if (buffers.length <= native.MAX_SEGMENTS) {
        native.mappedRead(this.map, offset, buffers);
        return;
      }
      let pos = offset;
      for (const batch of batches(buffers)) pos += native.mappedRead(this.map, pos, batch);
      return;
    }
    return this.reader.read(offset, buffers, total);
  }

  write(offset: number, buffers: readonly Uint8Array[]): void | Promise<void> {
    this.check(offset, totalLength(buffers), true);
    if (this.io === 'async') return this.writeAsync(offset, buffers);
    // pwritev writes everything (looping over short counts) or throws.
    if (buffers.length <= native.MAX_SEGMENTS) {
      native.pwritev(this.fd, buffers, offset);
      return;
    }
    let pos = offset;
    for (const batch of batches(buffers)) pos += native.pwritev(this.fd, batch, pos);
  }

  private async writeAsync(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    let pos = offset;
    for (const batch of batches(buffers)) pos += await native.pwritevAsync(this.fd, batch, pos);
  }

  flush(): Promise<void> {
    this.check(0, 0, false);
    return native.fdatasyncAsync(this.fd);
  }

  discard(offset: number, length: number): void | Promise<void> {
    this.check(offset, length, true);
    return this.deallocate(offset, length);
  }

  writeZeroes(offset: number, length: number, unmap: boolean): void | Promise<void> {
    this.check(offset, length, true);
    // With unmap the spec lets us deallocate (5.2.6.2), and a hole reads as zeroes.
    if (unmap) return this.deallocate(offset, length);
    if (!this.zeroRanges) return this.writeZeroBytes(offset, length);
    if (this.io === 'async') return this.zeroRangeAsync(offset, length);
    try {
      native.fallocate(this.fd, native.FALLOC_FL_ZERO_RANGE, offset, length);
    } catch (e) {
      if (!isUnsupported(e)) throw e;
      this.zeroRanges = false;
      this.writeZeroBytes(offset, length);
    }
  }

  private async zeroRangeAsync(offset: number, length: number): Promise<void> {
    try {
      await native.fallocateAsync(this.fd, native.FALLOC_FL_ZERO_RANGE, offset, length);
    } catch (e) {
      if (!isUnsupported(e)) throw e;
      this.zeroRanges = false;
      await this.writeZeroBytes(offset, length);
    }
  }

  /** Punches a hole (KEEP_SIZE: the image never changes size), else writes zeroes. */
  private deallocate(offset: number, length: number): void | Promise<void> {
    if (!this.punchHoles) return this.writeZeroBytes(offset, length);
    const mode = native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE;
    if (this.io === 'async') return this.punchAsync(mode, offset, length);
    try {
      native.fallocate(this.fd, mode, offset, length);
    } catch (e) {
      if (!isUnsupported(e)) throw e;
      this.punchHoles = false;
      this.writeZeroBytes(offset, length);
    }
  }

  private async punchAsync(mode: number, offset: number, length: number): Promise<void> {
    try {
      await native.fallocateAsync(this.fd, mode, offset, length);
    } catch (e) {
      if (!isUnsupported(e)) throw e;
      this.punchHoles = false;
      await this.writeZeroBytes(offset, length);
    }
  }

  /** The fallback: zeroes written a block at a time (slow, and it allocates the range). */
  private writeZeroBytes(offset: number, length: number): void | Promise<void> {
    if (this.io === 'async') return this.writeZeroBytesAsync(offset, length);
    const z = zeroes();
    for (let done = 0; done < length;) done += native.pwritev(this.fd, [z.subarray(0, Math.min(z.length, length - done))], offset + done);
  }

  private async writeZeroBytesAsync(offset: number, length: number): Promise<void> {
    const z = zeroes();
    for (let done = 0; done < length;) {
      done += await native.pwritevAsync(this.fd, [z.subarray(0, Math.min(z.length, length - done))], offset + done);
    }
  }

  /** Grows the image file (sparsely: ftruncate allocates nothing). */
  resize(newSize: number): void {
    this.check(0, 0, true);
    checkGrow(this.size, newSize);
    ftruncateSync(this.fd, newSize);
    this.size = newSize;
    if (this.map !== null) {
      native.unmapFile(this.map);
      this.map = native.mapFile(this.fd, newSize);
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.map !== null) native.unmapFile(this.map);
    this.map = null;
    closeSync(this.fd);
  }

  private check(offset: number, length: number, writes: boolean): void {
    if (this.closed) throw new BackendError('CLOSED', 'the file backend is closed');
    if (writes && this.readOnly) throw new BackendError('READ_ONLY', 'the image is open read-only');
    checkRange(this.size, offset, length);
  }
}
