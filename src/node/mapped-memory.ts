/**
 * MappedRegion: a region of a shared-memory fd (a vhost-user memory region, a memfd we
 * share with a device) mapped into this process as byte views.
 *
 * Node 20 caps an external ArrayBuffer at 4 GiB, so a larger region is mapped as
 * several windows, each its own mapping; an access that crosses a window edge must be
 * split by the caller (GuestMemory regions do exactly that when each window becomes one
 * region). Unmapping detaches every window's ArrayBuffer first, so a stale view reads
 * as empty (length 0) instead of faulting.
 */
import * as native from './native.js';

/** One mapped window of a {@link MappedRegion}. */
export interface MappedWindow {
  /** Where the window starts within the region (not within the file). */
  readonly offset: number;
  /** The window's bytes; length 0 once the region is unmapped. */
  readonly bytes: Uint8Array;
  /** Virtual address of `bytes[0]` in this process. */
  readonly address: bigint;
}

/** Options of {@link MappedRegion.map}. */
export interface MapRegionOptions {
  /** Where the region starts in the file (vhost-user's mmap_offset); any value, not only page multiples. Default 0. */
  readonly fileOffset?: number;
  /** Map read-write (default) or read-only. */
  readonly writable?: boolean;
  /** Largest window, a multiple of the page size (default and maximum: {@link native.MMAP_MAX_LENGTH}). */
  readonly maxWindowBytes?: number;
}

/** A region of an fd mapped shared into this process. */
export class MappedRegion {
  /** Region size in bytes: the windows' lengths add up to it. */
  readonly size: number;
  /** The windows in order, covering [0, size) without gaps. */
  readonly windows: readonly MappedWindow[];
  private readonly buffers: ArrayBuffer[];
  private mapped = true;

  private constructor(size: number, windows: MappedWindow[], buffers: ArrayBuffer[]) {
    this.size = size;
    this.windows = windows;
    this.buffers = buffers;
  }

  /**
   * Maps `size` bytes of `fd` starting at `options.fileOffset`. The fd may be closed
   * afterwards: the mapping keeps the memory. Throws when the range lies beyond the end
   * of the file (touching it would raise SIGBUS).
   */
  static map(fd: number, size: number, options: MapRegionOptions = {}): MappedRegion {
    const fileOffset = options.fileOffset ?? 0;
    const writable = options.writable ?? true;
    const maxWindow = options.maxWindowBytes ?? native.MMAP_MAX_LENGTH;
    if (!Number.isSafeInteger(size) || size <= 0) throw new RangeError(`MappedRegion.map: size must be a positive integer, got ${size}`);
    if (!Number.isSafeInteger(fileOffset) || fileOffset < 0 || fileOffset + size > Number.MAX_SAFE_INTEGER) {
      throw new RangeError(`MappedRegion.map: fileOffset ${fileOffset} is out of range`);
    }
    if (!Number.isSafeInteger(maxWindow) || maxWindow <= 0 || maxWindow % native.PAGE_SIZE !== 0 || maxWindow > native.MMAP_MAX_LENGTH) {
      throw new RangeError(`MappedRegion.map: maxWindowBytes must be a positive multiple of ${native.PAGE_SIZE} up to ${native.MMAP_MAX_LENGTH}, got ${maxWindow}`);
    }
    const windows: MappedWindow[] = [];
    const buffers: ArrayBuffer[] = [];
    // mmap offsets are page multiples: the first window starts at the page holding
    // fileOffset and its view skips the bytes before it. Every later window starts at a
    // multiple of maxWindow past that page, so is page-aligned too.
    const lead = fileOffset % native.PAGE_SIZE;
    let fileAt = fileOffset - lead;
    let skip = lead;
    let regionAt = 0;
    try {
      while (regionAt < size) {
        const length = Math.min(maxWindow, skip + (size - regionAt));
        const { buffer, address } = native.mmap(fd, length, fileAt, writable);
        buffers.push(buffer);
        windows.push({ offset: regionAt, bytes: new Uint8Array(buffer, skip), address: address + BigInt(skip) });
        regionAt += length - skip;
        fileAt += length;
        skip = 0;
      }
    } catch (e) {
      buffers.forEach((b) => native.munmap(b));
      throw e;
    }
    return new MappedRegion(size, windows, buffers);
  }

  get isMapped(): boolean {
    return this.mapped;
  }

  /**
   * Unmaps every window. Idempotent. Throws `EBUSY` while an asynchronous file I/O
   * request uses a window (that window and the later ones stay mapped): wait for the
   * request, then call again.
   */
  unmap(): void {
    if (!this.mapped) return;
    for (const b of this.buffers) native.munmap(b);
    this.mapped = false;
  }
}
