/**
 * The virtio-blk driver: the seed's `virtio_blk.c` (Linux ~2.6.3x) modernised to VIRTIO
 * 1.2 and written against {@link DriverTransport}, so it drives a loopback device, a
 * vhost-user-blk backend or anything else a transport reaches.
 *
 * What it keeps from the seed: disk names (`vda` …), feature negotiation, config space
 * (seg_max with a minimum of 1, size_max, blk_size, topology, RO, geometry with the sd-like
 * fallback), one chain per request (header, data, status byte), the status mapping of
 * `blk_done`, the stop/start of the request queue when the ring is full, the "new size"
 * notice on a config change, freeze/restore and remove. What it adds: VERSION_1, MQ,
 * DISCARD / WRITE_ZEROES / SECURE_ERASE, CONFIG_WCE, EVENT_IDX, INDIRECT_DESC, a
 * per-request timeout, and distrust of the device (a bad used id or length breaks the
 * queue and fails its requests instead of corrupting memory or hanging).
 *
 * Data path: caller buffers are bounce-copied through DMA memory (the device reaches only
 * `transport.memory`), except buffers from `allocBuffer`, which already live there and
 * go into the chain as they are (zero copy). Requests larger than one chain may carry
 * are split. A request that finds the ring full waits in a per-queue software FIFO and
 * goes out as completions free room. Chains are added at once; the kick is batched into
 * one microtask per queue.
 */
import { UsageError } from '../errors.js';
import {
  VIRTIO_BLK_CONFIG, VIRTIO_BLK_DWZ_SEGMENT, VIRTIO_BLK_F, VIRTIO_BLK_F_NAMES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_REQ_HEADER,
  VIRTIO_BLK_S, VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, virtioBlkConfigSize,
} from '../spec/virtio-blk.js';
import { VIRTIO_CONFIG_S, VIRTIO_F, features, hasFeature } from '../spec/virtio.js';
import { setU64 } from '../spec/u64.js';
import { isValidQueueSize } from '../spec/split-ring.js';
import type { DriverQueueBinding, DriverTransport } from '../virtqueue/device.js';
import { copyFromBuffers, copyToBuffers } from '../virtqueue/chain.js';
import { DriverQueueError, type Segment, type SplitDriverQueue } from '../virtqueue/split-driver.js';
import { powerOfTwo } from '../memory/dma-allocator.js';
import { isAligned } from './align.js';
import { decodeBlkConfig, BlkConfigError, type BlkConfig, type BlkGeometry } from './config.js';
import { BouncePool, viewOf, type DmaBlock } from './driver-dma.js';
import { rangeLimits, splitRange, type RangeLimits } from './range-split.js';
import {
  IoError, NotSupportedError, ProbeError, QueueBrokenError, ReadOnlyError, RequestError, TimeoutError, statusToError,
} from './driver-errors.js';
import { diskGeometry } from './geometry.js';
import { DiskIndexError, diskIndexes, diskName } from './naming.js';
import { STRING_UNITS, stringGetSize } from './size-string.js';
import { soon } from '../soon.js';

/** Features this driver can use; the device's offer is intersected with these (3.1.1 step 4). */
export const BLK_DRIVER_FEATURES: bigint = features(
  VIRTIO_BLK_F.SIZE_MAX, VIRTIO_BLK_F.SEG_MAX, VIRTIO_BLK_F.GEOMETRY, VIRTIO_BLK_F.RO, VIRTIO_BLK_F.BLK_SIZE,
  VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.TOPOLOGY, VIRTIO_BLK_F.CONFIG_WCE, VIRTIO_BLK_F.MQ, VIRTIO_BLK_F.DISCARD,
  VIRTIO_BLK_F.WRITE_ZEROES, VIRTIO_BLK_F.SECURE_ERASE,
  VIRTIO_F.VERSION_1, VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.RING_INDIRECT_DESC,
);

/** Default entries per queue when the transport allows that many (QEMU's default virtio-blk queue size). */
export const DEFAULT_QUEUE_SIZE = 256;
/** Default upper bound on the data bytes of one chain; larger requests are split. */
export const DEFAULT_MAX_REQUEST_BYTES = 1 << 20;
/** Indirect tables longer than this are not worth their memory: 128 × 16 bytes per slot. */
export const MAX_INDIRECT_ENTRIES = 128;
/** The logical block size when VIRTIO_BLK_F_BLK_SIZE is not negotiated (the block layer's default). */
const DEFAULT_BLOCK_SIZE = VIRTIO_BLK_SECTOR_SIZE;
/** Largest logical block we accept: 64 KiB, above any real device (Linux caps at a page). */
const MAX_BLOCK_SIZE = 1 << 16;
/** Largest physical block we accept (blk_size << physical_block_exp must stay sane). */
const MAX_PHYSICAL_BLOCK_SIZE = 2 ** 31;
/** Descriptor length is a u32: without SIZE_MAX one descriptor may describe this much. */
const U32_MAX = 0xffff_ffff;
/** Header and status byte of every chain, around its data descriptors. */
const CHAIN_OVERHEAD_DESCS = 2;
/** Per slot in the header area: 16-byte header, then the status byte, padded. */
const SLOT_STRIDE = 32;
const STATUS_OFFSET = VIRTIO_BLK_REQ_HEADER.size;
/** Written into the status byte before posting: no status the spec defines, so a device
 *  that completes a chain without writing its status yields an I/O error, not stale "OK". */
const STATUS_UNWRITTEN = 0xff;
/** Bounce blocks kept for reuse: an eighth of the DMA arena, at most this much. */
const MAX_BOUNCE_CACHE = 16 << 20;
const BOUNCE_CACHE_SHARE = 8;
const TWO_POW_32 = 0x1_0000_0000;
/** Bounce blocks up to this size stay with their slot between requests (no pool round trip). */
const SLOT_BOUNCE_KEEP = 64 << 10;
/** Timeout sweeps per timeout period: a request fails between 1 and 1.25 timeouts late. */
const TIMEOUT_SWEEPS = 4;
/**
 * Used-buffer notification coalescing (EVENT_IDX): with at least this many chains in
 * flight, the device is asked to notify once 1/COALESCE_SHARE of them are used. Half
 * measured best against vblk serve and qemu-storage-daemon at iodepth 32 (a quarter
 * woke the driver twice as often for no more IOPS; an eighth left the device idle).
 */
const COALESCE_MIN_IN_FLIGHT = 8;
const COALESCE_SHARE = 2;
/** While notifications are coalesced, used buffers are reaped at least this often (ms). */
const LATE_REAP_MS = 1;

/** Where the driver's notices go (the seed's dev_notice / dev_warn). */
export interface BlkLogger {
  /** Something worth knowing about `disk` (`vda` …) that needs no action, such as its new size. */
  notice(disk: string, message: string): void;
  /** Something wrong with `disk` that the driver survived, such as a broken queue. */
  warn(disk: string, message: string): void;
}

/** A logger that drops everything: the default, so a library never writes to a console. */
export const silentLogger: BlkLogger = { notice: () => {}, warn: () => {} };

/** How {@link BlkDriver.probe} sets the disk up; every field is optional. */
export interface BlkDriverOptions {
  /** Queues to use when VIRTIO_BLK_F_MQ is negotiated, capped by num_queues and the transport. Default 1. */
  queues?: number;
  /** Entries per queue (a power of two), capped by the transport's maximum. Default 256. */
  queueSize?: number;
  /**
   * Fail a request that has not completed after this many milliseconds with
   * {@link TimeoutError}. 0 (the default) waits forever, as Linux does.
   */
  timeoutMs?: number;
  /** Feature bits not to negotiate even when offered (e.g. VIRTIO_F.RING_EVENT_IDX). */
  excludeFeatures?: readonly number[];
  /** Upper bound on the data bytes of one chain; larger requests are split. Default 1 MiB. */
  maxRequestBytes?: number;
  /** Where notices (the "new size" line) and warnings (a broken queue) go. Default silent. */
  logger?: BlkLogger;
}

/**
 * How {@link BlkDriver.submitRead} and {@link BlkDriver.submitWrite} report: null on
 * success, else the error the promise form would reject with. Never called synchronously
 * from the submit call; called once.
 */
export type Completion = (error: Error | null) => void;

/** Per-request choices. */
export interface RequestOptions {
  /** Queue to put the request on (0 … numQueues - 1); default round robin. */
  queue?: number;
}

/** A range of 512-byte sectors for discard, write-zeroes and secure erase. */
export interface SectorRange {
  /** First 512-byte sector of the range. */
  readonly sector: number;
  /** Number of 512-byte sectors, > 0. */
  readonly sectors: number;
}

/** The device's write cache: volatile until flushed (writeback), or stable at completion (writethrough). */
export type CacheMode = 'writeback' | 'writethrough';

/** What a `resize` listener receives. */
export interface ResizeEvent {
  /** New capacity in 512-byte sectors. */
  readonly capacity: number;
  /** Capacity before the change, in 512-byte sectors. */
  readonly previousCapacity: number;
}

type Phase = 'probing' | 'running' | 'freezing' | 'frozen' | 'removing' | 'removed' | 'failed';

/**
 * One chain's worth of a caller request. A request that fits one chain is one Req — an
 * object the driver reuses once the request has completed (see {@link BlkDriver.complete}),
 * so the hot path allocates nothing per request; a larger one is split into several, and
 * the first of them, the root, also carries the request's promise and bookkeeping.
 */
