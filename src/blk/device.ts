/**
 * The virtio-blk device model (VIRTIO 1.2, 5.2): serves the requests a driver places in
 * its queues from a {@link BlockBackend}. Transport-agnostic: loopback, vhost-user and
 * virtio-mmio all drive it through {@link VirtioDevice}.
 *
 * Policy (STYLE.md, principle 8): a bad request completes with IOERR or UNSUPP and the
 * queue goes on; a bad ring (a ChainError from the queue) stops that queue and
 * reports NEEDS_RESET once, while the other queues keep working.
 *
 * The requests themselves run in device-engine.ts.
 */
import type { BlockBackend } from '../backends/backend.js';
import { SerialBackend } from '../backends/serial.js';
import { UsageError } from '../errors.js';
import { VIRTIO_BLK_CONFIG as CFG, VIRTIO_BLK_F, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_SECTOR_SIZE } from '../spec/virtio-blk.js';
import { setU64 } from '../spec/u64.js';
import { VIRTIO_F, VIRTIO_ID, features, hasFeature } from '../spec/virtio.js';
import { isValidQueueSize } from '../spec/split-ring.js';
import type { DeviceHost, VirtioDevice } from '../virtqueue/device.js';
import type { SplitDeviceQueue } from '../virtqueue/split-device.js';
import { encodeBlkConfig, type BlkGeometry, type BlkTopology } from './config.js';
import { topologyFromHints, type HintedTopology } from './block-size-hints.js';
import { QueueStats } from './stats.js';
import { Engine, QueueRunner, REQUEST_FRAMING_DESCRIPTORS, type RangeLimits } from './device-engine.js';

/** Limits of one kind of discard / write-zeroes / secure-erase request. */
export interface BlkRangeLimits {
  /** Most sectors in one segment; a multiple of the logical block in sectors. */
  readonly maxSectors?: number;
  /** Most segments in one request, 1 … {@link MAX_RANGE_SEGMENTS}. */
  readonly maxSegments?: number;
}

/** How to build a {@link BlkDevice}; everything but the backend has a default. */
export interface BlkDeviceOptions {
  /** The storage served; the device's feature bits follow what it can do. */
  readonly backend: BlockBackend;
  /** The GET_ID string: printable ASCII, at most 20 bytes. Default empty. */
  readonly serial?: string;
  /** Request queues, 1 … 65535. Default 1. */
  readonly numQueues?: number;
  /** Largest queue size the device accepts: a power of two. Default 256. */
  readonly queueSize?: number;
  /**
   * Logical block size (blk_size). Requests must then start on a block and cover whole
   * blocks. Sectors on the wire stay 512 bytes. Default 512.
   */
  readonly blockSize?: 512 | 4096;
  /** Serve the disk read-only (also implied by a read-only backend). */
  readonly readOnly?: boolean;
  /** Cache mode after reset (the `writeback` field). Default `writeback`. */
  readonly cache?: 'writeback' | 'writethrough';
  /** Called whenever the `writeback` field changes (a driver's choice, a reset, an assumption), for logs. */
  readonly onWritebackChange?: (writeback: 0 | 1) => void;
  /** Discard limits, or false not to offer discard. */
  readonly discard?: false | BlkRangeLimits;
  /** Write-zeroes limits, or false not to offer write-zeroes. */
  readonly writeZeroes?: false | BlkRangeLimits;
  /** Secure-erase limits, or false not to offer secure erase (see {@link BlkDevice}). */
  readonly secureErase?: false | BlkRangeLimits;
  /** CHS geometry to advertise (VIRTIO_BLK_F_GEOMETRY); none by default. */
  readonly geometry?: BlkGeometry;
  /**
   * Topology hints, in logical blocks (VIRTIO_BLK_F_TOPOLOGY). Each field given wins;
   * the others come from the backend's `blockSize` hints (block-size-hints.ts has the
   * mapping), else 0: no hint.
   */
  readonly topology?: Partial<BlkTopology>;
  /**
   * Most data segments per request the driver may use (seg_max), counted as a request's
   * descriptors less two (header and status). Default queueSize - 2. A request with more
   * completes with IOERR.
   */
  readonly segMax?: number;
  /**
   * Longest descriptor in bytes the driver may use (size_max, VIRTIO_BLK_F_SIZE_MAX), at
   * least 512; none by default. A request with a longer one completes with IOERR.
   */
  readonly sizeMax?: number;
  /**
   * Keep request statistics ({@link BlkDevice.stats}), timing requests with this clock
   * (milliseconds, like `performance.now`). Off by default: the data path then pays one
   * null check per batch and per request.
   */
  readonly statsClock?: () => number;
  /**
   * Called with every backend failure, for logs. The request completes with UNSUPP for a
   * {@link BackendError} `UNSUPPORTED`, with IOERR for anything else.
   */
  readonly onBackendError?: (error: unknown, type: number, sector: number) => void;
  /**
   * Called the first time a queue meets a request beyond seg_max or size_max (it
   * completes with IOERR), for logs: once per queue start, so a driver that keeps
   * breaking them cannot flood the log.
   */
  readonly onLimitExceeded?: (queue: number, message: string) => void;
}

