/**
 * An {@link ImageFile} over a growable `Uint8Array`: a qcow2 image in memory (tests, a
 * browser holding an image it downloaded). Synchronous: every call completes at once.
 */
import { BackendError, totalLength } from '../backend.js';
import type { ImageFile } from './image-file.js';

/** How a {@link MemoryImageFile} behaves. */
export interface MemoryImageFileOptions {
  /** Every write, truncate and discard fails. Default false. */
  readonly readOnly?: boolean;
  /** Refuse to grow past this many bytes (a write or truncate past it fails). Default 2^32. */
  readonly maxSize?: number;
}

/** An {@link ImageFile} in memory: a growable byte array, every call synchronous. */
export class MemoryImageFile implements ImageFile {
  #data: Uint8Array;
  #size: number;
  #closed = false;
  readonly readOnly: boolean;
  /** The file never grows past this many bytes. */
  readonly maxSize: number;
  /** Number of flush() calls, for tests of write ordering. */
  flushes = 0;
  /** Called before every write/truncate/discard/flush; tests use it to record or fail operations. */
  onOperation?: (op: 'write' | 'truncate' | 'discard' | 'flush', offset: number, length: number) => void;

  /** Starts from a copy of `initial` (empty by default). */
  constructor(initial: Uint8Array = new Uint8Array(0), options: MemoryImageFileOptions = {}) {
    this.#data = new Uint8Array(Math.max(initial.length, 4096));
    this.#data.set(initial);
    this.#size = initial.length;
    this.readOnly = options.readOnly ?? false;
    this.maxSize = options.maxSize ?? 2 ** 32;
  }

  get size(): number {
    return this.#size;
  }

  /** A copy of the file's bytes. */
  bytes(): Uint8Array {
    return this.#data.slice(0, this.#size);
  }

  read(offset: number, buffers: readonly Uint8Array[]): void {
    this.#check(offset, totalLength(buffers));
    let at = offset;
    for (const b of buffers) {
      const end = Math.min(at + b.length, this.#size);
      if (end > at) b.set(this.#data.subarray(at, end));
      if (end < at + b.length) b.fill(0, Math.max(0, end - at));
      at += b.length;
    }
  }

  write(offset: number, buffers: readonly Uint8Array[]): void {
    const length = totalLength(buffers);
    this.#writable(offset, length);
    this.onOperation?.('write', offset, length);
    this.#ensure(offset + length);
    let at = offset;
    for (const b of buffers) {
      this.#data.set(b, at);
      at += b.length;
    }
    if (at > this.#size) this.#size = at;
  }

  flush(): void {
    this.#check(0, 0);
    this.onOperation?.('flush', 0, 0);
    this.flushes++;
  }

  truncate(size: number): void {
    this.#writable(0, size);
    this.onOperation?.('truncate', size, 0);
    this.#ensure(size);
    if (size < this.#size) this.#data.fill(0, size, this.#size);
    this.#size = size;
  }

  discard(offset: number, length: number): void {
    this.#writable(offset, length);
    this.onOperation?.('discard', offset, length);
    const end = Math.min(offset + length, this.#size);
    if (end > offset) this.#data.fill(0, offset, end);
  }

  close(): void {
    this.#closed = true;
  }

  #check(offset: number, length: number): void {
    if (this.#closed) throw new BackendError('CLOSED', 'the image file is closed');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BackendError('OUT_OF_RANGE', `bad range of ${length} bytes at ${offset}`);
    }
  }

  #writable(offset: number, length: number): void {
    this.#check(offset, length);
    if (this.readOnly) throw new BackendError('READ_ONLY', 'the image file is read-only');
    if (offset + length > this.maxSize) {
      throw new BackendError('OUT_OF_RANGE', `the image file would grow past its limit of ${this.maxSize} bytes`);
    }
  }

  #ensure(size: number): void {
    if (size <= this.#data.length) return;
    const grown = new Uint8Array(Math.max(size, this.#data.length * 2));
    grown.set(this.#data.subarray(0, this.#size));
    this.#data = grown;
  }
}