class Req {
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
  /** Chains of the request on a ring while it is unsettled (counted in `liveChains`). */
  inFlight!: number;
  /** The timeout sweep during which it was submitted (see expireTimedOut). */
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

/** Range limits before the config is read: no range request gets that far. */
const NO_RANGE_LIMITS: RangeLimits = { maxSectors: 0, maxSegments: 0, granularity: 1 };

/**
 * Completed one-chain requests kept for reuse: more than a busy disk has in flight, so
 * the hot path finds one, and few enough to cost nothing when idle.
 */
const SPARE_REQS = 1024;

/**
 * Where an {@link BlkDriver.allocBuffer} buffer carries its {@link ZeroCopyBuffer}: a
 * property of the view itself, under a symbol this module does not export, hidden from
 * enumeration, copies and `console.log` (the caller is trusted: one who digs the symbol
 * out with getOwnPropertySymbols can only make its own driver post an address of its
 * choosing, which the device checks like any other). Read on every request: a property
 * load where a WeakMap hashed the view and probed its table
 * (loopback CPU per request, bench/ab.sh: −3% without the copies, −1.5% with them).
 */
const ZERO_COPY = Symbol('vblk.zeroCopy');
type MaybeZeroCopy = Uint8Array & { readonly [ZERO_COPY]?: ZeroCopyBuffer };

/** A buffer from {@link BlkDriver.allocBuffer}: where it lives, and the chains on rings that use it. */
interface ZeroCopyBuffer {
  /** The driver whose DMA memory holds it: to any other driver it is an ordinary buffer. */
  readonly owner: BlkDriver;
  readonly addr: number;
  /** Chains on a ring pointing into this buffer: it cannot be freed while any is. */
  onRings: number;
  /** Freed: a request still waiting to be posted with it fails instead of using the memory. */
  isFreed: boolean;
}

/**
 * One chain's resources: its header and status byte in the queue's header area, and a
 * bounce block kept across requests.
 */
class Slot {
  chunk: Req | null = null;
  /** The bounce block in use, or kept from an earlier request for reuse. */
  bounce: DmaBlock | null = null;
  /** The header's first u32 word in {@link QueueState.headerWords}. */
  readonly headerWord: number;
  /** The status byte's index in {@link QueueState.headerBytes}. */
  readonly statusAt: number;
  readonly statusAddr: number;
  constructor(
    index: number,
    /** Guest address of the request header. */
    readonly headerAddr: number,
  ) {
    this.headerWord = (index * SLOT_STRIDE) / Uint32Array.BYTES_PER_ELEMENT;
    this.statusAt = index * SLOT_STRIDE + STATUS_OFFSET;
    this.statusAddr = headerAddr + STATUS_OFFSET;
  }
}

/** A virtqueue as the driver uses it, and the requests waiting for room on it. */
class QueueState {
  readonly freeSlots: Slot[] = [];
  pendingHead: Req | null = null;
  pendingTail: Req | null = null;
  pendingCount = 0;
  kickScheduled = false;
  broken: QueueBrokenError | null = null;
  /** False once torn down: late notifications and kicks are ignored. */
  isLive = true;
  /** The used-buffer notification handler and the batched kick, bound once (no per-request closures). */
  reap: () => void = () => {};
  kick: () => void = () => {};
  /** While notifications are delayed: a reap in case the device leaves the rest unfinished. */
  lateReap: ReturnType<typeof setTimeout> | null = null;
  constructor(
    readonly index: number,
    readonly binding: DriverQueueBinding<Slot>,
    readonly slots: Slot[],
    readonly headerArea: number,
    /**
     * The header area as u32 words (headers are written as words: no byte copy per
     * request) and as bytes (status). One view each for all slots: a request touches
     * no view object of its own.
     */
    readonly headerWords: Uint32Array,
    readonly headerBytes: Uint8Array,
  ) {
    for (let i = slots.length - 1; i >= 0; i--) this.freeSlots.push(slots[i]);
  }

  get queue(): SplitDriverQueue<Slot> {
    return this.binding.queue;
  }
}

const TYPE_NAMES: Readonly<Record<number, string>> = {
  [VIRTIO_BLK_T.IN]: 'read',
  [VIRTIO_BLK_T.OUT]: 'write',
  [VIRTIO_BLK_T.FLUSH]: 'flush',
  [VIRTIO_BLK_T.GET_ID]: 'get-id',
  [VIRTIO_BLK_T.DISCARD]: 'discard',
  [VIRTIO_BLK_T.WRITE_ZEROES]: 'write-zeroes',
  [VIRTIO_BLK_T.SECURE_ERASE]: 'secure-erase',
};

/**
 * The line the seed logs when the capacity changes: "new size: N B-byte logical blocks
 * (decimal/binary)", sizes as `string_get_size` prints them. `capacity` is in 512-byte
 * sectors. With a logical block of 512 bytes this is the seed's line exactly. For larger
 * blocks the seed printed the sector count as if it were blocks and multiplied it by the
 * block size (an 8× overstatement at 4096); we count logical blocks as later Linux does
 * (rounded up, as `virtblk_update_capacity`) so the numbers are true.
 */
export function newSizeMessage(capacity: number, logicalBlockSize: number): string {
  const sectorsPerBlock = logicalBlockSize / VIRTIO_BLK_SECTOR_SIZE;
  const blocks = Math.ceil(capacity / sectorsPerBlock);
  const bytes = BigInt(blocks) * BigInt(logicalBlockSize);
  return `new size: ${blocks} ${logicalBlockSize}-byte logical blocks ` +
    `(${stringGetSize(bytes, STRING_UNITS.STRING_UNITS_10)}/${stringGetSize(bytes, STRING_UNITS.STRING_UNITS_2)})`;
}

/**
 * A virtio-blk disk. Create with {@link BlkDriver.probe}; release with {@link remove}.
 * Sectors are always 512 bytes; offsets and lengths must be multiples of the logical
 * block size.
 */
export class BlkDriver {
  /** Disk index, process-wide: the lowest one free when the disk was probed. */
  readonly index: number;
  /** The disk's name, from its index (0 → `vda`, 26 → `vdaa`), used in messages and logs. */
  readonly name: string;
  private phase: Phase = 'probing';
  private negotiated = 0n;
  private cfg!: BlkConfig;
  private capacitySectors = 0;
  private blockSize = DEFAULT_BLOCK_SIZE;
  private sectorsPerBlock = 1;
  private segMaxValue = 1;
  private sizeMaxValue = U32_MAX;
  private maxChainBytes = 0;
  private isWriteback = false;
  /** VIRTIO_BLK_F_RO, cached: the write path tests it per request (no BigInt there). */
  private isReadOnly = false;
  private discardLimits: RangeLimits = NO_RANGE_LIMITS;
  private writeZeroesLimits: RangeLimits = NO_RANGE_LIMITS;
  private secureEraseLimits: RangeLimits = NO_RANGE_LIMITS;
  private queues: QueueState[] = [];
  /** Queues the disk has; kept while frozen, when `queues` is empty. */
  private queueCount = 0;
  private nextQueue = 0;
  private readonly pool: BouncePool;
  private readonly logger: BlkLogger;
  private readonly timeoutMs: number;
  private readonly wanted: bigint;
  /** Ops accepted and not settled. */
  private liveOps = 0;
  /** Chains on rings whose op is unsettled (timed-out and failed ops' chains are not counted). */
  private liveChains = 0;
  /** Chunks in software FIFOs, all queues. */
  private pendingTotal = 0;
  /** Chunks of a frozen disk, waiting for restore. */
  private parked: Req[] = [];
  private readonly waiters: { isDone: () => boolean; resolve: () => void }[] = [];
  /** A submitted request is being launched: its callback must not run yet (see settle). */
  private launching = false;
  private timer: ReturnType<typeof setTimeout> | null = null;
  /** Timeout sweeps so far. */
  private sweeps = 0;
  private readonly onTimer = (): void => this.expireTimedOut();
  private configEnabled = false;
  private configBusy = false;
  private configDirty = false;
  private readonly resizeListeners: ((e: ResizeEvent) => void)[] = [];
  private removal: Promise<void> | null = null;
  private freezing: Promise<void> | null = null;
  /** Completed one-chain requests, reused by the next reads and writes (at most SPARE_REQS). */
  private readonly spareReqs: Req[] = [];

  private constructor(
    private readonly transport: DriverTransport,
    index: number,
    private readonly options: BlkDriverOptions,
  ) {
    this.index = index;
    this.name = diskName(index);
    this.logger = options.logger ?? silentLogger;
    this.timeoutMs = options.timeoutMs ?? 0;
    let wanted = BLK_DRIVER_FEATURES;
    for (const bit of options.excludeFeatures ?? []) wanted &= ~features(bit);
    this.wanted = wanted;
    this.pool = new BouncePool(transport.memory, transport.dma, Math.min(MAX_BOUNCE_CACHE, transport.dma.size / BOUNCE_CACHE_SHARE));
  }