/**
 * Most segments accepted in one discard, write-zeroes or secure-erase request: Linux
 * never sends more (its block layer's MAX_DISCARD_SEGMENTS), and it bounds the work
 * and memory one request can ask of the device.
 */
export const MAX_RANGE_SEGMENTS = 256;
/**
 * Default most sectors per range segment: under 2 GiB, so one backend call (a
 * fallocate, or the zero-writing fallback) stays bounded. Rounded down to whole blocks.
 */
const DEFAULT_MAX_RANGE_SECTORS = Math.floor(0x7fff_ffff / VIRTIO_BLK_SECTOR_SIZE);
const DEFAULT_QUEUE_SIZE = 256;
/** Logical block sizes on offer: the classic sector and 4 KiB ("advanced format") disks. */
const BLOCK_SIZES: readonly number[] = [VIRTIO_BLK_SECTOR_SIZE, 4096];
/**
 * Smallest size_max on offer: one sector. Smaller would only cut blocks into pieces, and
 * at this size the header (16 bytes) and status (1 byte) descriptors are within it too,
 * so the device bounds every descriptor without telling framing from data.
 */
const MIN_SIZE_MAX = VIRTIO_BLK_SECTOR_SIZE;
const U8_MAX = 0xff;
const U16_MAX = 0xffff;
const U32_MAX = 0xffff_ffff;
/** Printable ASCII, the alphabet of the device ID string (5.2.6). */
const ASCII_FIRST_PRINTABLE = 0x20;
const ASCII_LAST_PRINTABLE = 0x7e;

const NO_HOST: DeviceHost = { configChanged: () => undefined, needsReset: () => undefined };

/**
 * A virtio-blk device over a {@link BlockBackend}.
 *
 * Feature bits offered, each because it is implemented here and tested:
 * VERSION_1, RING_INDIRECT_DESC and RING_EVENT_IDX (the split queue handles both);
 * SEG_MAX, BLK_SIZE and TOPOLOGY (always: the values are accurate; the topology hints
 * come from the backend's block size hints, else are zero); SIZE_MAX and GEOMETRY when given; RO for a read-only disk; FLUSH and
 * CONFIG_WCE when the backend can flush; MQ when there is more than one queue
 * (num_queues is filled in regardless: with one queue the bit would add nothing, and
 * leaving it off keeps drivers without MQ support on their well-trodden path);
 * DISCARD, WRITE_ZEROES and SECURE_ERASE on a writable disk whose backend can do them.
 *
 * Secure erase is best effort and says so: each range is overwritten with zeroes
 * (write-zeroes without unmap), then discarded, then flushed, so it reads back as
 * zeroes and is deallocated in the image. What lower layers keep (filesystem
 * journals, snapshots, an SSD's remapped blocks) is beyond a file's reach.
 *
 * A backend that declares `concurrency: 'serial'` gets one operation at a time (flushes
 * and resizes included), the rest queued in arrival order; the queue exists only for
 * such a backend.
 *
 * Limits: a request with more data segments than seg_max, or a descriptor longer than
 * size_max, completes with IOERR. A disk whose size is not a whole number of logical
 * blocks exposes the whole blocks only.
 */
