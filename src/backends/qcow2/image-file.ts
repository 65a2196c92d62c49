/**
 * The byte-addressed file an image format runs on: what the qcow2 driver needs of the
 * storage under it, and nothing more, so that it runs on a Node file descriptor
 * (src/node), on a `Uint8Array` in a browser, or on a remote object.
 *
 * Results follow {@link BackendResult}: an implementation that completes at once returns
 * nothing, so a format's hot path (a read of an allocated cluster) pays no promise.
 */
import type { BackendResult } from '../backend.js';

/** A byte-addressed file: see the module comment. */
export interface ImageFile {
  /** Length of the file in bytes; grows with writes past the end and with {@link truncate}. */
  readonly size: number;
  /** The file was opened read-only: every write, truncate and discard fails. */
  readonly readOnly: boolean;
  /**
   * Fills `buffers`, in order, with their total length of bytes from `offset`. Bytes past
   * the end of the file read as zeroes (a cluster allocated at the end may not be written
   * to its end).
   */
  read(offset: number, buffers: readonly Uint8Array[]): BackendResult;
  /** Writes all of `buffers`, in order, at `offset`, growing the file when it ends past it. */
  write(offset: number, buffers: readonly Uint8Array[]): BackendResult;
  /** Makes every write completed before this call durable. */
  flush(): BackendResult;
  /** Sets the length of the file; new bytes read as zeroes. */
  truncate(size: number): BackendResult;
  /**
   * Releases the storage of `[offset, offset + length)`, which then reads as zeroes;
   * absent when the storage cannot.
   */
  discard?(offset: number, length: number): BackendResult;
  /** Releases the file; every later call fails. */
  close(): BackendResult;
}