  /**
   * Brings up the device behind `transport` (3.1.1: reset, ACKNOWLEDGE, DRIVER, features,
   * FEATURES_OK, config, queues, DRIVER_OK) and returns the disk. On failure the device
   * status gets FAILED and a {@link ProbeError} is thrown.
   */
  static async probe(transport: DriverTransport, options: BlkDriverOptions = {}): Promise<BlkDriver> {
    checkOptions(options);
    let index: number;
    try {
      index = diskIndexes.allocate();
    } catch (e) {
      if (e instanceof DiskIndexError) throw new ProbeError('NO_DISK_INDEX', e.message, { cause: e });
      throw e;
    }
    const driver = new BlkDriver(transport, index, options);
    // Listening before DRIVER_OK loses no change; the listener ignores them until running.
    transport.onConfigChange(() => driver.configChanged());
    transport.onDeviceLost((reason) => driver.deviceLost(reason));
    try {
      await driver.bringUp();
    } catch (e) {
      diskIndexes.release(index);
      driver.phase = 'failed';
      throw e;
    }
    driver.phase = 'running';
    driver.configEnabled = true;
    return driver;
  }

  // ---- What the disk looks like ----------------------------------------------------

  /** Capacity in 512-byte sectors (follows config changes). */
  get capacity(): number {
    return this.capacitySectors;
  }

  /** Capacity in bytes (exact up to 2^53 bytes, 8 PiB). */
  get sizeBytes(): number {
    return this.capacitySectors * VIRTIO_BLK_SECTOR_SIZE;
  }

  /** Logical block size: blk_size when VIRTIO_BLK_F_BLK_SIZE is negotiated, else 512. */
  get logicalBlockSize(): number {
    return this.blockSize;
  }

  /** blk_size << physical_block_exp with TOPOLOGY and a non-zero exponent, else the logical block size. */
  get physicalBlockSize(): number {
    const exp = this.topologyField('physicalBlockExp');
    return exp ? this.blockSize * 2 ** exp : this.blockSize;
  }

  /** Bytes: blk_size × alignment_offset with TOPOLOGY, else 0. */
  get alignmentOffset(): number {
    return this.blockSize * this.topologyField('alignmentOffset');
  }

  /** Bytes: blk_size × min_io_size with TOPOLOGY, else 0 (not given). */
  get ioMin(): number {
    return this.blockSize * this.topologyField('minIoSize');
  }

  /** Bytes: blk_size × opt_io_size with TOPOLOGY, else 0 (not given). */
  get ioOpt(): number {
    return this.blockSize * this.topologyField('optIoSize');
  }

  /** VIRTIO_BLK_F_RO: writes, discards, write-zeroes and secure erases are refused. */
  get readOnly(): boolean {
    return this.isReadOnly;
  }

  /** The device's CHS geometry with VIRTIO_BLK_F_GEOMETRY, else the seed's 64/32 fallback. */
  get geometry(): BlkGeometry {
    return diskGeometry(this.has(VIRTIO_BLK_F.GEOMETRY) ? this.cfg.geometry : null, this.capacitySectors);
  }

  /** Negotiated feature bits. */
  get features(): bigint {
    return this.negotiated;
  }

  /** The config space as last read. */
  get config(): BlkConfig {
    return this.cfg;
  }

  /** Data segments per request: seg_max with SEG_MAX, at least 1 (the seed's minimum). */
  get segMax(): number {
    return this.segMaxValue;
  }

  /** Largest data descriptor: size_max with SIZE_MAX, else 2^32 - 1. */
  get sizeMax(): number {
    return this.sizeMaxValue;
  }

  /** Largest data of one chain; longer requests are split into several. */
  get maxRequestBytes(): number {
    return this.maxChainBytes;
  }

  /** Queues in use. */
  get numQueues(): number {
    return this.queueCount;
  }

  /** Whether feature `bit` was negotiated. */
  has(bit: number): boolean {
    return hasFeature(this.negotiated, bit);
  }

  private topologyField(field: 'physicalBlockExp' | 'alignmentOffset' | 'minIoSize' | 'optIoSize'): number {
    return this.has(VIRTIO_BLK_F.TOPOLOGY) ? this.cfg.topology[field] : 0;
  }

  /** Listens for capacity changes; returns a function that stops listening. */
  on(event: 'resize', listener: (e: ResizeEvent) => void): () => void {
    if (event !== 'resize') throw new UsageError('BAD_EVENT', `unknown event '${String(event)}'`);
    this.resizeListeners.push(listener);
    return () => {
      const i = this.resizeListeners.indexOf(listener);
      if (i >= 0) this.resizeListeners.splice(i, 1);
    };
  }

  // ---- Requests ----------------------------------------------------------------------

  /**
   * A buffer of `length` bytes in DMA memory, memory the device reaches directly. A
   * {@link read} or {@link write} whose buffer list is exactly this buffer (the same
   * view, alone) puts its address in the chain and skips the bounce copy: the device
   * reads from it or writes into it in place. Any other list, including a subarray of
   * it, is copied as usual. The buffer lives until {@link freeBuffer}; its contents
   * are undefined while a request using it is in flight. Throws {@link RequestError}
   * `NO_DMA_MEMORY` when the transport's DMA memory has no room, {@link UsageError}
   * for a bad length or a disk that is gone.
   */
  allocBuffer(length: number): Uint8Array {
    if (!Number.isSafeInteger(length) || length < 1) {
      throw new UsageError('BAD_LENGTH', `${this.name}: a DMA buffer needs a positive integer length, got ${length}`);
    }
    if (this.phase === 'removed' || this.phase === 'failed') {
      throw new UsageError('BAD_STATE', `${this.name}: cannot allocate a DMA buffer on a disk that is ${this.phase}`);
    }
    const dma = this.transport.dma;
    const addr = dma.alloc(length);
    if (addr < 0) throw new RequestError('NO_DMA_MEMORY', `${this.name}: no DMA memory for a buffer of ${length} bytes`);
    const bytes = viewOf(this.transport.memory, dma, addr, length);
    const record: ZeroCopyBuffer = { owner: this, addr, onRings: 0, isFreed: false };
    // Writable and configurable as an assigned property is: read-only attributes measured
    // slower here (B/A 1.04).
    Object.defineProperty(bytes, ZERO_COPY, { value: record, writable: true, configurable: true, enumerable: false });
    return bytes;
  }

  /**
   * Returns a buffer from {@link allocBuffer}. Throws {@link UsageError} `BUFFER_BUSY`
   * while a request using it is on a ring (the device may still touch it; a timed-out
   * request counts until the device returns it or the disk is removed), and
   * `NOT_A_DMA_BUFFER` for anything else. A request still waiting for room fails.
   */
  freeBuffer(buffer: Uint8Array): void {
    const zc = this.zeroCopyOf(buffer);
    if (zc === null) throw new UsageError('NOT_A_DMA_BUFFER', `${this.name}: freeBuffer takes a buffer from allocBuffer (and each only once)`);
    if (zc.onRings > 0) throw new UsageError('BUFFER_BUSY', `${this.name}: the DMA buffer is in use by ${zc.onRings} request(s) on a ring`);
    zc.isFreed = true;
    this.transport.dma.release(zc.addr);
  }

  /** `buffer`'s record if it is one of this driver's {@link allocBuffer} buffers, not yet freed; else null. */
  private zeroCopyOf(buffer: MaybeZeroCopy): ZeroCopyBuffer | null {
    const zc = buffer[ZERO_COPY];
    return zc !== undefined && zc.owner === this && !zc.isFreed ? zc : null;
  }

  /** Reads from `sector` into `buffers` (their total length is the request's length). */
  read(sector: number, buffers: readonly Uint8Array[], options?: RequestOptions): Promise<void> {
    return this.promised(this.prepareReadWrite(VIRTIO_BLK_T.IN, sector, buffers, options));
  }

  /** Writes `buffers` (concatenated) at `sector`. */
  write(sector: number, buffers: readonly Uint8Array[], options?: RequestOptions): Promise<void> {
    if (this.readOnly) return this.refuseReadOnly('write', sector);
    return this.promised(this.prepareReadWrite(VIRTIO_BLK_T.OUT, sector, buffers, options));
  }

  /**
   * {@link read} with a callback instead of a promise: for callers that keep many
   * requests in flight, it spares a promise and a microtask per request. An exception
   * thrown by `done` does not disturb the driver; it is rethrown from a microtask.
   */
  submitRead(sector: number, buffers: readonly Uint8Array[], done: Completion, options?: RequestOptions): void {
    this.submitted(this.prepareReadWrite(VIRTIO_BLK_T.IN, sector, buffers, options), done);
  }

  /** {@link write} with a callback instead of a promise (see {@link submitRead}). */
  submitWrite(sector: number, buffers: readonly Uint8Array[], done: Completion, options?: RequestOptions): void {
    if (this.readOnly) {
      this.submitted(this.readOnlyError('write', sector), done);
      return;
    }
    this.submitted(this.prepareReadWrite(VIRTIO_BLK_T.OUT, sector, buffers, options), done);
  }

  /**
   * Makes completed writes durable (VIRTIO_BLK_T_FLUSH). Without VIRTIO_BLK_F_FLUSH
   * negotiated a completed write is already stable (5.2.6.2) — the seed then never enables
   * REQ_FLUSH — so this resolves at once.
   */
  flush(options?: RequestOptions): Promise<void> {
    if (!this.has(VIRTIO_BLK_F.FLUSH)) return this.refuseIfGone() ?? Promise.resolve();
    return this.submitSingle(VIRTIO_BLK_T.FLUSH, null, 0, false, options);
  }