export class BlkDevice implements VirtioDevice {
  readonly deviceId = VIRTIO_ID.BLOCK;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly deviceFeatures: bigint;
  /** The backend served, as given in the options. */
  readonly backend: BlockBackend;
  /** Logical block size in bytes (blk_size): 512 or 4096. */
  readonly blockSize: number;
  /** The disk is served read-only (VIRTIO_BLK_F_RO): by the options or because the backend is. */
  readonly readOnly: boolean;
  private readonly engine: Engine;
  private readonly config: Uint8Array;
  private readonly configView: DataView;
  private readonly initialWriteback: 0 | 1;
  private readonly onWritebackChange: ((writeback: 0 | 1) => void) | null;
  private readonly runners: (QueueRunner | null)[];
  private readonly onLimitExceeded: ((queue: number, message: string) => void) | null;
  /** Request statistics per queue, when the device was built with a `statsClock`; else null. */
  readonly stats: readonly QueueStats[] | null;
  private host: DeviceHost = NO_HOST;
  private driverFeatures = 0n;

  /**
   * Throws {@link UsageError} `BAD_OPTION` for options out of range, and
   * `BAD_BLOCK_SIZE_HINTS` for a backend's invalid block size hints.
   */
  constructor(options: BlkDeviceOptions) {
    const backend = options.backend;
    this.backend = backend;
    // Decided once, here: a parallel backend is called directly, and its requests pay
    // nothing for the queue a serial one needs.
    const served = backend.concurrency === 'serial' ? new SerialBackend(backend) : backend;
    this.blockSize = options.blockSize ?? VIRTIO_BLK_SECTOR_SIZE;
    if (!BLOCK_SIZES.includes(this.blockSize)) bad(`block size ${this.blockSize} is not one of ${BLOCK_SIZES.join(', ')}`);
    const sectorsPerBlock = this.blockSize / VIRTIO_BLK_SECTOR_SIZE;
    this.numQueues = options.numQueues ?? 1;
    checkInt('numQueues', this.numQueues, 1, U16_MAX);
    this.maxQueueSize = options.queueSize ?? DEFAULT_QUEUE_SIZE;
    if (!isValidQueueSize(this.maxQueueSize)) bad(`queue size ${this.maxQueueSize} is not a power of two from 1 to 32768`);
    const segMax = options.segMax ?? Math.max(1, this.maxQueueSize - REQUEST_FRAMING_DESCRIPTORS);
    checkInt('segMax', segMax, 1, U32_MAX);
    if (options.sizeMax !== undefined) checkInt('sizeMax', options.sizeMax, MIN_SIZE_MAX, U32_MAX);
    this.readOnly = (options.readOnly ?? false) || backend.readOnly;
    if (backend.size < this.blockSize) bad(`the backend's ${backend.size} bytes hold no ${this.blockSize}-byte block`);

    const geometry = options.geometry;
    if (geometry) {
      checkInt('geometry.cylinders', geometry.cylinders, 0, U16_MAX);
      checkInt('geometry.heads', geometry.heads, 0, U8_MAX);
      checkInt('geometry.sectors', geometry.sectors, 0, U8_MAX);
    }
    const t = options.topology ?? {};
    const hinted: HintedTopology = backend.blockSize
      ? topologyFromHints(backend.blockSize, this.blockSize)
      : { physicalBlockExp: 0, minIoSize: 0, optIoSize: 0 };
    const topology: BlkTopology = {
      physicalBlockExp: t.physicalBlockExp ?? hinted.physicalBlockExp,
      alignmentOffset: t.alignmentOffset ?? 0,
      minIoSize: t.minIoSize ?? hinted.minIoSize,
      optIoSize: t.optIoSize ?? hinted.optIoSize,
    };
    checkInt('topology.physicalBlockExp', topology.physicalBlockExp, 0, U8_MAX);
    checkInt('topology.alignmentOffset', topology.alignmentOffset, 0, U8_MAX);
    checkInt('topology.minIoSize', topology.minIoSize, 0, U16_MAX);
    checkInt('topology.optIoSize', topology.optIoSize, 0, U32_MAX);

    const writable = !this.readOnly;
    const flush = backend.canFlush;
    const discard = writable && backend.canDiscard && options.discard !== false;
    const writeZeroes = writable && backend.canWriteZeroes && options.writeZeroes !== false;
    const secureErase = writable && backend.canDiscard && backend.canWriteZeroes && options.secureErase !== false;
    const discardLimits = rangeLimits('discard', options.discard, sectorsPerBlock);
    const writeZeroesLimits = rangeLimits('writeZeroes', options.writeZeroes, sectorsPerBlock);
    const secureEraseLimits = rangeLimits('secureErase', options.secureErase, sectorsPerBlock);
    this.initialWriteback = (options.cache ?? 'writeback') === 'writeback' ? 1 : 0;
    this.onWritebackChange = options.onWritebackChange ?? null;
    this.engine = new Engine(served, this.blockSize, this.readOnly, flush, encodeSerial(options.serial ?? ''),
      discardLimits, writeZeroesLimits, secureEraseLimits, segMax + REQUEST_FRAMING_DESCRIPTORS,
      options.sizeMax ?? U32_MAX, options.onBackendError ?? null);
    this.onLimitExceeded = options.onLimitExceeded ?? null;

    const bits: number[] = [
      VIRTIO_F.VERSION_1, VIRTIO_F.RING_INDIRECT_DESC, VIRTIO_F.RING_EVENT_IDX,
      VIRTIO_BLK_F.SEG_MAX, VIRTIO_BLK_F.BLK_SIZE, VIRTIO_BLK_F.TOPOLOGY,
    ];
    if (options.sizeMax !== undefined) bits.push(VIRTIO_BLK_F.SIZE_MAX);
    if (geometry) bits.push(VIRTIO_BLK_F.GEOMETRY);
    if (this.readOnly) bits.push(VIRTIO_BLK_F.RO);
    // 5.2.5.2: "Devices SHOULD always offer VIRTIO_BLK_F_FLUSH, and MUST offer it if they
    // offer VIRTIO_BLK_F_CONFIG_WCE" — both follow what the backend can do.
    if (flush) bits.push(VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.CONFIG_WCE);
    if (this.numQueues > 1) bits.push(VIRTIO_BLK_F.MQ);
    if (discard) bits.push(VIRTIO_BLK_F.DISCARD);
    if (writeZeroes) bits.push(VIRTIO_BLK_F.WRITE_ZEROES);
    if (secureErase) bits.push(VIRTIO_BLK_F.SECURE_ERASE);
    this.deviceFeatures = features(...bits);

    const off: RangeLimits = { maxSectors: 0, maxSegments: 0 };
    const dl = discard ? discardLimits : off;
    const wl = writeZeroes ? writeZeroesLimits : off;
    const sl = secureErase ? secureEraseLimits : off;
    this.config = encodeBlkConfig({
      capacity: this.engine.capacitySectors,
      sizeMax: options.sizeMax ?? 0,
      segMax,
      geometry: geometry ?? { cylinders: 0, heads: 0, sectors: 0 },
      blkSize: this.blockSize,
      topology,
      writeback: this.initialWriteback,
      numQueues: this.numQueues,
      maxDiscardSectors: dl.maxSectors,
      maxDiscardSeg: dl.maxSegments,
      // Alignment hints in sectors: one logical block, the unit every range must use.
      discardSectorAlignment: discard ? sectorsPerBlock : 0,
      maxWriteZeroesSectors: wl.maxSectors,
      maxWriteZeroesSeg: wl.maxSegments,
      // Write-zeroes with unmap deallocates exactly when the backend can discard.
      writeZeroesMayUnmap: writeZeroes && backend.canDiscard ? 1 : 0,
      maxSecureEraseSectors: sl.maxSectors,
      maxSecureEraseSeg: sl.maxSegments,
      secureEraseSectorAlignment: secureErase ? sectorsPerBlock : 0,
    });
    this.configView = new DataView(this.config.buffer, this.config.byteOffset, this.config.byteLength);
    this.runners = new Array<QueueRunner | null>(this.numQueues).fill(null);
    const clock = options.statsClock;
    this.stats = clock ? Array.from({ length: this.numQueues }, () => new QueueStats(clock)) : null;
    this.setDriverFeatures(0n);
  }

