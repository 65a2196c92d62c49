/**
 * File I/O through the addon shared by the file backend (file-backend.ts) and the qcow2
 * image file (image-file.ts): vectored reads with the end of file read as zeroes, in
 * `sync`, `async` or `auto` mode ({@link FileReader}); vectored writes, hole punching and
 * zero ranges, each fallocate mode falling back to writing zeroes on a filesystem that
 * refuses it ({@link FileWriter}).
 */
import { totalLength, type BackendResult } from '../backends/backend.js';
import { sliceBuffers } from '../virtqueue/chain.js';
import * as native from './native.js';

/** Errors with which fallocate says "not this mode here" (fallocate(2)): fall back to writing zeroes. */
function isUnsupported(e: unknown): boolean {
  return native.isNativeError(e) && (e.code === 'EOPNOTSUPP' || e.code === 'ENOTSUP' || e.code === 'EINVAL' || e.code === 'ENOSYS');
}

/** Fills every byte of `buffers` from byte `from` on with zeroes (what a read past end of file gives). */
function zeroFrom(buffers: readonly Uint8Array[], from: number): void {
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

/** Bytes written per call when a range must be zeroed by writing. */
const ZERO_BLOCK = 1024 * 1024;
let zeroBlock: Uint8Array | null = null;

/** A shared block of zeroes, for writing zeroes where fallocate cannot (never written into). */
function zeroes(): Uint8Array {
  zeroBlock ??= new Uint8Array(ZERO_BLOCK);
  return zeroBlock;
}

const PUNCH_HOLE = native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE;

/**
 * Writes to a file on the event loop or, `async`, on the thread pool, and the two
 * fallocate modes a filesystem may refuse (tmpfs has no ZERO_RANGE, some filesystems no
 * holes): at the first refusal a mode is remembered as missing, and the range is written
 * with zeroes from then on.
 */
export class FileWriter {
  private punchHoles = true;
  private zeroRanges = true;

  constructor(private readonly fd: number, private readonly async: boolean) {}

  /** Writes all of `buffers` at `offset` (pwritev loops over short counts, or throws). */
  write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    if (this.async) return this.writeAsync(offset, buffers);
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

  /**
   * Punches a hole (KEEP_SIZE: the file never changes length); where the filesystem
   * cannot, writes zeroes from `offset` up to `zeroesEnd` (default the range's end).
   */
  punchHole(offset: number, length: number, zeroesEnd = offset + length): BackendResult {
    if (!this.punchHoles) return this.writeZeroes(offset, zeroesEnd);
    return this.fallocate(PUNCH_HOLE, offset, length, zeroesEnd);
  }

  /** Zeroes the range with FALLOC_FL_ZERO_RANGE (allocated, reads as zeroes), else by writing zeroes. */
  zeroRange(offset: number, length: number): BackendResult {
    if (!this.zeroRanges) return this.writeZeroes(offset, offset + length);
    return this.fallocate(native.FALLOC_FL_ZERO_RANGE, offset, length, offset + length);
  }

  private fallocate(mode: number, offset: number, length: number, zeroesEnd: number): BackendResult {
    if (this.async) {
      return native.fallocateAsync(this.fd, mode, offset, length).catch((e: unknown) => this.refused(e, mode, offset, zeroesEnd));
    }
    try {
      native.fallocate(this.fd, mode, offset, length);
    } catch (e) {
      return this.refused(e, mode, offset, zeroesEnd);
    }
  }

  /** A failed fallocate: a mode the filesystem lacks is remembered as missing and the range written with zeroes. */
  private refused(e: unknown, mode: number, offset: number, zeroesEnd: number): BackendResult {
    if (!isUnsupported(e)) throw e;
    if (mode === PUNCH_HOLE) this.punchHoles = false;
    else this.zeroRanges = false;
    return this.writeZeroes(offset, zeroesEnd);
  }

  /** The fallback: zeroes written a block at a time over [offset, end) (slow, and it allocates). */
  private writeZeroes(offset: number, end: number): BackendResult {
    const z = zeroes();
    if (this.async) {
      return (async () => {
        for (let at = offset; at < end;) at += await native.pwritevAsync(this.fd, [z.subarray(0, Math.min(z.length, end - at))], at);
      })();
    }
    for (let at = offset; at < end;) at += native.pwritev(this.fd, [z.subarray(0, Math.min(z.length, end - at))], at);
  }
}