  /** Discards `ranges` (VIRTIO_BLK_T_DISCARD; needs VIRTIO_BLK_F_DISCARD). */
  discard(ranges: readonly SectorRange[], options?: RequestOptions): Promise<void> {
    return this.rangeRequest(VIRTIO_BLK_T.DISCARD, VIRTIO_BLK_F.DISCARD, this.discardLimits, ranges, 0, options);
  }

  /**
   * Zeroes `ranges` (VIRTIO_BLK_T_WRITE_ZEROES; needs VIRTIO_BLK_F_WRITE_ZEROES). `unmap`
   * lets the device deallocate the blocks (the segment's unmap flag).
   */
  writeZeroes(ranges: readonly SectorRange[], options?: RequestOptions & { unmap?: boolean }): Promise<void> {
    const flags = options?.unmap ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0;
    return this.rangeRequest(VIRTIO_BLK_T.WRITE_ZEROES, VIRTIO_BLK_F.WRITE_ZEROES, this.writeZeroesLimits, ranges, flags, options);
  }

  /** Securely erases `ranges` (VIRTIO_BLK_T_SECURE_ERASE; needs VIRTIO_BLK_F_SECURE_ERASE). */
  secureErase(ranges: readonly SectorRange[], options?: RequestOptions): Promise<void> {
    return this.rangeRequest(VIRTIO_BLK_T.SECURE_ERASE, VIRTIO_BLK_F.SECURE_ERASE, this.secureEraseLimits, ranges, 0, options);
  }

  /**
   * The device serial (VIRTIO_BLK_T_GET_ID): its 20 bytes up to the first NUL. An empty
   * string when the device answers IOERR or UNSUPP, as the seed's sysfs `serial` does.
   */
  async getId(options?: RequestOptions): Promise<string> {
    const id = new Uint8Array(VIRTIO_BLK_ID_BYTES);
    try {
      await this.submitSingle(VIRTIO_BLK_T.GET_ID, [id], VIRTIO_BLK_ID_BYTES, true, options);
    } catch (e) {
      if (e instanceof IoError || e instanceof NotSupportedError) return '';
      throw e;
    }
    const end = id.indexOf(0);
    return String.fromCharCode(...id.subarray(0, end < 0 ? id.length : end));
  }

  /**
   * The cache mode: the config's `writeback` byte with VIRTIO_BLK_F_CONFIG_WCE (5.2.4),
   * else writeback exactly when VIRTIO_BLK_F_FLUSH was negotiated (5.2.5).
   */
  getCacheMode(): CacheMode {
    return this.isWriteback ? 'writeback' : 'writethrough';
  }

  /** Switches the device's cache mode through the `writeback` config byte; resolves to the mode the device then reports. */
  async setCacheMode(mode: CacheMode): Promise<CacheMode> {
    if (mode !== 'writeback' && mode !== 'writethrough') {
      throw new UsageError('BAD_CACHE_MODE', `cache mode must be 'writeback' or 'writethrough', got '${String(mode)}'`);
    }
    const gone = this.refuseIfGone();
    if (gone) return gone;
    if (!this.has(VIRTIO_BLK_F.CONFIG_WCE)) {
      throw new NotSupportedError(`${this.name}: the device cannot switch its cache mode (VIRTIO_BLK_F_CONFIG_WCE not negotiated)`);
    }
    const { offset } = VIRTIO_BLK_CONFIG.writeback;
    await this.transport.writeConfig(offset, Uint8Array.of(mode === 'writeback' ? 1 : 0));
    const [byte] = await this.transport.readConfig(offset, VIRTIO_BLK_CONFIG.writeback.size);
    this.isWriteback = byte !== 0;
    return this.getCacheMode();
  }

  private refuseReadOnly(what: string, sector: number): Promise<void> {
    return Promise.reject(this.readOnlyError(what, sector));
  }

  private readOnlyError(what: string, sector: number): ReadOnlyError {
    return new ReadOnlyError(`${this.name}: ${what} at sector ${sector} refused: the disk is read-only (VIRTIO_BLK_F_RO)`);
  }

  /** Launches a prepared request (null: nothing to do) and returns its promise. */
  private promised(prepared: Req | Error | null): Promise<void> {
    if (prepared === null) return Promise.resolve();
    if (prepared instanceof Error) return Promise.reject(prepared);
    const promise = this.promiseOf(prepared);
    this.launch(prepared);
    return promise;
  }

  /** Launches a prepared request (null: nothing to do) that reports to `done`. */
  private submitted(prepared: Req | Error | null, done: Completion): void {
    if (typeof done !== 'function') throw new UsageError('BAD_CALLBACK', `${this.name}: a submitted request needs a completion function`);
    if (prepared === null || prepared instanceof Error) {
      callBackSoon(done, prepared);
      return;
    }
    prepared.done = done;
    // A request that fails while being launched (a broken queue, a freed buffer) must
    // not call back from inside the submit call: settle defers it meanwhile.
    this.launching = true;
    try {
      this.launch(prepared);
    } finally {
      this.launching = false;
    }
  }

  /** A rejected promise when the disk no longer takes requests, else null. */
  private refuseIfGone(): Promise<never> | null {
    const gone = this.goneError();
    return gone && Promise.reject(gone);
  }

  /** Why the disk no longer takes requests, or null while it does. */
  private goneError(): RequestError | null {
    if (this.phase === 'running' || this.phase === 'freezing' || this.phase === 'frozen') return null;
    return new RequestError('DISK_REMOVED', `${this.name}: the disk is ${this.phase === 'failed' ? 'failed' : 'removed'}`);
  }

  /**
   * A read or write checked and made into its root chain, not yet tracked or queued; the
   * error that refuses it; or null when it moves no data.
   */
  private prepareReadWrite(type: number, sector: number, buffers: readonly Uint8Array[], options: RequestOptions | undefined): Req | Error | null {
    const gone = this.goneError();
    if (gone) return gone;
    let total = 0;
    for (let i = 0; i < buffers.length; i++) total += buffers[i].length;
    const bad = this.checkExtent(TYPE_NAMES[type], sector, total);
    if (bad) return bad;
    if (total === 0) return null;
    const queue = this.pickQueue(options);
    if (typeof queue !== 'number') return queue;
    const root = (this.spareReqs.pop() ?? new Req()).init(null, type, sector, buffers, 0, Math.min(this.maxChainBytes, total), null,
      type === VIRTIO_BLK_T.IN, queue);
    root.zc = buffers.length === 1 ? this.zeroCopyOf(buffers[0]) : null;
    root.opBytes = total;
    return root;
  }

  /** Tracks a prepared read or write and queues its chains: the first, then one per further maxChainBytes. */
  private launch(root: Req): void {
    const total = root.opBytes;
    const max = this.maxChainBytes;
    this.track(root, root.sector);
    // Most requests are one chain (`remaining` starts at 1): no division for them.
    if (total > max) root.remaining = Math.ceil(total / max);
    this.enqueue(root);
    for (let off = max; off < total; off += max) {
      const chunk = new Req().init(root, root.type, root.sector + off / VIRTIO_BLK_SECTOR_SIZE, root.buffers, off, Math.min(max, total - off),
        null, root.isWritable, root.queue);
      chunk.zc = root.zc;
      this.enqueue(chunk);
    }
  }

  /** A request that is one chain whatever its size (flush, GET_ID). */
  private submitSingle(type: number, buffers: Uint8Array[] | null, length: number, isWritable: boolean, options?: RequestOptions): Promise<void> {
    const gone = this.refuseIfGone();
    if (gone) return gone;
    const queue = this.pickQueue(options);
    if (typeof queue !== 'number') return Promise.reject(queue);
    const root = new Req().init(null, type, 0, buffers, 0, length, null, isWritable, queue);
    const promise = this.promiseOf(root);
    root.opBytes = length;
    this.track(root, 0);
    this.enqueue(root);
    return promise;
  }