  /** Disk size in 512-byte sectors, as the config space reports it. */
  get capacity(): number {
    return this.engine.capacitySectors;
  }

  /** The cache mode in force: 1 writeback, 0 writethrough (the `writeback` field). */
  get writeback(): number {
    return this.config[CFG.writeback.offset];
  }

  attach(host: DeviceHost): void {
    this.host = host;
  }

  readConfig(offset: number, length: number): Uint8Array {
    if (!Number.isSafeInteger(length) || length < 0) return new Uint8Array(0);
    const out = new Uint8Array(length);
    if (Number.isSafeInteger(offset) && offset >= 0 && offset < this.config.length) {
      out.set(this.config.subarray(offset, Math.min(this.config.length, offset + length)));
    }
    return out;
  }

  /**
   * Only `writeback` is writable, and only with CONFIG_WCE negotiated (5.2.5): a write
   * covering it sets the cache mode to 0 or 1; any other value, and every other byte,
   * is ignored.
   */
  writeConfig(offset: number, data: Uint8Array): void {
    if (!hasFeature(this.driverFeatures, VIRTIO_BLK_F.CONFIG_WCE) || !Number.isSafeInteger(offset)) return;
    const at = CFG.writeback.offset - offset;
    if (at < 0 || at >= data.length) return;
    const value = data[at];
    if (value !== 0 && value !== 1) return;
    this.setWriteback(value);
  }

