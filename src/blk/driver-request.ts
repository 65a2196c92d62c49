/**
 * A request as the driver carries it: the chain-sized pieces ({@link Req}), the caller's
 * DMA buffers that go into a chain without a copy, the payload of range requests, and
 * how completions reach the caller. No queue, ring or device state here.
 */
import { VIRTIO_BLK_DWZ_SEGMENT, VIRTIO_BLK_T } from '../spec/virtio-blk.js';
import { setU64 } from '../spec/u64.js';
import type { Completion } from './driver-options.js';

/**
 * One chain's worth of a caller request. A request that fits one chain is one Req — an
 * object the driver reuses once the request has completed (see {@link SPARE_REQS}),
 * so the hot path allocates nothing per request; a larger one is split into several, and
 * the first of them, the root, also carries the request's promise and bookkeeping.
 */
export class Req {
  /** The request this chain belongs to, or null when this is the root. */
  root!: Req | null;
  type!: number;
  sector!: number;
  /** Caller buffers the data comes from or goes to, or null. */
  buffers!: readonly Uint8Array[] | null;
  /** Offset of this chain's data in the concatenation of `buffers`. */
  byteOffset!: number;
  /** Bytes of data (or of `payload`); 0 for a flush. */
  length!: number;
  /** Device-readable bytes the driver built (discard/write-zeroes segments), or null. */
  payload!: Uint8Array | null;
  /** Data is device-writable (IN, GET_ID) rather than device-readable. */
  isWritable!: boolean;
  /** Queue index; restore moves requests of queues that no longer exist. */
  queue!: number;
  /** Link in a queue's software FIFO. */
  next!: Req | null;
  // The request's state, kept on the root: its callback, or its promise's functions.
  done!: Completion | null;
  resolve!: () => void;
  reject!: (e: Error) => void;
  settled!: boolean;
  /** Chains of the request not yet completed. */
  remaining!: number;
  /** Chains of the request on a ring while it is unsettled (counted in the engine's `liveChains`). */
  inFlight!: number;
  /** The timeout sweep during which it was submitted (see the engine's expireTimedOut). */
  sweep!: number;
  /** The request as the caller made it, for messages: its first sector and its bytes. */
  opSector!: number;
  opBytes!: number;
  /** The caller's buffer when it is a {@link BlkDriver.allocBuffer} buffer: no bounce copy. */
  zc!: ZeroCopyBuffer | null;

  /** Sets every field, as for a new request: a reused Req keeps nothing of its last one. */
  init(root: Req | null, type: number, sector: number, buffers: readonly Uint8Array[] | null, byteOffset: number,
    length: number, payload: Uint8Array | null, isWritable: boolean, queue: number): this {
    this.root = root;
    this.type = type;
    this.sector = sector;
    this.buffers = buffers;
    this.byteOffset = byteOffset;
    this.length = length;
    this.payload = payload;
    this.isWritable = isWritable;
    this.queue = queue;
    this.next = null;
    this.done = null;
    this.resolve = settledAlready;
    this.reject = settledAlready;
    this.settled = false;
    this.remaining = 1;
    this.inFlight = 0;
    this.sweep = 0;
    this.opSector = 0;
    this.opBytes = 0;
    this.zc = null;
    return this;
  }
}

/** A Req's promise functions until it has a promise (and after it is reused). */
function settledAlready(): void {}

/**
 * Completed one-chain requests kept for reuse: more than a busy disk has in flight, so
 * the hot path finds one, and few enough to cost nothing when idle.
 */
export const SPARE_REQS = 1024;

export const TYPE_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_BLK_T.IN]: 'read',
  [VIRTIO_BLK_T.OUT]: 'write',
  [VIRTIO_BLK_T.FLUSH]: 'flush',
  [VIRTIO_BLK_T.GET_ID]: 'get-id',
  [VIRTIO_BLK_T.DISCARD]: 'discard',
  [VIRTIO_BLK_T.WRITE_ZEROES]: 'write-zeroes',
  [VIRTIO_BLK_T.SECURE_ERASE]: 'secure-erase',
};

