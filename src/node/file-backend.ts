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
import { FileReader, FileWriter, batches } from './file-io.js';
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
  /** Reads, but for `mmap` mode. */
  private readonly reader: FileReader;
  private readonly writer: FileWriter;
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
    this.writer = new FileWriter(fd, this.io === 'async');
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
    return this.writer.write(offset, buffers);
  }

  flush(): Promise<void> {
    this.check(0, 0, false);
    return native.fdatasyncAsync(this.fd);
  }

  discard(offset: number, length: number): void | Promise<void> {
    this.check(offset, length, true);
    return this.writer.punchHole(offset, length);
  }

  writeZeroes(offset: number, length: number, unmap: boolean): void | Promise<void> {
    this.check(offset, length, true);
    // With unmap the spec lets us deallocate (5.2.6.2), and a hole reads as zeroes.
    return unmap ? this.writer.punchHole(offset, length) : this.writer.zeroRange(offset, length);
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