  /**
   * The driver's copy of the config space is unknown (a vhost-user backend restarted
   * under a running guest, with nothing recorded): take writethrough, the one mode in
   * which no acknowledged write can be lost whatever the driver believes. A driver that
   * believes writeback still flushes; one that switches modes tells us.
   */
  assumeCautiousConfig(): void {
    this.setWriteback(0);
  }

  private setWriteback(value: 0 | 1): void {
    const changed = this.config[CFG.writeback.offset] !== value;
    this.config[CFG.writeback.offset] = value;
    this.updateCacheMode();
    if (changed) this.onWritebackChange?.(value);
  }

  setDriverFeatures(accepted: bigint): void {
    const f = accepted & this.deviceFeatures;
    this.driverFeatures = f;
    // 5.2.5.2: "If VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is not,
    // the device MUST initialize writeback to 0."
    // Otherwise writeback keeps what reset or the driver set: a vhost-user frontend
    // renegotiates features at every driver start but keeps its own copy of the config
    // space across guest resets and never reads it again (QEMU 7.2: config-record.ts),
    // so a guest that chose writethrough before a reboot still believes it after.
    const wceWithoutFlush = hasFeature(f, VIRTIO_BLK_F.CONFIG_WCE) && !hasFeature(f, VIRTIO_BLK_F.FLUSH);
    this.engine.discardOn = hasFeature(f, VIRTIO_BLK_F.DISCARD);
    this.engine.writeZeroesOn = hasFeature(f, VIRTIO_BLK_F.WRITE_ZEROES);
    this.engine.secureEraseOn = hasFeature(f, VIRTIO_BLK_F.SECURE_ERASE);
    if (wceWithoutFlush) this.setWriteback(0);
    else this.updateCacheMode();
  }

  /**
   * 5.2.6.2: a completed write is stable when FLUSH was offered but neither FLUSH nor
   * CONFIG_WCE negotiated (case 1), or CONFIG_WCE negotiated with writeback 0 (case 2).
   * Without FLUSH offered the backend has no volatile cache to flush.
   */
  private updateCacheMode(): void {
    const f = this.driverFeatures;
    const wce = hasFeature(f, VIRTIO_BLK_F.CONFIG_WCE);
    const flush = hasFeature(f, VIRTIO_BLK_F.FLUSH);
    this.engine.writethrough = this.engine.flushOffered && (wce ? this.writeback === 0 : !flush);
  }

  startQueue(index: number, queue: SplitDeviceQueue, notify: () => void): void {
    this.checkIndex(index);
    if (this.runners[index]) throw new UsageError('QUEUE_BUSY', `queue ${index} is already started; stop it first`);
    // A broken ring is reported once (2.1.2), then the queue stays stopped.
    const onLimitExceeded = this.onLimitExceeded;
    this.runners[index] = new QueueRunner(this.engine, queue, notify, (e) => this.host.needsReset(index, e),
      onLimitExceeded && ((message) => onLimitExceeded(index, message)), this.stats?.[index] ?? null);
  }

