/**
 * What the device side of a virtqueue hands to device code: one descriptor chain, walked
 * once and validated, as two lists of views into guest memory — the device-readable part
 * and the device-writable part, in chain order (crosvm's Reader/Writer split).
 */
import { VblkError } from '../errors.js';

export interface DescriptorChain {
  /** Head descriptor index: the id the used ring reports back. */
  readonly head: number;
  /** Device-readable buffers, in order. A descriptor crossing regions gives several views. */
  readonly readable: Uint8Array[];
  /** Device-writable buffers, in order. */
  readonly writable: Uint8Array[];
  readonly readableBytes: number;
  readonly writableBytes: number;
  /**
   * Descriptors that carry buffers: every direct one, and an indirect table's entries
   * instead of the descriptor that points to the table. Zero-length ones count.
   */
  readonly descriptors: number;
  /** Length in bytes of the chain's longest buffer descriptor (0 when it has none). */
  readonly longestDescriptor: number;
}

/**
 * A chain object a device keeps and hands back to `SplitDeviceQueue.pop`, which refills
 * it: its lists are emptied and reused, so popping allocates no chain per request. The
 * previous chain it held must be finished with (its views are dropped).
 */
export interface ReusableChain extends DescriptorChain {
  head: number;
  readableBytes: number;
  writableBytes: number;
  descriptors: number;
  longestDescriptor: number;
}

/**
 * Why a chain or a ring was refused. Every one of these is fatal to the queue: the ring
 * itself cannot be trusted any more (STYLE.md, principle 8), so the device stops the
 * queue and reports NEEDS_RESET.
 */
export type ChainErrorCode =
  | 'AVAIL_INDEX_JUMP'
  | 'HEAD_OUT_OF_RANGE'
  | 'NEXT_OUT_OF_RANGE'
  | 'CHAIN_LOOP'
  | 'INDIRECT_NOT_NEGOTIATED'
  | 'INDIRECT_NESTED'
  | 'INDIRECT_WITH_NEXT'
  | 'INDIRECT_BAD_LENGTH'
  | 'READABLE_AFTER_WRITABLE'
  | 'OUT_OF_BOUNDS'
  | 'CHAIN_TOO_LARGE';

export class ChainError extends VblkError {
  declare readonly code: ChainErrorCode;
  constructor(
    code: ChainErrorCode,
    message: string,
    /** Head of the chain being walked, or -1 when the ring index itself was bad. */
    readonly head: number,
  ) {
    super(code, message);
  }
}

/**
 * Views of the byte range [start, start + length) of a buffer list, sharing memory with
 * it: how device code takes the header, data and status out of a chain without copying.
 * Returns null when the lists are shorter than the range.
 */
export function sliceBuffers(buffers: readonly Uint8Array[], start: number, length: number): Uint8Array[] | null {
  const out: Uint8Array[] = [];
  let skip = start;
  let left = length;
  for (let i = 0; i < buffers.length && left > 0; i++) {
    const b = buffers[i];
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const n = Math.min(b.length - skip, left);
    out.push(b.subarray(skip, skip + n));
    skip = 0;
    left -= n;
  }
  return left === 0 ? out : null;
}

/**
 * Copies `length` bytes (default `dest.length`) of a buffer list, from byte `start`, into
 * the front of `dest`; false if the list is too short. Whole buffers go without a view.
 */
export function copyFromBuffers(buffers: readonly Uint8Array[], start: number, dest: Uint8Array, length = dest.length): boolean {
  let skip = start;
  let at = 0;
  for (let i = 0; i < buffers.length && at < length; i++) {
    const b = buffers[i];
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const n = Math.min(b.length - skip, length - at);
    dest.set(skip === 0 && n === b.length ? b : b.subarray(skip, skip + n), at);
    skip = 0;
    at += n;
  }
  return at === length;
}

/**
 * Copies the first `length` bytes (default all) of `src` into a buffer list from byte
 * `start`; false if the list is too short. A whole `src` goes without a view.
 */
export function copyToBuffers(buffers: readonly Uint8Array[], start: number, src: Uint8Array, length = src.length): boolean {
  let skip = start;
  let at = 0;
  for (let i = 0; i < buffers.length && at < length; i++) {
    const b = buffers[i];
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const n = Math.min(b.length - skip, length - at);
    b.set(at === 0 && n === src.length ? src : src.subarray(at, at + n), skip);
    skip = 0;
    at += n;
  }
  return at === length;
}