  private rangeRequest(type: number, feature: number, limits: RangeLimits, ranges: readonly SectorRange[], flags: number,
    options: RequestOptions | undefined): Promise<void> {
    const gone = this.refuseIfGone();
    if (gone) return gone;
    const what = TYPE_NAMES[type];
    if (this.readOnly) return this.refuseReadOnly(what, ranges.length > 0 ? ranges[0].sector : 0);
    if (!this.has(feature)) {
      return Promise.reject(new NotSupportedError(`${this.name}: ${what} is not supported by the device (${VIRTIO_BLK_F_NAMES[feature] ?? `feature bit ${feature}`} not negotiated)`));
    }
    // Each range is cut into segments the device takes (splitRange), then grouped maxSegments per request.
    const segments: number[] = [];
    let total = 0;
    for (const r of ranges) {
      const bad = r.sectors > 0 ? this.checkExtent(what, r.sector, r.sectors * VIRTIO_BLK_SECTOR_SIZE)
        : new RequestError('OUT_OF_RANGE', `${this.name}: ${what} of ${r.sectors} sectors at sector ${r.sector}: not a valid range`);
      if (bad) return Promise.reject(bad);
      splitRange(r.sector, r.sectors, limits, segments);
      total += r.sectors * VIRTIO_BLK_SECTOR_SIZE;
    }
    if (segments.length === 0) return Promise.resolve();
    const queue = this.pickQueue(options);
    if (typeof queue !== 'number') return Promise.reject(queue);
    const count = segments.length / 2;
    const payloads: Uint8Array[] = [];
    for (let first = 0; first < count; first += limits.maxSegments) {
      const n = Math.min(limits.maxSegments, count - first);
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
    const chain = (root: Req | null, payload: Uint8Array): Req => new Req().init(root, type, 0, null, 0, payload.length, payload, false, queue);
    const root = chain(null, payloads[0]);
    const promise = this.promiseOf(root);
    root.opBytes = total;
    this.track(root, ranges[0].sector);
    root.remaining = payloads.length;
    this.enqueue(root);
    for (let i = 1; i < payloads.length; i++) this.enqueue(chain(root, payloads[i]));
    return promise;
  }

  /** Why [sector, sector + bytes) is not a valid extent of this disk, or null. */
  private checkExtent(what: string, sector: number, bytes: number): RequestError | null {
    if (!Number.isSafeInteger(sector) || sector < 0 || !Number.isSafeInteger(bytes)) {
      return new RequestError('OUT_OF_RANGE', `${this.name}: ${what} at sector ${sector}: not a valid sector or length`);
    }
    if (!isAligned(sector, this.sectorsPerBlock) || !isAligned(bytes, this.blockSize)) {
      return new RequestError('MISALIGNED',
        `${this.name}: ${what} of ${bytes} bytes at sector ${sector} is not aligned to the ${this.blockSize}-byte logical block`);
    }
    if (sector + bytes / VIRTIO_BLK_SECTOR_SIZE > this.capacitySectors) {
      return new RequestError('OUT_OF_RANGE',
        `${this.name}: ${what} of ${bytes} bytes at sector ${sector} goes past the end of the disk (${this.capacitySectors} sectors)`);
    }
    return null;
  }

  /**
   * The queue for a new request: the caller's, or the next healthy one round robin. While
   * frozen there are no queues; the count they had is used, and restore re-checks it.
   */
  private pickQueue(options: RequestOptions | undefined): number | Error {
    const n = this.queueCount;
    const live = this.queues.length > 0;
    if (options?.queue !== undefined) {
      const q = options.queue;
      if (!Number.isInteger(q) || q < 0 || q >= n) {
        return new RequestError('BAD_QUEUE_INDEX', `${this.name}: queue ${q} does not exist (the disk has ${n})`);
      }
      return (live && this.queues[q].broken) || q;
    }
    for (let tries = 0; tries < n; tries++) {
      const q = this.nextQueue;
      this.nextQueue = q + 1 === n ? 0 : q + 1;
      if (!live || !this.queues[q].broken) return q;
    }
    return this.queues[0].broken as QueueBrokenError;
  }

  /** The promise that settles with `op` (a root). */
  private promiseOf(op: Req): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      op.resolve = resolve;
      op.reject = reject;
    });
  }

  /**
   * Counts request `op` (a root, its `opBytes` already set) as live and notes its first
   * sector for messages; arms the timeout sweep when requests can time out.
   */
  private track(op: Req, sector: number): void {
    op.opSector = sector;
    this.liveOps++;
    if (this.timeoutMs > 0) {
      op.sweep = this.sweeps;
      if (this.timer === null) this.armTimer();
    }
  }

  private settle(op: Req, error: Error | null): void {
    if (op.settled) return;
    op.settled = true;
    this.liveOps--;
    this.liveChains -= op.inFlight;
    op.inFlight = 0;
    const done = op.done;
    if (done === null) {
      if (error) op.reject(error);
      else op.resolve();
    } else {
      op.done = null;
      if (this.launching) callBackSoon(done, error);
      else callBack(done, error);
    }
    if (this.waiters.length > 0) this.checkWaiters();
  }

  private describe(op: Req): string {
    const what = TYPE_NAMES[op.type];
    if (op.type === VIRTIO_BLK_T.FLUSH || op.type === VIRTIO_BLK_T.GET_ID) return `${this.name}: ${what}`;
    return `${this.name}: ${what} of ${op.opBytes} bytes at sector ${op.opSector}`;
  }

  // ---- Software queue and posting ------------------------------------------------

  private enqueue(chunk: Req): void {
    const op = chunk.root ?? chunk;
    if (op.settled) return;
    const qs = this.queues[chunk.queue];
    if (qs === undefined || this.phase === 'frozen') {
      this.parked.push(chunk);
      return;
    }
    if (qs.broken) {
      this.settle(op, qs.broken);
      return;
    }
    if (!this.isPosting()) {
      this.pushPending(qs, chunk);
      return;
    }
    if (qs.pendingHead === null && this.post(qs, chunk)) {
      this.scheduleKick(qs);
      return;
    }
    this.pushPending(qs, chunk);
    // No completion on this queue will come to retry: pump decides whether to wait or fail.
    if (qs.queue.numInFlight === 0) this.pump(qs);
  }

  private isPosting(): boolean {
    return this.phase === 'running' || this.phase === 'removing';
  }

  private pushPending(qs: QueueState, chunk: Req): void {
    chunk.next = null;
    if (qs.pendingTail) qs.pendingTail.next = chunk;
    else qs.pendingHead = chunk;
    qs.pendingTail = chunk;
    qs.pendingCount++;
    this.pendingTotal++;
  }

  private popPending(qs: QueueState): void {
    const head = qs.pendingHead as Req;
    qs.pendingHead = head.next;
    if (qs.pendingHead === null) qs.pendingTail = null;
    head.next = null;
    qs.pendingCount--;
    this.pendingTotal--;
  }

  /** Posts waiting chunks while the ring has room (the seed's blk_start_queue). */
  private pump(qs: QueueState): void {
    let posted = false;
    while (qs.pendingHead !== null && !qs.broken && this.isPosting()) {
      const chunk = qs.pendingHead;
      const op = chunk.root ?? chunk;
      if (op.settled) {
        this.popPending(qs);
        continue;
      }
      if (!this.post(qs, chunk)) {
        if (qs.queue.numInFlight === 0 && this.chainsOnRings() === 0) {
          // Nothing in flight anywhere will ever free DMA memory: the request cannot go.
          this.popPending(qs);
          this.settle(op, new RequestError('NO_DMA_MEMORY', `${this.describe(op)}: no DMA memory for ${chunk.length} bytes`));
          continue;
        }
        break;
      }
      this.popPending(qs);
      posted = true;
    }
    if (posted) this.scheduleKick(qs);
  }

  private chainsOnRings(): number {
    let n = 0;
    for (const qs of this.queues) n += qs.queue.numInFlight;
    return n;
  }

  /**
   * Puts `chunk` on the ring as header + data + status. False when there is no room (ring
   * descriptors, a slot, or DMA memory for the bounce buffer): it then waits.
   */
  private post(qs: QueueState, chunk: Req): boolean {
    const zc = chunk.zc;
    if (zc !== null && zc.isFreed) {
      // The caller freed the buffer before the request reached a ring: never use that memory.
      const op = chunk.root ?? chunk;
      this.settle(op, new UsageError('BUFFER_FREED', `${this.describe(op)}: its DMA buffer was freed before the request was sent`));
      return true;
    }
    const length = chunk.length;
    const sizeMax = this.sizeMaxValue;
    const dataDescs = length === 0 ? 0 : length <= sizeMax ? 1 : Math.ceil(length / sizeMax);
    const queue = qs.queue;
    if (qs.freeSlots.length === 0 || !queue.canAdd(dataDescs + CHAIN_OVERHEAD_DESCS)) return false;
    const slot = qs.freeSlots.pop() as Slot;
    // Guest address of the data: the caller's DMA buffer itself, or a bounce block.
    let dataAddr = -1;
    if (zc !== null) {
      dataAddr = zc.addr + chunk.byteOffset;
    } else if (length > 0) {
      let bounce = slot.bounce;
      if (bounce === null || bounce.bytes.length < length) {
        const fresh = this.getBounce(length);
        if (fresh === null) {
          qs.freeSlots.push(slot);
          return false;
        }
        if (bounce !== null) this.pool.put(bounce);
        slot.bounce = bounce = fresh;
      }
      if (chunk.payload) bounce.bytes.set(chunk.payload);
      else if (!chunk.isWritable) copyFromBuffers(chunk.buffers as readonly Uint8Array[], chunk.byteOffset, bounce.bytes, length);
      // GET_ID: a device that writes fewer than 20 bytes leaves NULs, not an older request's data.
      else if (chunk.type === VIRTIO_BLK_T.GET_ID) bounce.bytes.fill(0, 0, length);
      dataAddr = bounce.addr;
    }
    const words = qs.headerWords;
    const w = slot.headerWord;
    const sector = chunk.sector;
    words[w] = chunk.type;
    words[w + 1] = 0;
    const low = sector >>> 0;
    words[w + 2] = low;
    words[w + 3] = sector === low ? 0 : (sector - low) / TWO_POW_32;
    qs.headerBytes[slot.statusAt] = STATUS_UNWRITTEN;
    // canAdd said yes and nothing ran in between: neither add can refuse.
    if (dataDescs <= 1) {
      queue.addFramed(slot.headerAddr, VIRTIO_BLK_REQ_HEADER.size, dataAddr, length, chunk.isWritable, slot.statusAddr, 1, slot);
    } else {
      // Longer than size_max: one descriptor per size_max bytes (rare; lists built here).
      const header: Segment = { addr: slot.headerAddr, len: VIRTIO_BLK_REQ_HEADER.size };
      const status: Segment = { addr: slot.statusAddr, len: 1 };
      const data: Segment[] = [];
      for (let at = 0; at < length; at += sizeMax) data.push({ addr: dataAddr + at, len: Math.min(sizeMax, length - at) });
      queue.add(chunk.isWritable ? [header] : [header, ...data], chunk.isWritable ? [...data, status] : [status], slot);
    }
    slot.chunk = chunk;
    if (zc !== null) zc.onRings++;
    (chunk.root ?? chunk).inFlight++;
    this.liveChains++;
    return true;
  }


  /**
   * A bounce block of at least `length` bytes. When DMA memory runs out, the blocks idle
   * slots keep for reuse are given back first: cached memory must never starve a request.
   */
  private getBounce(length: number): DmaBlock | null {
    const block = this.pool.get(length);
    if (block !== null) return block;
    for (const qs of this.queues) {
      for (const slot of qs.freeSlots) {
        if (slot.bounce !== null) this.pool.put(slot.bounce);
        slot.bounce = null;
      }
    }
    this.pool.drain();
    return this.pool.get(length);
  }

  private scheduleKick(qs: QueueState): void {
    if (qs.kickScheduled) return;
    qs.kickScheduled = true;
    soon(qs.kick);
  }

  /** Publishes the chains added since the last kick and notifies the device if it wants. */
  private kickQueue(qs: QueueState): void {
    qs.kickScheduled = false;
    if (!qs.isLive || qs.broken) return;
    if (qs.queue.kickPrepare()) qs.binding.notify();
  }

  // ---- Completions ---------------------------------------------------------------

  /**
   * The used-buffer notification of `qs` (the seed's `blk_done`): drain the used ring with
   * notifications off, re-enable and drain again if more arrived, then restart whatever
   * waited for room.
   */
  private reapQueue(qs: QueueState): void {
    if (!qs.isLive || qs.broken) return;
    const queue = qs.queue;
    for (;;) {
      queue.disableInterrupts();
      for (let slot = queue.takeUsed(); slot !== null; slot = queue.takeUsed()) {
        if (slot instanceof DriverQueueError) {
          this.breakQueue(qs, slot);
          return;
        }
        this.complete(qs, slot);
      }
      // Many chains in flight: ask for the next notification only once half of them are
      // used, so a device that completes them one by one wakes us a few times per batch
      // rather than once per request (a wakeup costs two syscalls, epoll and the eventfd
      // read). The device stays busy with the other half meanwhile.
      const inFlight = queue.numInFlight;
      const delay = inFlight >= COALESCE_MIN_IN_FLIGHT ? Math.floor(inFlight / COALESCE_SHARE) - 1 : 0;
      if (!queue.enableInterrupts(delay)) {
        // A device that finishes fewer than that for a while (a straggler, a slow disk)
        // must not hold back the ones it did finish for longer than a moment.
        if (delay > 0) this.armLateReap(qs);
        break;
      }
    }
    if (this.pendingTotal > 0) {
      // Completions here may also have freed DMA memory another queue waits for.
      this.pump(qs);
      if (this.pendingTotal > 0) for (const other of this.queues) if (other !== qs) this.pump(other);
    }
    if (this.waiters.length > 0) this.checkWaiters();
  }

  /** Reaps `qs` again after {@link LATE_REAP_MS}, re-arming the queue's one timer. */
  private armLateReap(qs: QueueState): void {
    const t = qs.lateReap as { refresh?: () => unknown } | null;
    // Node's timers re-arm in place (no allocation per reap); elsewhere a new one.
    if (t !== null && typeof t.refresh === 'function') {
      t.refresh();
      return;
    }
    if (qs.lateReap !== null) clearTimeout(qs.lateReap);
    const timer = setTimeout(qs.reap, LATE_REAP_MS);
    // It only hurries completions along: never the reason the process stays alive.
    (timer as { unref?: () => unknown }).unref?.();
    qs.lateReap = timer;
  }

  /**
   * One used chain. Its used length is not checked against the data posted: the queue
   * already refuses lengths beyond it, and Linux does not check short ones either.
   */
  private complete(qs: QueueState, slot: Slot): void {
    const chunk = slot.chunk as Req;
    const bounce = slot.bounce;
    slot.chunk = null;
    const op = chunk.root ?? chunk;
    const zc = chunk.zc;
    if (zc !== null) zc.onRings--;
    let error: Error | null = null;
    if (!op.settled) {
      op.inFlight--;
      this.liveChains--;
      const status = qs.headerBytes[slot.statusAt];
      if (status !== VIRTIO_BLK_S.OK) error = statusToError(status, this.describe(op));
      // The slot may keep a bounce block from an earlier request: a zero-copy chunk never used it.
      else if (chunk.isWritable && zc === null && bounce !== null) {
        copyToBuffers(chunk.buffers as readonly Uint8Array[], chunk.byteOffset, bounce.bytes, chunk.length);
      }
    }
    // Large blocks go back to the pool; small ones stay with the slot for its next request.
    if (bounce !== null && bounce.bytes.length > SLOT_BOUNCE_KEEP) {
      slot.bounce = null;
      this.pool.put(bounce);
    }
    qs.freeSlots.push(slot);
    if (op.settled) return;
    if (error !== null) this.settle(op, error);
    else if (--op.remaining === 0) {
      this.settle(op, null);
      // A one-chain request is referenced by nothing any more: its slot, the FIFOs and
      // the timeout sweep only hold requests in flight, and callers never see a Req.
      if (chunk === op && this.spareReqs.length < SPARE_REQS) this.spareReqs.push(op);
    }
  }

  /**
   * The device broke the ring's rules: the queue is done for (sticky, logged once). Every
   * request on it or waiting for it fails; their DMA memory stays reserved until the
   * queue is torn down, since the device may still write it.
   */
  private breakQueue(qs: QueueState, cause: DriverQueueError<Slot>): void {
    const err = new QueueBrokenError(`${this.name}: queue ${qs.index} is broken: ${cause.message}`, { cause });
    qs.broken = err;
    this.logger.warn(this.name, `queue ${qs.index} is broken: ${cause.message}`);
    for (const slot of qs.slots) if (slot.chunk) this.settle(slot.chunk.root ?? slot.chunk, err);
    while (qs.pendingHead !== null) {
      const chunk = qs.pendingHead;
      this.popPending(qs);
      this.settle(chunk.root ?? chunk, err);
    }
  }

  // ---- Timeouts --------------------------------------------------------------------

  /**
   * Fails every op that has seen more than TIMEOUT_SWEEPS sweeps, the sweeps being at
   * least a quarter timeout apart: an op fails after 1 to 1.25 timeouts, never sooner
   * (a late timer only makes it later). Sweeping the slots and FIFOs costs O(queue size)
   * per sweep and nothing per request: no timer, deadline list or clock read per request.
   * A timed-out chain stays on its ring, and its slot and bounce buffer stay reserved,
   * until the device returns it or the queue is torn down: the device may still write
   * into that memory, so it is never reused before.
   */
  private expireTimedOut(): void {
    this.timer = null;
    const sweep = ++this.sweeps;
    const expire = (chunk: Req): void => {
      const op = chunk.root ?? chunk;
      if (!op.settled && sweep - op.sweep > TIMEOUT_SWEEPS) {
        this.settle(op, new TimeoutError(`${this.describe(op)} timed out after ${this.timeoutMs} ms`));
      }
    };
    for (const qs of this.queues) {
      for (const slot of qs.slots) if (slot.chunk) expire(slot.chunk);
      for (let c = qs.pendingHead; c !== null; c = c.next) expire(c);
    }
    for (const c of this.parked) expire(c);
    for (const qs of this.queues) this.pump(qs);
    if (this.liveOps > 0) this.armTimer();
  }

  private armTimer(): void {
    this.timer = setTimeout(this.onTimer, Math.max(1, this.timeoutMs / TIMEOUT_SWEEPS));
  }

  private stopTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  // ---- Quiescing -------------------------------------------------------------------

  private waitFor(isDone: () => boolean): Promise<void> {
    if (isDone()) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ isDone, resolve }));
  }

  private checkWaiters(): void {
    for (let i = 0; i < this.waiters.length; i++) {
      const w = this.waiters[i];
      if (w.isDone()) {
        this.waiters.splice(i--, 1);
        w.resolve();
      }
    }
  }

  /**
   * Quiesces the disk for suspend (the seed's `virtblk_freeze`): new requests are held in
   * software, requests on the rings complete, then the queues are torn down and the device
   * reset. {@link restore} brings it back and sends what was held.
   */
  freeze(): Promise<void> {
    if (this.phase !== 'running') {
      return Promise.reject(new UsageError('BAD_STATE', `${this.name}: cannot freeze a disk that is ${this.phase}`));
    }
    this.phase = 'freezing';
    this.configEnabled = false;
    this.freezing = this.doFreeze();
    return this.freezing;
  }

  private async doFreeze(): Promise<void> {
    await this.waitFor(() => this.liveChains === 0);
    try {
      await this.teardown();
      await this.transport.reset();
    } catch (e) {
      // The transport failed under us: nothing held can be sent any more.
      this.phase = 'failed';
      this.failParked(e as Error);
      throw e;
    }
    this.phase = 'frozen';
  }

  /** The transport lost the device: every request in flight, queued or held fails now, not at its timeout. */
  private deviceLost(reason: Error): void {
    this.logger.warn(this.name, `device lost: ${reason.message}`);
    for (const qs of this.queues) {
      if (!qs.broken) this.breakQueue(qs, new DriverQueueError('QUEUE_BROKEN', `device lost: ${reason.message}`));
    }
    this.failParked(new QueueBrokenError(`${this.name}: device lost: ${reason.message}`, { cause: reason }));
  }

  /** Fails every request held for restore with `error`. */
  private failParked(error: Error): void {
    const held = this.parked;
    this.parked = [];
    for (const chunk of held) this.settle(chunk.root ?? chunk, error);
  }

  /**
   * Brings a frozen disk back (the seed's `virtblk_restore`): negotiates again, re-reads
   * the config, sets up the queues and sends every request held meanwhile. On failure the
   * device is FAILED and every held request fails with the same {@link ProbeError}.
   */
  async restore(): Promise<void> {
    if (this.phase !== 'frozen') throw new UsageError('BAD_STATE', `${this.name}: cannot restore a disk that is ${this.phase}`);
    const previousCapacity = this.capacitySectors;
    try {
      await this.bringUp();
    } catch (e) {
      this.phase = 'failed';
      this.failParked(e as Error);
      throw e;
    }
    this.phase = 'running';
    this.configEnabled = true;
    const held = this.parked;
    this.parked = [];
    const n = this.queues.length;
    for (const chunk of held) {
      chunk.queue %= n;
      this.enqueue(chunk);
    }
    if (this.capacitySectors !== previousCapacity) this.emitResize(previousCapacity);
  }

  /**
   * Removes the disk (the seed's `virtblk_remove`): refuses new requests, lets accepted
   * ones complete, resets the device and frees the disk index. A frozen disk's held
   * requests fail, since there are no queues to send them on. Like Linux, this waits for
   * a device that never answers unless `timeoutMs` is set. Calling it again returns the
   * same promise.
   */
  remove(): Promise<void> {
    this.removal ??= this.doRemove();
    return this.removal;
  }

  private async doRemove(): Promise<void> {
    if (this.phase === 'freezing') await this.freezing;
    const wasFrozen = this.phase === 'frozen';
    this.phase = 'removing';
    this.configEnabled = false;
    try {
      if (wasFrozen || this.queues.length === 0) {
        this.failParked(new RequestError('DISK_REMOVED', `${this.name}: the disk was removed while frozen`));
      } else {
        await this.waitFor(() => this.liveOps === 0);
        await this.teardown();
        await this.transport.reset();
      }
    } finally {
      // Even when the transport fails here, the disk is gone and its name free again.
      this.stopTimer();
      this.pool.drain();
      diskIndexes.release(this.index);
      this.phase = 'removed';
    }
  }

  /**
   * Stops the queues at the device, takes every chain back and releases their memory.
   * Only chains of settled ops can still be on the rings (callers wait for the rest).
   */
  private async teardown(): Promise<void> {
    const queues = this.queues;
    for (const qs of queues) {
      qs.isLive = false;
      if (qs.lateReap !== null) clearTimeout(qs.lateReap);
      qs.lateReap = null;
    }
    await this.transport.teardownQueues();
    for (const qs of queues) {
      qs.queue.detachAll();
      for (const slot of qs.slots) {
        if (slot.bounce !== null) this.pool.put(slot.bounce);
        slot.bounce = null;
        // The device no longer uses the rings: a zero-copy buffer may be freed now.
        if (slot.chunk?.zc) slot.chunk.zc.onRings--;
        slot.chunk = null;
      }
      while (qs.pendingHead !== null) {
        this.parked.push(qs.pendingHead);
        this.popPending(qs);
      }
      this.transport.dma.release(qs.headerArea);
    }
    this.queues = [];
  }

  // ---- Bring-up ------------------------------------------------------------------

  private async bringUp(): Promise<void> {
    const t = this.transport;
    const S = VIRTIO_CONFIG_S;
    try {
      await t.reset();
      await t.setStatus(S.ACKNOWLEDGE);
      await t.setStatus(S.ACKNOWLEDGE | S.DRIVER);
      const offered = await t.getDeviceFeatures();
      if (!hasFeature(offered, VIRTIO_F.VERSION_1)) {
        throw new ProbeError('NO_VERSION_1',
          `${this.name}: the device does not offer VIRTIO_F_VERSION_1; legacy (pre-1.0) devices are not supported`);
      }
      const negotiated = offered & this.wanted;
      await t.setDriverFeatures(negotiated);
      await t.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
      // 3.1.1 step 6: re-read the status; without FEATURES_OK the device refused our subset.
      if (((await t.getStatus()) & S.FEATURES_OK) === 0) {
        throw new ProbeError('FEATURES_NOT_ACCEPTED', `${this.name}: the device did not accept features 0x${negotiated.toString(16)}`);
      }
      const config = decodeBlkConfig(await this.readConfigFor(negotiated));
      if (config instanceof BlkConfigError) throw new ProbeError('BAD_CONFIG', `${this.name}: ${config.message}`, { cause: config });
      this.applyConfig(negotiated, config);
      await this.setupQueues();
      await t.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    } catch (e) {
      const err = e instanceof ProbeError ? e
        : new ProbeError('TRANSPORT', `${this.name}: bringing up the device failed: ${(e as Error).message}`, { cause: e });
      await this.failDevice();
      throw err;
    }
  }

  /**
   * The config space the negotiated features define (5.2.4). A device that will not give
   * it all fails the probe: zeroes in place of the secure-erase limits would read as "any
   * size, one segment" and send requests the device refuses; QEMU too gives up on a
   * vhost-user-blk backend whose GET_CONFIG fails.
   */
  private async readConfigFor(negotiated: bigint): Promise<Uint8Array> {
    const size = virtioBlkConfigSize(negotiated);
    try {
      return await this.transport.readConfig(0, size);
    } catch (e) {
      if ((e as { code?: unknown }).code !== 'CONFIG_REFUSED') throw e;
      const why = hasFeature(negotiated, VIRTIO_BLK_F.SECURE_ERASE)
        ? `VIRTIO_BLK_F_SECURE_ERASE's limits are bytes ${VIRTIO_BLK_CONFIG.max_secure_erase_sectors.offset}-${size - 1}` : 'the VIRTIO 1.1 structure';
      throw new ProbeError('BAD_CONFIG',
        `${this.name}: the device refused the ${size} bytes of config space the negotiated features need (${why}): ${(e as Error).message}`, { cause: e });
    }
  }

  /** After a failed bring-up: release what was set up and tell the device FAILED (3.1.1 step 8's alternative). */
  private async failDevice(): Promise<void> {
    try {
      if (this.queues.length > 0) await this.teardown();
      await this.transport.setStatus((await this.transport.getStatus()) | VIRTIO_CONFIG_S.FAILED);
    } catch {
      // The transport is already failing; the ProbeError being thrown says why.
    }
  }

  /** Validates the config and derives the limits the data path uses. */
  private applyConfig(negotiated: bigint, config: BlkConfig): void {
    const has = (bit: number): boolean => hasFeature(negotiated, bit);
    const bad = (why: string): ProbeError => new ProbeError('BAD_CONFIG', `${this.name}: ${why}`);
    let blockSize = DEFAULT_BLOCK_SIZE;
    if (has(VIRTIO_BLK_F.BLK_SIZE)) {
      blockSize = config.blkSize;
      if (!isPowerOfTwo(blockSize) || blockSize < VIRTIO_BLK_SECTOR_SIZE || blockSize > MAX_BLOCK_SIZE) {
        throw bad(`blk_size ${config.blkSize} is not a power of two from ${VIRTIO_BLK_SECTOR_SIZE} to ${MAX_BLOCK_SIZE}`);
      }
    }
    if (has(VIRTIO_BLK_F.TOPOLOGY) && blockSize * 2 ** config.topology.physicalBlockExp > MAX_PHYSICAL_BLOCK_SIZE) {
      throw bad(`physical_block_exp ${config.topology.physicalBlockExp} makes a physical block above 2^31 bytes`);
    }
    if (has(VIRTIO_BLK_F.SECURE_ERASE)) {
      // As Linux's virtblk_probe since it learnt secure erase (the seed predates it): a
      // zero secure-erase limit fails the probe ("max_secure_erase_sectors can't be 0").
      // Unlike discard's fields, 0 has no "no limit" reading here, and guessing one sends
      // the device requests it refuses.
      const fields = [
        ['max_secure_erase_sectors', config.maxSecureEraseSectors],
        ['max_secure_erase_seg', config.maxSecureEraseSeg],
        ['secure_erase_sector_alignment', config.secureEraseSectorAlignment],
      ] as const;
      for (const [name, value] of fields) if (value === 0) throw bad(`${name} is 0 with VIRTIO_BLK_F_SECURE_ERASE negotiated`);
    }
    this.negotiated = negotiated;
    this.cfg = config;
    this.blockSize = blockSize;
    this.sectorsPerBlock = blockSize / VIRTIO_BLK_SECTOR_SIZE;
    this.capacitySectors = config.capacity;
    // The seed: "We need at least one SG element, whatever they say."
    this.segMaxValue = has(VIRTIO_BLK_F.SEG_MAX) && config.segMax > 0 ? config.segMax : 1;
    this.sizeMaxValue = has(VIRTIO_BLK_F.SIZE_MAX) && config.sizeMax > 0 ? config.sizeMax : U32_MAX;
    this.isWriteback = has(VIRTIO_BLK_F.CONFIG_WCE) ? config.writeback !== 0 : has(VIRTIO_BLK_F.FLUSH);
    this.isReadOnly = has(VIRTIO_BLK_F.RO);
  }

  /** A kind of range request's limits from its config fields (see {@link rangeLimits}). */
  private rangeLimits(maxSectors: number, maxSegments: number, alignment: number): RangeLimits {
    // A range request's segments travel as one chain's data, so the chain limit caps them too.
    const segmentsPerChain = Math.floor(this.maxChainBytes / VIRTIO_BLK_DWZ_SEGMENT.size);
    return rangeLimits({ maxSectors, maxSegments, alignment, sectorsPerBlock: this.sectorsPerBlock, segmentsPerChain });
  }

  private async setupQueues(): Promise<void> {
    const t = this.transport;
    let count = 1;
    if (this.has(VIRTIO_BLK_F.MQ)) {
      count = Math.max(1, Math.min(this.cfg.numQueues || 1, this.options.queues ?? 1, await t.maxQueues()));
    }
    const sizes: number[] = [];
    for (let i = 0; i < count; i++) {
      const size = floorPowerOfTwo(Math.min(await t.maxQueueSize(i), this.options.queueSize ?? DEFAULT_QUEUE_SIZE));
      if (!isValidQueueSize(size)) throw new ProbeError('QUEUE_SETUP', `${this.name}: queue ${i} has no usable size`);
      sizes.push(size);
    }
    const isIndirect = this.has(VIRTIO_F.RING_INDIRECT_DESC);
    // Header + seg_max data + status per chain; an indirect table of that many spares the ring.
    const maxIndirect = isIndirect ? Math.min(this.segMaxValue + CHAIN_OVERHEAD_DESCS, MAX_INDIRECT_ENTRIES) : 0;
    const smallest = Math.min(...sizes);
    // A chain longer than an indirect table goes direct, so it must fit the ring.
    const descLimit = isIndirect ? Math.max(maxIndirect, smallest) : smallest;
    const dataDescs = Math.min(this.segMaxValue, descLimit - CHAIN_OVERHEAD_DESCS);
    if (dataDescs < 1) {
      throw new ProbeError('QUEUE_SETUP', `${this.name}: a queue of ${smallest} entries cannot hold a header, data and status`);
    }
    const byDescs = dataDescs * this.sizeMaxValue;
    const limit = Math.min(byDescs, this.options.maxRequestBytes ?? DEFAULT_MAX_REQUEST_BYTES);
    this.maxChainBytes = limit - (limit % this.blockSize);
    if (this.maxChainBytes === 0) {
      throw new ProbeError('BAD_CONFIG', `${this.name}: seg_max ${this.segMaxValue} × size_max ${this.sizeMaxValue} cannot carry one ${this.blockSize}-byte block`);
    }
    // Every chain carries one contiguous buffer (a bounce block or a DMA buffer) cut into
    // size_max pieces, so tables need no more entries than that: usually 3. Tables sized
    // for seg_max (128 entries, 2 KiB apart) would make the few lines in use alias in the
    // CPU caches and cost half a megabyte of DMA memory per queue.
    const indirectEntries = isIndirect
      ? Math.min(maxIndirect, Math.ceil(this.maxChainBytes / this.sizeMaxValue) + CHAIN_OVERHEAD_DESCS) : 0;
    const c = this.cfg;
    // Each kind keeps its own limits. Linux merges the discard and secure-erase ones
    // (the smaller of each) only because its block layer has one set for both.
    this.discardLimits = this.rangeLimits(c.maxDiscardSectors, c.maxDiscardSeg, c.discardSectorAlignment);
    // Write-zeroes has no alignment field: whole logical blocks.
    this.writeZeroesLimits = this.rangeLimits(c.maxWriteZeroesSectors, c.maxWriteZeroesSeg, 0);
    this.secureEraseLimits = this.rangeLimits(c.maxSecureEraseSectors, c.maxSecureEraseSeg, c.secureEraseSectorAlignment);
    for (let i = 0; i < count; i++) {
      this.queues.push(await this.setupQueue(i, sizes[i], indirectEntries));
    }
    this.queueCount = count;
    this.nextQueue = 0;
  }

  private async setupQueue(index: number, size: number, indirectEntries: number): Promise<QueueState> {
    const t = this.transport;
    const bytes = size * SLOT_STRIDE;
    const headerArea = t.dma.alloc(bytes);
    const area = headerArea < 0 ? null : t.memory.view(headerArea, bytes);
    // Headers are written as u32 words (no byte copy per request): the area must be word aligned in host memory.
    if (area === null || area.byteOffset % Uint32Array.BYTES_PER_ELEMENT !== 0) {
      if (headerArea >= 0) t.dma.release(headerArea);
      throw new ProbeError('QUEUE_SETUP', `${this.name}: no word-aligned DMA memory for the request headers of queue ${index}`);
    }
    const holder: { state: QueueState | null } = { state: null };
    let binding: DriverQueueBinding<Slot>;
    try {
      binding = await t.setupQueue<Slot>(index, size, indirectEntries, () => holder.state?.reap());
    } catch (e) {
      t.dma.release(headerArea);
      throw new ProbeError('QUEUE_SETUP', `${this.name}: setting up queue ${index} failed: ${(e as Error).message}`, { cause: e });
    }
    const slots: Slot[] = [];
    for (let i = 0; i < size; i++) slots.push(new Slot(i, headerArea + i * SLOT_STRIDE));
    const state = new QueueState(index, binding, slots, headerArea,
      new Uint32Array(area.buffer, area.byteOffset, bytes / Uint32Array.BYTES_PER_ELEMENT), area);
    state.reap = () => this.reapQueue(state);
    state.kick = () => this.kickQueue(state);
    holder.state = state;
    return state;
  }

  // ---- Config changes ------------------------------------------------------------

  /** The transport's configuration change notification (the seed's `virtblk_config_changed`). */
  private configChanged(): void {
    if (!this.configEnabled) return;
    if (this.configBusy) {
      this.configDirty = true;
      return;
    }
    this.configBusy = true;
    void this.rereadConfig();
  }

  /**
   * Re-reads capacity and cache mode, logs the seed's "new size" line and tells `resize`
   * listeners when the capacity changed (the seed's `virtblk_config_changed_work`).
   */
  private async rereadConfig(): Promise<void> {
    do {
      this.configDirty = false;
      try {
        const config = decodeBlkConfig(await this.transport.readConfig(0, virtioBlkConfigSize(this.negotiated)));
        if (!this.configEnabled) break;
        if (config instanceof BlkConfigError) {
          this.logger.warn(this.name, `ignoring config change: ${config.message}`);
          continue;
        }
        const previous = this.capacitySectors;
        this.cfg = config;
        this.capacitySectors = config.capacity;
        if (this.has(VIRTIO_BLK_F.CONFIG_WCE)) this.isWriteback = config.writeback !== 0;
        this.logger.notice(this.name, newSizeMessage(config.capacity, this.blockSize));
        if (config.capacity !== previous) this.emitResize(previous);
      } catch (e) {
        this.logger.warn(this.name, `reading the config space after a change failed: ${(e as Error).message}`);
      }
    } while (this.configDirty);
    this.configBusy = false;
  }

  private emitResize(previousCapacity: number): void {
    const event: ResizeEvent = { capacity: this.capacitySectors, previousCapacity };
    for (const l of [...this.resizeListeners]) l(event);
  }
}