  queueNotify(index: number): void {
    // A kick for a queue that is not started (or does not exist) is ignored.
    const runner = Number.isInteger(index) ? this.runners[index] : undefined;
    if (runner) runner.drain();
  }

  async stopQueue(index: number): Promise<number> {
    this.checkIndex(index);
    const runner = this.runners[index];
    if (!runner) return 0;
    const next = await runner.stop();
    if (this.runners[index] === runner) this.runners[index] = null;
    return next;
  }

  async reset(): Promise<void> {
    await Promise.all(this.runners.map((r, i) => (r ? this.stopQueue(i) : 0)));
    this.setDriverFeatures(0n);
    this.setWriteback(this.initialWriteback);
  }

  /**
   * Grows the disk to `newSize` bytes (the backend must implement `resize`), updates
   * `capacity` and raises a configuration change notification (5.2.6.2: "The device MAY
   * change the content of the capacity field during operation of the device. When this
   * happens, the device SHOULD trigger a configuration change notification."). Throws
   * {@link UsageError} when the backend cannot resize or the size is not a multiple of
   * 512 at least the current size.
   */
  async resize(newSize: number): Promise<void> {
    const backend = this.engine.backend;
    if (!backend.resize) throw new UsageError('RESIZE_UNSUPPORTED', 'this backend cannot be resized');
    if (!Number.isSafeInteger(newSize) || newSize % VIRTIO_BLK_SECTOR_SIZE !== 0 || newSize < backend.size) {
      throw new UsageError('BAD_SIZE', `cannot resize a ${backend.size}-byte disk to ${newSize} bytes: the new size must be a multiple of 512, no smaller`);
    }
    await backend.resize(newSize);
    this.backendResized();
  }

  /**
   * Takes up the backend's size after someone else grew it — another device serving the
   * same backend (one disk on several vhost-user sockets) — and raises a configuration
   * change notification, as {@link resize} does.
   */
  backendResized(): void {
    this.engine.capacitySectors = this.engine.capacityOf(this.engine.backend.size);
    setU64(this.configView, CFG.capacity.offset, this.engine.capacitySectors);
    this.host.configChanged();
  }

  private checkIndex(index: number): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.numQueues) {
      throw new UsageError('BAD_QUEUE', `queue ${index} does not exist (the device has ${this.numQueues})`);
    }
  }
}

function rangeLimits(name: string, given: false | BlkRangeLimits | undefined, sectorsPerBlock: number): RangeLimits {
  const g = given || {};
  const maxSectors = g.maxSectors ?? DEFAULT_MAX_RANGE_SECTORS - (DEFAULT_MAX_RANGE_SECTORS % sectorsPerBlock);
  const maxSegments = g.maxSegments ?? MAX_RANGE_SEGMENTS;
  checkInt(`${name}.maxSectors`, maxSectors, sectorsPerBlock, U32_MAX);
  if (maxSectors % sectorsPerBlock !== 0) bad(`${name}.maxSectors ${maxSectors} is not a whole number of logical blocks`);
  checkInt(`${name}.maxSegments`, maxSegments, 1, MAX_RANGE_SEGMENTS);
  return { maxSectors, maxSegments };
}

/** The GET_ID answer: the serial NUL-padded to 20 bytes (no terminator at 20). */
function encodeSerial(serial: string): Uint8Array {
  if (serial.length > VIRTIO_BLK_ID_BYTES) bad(`serial "${serial}" is longer than ${VIRTIO_BLK_ID_BYTES} bytes`);
  const id = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  for (let i = 0; i < serial.length; i++) {
    const c = serial.charCodeAt(i);
    if (c < ASCII_FIRST_PRINTABLE || c > ASCII_LAST_PRINTABLE) bad(`serial "${serial}" is not printable ASCII`);
    id[i] = c;
  }
  return id;
}

function checkInt(name: string, value: number, min: number, max: number): void {
  if (!Number.isInteger(value) || value < min || value > max) bad(`${name} ${value} is not an integer from ${min} to ${max}`);
}

function bad(message: string): never {
  throw new UsageError('BAD_OPTION', message);
}
