/**
 * The {@link ImageFile} an image format (qcow2) runs on, over a file descriptor through
 * the addon: vectored preadv/pwritev into the caller's views (guest memory, for data
 * clusters), fdatasync, and fallocate hole punching for discard.
 *
 * The addon rather than node:fs for the reason file-backend.ts gives: its thread-pool
 * calls pin the guest-memory mapping they write into, so a frontend that vanishes
 * mid-request cannot unmap memory under a running read.
 *
 * In `sync` mode reads and writes complete before returning and return nothing, so a
 * format's hot path pays no promise; `async` runs them on the thread pool; `auto` tries a
 * read from the page cache first (RWF_NOWAIT) and sends only a miss to the thread pool.
 * Flush always runs on the thread pool: an fdatasync can take milliseconds.
 */
import { closeSync, constants, fstatSync, ftruncateSync } from 'node:fs';
import type { BackendResult } from '../backends/backend.js';
import { BackendError, totalLength } from '../backends/backend.js';
import type { ImageFile } from '../backends/qcow2/image-file.js';
import { FileBackendError, openError, openNoAtime } from './file-backend.js';
import { FileReader, FileWriter } from './file-io.js';
import * as native from './native.js';

/** How a {@link NodeImageFile} runs reads and writes: the file backend's modes without `mmap`. */
export type ImageFileIoMode = 'sync' | 'async' | 'auto';

/** How {@link openImageFile} opens a file. */
export interface ImageFileOptions {
  /** Open O_RDONLY; every write, truncate and discard then fails. */
  readonly readOnly?: boolean;
  /** Default `sync`. */
  readonly io?: ImageFileIoMode;
  /** Create the file (empty) when it is missing; only when not read-only. */
  readonly create?: boolean;
}

/**
 * Opens `path` as an {@link ImageFile}. Throws {@link FileBackendError} (`IMAGE_MISSING`,
 * `IMAGE_UNREADABLE`, `IMAGE_NOT_FILE`) with a one-line message naming the file.
 */
export function openImageFile(path: string, options: ImageFileOptions = {}): NodeImageFile {
  const readOnly = options.readOnly ?? false;
  const create = (options.create ?? false) && !readOnly;
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
    return new NodeImageFile(fd, st.size, { readOnly, io: options.io ?? 'sync' });
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/** An open file as an {@link ImageFile}; use {@link openImageFile}. */
export class NodeImageFile implements ImageFile {
  size: number;
  readonly readOnly: boolean;
  readonly io: ImageFileIoMode;
  /** The descriptor, for fstat (allocation figures); owned by this object. */
  readonly fd: number;
  private closed = false;
  private readonly reader: FileReader;
  private readonly writer: FileWriter;

  /** Takes ownership of `fd`, a file of `size` bytes. */
  constructor(fd: number, size: number, options: { readonly readOnly: boolean; readonly io: ImageFileIoMode }) {
    this.fd = fd;
    this.size = size;
    this.readOnly = options.readOnly;
    this.io = options.io;
    this.reader = new FileReader(fd, options.io);
    this.writer = new FileWriter(fd, options.io === 'async');
  }

  read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    const total = totalLength(buffers);
    this.check(offset, total, false);
    return this.reader.read(offset, buffers, total);
  }

  write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    const total = totalLength(buffers);
    this.check(offset, total, true);
    // The size grows when the write is issued: a format allocates past the end and
    // expects later requests to see the new length before this one lands.
    this.size = Math.max(this.size, offset + total);
    return this.writer.write(offset, buffers);
  }

  flush(): Promise<void> {
    this.check(0, 0, false);
    return native.fdatasyncAsync(this.fd);
  }

  truncate(size: number): void {
    this.check(0, 0, true);
    if (!Number.isSafeInteger(size) || size < 0) throw new BackendError('BAD_SIZE', `file size ${size} is not a non-negative integer`);
    ftruncateSync(this.fd, size);
    this.size = size;
  }

  /**
   * Punches a hole (KEEP_SIZE: the file never changes length). Where the filesystem
   * cannot, zeroes are written inside the file only: past its end they would grow it, and
   * reads there give zeroes anyway.
   */
  discard(offset: number, length: number): BackendResult {
    this.check(offset, length, true);
    if (length === 0) return;
    return this.writer.punchHole(offset, length, Math.min(offset + length, this.size));
  }

  /** Bytes the file occupies on the host (st_blocks × 512): what `vblk image info` reports as allocated. */
  allocatedBytes(): number {
    this.check(0, 0, false);
    return fstatSync(this.fd).blocks * 512;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeSync(this.fd);
  }

  private check(offset: number, length: number, writes: boolean): void {
    if (this.closed) throw new BackendError('CLOSED', 'the image file is closed');
    if (writes && this.readOnly) throw new BackendError('READ_ONLY', 'the image file is open read-only');
    // A file has no upper bound to check against (writes grow it), only sane numbers.
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > Number.MAX_SAFE_INTEGER) {
      throw new BackendError('OUT_OF_RANGE', `range of ${length} bytes at ${offset} is not a valid file range`);
    }
  }
}