function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

function floorPowerOfTwo(n: number): number {
  return n >= 1 ? powerOfTwo(Math.floor(Math.log2(n)) | 0) : 0;
}

function checkOptions(o: BlkDriverOptions): void {
  const positiveInt = (name: string, v: number | undefined): void => {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 1)) {
      throw new UsageError('BAD_OPTION', `BlkDriver option ${name} must be a positive integer, got ${v}`);
    }
  };
  positiveInt('queues', o.queues);
  positiveInt('queueSize', o.queueSize);
  positiveInt('maxRequestBytes', o.maxRequestBytes);
  if (o.timeoutMs !== undefined && (!Number.isFinite(o.timeoutMs) || o.timeoutMs < 0)) {
    throw new UsageError('BAD_OPTION', `BlkDriver option timeoutMs must be a non-negative number, got ${o.timeoutMs}`);
  }
  if (o.excludeFeatures?.includes(VIRTIO_F.VERSION_1)) {
    throw new UsageError('BAD_OPTION', 'BlkDriver cannot do without VIRTIO_F_VERSION_1');
  }
}

/**
 * Calls a caller's completion. What it throws is the caller's bug, not the driver's: it
 * surfaces from a microtask (an uncaught exception, as from any callback) instead of
 * unwinding the driver's bookkeeping half-way through a reap.
 */
function callBack(done: Completion, error: Error | null): void {
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
function callBackSoon(done: Completion, error: Error | null): void {
  queueMicrotask(() => done(error));
}