/** `op` (a root) in messages: "vda: read of 4096 bytes at sector 8". */
export function describe(disk: string, op: Req): string {
  const what = TYPE_NAMES[op.type];
  if (op.type === VIRTIO_BLK_T.FLUSH || op.type === VIRTIO_BLK_T.GET_ID) return `${disk}: ${what}`;
  return `${disk}: ${what} of ${op.opBytes} bytes at sector ${op.opSector}`;
}

/**
 * Where an {@link BlkDriver.allocBuffer} buffer carries its {@link ZeroCopyBuffer}: a
 * property of the view itself, under a symbol the package does not export, hidden from
 * enumeration, copies and `console.log` (the caller is trusted: one who digs the symbol
 * out with getOwnPropertySymbols can only make its own driver post an address of its
 * choosing, which the device checks like any other). Read on every request: a property
 * load where a WeakMap hashed the view and probed its table
 * (loopback CPU per request, bench/ab.sh: −3% without the copies, −1.5% with them).
 */
export const ZERO_COPY = Symbol('vblk.zeroCopy');
export type MaybeZeroCopy = Uint8Array & { readonly [ZERO_COPY]?: ZeroCopyBuffer };

/** A buffer from {@link BlkDriver.allocBuffer}: where it lives, and the chains on rings that use it. */
export interface ZeroCopyBuffer {
  /** The driver whose DMA memory holds it: to any other driver it is an ordinary buffer. */
  readonly owner: object;
  readonly addr: number;
  /** Chains on a ring pointing into this buffer: it cannot be freed while any is. */
  onRings: number;
  /** Freed: a request still waiting to be posted with it fails instead of using the memory. */
  isFreed: boolean;
}

/**
 * The device-readable payloads of a range request: `segments` (sector, count pairs, as
 * {@link splitRange} makes them) as VIRTIO_BLK_DWZ_SEGMENTs, `maxSegments` per chain.
 */
export function rangePayloads(segments: readonly number[], maxSegments: number, flags: number): Uint8Array[] {
  const count = segments.length / 2;
  const payloads: Uint8Array[] = [];
  for (let first = 0; first < count; first += maxSegments) {
    const n = Math.min(maxSegments, count - first);
    const payload = new Uint8Array(n * VIRTIO_BLK_DWZ_SEGMENT.size);
    const v = new DataView(payload.buffer);
    for (let k = 0; k < n; k++) {
      const at = k * VIRTIO_BLK_DWZ_SEGMENT.size;
      setU64(v, at + VIRTIO_BLK_DWZ_SEGMENT.sector, segments[2 * (first + k)]);
      v.setUint32(at + VIRTIO_BLK_DWZ_SEGMENT.numSectors, segments[2 * (first + k) + 1], true);
      v.setUint32(at + VIRTIO_BLK_DWZ_SEGMENT.flags, flags, true);
    }
    payloads.push(payload);
  }
  return payloads;
}

/**
 * Calls a caller's completion. What it throws is the caller's bug, not the driver's: it
 * surfaces from a microtask (an uncaught exception, as from any callback) instead of
 * unwinding the driver's bookkeeping half-way through a reap.
 */
export function callBack(done: Completion, error: Error | null): void {
  try {
    done(error);
  } catch (e) {
    queueMicrotask(() => {
      throw e;
    });
  }
}

/**
 * Calls a completion from a microtask. A function of its own because a closure in a hot
 * function costs every call of it: V8 allocates the captured variables' context on
 * entry, whether the closure is made or not (settle and submitted allocated 88 bytes per
 * request that way, measured with the sampling heap profiler).
 */
export function callBackSoon(done: Completion, error: Error | null): void {
  queueMicrotask(() => done(error));
}
