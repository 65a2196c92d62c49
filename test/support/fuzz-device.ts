/**
 * The virtio-blk device fuzzer (Firecracker / Cloud Hypervisor style): builds rings,
 * descriptor chains and requests that are mostly what a driver sends, corrupts them now
 * and then, runs a {@link BlkDevice} over a memory backend on them, and checks every
 * batch against a reference model (fuzz-model.ts) and a plain array standing for the disk.
 *
 * Oracles, for every batch:
 * - no exception escapes the device;
 * - the whole host buffer — guard bytes, holes between regions, rings, every buffer — is
 *   byte for byte what the model predicts: the status byte and data of each completed
 *   request in its device-writable buffers, nothing anywhere else (the used ring and
 *   avail_event, which are the device's to write, are checked field by field instead);
 * - each used element is the model's (head, length), so lengths never exceed the
 *   writable bytes; well-formed requests complete OK with the model disk's data, bad
 *   ones IOERR or UNSUPP, a bad ring makes the queue report NEEDS_RESET once, with the
 *   model's reason, and stops it;
 * - used-buffer notifications follow the suppression rules, and the device re-enables
 *   available-buffer notifications after draining;
 * - when a batch's last change to the disk was followed by a completed FLUSH (or was a
 *   writethrough write, or a secure erase), the backend's flushed image is the model disk;
 * - a driver's config-space writes change `writeback` only, as 5.2.5 allows, and the
 *   cache mode follows 5.2.6.2;
 * - a queue stopped right after a kick (as vhost-user's GET_VRING_BASE does) resolves only
 *   once its requests in flight completed, with the next available index as its base,
 *   and serves on when restarted from there;
 * - at the end of each epoch the backend holds exactly the model disk.
 *
 * A setup is one device (block size, size, read-only, queues, limits, cache mode, serial,
 * sync or holding backend, all random) served through several epochs (feature sets, ring
 * placements and sizes, starting indices near the u16 wrap), each a run of batches; a
 * holding backend completes requests later and out of order, and the driver may publish
 * more while some are in flight. A
 * batch whose chains write into memory that a later chain is read from (possible only
 * by corruption) has no single right answer: those get the safety oracles only, and the
 * disk model is re-read from the backend.
 */
import { BlkDevice, type BlkRangeLimits } from '../../src/blk/device.js';
import { MemoryBackend } from '../../src/backends/memory-backend.js';
import type { BackendResult, BlockBackend } from '../../src/backends/backend.js';
import {
  VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F, VIRTQ_DESC_SIZE, VIRTQ_USED_F_NO_NOTIFY, availEventOffset, availRingSize,
  contiguousRingLayout, usedEventOffset, usedRingSize, vringNeedEvent,
} from '../../src/spec/split-ring.js';
import {
  VIRTIO_BLK_CONFIG as CFG, VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_F, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T,
} from '../../src/spec/virtio-blk.js';
import { VIRTIO_F, hasFeature } from '../../src/spec/virtio.js';
import type { ChainError, ChainErrorCode } from '../../src/virtqueue/chain.js';
import type { DeviceHost } from '../../src/virtqueue/device.js';
import type { SplitQueueConfig } from '../../src/virtqueue/ring-views.js';
import { SplitDeviceQueue } from '../../src/virtqueue/split-device.js';
import { BatchAllocator, FuzzMemory, type HostRange } from './fuzz-memory.js';
import {
  gather, scatter, serveChain, statusOf, u16, u32, walkChain, type DiskModel, type QueueModel, type Served, type WalkedChain,
} from './fuzz-model.js';
import { Rng } from './fuzz-prng.js';
import { genRequest } from './fuzz-requests.js';

export interface FuzzOptions {
  /** Seed of the whole run: every setup's seed is drawn from it. */
  readonly seed: number;
  /** Cases (available chains the device processes) to run. */
  readonly iterations: number;
  /** Run only the setup with this seed (from a failure report), to reproduce it. */
  readonly setupSeed?: number;
  /** Stop after this many failures. Default 5. */
  readonly maxFailures?: number;
}

export interface FuzzFailure {
  readonly setupSeed: number;
  readonly epoch: number;
  readonly batch: number;
  readonly message: string;
}

export interface FuzzReport {
  readonly seed: number;
  cases: number;
  setups: number;
  epochs: number;
  batches: number;
  /** Batches whose backend completed out of order, later. */
  asyncBatches: number;
  /** Cases by outcome: ok, ioerr, unsupp, no-status, needs-reset:CODE, unchecked. */
  readonly outcomes: Record<string, number>;
  /** Batches by the corruption applied to them. */
  readonly corruptions: Record<string, number>;
  readonly failures: FuzzFailure[];
  elapsedMs: number;
}

/** Thrown inside a setup when an oracle fails; the setup stops there. */
class OracleFailure extends Error {}

const P_CORRUPT = 0.04;
const P_FLIPS = 0.02;
const P_ALIAS = 0.004;
const P_STOP = 0.03;
const CORRUPTIONS = [
  'next-out-of-range', 'loop', 'out-of-memory', 'head-out-of-range', 'avail-jump', 'indirect-nested',
  'indirect-with-next', 'indirect-bad-length', 'indirect-not-negotiated', 'readable-after-writable',
  'indirect-next-out-of-range', 'indirect-loop', 'indirect-out-of-memory',
] as const;
type Corruption = (typeof CORRUPTIONS)[number] | 'bit-flips' | 'alias';

const QUEUE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256];
const QUEUE_SIZE_WEIGHTS = [2, 5, 10, 15, 20, 20, 15, 8, 5];
/** Flag bits no split ring defines: a device ignores them. */
const JUNK_FLAGS = [0x8, 0x10, 0x80, 0x8000];
const U16 = 0x1_0000;
/** Bounds a setup whose random shape makes every batch empty (say, queues of size 1). */
const MAX_EPOCHS = 200;

/** Runs the fuzzer; resolves with the counts and any failures (it never throws for a device bug). */
export async function fuzzDevice(options: FuzzOptions): Promise<FuzzReport> {
  const report: FuzzReport = {
    seed: options.seed >>> 0, cases: 0, setups: 0, epochs: 0, batches: 0, asyncBatches: 0,
    outcomes: {}, corruptions: {}, failures: [], elapsedMs: 0,
  };
  const started = performance.now();
  const master = new Rng(options.seed);
  const mem = new FuzzMemory();
  const expected = new Uint8Array(mem.host.length);
  const maxFailures = options.maxFailures ?? 5;
  while (report.cases < options.iterations && report.failures.length < maxFailures) {
    const setupSeed = options.setupSeed ?? master.u32();
    const setup = new Setup(setupSeed, mem, expected, report);
    report.setups++;
    try {
      await setup.run(options.iterations - report.cases);
    } catch (e) {
      const message = e instanceof OracleFailure ? e.message : `fuzzer error: ${e instanceof Error ? e.stack : String(e)}`;
      report.failures.push({ setupSeed, epoch: setup.epoch, batch: setup.batch, message });
    }
    if (options.setupSeed !== undefined) break;
  }
  report.elapsedMs = performance.now() - started;
  return report;
}

/** The report as a few lines of text. */
export function formatReport(r: FuzzReport): string {
  const fmt = (rec: Record<string, number>): string => Object.entries(rec).sort().map(([k, v]) => `${k}=${v}`).join(' ') || '-';
  const lines = [
    `seed ${r.seed}: ${r.cases} cases in ${(r.elapsedMs / 1000).toFixed(1)} s ` +
      `(${r.setups} devices, ${r.epochs} epochs, ${r.batches} batches, ${r.asyncBatches} with out-of-order backend completions)`,
    `outcomes: ${fmt(r.outcomes)}`,
    `corrupted batches: ${fmt(r.corruptions)}`,
    `failures: ${r.failures.length}`,
  ];
  for (const f of r.failures) {
    lines.push(`FAIL setup ${f.setupSeed} (epoch ${f.epoch}, batch ${f.batch}); reproduce with --setup ${f.setupSeed}`, `  ${f.message.replace(/\n/g, '\n  ')}`);
  }
  return lines.join('\n');
}

/**
 * A memory backend that, when asked to, holds some operations until the fuzzer releases
 * them in random order, so requests complete out of order and later than they start.
 */
class FuzzBackend implements BlockBackend {
  readonly inner: MemoryBackend;
  readonly readOnly = false;
  readonly canFlush = true;
  readonly canDiscard = true;
  readonly canWriteZeroes = true;
  /** Hold operations (some of them) instead of running them at once. */
  deferring = false;
  readonly held: (() => void)[] = [];
  /** The disk as of the last flush: what survives a crash. */
  readonly durable: Uint8Array;

  constructor(size: number, private readonly rng: Rng) {
    this.inner = new MemoryBackend({ size });
    this.durable = new Uint8Array(size);
  }

  get size(): number {
    return this.inner.size;
  }

  read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.run(() => this.inner.read(offset, buffers));
  }
  write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.run(() => this.inner.write(offset, buffers));
  }
  flush(): BackendResult {
    return this.run(() => {
      this.inner.flush();
      this.inner.read(0, [this.durable]);
    });
  }
  discard(offset: number, length: number): BackendResult {
    return this.run(() => this.inner.discard(offset, length));
  }
  writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    return this.run(() => this.inner.writeZeroes(offset, length, unmap));
  }
  close(): void {
    this.inner.close();
  }

  private run(op: () => void): BackendResult {
    if (!this.deferring || this.rng.chance(0.3)) {
      op();
      return;
    }
    return new Promise<void>((resolve, reject) => {
      this.held.push(() => {
        try {
          op();
          resolve();
        } catch (e) {
          reject(e);
        }
      });
    });
  }
}

/** One queue of the current epoch, as the fuzzer (the driver) sees it. */
interface QueueState {
  readonly index: number;
  readonly size: number;
  readonly model: QueueModel;
  readonly config: SplitQueueConfig;
  /** The used-buffer notification callback the queue was started with. */
  readonly notify: () => void;
  readonly eventIdx: boolean;
  /** Guest address of the descriptor table. */
  readonly descAddr: number;
  /** avail.idx as last published. */
  availIdx: number;
  /** The used index the device has published (the model's). */
  usedIdx: number;
  /** The next available index the device will process (the model's). */
  nextAvail: number;
  broken: boolean;
  notifications: number;
}

/** Where a built chain's parts are, for the corruptions to find them. */
interface BuiltChain {
  readonly head: number;
  /** Host offset of its available ring entry. */
  readonly slotAt: number;
  /** Guest addresses of its data descriptors in chain order (ring ones, then table entries). */
  readonly dataDescs: { readonly addr: number; readonly write: boolean; readonly len: number }[];
  /** Guest addresses of its ring descriptors that chain with NEXT (the direct part). */
  readonly ringDescs: number[];
  readonly table: { readonly descAddr: number; readonly addr: number; readonly entries: number; readonly used: number[] } | null;
  readonly readablePieces: { readonly addr: number; readonly len: number }[];
}

/** What the model says one batch must do. */
interface Plan {
  readonly steps: { readonly walk: WalkedChain; readonly served: Served; readonly slotAt: number }[];
  readonly broken: ChainErrorCode | null;
  /** Bytes the device read for the chain that broke the queue. */
  readonly brokenReads: HostRange[];
  readonly brokenSlotAt: number;
}

class RecordingHost implements DeviceHost {
  readonly resets: { index: number; code: string }[] = [];
  configChanged(): void {}
  needsReset(index: number, reason: ChainError): void {
    this.resets.push({ index, code: reason.code });
  }
}

class Setup {
  epoch = 0;
  batch = 0;
  private readonly rng: Rng;
  private readonly alloc: BatchAllocator;
  private readonly backend: FuzzBackend;
  private readonly device: BlkDevice;
  private readonly host = new RecordingHost();
  private readonly backendErrors: string[] = [];
  private readonly asyncMode: boolean;
  private readonly diskBytes: Uint8Array;
  private readonly serial: string;
  private readonly readOnly: boolean;
  /** The `writeback` value the device starts from (its `cache` option). */
  private readonly initialWriteback: number;
  /** 5.2.6.2: writes must be stable when they complete (the model's view of the cache mode). */
  private writethrough = false;
  private disk!: DiskModel;
  private queues: QueueState[] = [];
  private forbidden: HostRange[] = [];
  /** The stopQueue of the current batch has resolved. */
  private stopped = false;

  constructor(
    seed: number,
    private readonly mem: FuzzMemory,
    private readonly expected: Uint8Array,
    private readonly report: FuzzReport,
  ) {
    const rng = new Rng(seed);
    this.rng = rng;
    this.alloc = new BatchAllocator(mem);
    mem.scramble(rng);
    const blockSize = rng.chance(0.7) ? 512 : 4096;
    const spb = blockSize / VIRTIO_BLK_SECTOR_SIZE;
    const size = rng.range(spb, 512) * VIRTIO_BLK_SECTOR_SIZE;
    this.backend = new FuzzBackend(size, rng);
    this.asyncMode = rng.chance(0.3);
    this.diskBytes = new Uint8Array(size);
    const limits = (): false | BlkRangeLimits | undefined => {
      if (rng.chance(0.1)) return false;
      if (rng.chance(0.5)) return undefined;
      return { maxSectors: spb * rng.range(1, 64), maxSegments: rng.range(1, 8) };
    };
    let serial = '';
    for (let n = rng.range(0, VIRTIO_BLK_ID_BYTES); n > 0; n--) serial += String.fromCharCode(rng.range(0x20, 0x7e));
    this.serial = serial;
    this.initialWriteback = rng.chance(0.5) ? 1 : 0;
    this.readOnly = rng.chance(0.1);
    this.device = new BlkDevice({
      backend: this.backend,
      blockSize,
      readOnly: this.readOnly,
      numQueues: rng.chance(0.3) ? 2 : 1,
      serial,
      cache: this.initialWriteback === 1 ? 'writeback' : 'writethrough',
      discard: limits(),
      writeZeroes: limits(),
      secureErase: limits(),
      onBackendError: (e) => this.backendErrors.push(e instanceof Error ? e.message : String(e)),
    });
    this.device.attach(this.host);
  }

  async run(budget: number): Promise<void> {
    const caseBudget = Math.min(budget, this.rng.range(200, 3000));
    const startCases = this.report.cases;
    for (let epochs = 0; this.report.cases - startCases < caseBudget && epochs < MAX_EPOCHS; epochs++) {
      this.epoch++;
      this.report.epochs++;
      this.startEpoch();
      const batches = this.rng.range(5, 60);
      for (let b = 0; b < batches && this.report.cases - startCases < caseBudget; b++) {
        const alive = this.queues.filter((q) => !q.broken);
        if (alive.length === 0) break;
        this.batch++;
        this.report.batches++;
        // Now and then kick a queue that broke: it must stay stopped and touch nothing.
        const dead = this.queues.filter((q) => q.broken);
        if (dead.length > 0 && this.rng.chance(0.2)) await this.kickBroken(this.rng.pick(dead));
        const ok = await this.runBatch(this.rng.pick(alive));
        if (!ok) break;
      }
      this.checkDisk();
      try {
        await this.device.reset();
      } catch (e) {
        throw new OracleFailure(`device.reset() threw: ${describe(e)}`);
      }
    }
  }

  /** Negotiates a random feature set and starts every queue on freshly placed rings. */
  private startEpoch(): void {
    const rng = this.rng;
    const dev = this.device;
    let features = 0n;
    for (let bit = 0; bit < 64; bit++) {
      if (hasFeature(dev.deviceFeatures, bit) && rng.chance(0.8)) features |= 1n << BigInt(bit);
    }
    dev.setDriverFeatures(features);
    const offered = (bit: number): boolean => hasFeature(dev.deviceFeatures, bit);
    const negotiated = (bit: number): boolean => hasFeature(features, bit);
    const cfg = (field: { offset: number; size: number }): number => {
      const b = dev.readConfig(field.offset, field.size);
      return field.size === 4 ? u32(b, 0) : b[0];
    };
    const range = (bit: number, sectors: { offset: number; size: number }, segs: { offset: number; size: number }) => ({
      negotiated: negotiated(bit), maxSectors: cfg(sectors), maxSegments: cfg(segs),
    });
    const spb = dev.blockSize / VIRTIO_BLK_SECTOR_SIZE;
    // Only whole logical blocks are exposed, in 512-byte sectors (5.2.4).
    const capacity = Math.floor(this.diskBytes.length / dev.blockSize) * spb;
    if (dev.capacity !== capacity) this.fail(`the device reports ${dev.capacity} sectors, expected ${capacity}`, () => '');
    // GET_ID answers the serial NUL-padded to 20 bytes (5.2.6).
    const id = new Uint8Array(VIRTIO_BLK_ID_BYTES);
    for (let k = 0; k < this.serial.length; k++) id[k] = this.serial.charCodeAt(k);
    this.disk = {
      bytes: this.diskBytes,
      capacitySectors: capacity,
      sectorsPerBlock: spb,
      readOnly: this.readOnly,
      flushOffered: offered(VIRTIO_BLK_F.FLUSH),
      id,
      discard: range(VIRTIO_BLK_F.DISCARD, CFG.max_discard_sectors, CFG.max_discard_seg),
      writeZeroes: range(VIRTIO_BLK_F.WRITE_ZEROES, CFG.max_write_zeroes_sectors, CFG.max_write_zeroes_seg),
      secureErase: range(VIRTIO_BLK_F.SECURE_ERASE, CFG.max_secure_erase_sectors, CFG.max_secure_erase_seg),
    };
    this.fuzzCacheMode(negotiated(VIRTIO_BLK_F.CONFIG_WCE), negotiated(VIRTIO_BLK_F.FLUSH), offered(VIRTIO_BLK_F.FLUSH));

    const eventIdx = negotiated(VIRTIO_F.RING_EVENT_IDX);
    const indirect = negotiated(VIRTIO_F.RING_INDIRECT_DESC);
    this.alloc.clearFixed();
    this.forbidden = [];
    this.queues = [];
    const r0 = this.mem.r0;
    let placeAt = rng.below(64) * VIRTQ_DESC_SIZE;
    for (let i = 0; i < dev.numQueues; i++) {
      const size = QUEUE_SIZES[rng.weighted(QUEUE_SIZE_WEIGHTS)];
      const layout = contiguousRingLayout(size);
      const base = r0.guest + placeAt;
      placeAt += Math.ceil(layout.total / VIRTQ_DESC_SIZE) * VIRTQ_DESC_SIZE + rng.below(8) * VIRTQ_DESC_SIZE;
      const config = { size, desc: base + layout.desc, avail: base + layout.avail, used: base + layout.used, eventIdx, indirect };
      this.alloc.reserve(base, layout.total);
      const model: QueueModel = {
        size, indirect,
        descAt: this.mem.hostOffset(config.desc), availAt: this.mem.hostOffset(config.avail), usedAt: this.mem.hostOffset(config.used),
      };
      this.forbidden.push({ at: model.availAt, len: availRingSize(size) }, { at: model.usedAt, len: usedRingSize(size) });
      // Start anywhere in the u16 index space, often just before it wraps.
      const start = rng.chance(0.3) ? U16 - rng.range(1, 32) : rng.below(U16);
      const host = this.mem.host;
      put16(host, model.availAt, 0);
      put16(host, model.availAt + 2, start);
      put16(host, model.usedAt, 0);
      put16(host, model.usedAt + 2, start);
      const queue = SplitDeviceQueue.create(this.mem.memory, config);
      if (!(queue instanceof SplitDeviceQueue)) throw new Error(`fuzzer bug: queue setup refused: ${queue.message}`);
      queue.nextAvail = start;
      const state: QueueState = {
        index: i, size, model, config, eventIdx, descAddr: config.desc,
        notify: () => {
          state.notifications++;
        },
        availIdx: start, usedIdx: start, nextAvail: start, broken: false, notifications: 0,
      };
      this.queues.push(state);
      this.call('startQueue', () => dev.startQueue(i, queue, state.notify));
    }
  }

  /**
   * Config-space writes from the driver, mostly to `writeback`, sometimes junk anywhere
   * (guest input: only writeback is writable, only with CONFIG_WCE, only 0 or 1; 5.2.5).
   * Checks the device's cache mode against the spec's rules and records it for the
   * durability oracle.
   */
  private fuzzCacheMode(wce: boolean, flush: boolean, flushOffered: boolean): void {
    const rng = this.rng;
    const dev = this.device;
    const at = CFG.writeback.offset;
    // 5.2.5.2: with CONFIG_WCE but not FLUSH negotiated, writeback starts at 0.
    let writeback = wce && !flush ? 0 : this.initialWriteback;
    const before = dev.readConfig(0, VIRTIO_BLK_CONFIG_SIZE);
    if (rng.chance(0.4)) {
      let offset: number = at;
      let data = Uint8Array.of(rng.chance(0.85) ? rng.below(2) : rng.range(2, 255));
      if (rng.chance(0.3)) {
        offset = rng.below(VIRTIO_BLK_CONFIG_SIZE + 8);
        data = new Uint8Array(rng.range(1, 16));
        rng.fill(data);
      }
      this.call('writeConfig', () => dev.writeConfig(offset, data));
      const v = data[at - offset];
      if (wce && at >= offset && at < offset + data.length && v <= 1) writeback = v;
    }
    const after = dev.readConfig(0, VIRTIO_BLK_CONFIG_SIZE);
    before[at] = writeback;
    if (Buffer.compare(before, after) !== 0) {
      this.fail(`config space after a driver write: ${Buffer.from(after).toString('hex')}, expected ${Buffer.from(before).toString('hex')}`, () => '');
    }
    // 5.2.6.2: writes are stable at completion when FLUSH was offered but neither FLUSH
    // nor CONFIG_WCE negotiated, or with CONFIG_WCE and writeback 0.
    this.writethrough = flushOffered && (wce ? writeback === 0 : !flush);
  }

  /** One batch on queue `q`. Returns false when the epoch must end (the ring state is unknown). */
  private async runBatch(q: QueueState): Promise<boolean> {
    this.stopped = false;
    let corruption = this.pickCorruption(q);
    const built = this.buildBatch(q, corruption);
    if (built.length === 0) return true;
    const flips = corruption === 'bit-flips' ? this.flipBits(built) : [];
    if (corruption === 'alias') this.alias(q, built);
    else if (corruption && corruption !== 'bit-flips') corruption = this.corrupt(q, built, corruption);
    if (corruption) this.report.corruptions[corruption] = (this.report.corruptions[corruption] ?? 0) + 1;
    this.setNotificationFields(q, built.length);

    let plan = this.plan(q);
    if (!this.isPredictable(plan) && flips.length > 0) {
      // These flips made chains write where later chains are read from; undo them and
      // keep the batch checkable.
      for (let k = flips.length - 1; k >= 0; k--) this.mem.host[flips[k].at] = flips[k].old;
      plan = this.plan(q);
    }
    if (!this.isPredictable(plan)) {
      await this.runUnchecked(q, built.length);
      return false;
    }
    const outOfOrder = this.asyncMode && this.isOrderFree(plan);
    if (outOfOrder) this.report.asyncBatches++;
    this.backend.deferring = outOfOrder;

    const expected = this.expected;
    expected.set(this.mem.host);
    const oldUsed = q.usedIdx;
    const mustBeDurable = this.apply(q, plan);
    const resetsBefore = this.host.resets.length;
    const notesBefore = q.notifications;
    const availIdxAt = q.model.availAt + 2;
    const finalIdx = u16(this.mem.host, availIdxAt);
    if (outOfOrder && corruption === null && built.length >= 2 && this.rng.chance(0.5)) {
      // A driver adds requests while earlier ones are in flight: publish the batch in two
      // parts, releasing some held backend operations in between.
      put16(this.mem.host, availIdxAt, (finalIdx - this.rng.range(1, built.length - 1)) & 0xffff);
      this.call('queueNotify', () => this.device.queueNotify(q.index));
      await this.pump(this.rng.below(4));
      put16(this.mem.host, availIdxAt, finalIdx);
    }
    this.call('queueNotify', () => this.device.queueNotify(q.index));
    // Now and then the transport stops the queue right after the kick (vhost-user
    // GET_VRING_BASE): it must wait for requests in flight, then report where to resume.
    const stopping = !plan.broken && this.rng.chance(P_STOP) ? this.device.stopQueue(q.index) : null;
    stopping?.then(() => {
      this.stopped = true;
    }, () => {});
    if (outOfOrder) await this.pump();
    if (stopping) await this.restartQueue(q, stopping);

    const n = plan.steps.length;
    this.report.cases += n + (plan.broken ? 1 : 0);
    for (const s of plan.steps) this.count(s.served.outcome);
    if (plan.broken) this.count(`needs-reset:${plan.broken}`);

    const context = (): string => this.describePlan(q, plan);
    if (this.backendErrors.length > 0) {
      this.fail(`the backend refused an operation the device should have validated: ${this.backendErrors.join('; ')}`, context);
    }
    const newResets = this.host.resets.slice(resetsBefore);
    if (plan.broken) {
      if (newResets.length !== 1 || newResets[0].index !== q.index || newResets[0].code !== plan.broken) {
        this.fail(`expected one NEEDS_RESET for queue ${q.index} (${plan.broken}), got ${JSON.stringify(newResets)}`, context);
      }
      q.broken = true;
    } else if (newResets.length > 0) {
      this.fail(`unexpected NEEDS_RESET ${JSON.stringify(newResets)}`, context);
    }
    if (outOfOrder) this.checkUsedSet(q, oldUsed, plan, context);
    this.checkRingWords(q, context);
    this.compareMemory(context);
    if (!outOfOrder && mustBeDurable && Buffer.compare(this.backend.durable, this.diskBytes) !== 0) {
      this.fail('completed writes are not durable after a completed FLUSH (or a writethrough write, or a secure erase)', context);
    }

    // Used-buffer notifications (2.7.7.2, 2.7.10).
    const notes = q.notifications - notesBefore;
    const host = this.mem.host;
    let want: number | 'some';
    if (n === 0) want = 0;
    else if (q.eventIdx) want = vringNeedEvent(u16(host, q.model.availAt + usedEventOffset(q.size)), (oldUsed + n) & 0xffff, oldUsed) ? 1 : 0;
    else if (u16(host, q.model.availAt) & VIRTQ_AVAIL_F_NO_INTERRUPT) want = 0;
    else want = outOfOrder ? 'some' : 1;
    if (want === 'some' ? notes < 1 : notes !== want) this.fail(`expected ${want} used-buffer notifications, got ${notes}`, context);
    return true;
  }

  /** Waits for a stopping queue, checks its vring base, and starts it again from there. */
  private async restartQueue(q: QueueState, stopping: Promise<number>): Promise<void> {
    let base: number;
    try {
      base = await stopping;
    } catch (e) {
      throw new OracleFailure(`stopQueue rejected: ${describe(e)}`);
    }
    if (base !== q.nextAvail) this.fail(`stopQueue returned vring base ${base}, expected ${q.nextAvail}`, () => '');
    const queue = SplitDeviceQueue.create(this.mem.memory, q.config);
    if (!(queue instanceof SplitDeviceQueue)) throw new Error(`fuzzer bug: queue setup refused: ${queue.message}`);
    queue.nextAvail = base;
    this.call('startQueue', () => this.device.startQueue(q.index, queue, q.notify));
  }

  /** A broken queue kicked again: nothing may change but its used flags word. */
  private async kickBroken(q: QueueState): Promise<void> {
    this.expected.set(this.mem.host);
    const resets = this.host.resets.length;
    const notes = q.notifications;
    this.call('queueNotify', () => this.device.queueNotify(q.index));
    if (this.asyncMode) await this.pump();
    const context = (): string => `kick of broken queue ${q.index}`;
    this.checkRingWords(q, context);
    this.compareMemory(context);
    if (this.host.resets.length !== resets) this.fail('a broken queue reported NEEDS_RESET again', context);
    if (q.notifications !== notes) this.fail('a broken queue notified', context);
  }

  /**
   * A batch without a single right answer (chains writing into later chains' metadata,
   * or into the rings): only the safety oracles, then the disk model is re-read.
   */
  private async runUnchecked(q: QueueState, built: number): Promise<void> {
    const expected = this.expected;
    expected.set(this.mem.host);
    this.backend.deferring = this.asyncMode;
    this.call('queueNotify', () => this.device.queueNotify(q.index));
    if (this.asyncMode) await this.pump();
    this.report.cases += built;
    this.count('unchecked', built);
    const host = this.mem.host;
    const regions = this.mem.regions;
    let from = 0;
    for (const r of regions) {
      this.compareRange(from, r.host, () => 'unchecked batch: a byte outside guest memory changed');
      from = r.host + r.size;
    }
    this.compareRange(from, host.length, () => 'unchecked batch: a byte outside guest memory changed');
    if (this.backendErrors.length > 0) {
      this.fail(`the backend refused an operation the device should have validated: ${this.backendErrors.join('; ')}`, () => 'unchecked batch');
    }
    // The ring state is unknown now: the epoch ends, and the model disk starts over from
    // what the backend holds.
    this.backend.inner.read(0, [this.diskBytes]);
  }

  private count(outcome: string, n = 1): void {
    this.report.outcomes[outcome] = (this.report.outcomes[outcome] ?? 0) + n;
  }

  private pickCorruption(q: QueueState): Corruption | null {
    const rng = this.rng;
    if (rng.chance(P_ALIAS)) return 'alias';
    if (rng.chance(P_FLIPS)) return 'bit-flips';
    if (!rng.chance(P_CORRUPT)) return null;
    const kinds = CORRUPTIONS.filter((k) => (k.startsWith('indirect-') ? (k === 'indirect-not-negotiated') !== q.model.indirect : true));
    return rng.pick(kinds);
  }

  /** Builds one batch of requests on `q` and publishes it. */
  private buildBatch(q: QueueState, corruption: Corruption | null): BuiltChain[] {
    const rng = this.rng;
    const mem = this.mem;
    const alloc = this.alloc;
    alloc.reset();
    const free = rng.shuffle(Array.from({ length: q.size }, (_, i) => i));
    const want = Math.min(q.size, [1, rng.range(2, 4), rng.range(5, 16)][rng.weighted([20, 40, 40])]);
    const forceIndirectAt = corruption === 'indirect-not-negotiated' ? rng.below(want) : -1;
    const chains: BuiltChain[] = [];
    const mask = q.size - 1;
    for (let j = 0; j < want; j++) {
      const shape = genRequest(rng, this.disk);
      const readCuts = rng.chance(0.3) ? [rng.range(1, 15)] : [];
      const writeCuts = rng.chance(0.5) ? [shape.writableLen - 1] : [];
      const data: { addr: number; len: number; flags: number; write: boolean }[] = [];
      const readablePieces: { addr: number; len: number }[] = [];
      let at = 0;
      let ok = true;
      for (const len of cut(rng, shape.readable.length, readCuts)) {
        const addr = alloc.alloc(rng, len);
        if (addr < 0) {
          ok = false;
          break;
        }
        mem.write(addr, shape.readable.subarray(at, at + len));
        at += len;
        data.push({ addr, len, flags: 0, write: false });
        readablePieces.push({ addr, len });
      }
      for (const len of ok ? cut(rng, shape.writableLen, writeCuts) : []) {
        const addr = alloc.alloc(rng, len);
        if (addr < 0) {
          ok = false;
          break;
        }
        data.push({ addr, len, flags: VIRTQ_DESC_F.WRITE, write: true });
      }
      if (!ok) break;
      if (data.length === 0 || rng.chance(0.02)) {
        // An empty descriptor: never dereferenced, so it may point anywhere below 2^53.
        const addr = rng.chance(0.5) ? mem.outsideAddress(rng, 1) % 2 ** 52 : alloc.alloc(rng, 0);
        const k = rng.below(data.length + 1);
        const write = k > 0 && data[k - 1].write;
        data.splice(k, 0, { addr: Math.max(0, addr), len: 0, flags: write ? VIRTQ_DESC_F.WRITE : 0, write });
      }
      if (rng.chance(0.02)) rng.pick(data).flags |= rng.pick(JUNK_FLAGS);

      const forceIndirect = j === forceIndirectAt;
      const useIndirect = forceIndirect || (q.model.indirect && (rng.chance(0.35) || data.length > free.length));
      if (useIndirect && free.length === 0) break;
      if (!useIndirect && data.length > free.length) break;
      // Some chains start with direct descriptors and end in a table (2.7.5.3.2 allows it).
      const direct = useIndirect ? (rng.chance(0.1) ? rng.below(Math.min(data.length, free.length)) : 0) : data.length;
      const ringDescs = free.splice(0, direct + (useIndirect ? 1 : 0));
      const ringAddr = (i: number): number => q.descAddr + i * VIRTQ_DESC_SIZE;
      const dataDescs: BuiltChain['dataDescs'][number][] = [];
      for (let k = 0; k < direct; k++) {
        const d = data[k];
        const last = k === ringDescs.length - 1;
        putDesc(mem, ringAddr(ringDescs[k]), d.addr, d.len, d.flags | (last ? 0 : VIRTQ_DESC_F.NEXT), last ? rng.below(U16) : ringDescs[k + 1]);
        dataDescs.push({ addr: ringAddr(ringDescs[k]), write: d.write, len: d.len });
      }
      let table: BuiltChain['table'] = null;
      if (useIndirect) {
        const inTable = data.slice(direct);
        const entries = inTable.length + (rng.chance(0.2) ? rng.range(1, 2) : 0);
        const tableAddr = alloc.alloc(rng, entries * VIRTQ_DESC_SIZE, rng.chance(0.7) ? VIRTQ_DESC_SIZE : 1);
        if (tableAddr < 0) {
          free.push(...ringDescs);
          break;
        }
        const bytes = new Uint8Array(entries * VIRTQ_DESC_SIZE);
        rng.fill(bytes);
        // The walk of a table starts at entry 0 (2.7.5.3.2); the rest may come in any order.
        const slots = [0, ...rng.shuffle(Array.from({ length: entries - 1 }, (_, i) => i + 1))].slice(0, inTable.length);
        for (let k = 0; k < inTable.length; k++) {
          const d = inTable[k];
          const last = k === inTable.length - 1;
          encodeDesc(bytes, slots[k] * VIRTQ_DESC_SIZE, d.addr, d.len, d.flags | (last ? 0 : VIRTQ_DESC_F.NEXT), last ? rng.below(U16) : slots[k + 1]);
          dataDescs.push({ addr: tableAddr + slots[k] * VIRTQ_DESC_SIZE, write: d.write, len: d.len });
        }
        mem.write(tableAddr, bytes);
        const descAddr = ringAddr(ringDescs[direct]);
        // WRITE on the descriptor of a table means nothing; a device ignores it (2.7.5.3.2).
        putDesc(mem, descAddr, tableAddr, entries * VIRTQ_DESC_SIZE, VIRTQ_DESC_F.INDIRECT | (rng.chance(0.1) ? VIRTQ_DESC_F.WRITE : 0), rng.below(U16));
        table = { descAddr, addr: tableAddr, entries, used: slots };
      }
      const slotAt = q.model.availAt + 4 + 2 * ((q.availIdx + j) & mask);
      put16(mem.host, slotAt, ringDescs[0]);
      chains.push({ head: ringDescs[0], slotAt, dataDescs, ringDescs: ringDescs.slice(0, direct).map(ringAddr), table, readablePieces });
    }
    q.availIdx = (q.availIdx + chains.length) & 0xffff;
    put16(mem.host, q.model.availAt + 2, q.availIdx);
    return chains;
  }

  /**
   * Applies one targeted corruption to a random chain of the batch (or to the ring);
   * returns the one applied (another when the batch offers no target for it).
   */
  private corrupt(q: QueueState, chains: BuiltChain[], kind: Corruption): Corruption {
    const rng = this.rng;
    const mem = this.mem;
    const c = rng.pick(chains);
    switch (kind) {
      case 'next-out-of-range': {
        const addr = c.ringDescs.length > 0 ? rng.pick(c.ringDescs) : c.table ? c.table.descAddr : q.descAddr + c.head * VIRTQ_DESC_SIZE;
        patchDesc(mem, addr, (d) => {
          d.flags = (d.flags | VIRTQ_DESC_F.NEXT) & ~VIRTQ_DESC_F.INDIRECT;
          // Exactly the queue size half the time: the off-by-one a walker gets wrong.
          d.next = rng.chance(0.5) ? q.size : rng.range(q.size, U16 - 1);
        });
        return kind;
      }
      case 'loop': {
        if (c.table || c.ringDescs.length === 0) return this.corrupt(q, chains, 'next-out-of-range');
        const last = c.ringDescs[c.ringDescs.length - 1];
        const target = (rng.pick(c.ringDescs) - q.descAddr) / VIRTQ_DESC_SIZE;
        patchDesc(mem, last, (d) => {
          d.flags |= VIRTQ_DESC_F.NEXT;
          d.next = target;
        });
        return kind;
      }
      case 'out-of-memory': {
        const d = c.dataDescs.length > 0 ? rng.pick(c.dataDescs) : null;
        const addr = d ? d.addr : q.descAddr + c.head * VIRTQ_DESC_SIZE;
        patchDesc(mem, addr, (x) => {
          if (x.len === 0) x.len = rng.range(1, 4096);
          [x.lo, x.hi] = halves(mem.outsideAddress(rng, x.len));
        });
        return kind;
      }
      case 'head-out-of-range':
        put16(mem.host, c.slotAt, rng.range(q.size, U16 - 1));
        return kind;
      case 'avail-jump':
        put16(mem.host, q.model.availAt + 2, (q.nextAvail + rng.range(q.size + 1, U16 - 1)) & 0xffff);
        return kind;
      case 'indirect-nested':
      case 'indirect-next-out-of-range':
      case 'indirect-loop': {
        const t = chains.find((x) => x.table)?.table;
        if (!t) return this.corrupt(q, chains, 'next-out-of-range');
        const slot = rng.pick(t.used);
        const lastSlot = t.used[t.used.length - 1];
        if (kind === 'indirect-nested') {
          patchDesc(mem, t.addr + slot * VIRTQ_DESC_SIZE, (d) => {
            d.flags |= VIRTQ_DESC_F.INDIRECT;
          });
        } else {
          patchDesc(mem, t.addr + lastSlot * VIRTQ_DESC_SIZE, (d) => {
            d.flags = (d.flags | VIRTQ_DESC_F.NEXT) & ~VIRTQ_DESC_F.INDIRECT;
            d.next = kind === 'indirect-loop' ? slot : rng.chance(0.5) ? t.entries : rng.range(t.entries, U16 - 1);
          });
        }
        return kind;
      }
      case 'indirect-with-next':
      case 'indirect-bad-length':
      case 'indirect-out-of-memory': {
        const t = chains.find((x) => x.table)?.table;
        if (!t) return this.corrupt(q, chains, 'next-out-of-range');
        patchDesc(mem, t.descAddr, (d) => {
          if (kind === 'indirect-with-next') {
            d.flags |= VIRTQ_DESC_F.NEXT;
            d.next = rng.below(q.size);
          } else if (kind === 'indirect-out-of-memory') {
            // Sometimes the largest table a u32 length can claim.
            if (rng.chance(0.3)) d.len = 0xffff_fff0;
            [d.lo, d.hi] = halves(mem.outsideAddress(rng, d.len));
          } else {
            d.len = rng.chance(0.3) ? 0 : d.len + (rng.chance(0.5) ? rng.range(1, 15) : -rng.range(1, 15));
          }
        });
        return kind;
      }
      case 'readable-after-writable': {
        const ds = c.dataDescs;
        const w = ds.findIndex((d) => d.write && d.len > 0);
        if (w < 0 || w === ds.length - 1) {
          // No writable byte before the end: make the first descriptor writable instead,
          // with a readable one after it.
          if (ds.length < 2 || ds[0].len === 0) return this.corrupt(q, chains, 'head-out-of-range');
          patchDesc(mem, ds[0].addr, (d) => {
            d.flags |= VIRTQ_DESC_F.WRITE;
          });
          patchDesc(mem, ds[ds.length - 1].addr, (d) => {
            d.flags &= ~VIRTQ_DESC_F.WRITE;
          });
          return kind;
        }
        patchDesc(mem, ds[rng.range(w + 1, ds.length - 1)].addr, (d) => {
          d.flags &= ~VIRTQ_DESC_F.WRITE;
        });
        return kind;
      }
      default:
        // 'indirect-not-negotiated' was built in; nothing more to do.
        return kind;
    }
  }

  /** Flips 1–4 random bits in the batch's metadata, headers or the avail ring. */
  private flipBits(chains: BuiltChain[]): { at: number; old: number }[] {
    const rng = this.rng;
    const mem = this.mem;
    const flips: { at: number; old: number }[] = [];
    for (let n = rng.range(1, 4); n > 0; n--) {
      const c = rng.pick(chains);
      let addr: number;
      let len: number;
      switch (rng.below(4)) {
        case 0:
          if (c.dataDescs.length === 0) continue;
          addr = rng.pick(c.dataDescs).addr;
          len = VIRTQ_DESC_SIZE;
          break;
        case 1:
          if (!c.table) continue;
          addr = c.table.descAddr;
          len = VIRTQ_DESC_SIZE;
          break;
        case 2: {
          if (c.readablePieces.length === 0) continue;
          const p = rng.pick(c.readablePieces);
          if (p.len === 0) continue;
          addr = p.addr;
          len = Math.min(p.len, 48);
          break;
        }
        default: {
          const at = c.slotAt + rng.below(2);
          flips.push({ at, old: mem.host[at] });
          mem.host[at] ^= 1 << rng.below(8);
          continue;
        }
      }
      const at = mem.hostOffset(addr + rng.below(len));
      if (at < 0) continue;
      flips.push({ at, old: mem.host[at] });
      mem.host[at] ^= 1 << rng.below(8);
    }
    return flips;
  }

  /** Points a writable buffer at the avail ring, or at a later chain's metadata or header. */
  private alias(q: QueueState, chains: BuiltChain[]): void {
    const rng = this.rng;
    const writer = rng.below(chains.length);
    const w = chains[writer].dataDescs.find((d) => d.write && d.len > 0);
    if (!w) return;
    const later = chains.slice(writer + 1);
    const targets: number[] = [this.mem.guestAddress(q.model.availAt)];
    for (const c of later) {
      targets.push(...c.dataDescs.map((d) => d.addr));
      targets.push(...c.readablePieces.filter((p) => p.len > 0).map((p) => p.addr));
    }
    const target = rng.pick(targets);
    const start = Math.max(this.mem.r0.guest, target - rng.below(Math.min(w.len, 64)));
    if (!this.mem.translate(start % 2 ** 32, Math.floor(start / 2 ** 32), w.len)) return;
    patchDesc(this.mem, w.addr, (d) => {
      [d.lo, d.hi] = halves(start);
    });
  }

  /** Random used_event / avail flags: the driver's notification wishes. */
  private setNotificationFields(q: QueueState, built: number): void {
    const rng = this.rng;
    const host = this.mem.host;
    if (q.eventIdx) {
      const v = rng.chance(0.5) ? q.usedIdx : rng.chance(0.5) ? q.usedIdx + rng.below(built + 1) : rng.below(U16);
      put16(host, q.model.availAt + usedEventOffset(q.size), v & 0xffff);
      // Flags mean nothing with EVENT_IDX; a driver may leave anything there.
      put16(host, q.model.availAt, rng.chance(0.1) ? rng.below(U16) : 0);
    } else {
      put16(host, q.model.availAt, rng.chance(0.25) ? VIRTQ_AVAIL_F_NO_INTERRUPT : 0);
    }
  }

  /** What the device must do with the chains now available on `q`. */
  private plan(q: QueueState): Plan {
    const host = this.mem.host;
    const steps: Plan['steps'][number][] = [];
    const avail = u16(host, q.model.availAt + 2);
    const pending = (avail - q.nextAvail) & 0xffff;
    const availIdxAt = { at: q.model.availAt + 2, len: 2 };
    // 2.7.13.3: the driver never makes more than the queue size available at once.
    if (pending > q.size) return { steps, broken: 'AVAIL_INDEX_JUMP', brokenReads: [], brokenSlotAt: availIdxAt.at };
    for (let k = 0; k < pending; k++) {
      const slotAt = q.model.availAt + 4 + 2 * ((q.nextAvail + k) & (q.size - 1));
      const head = u16(host, slotAt);
      if (head >= q.size) return { steps, broken: 'HEAD_OUT_OF_RANGE', brokenReads: [], brokenSlotAt: slotAt };
      const walk = walkChain(this.mem, q.model, head);
      if (!walk.ok) return { steps, broken: walk.code, brokenReads: [...walk.metadata, ...walk.readable], brokenSlotAt: slotAt };
      steps.push({ walk, served: serveChain(this.mem, walk, this.disk), slotAt });
    }
    return { steps, broken: null, brokenReads: [], brokenSlotAt: -1 };
  }

  /**
   * Whether the model's answer is the only right one: no chain writes into the rings or
   * into anything the device reads later in the batch (descriptors, tables, headers,
   * data, avail entries). A chain reads its own request before writing its buffers.
   */
  private isPredictable(plan: Plan): boolean {
    const steps = plan.steps;
    for (let k = 0; k < steps.length; k++) {
      const w = steps[k].walk.writable;
      if (overlaps(w, this.forbidden)) return false;
      for (let j = k + 1; j < steps.length; j++) {
        const s = steps[j];
        if (overlaps(w, s.walk.metadata) || overlaps(w, s.walk.readable)) return false;
      }
      if (plan.broken && overlaps(w, plan.brokenReads)) return false;
    }
    return true;
  }

  /**
   * Whether the batch's result is the same in any completion order: no two chains share
   * a buffer byte that one of them writes, and no two requests touch the same disk bytes
   * where one of them changes them.
   */
  private isOrderFree(plan: Plan): boolean {
    const steps = plan.steps;
    for (let k = 0; k < steps.length; k++) {
      for (let j = 0; j < steps.length; j++) {
        if (j === k) continue;
        const a = steps[k].walk;
        const b = steps[j].walk;
        if (overlaps(a.writable, b.writable) || overlaps(a.writable, b.readable) || overlaps(a.writable, b.metadata)) return false;
        if (j > k && diskConflict(steps[k].served, steps[j].served)) return false;
      }
    }
    return true;
  }

  /**
   * Applies the plan to the expected memory and the model disk, in processing order.
   * Returns whether the disk as it ends must be durable: its last change was followed by
   * a completed FLUSH, or was itself a writethrough write, or a secure erase (which vblk
   * flushes whatever the cache mode: erased data must not linger in a volatile cache).
   */
  private apply(q: QueueState, plan: Plan): boolean {
    const exp = this.expected;
    const disk = this.diskBytes;
    let durable = false;
    for (const { walk, served } of plan.steps) {
      if (served.outcome === 'ok') {
        if (served.type === VIRTIO_BLK_T.FLUSH || served.type === VIRTIO_BLK_T.SECURE_ERASE) durable = true;
        else if (served.effects.some((e) => e.kind === 'write' || e.kind === 'zero')) durable = this.writethrough;
      }
      for (const e of served.effects) {
        if (e.kind === 'read') scatter(exp, walk.writable, 0, disk.subarray(e.offset, e.offset + e.length));
        else if (e.kind === 'write') disk.set(e.bytes, e.offset);
        else if (e.kind === 'zero') disk.fill(0, e.offset, e.offset + e.length);
        else scatter(exp, walk.writable, 0, e.bytes);
      }
      if (served.outcome !== 'no-status') scatter(exp, walk.writable, walk.writableBytes - 1, Uint8Array.of(statusOf(served.outcome)));
      const slot = q.model.usedAt + 4 + 8 * (q.usedIdx & (q.size - 1));
      put32(exp, slot, walk.head);
      put32(exp, slot + 4, served.usedLen);
      q.usedIdx = (q.usedIdx + 1) & 0xffff;
    }
    put16(exp, q.model.usedAt + 2, q.usedIdx);
    q.nextAvail = (q.nextAvail + plan.steps.length + (plan.broken && plan.broken !== 'AVAIL_INDEX_JUMP' ? 1 : 0)) & 0xffff;
    return durable;
  }

  /**
   * Out-of-order completion: the used elements are the model's as a set. Copies the
   * device's order into the expected memory so the full comparison can go on.
   */
  private checkUsedSet(q: QueueState, oldUsed: number, plan: Plan, context: () => string): void {
    const host = this.mem.host;
    const exp = this.expected;
    const got: string[] = [];
    const want: string[] = [];
    for (let k = 0; k < plan.steps.length; k++) {
      const at = q.model.usedAt + 4 + 8 * ((oldUsed + k) & (q.size - 1));
      got.push(`${u32(host, at)}:${u32(host, at + 4)}`);
      want.push(`${u32(exp, at)}:${u32(exp, at + 4)}`);
      exp.set(host.subarray(at, at + 8), at);
    }
    got.sort();
    want.sort();
    if (got.join() !== want.join()) this.fail(`used elements ${got.join(' ')}, expected ${want.join(' ')}`, context);
  }

  /**
   * used.flags and avail_event, which the device writes to suppress notifications: after
   * a drain that did not break the queue the driver must be free to notify again.
   */
  private checkRingWords(q: QueueState, context: () => string): void {
    const host = this.mem.host;
    const exp = this.expected;
    const flagsAt = q.model.usedAt;
    const eventAt = q.model.usedAt + availEventOffset(q.size);
    const flags = u16(host, flagsAt);
    const event = u16(host, eventAt);
    if (!q.broken) {
      if (q.eventIdx && event !== q.nextAvail) this.fail(`avail_event is ${event}, expected ${q.nextAvail}`, context);
      if (!q.eventIdx && flags !== 0) this.fail(`used.flags left at ${flags} after the drain`, context);
    }
    if (q.eventIdx ? flags !== u16(exp, flagsAt) : flags > VIRTQ_USED_F_NO_NOTIFY) this.fail(`used.flags is ${flags}`, context);
    put16(exp, flagsAt, flags);
    put16(exp, eventAt, event);
  }

  /** The host buffer must equal the expected one, byte for byte. */
  private compareMemory(context: () => string): void {
    this.compareRange(0, this.mem.host.length, context);
  }

  private compareRange(from: number, to: number, context: () => string): void {
    const host = this.mem.host;
    const exp = this.expected;
    if (Buffer.compare(host.subarray(from, to), exp.subarray(from, to)) === 0) return;
    let i = from;
    while (host[i] === exp[i]) i++;
    const g = this.mem.guestAddress(i);
    const where = g < 0 ? `guard byte at host offset ${i}` : `guest 0x${g.toString(16)}`;
    this.fail(`memory differs at ${where}: 0x${host[i].toString(16)}, expected 0x${exp[i].toString(16)}`, context);
  }

  /** The backend must hold exactly the model disk. */
  private checkDisk(): void {
    const actual = new Uint8Array(this.diskBytes.length);
    this.backend.inner.read(0, [actual]);
    if (Buffer.compare(actual, this.diskBytes) !== 0) {
      let i = 0;
      while (actual[i] === this.diskBytes[i]) i++;
      this.fail(`the disk differs from the model at byte ${i} (sector ${Math.floor(i / VIRTIO_BLK_SECTOR_SIZE)})`, () => '');
    }
  }

  /** Releases held backend operations in random order until the device is idle (or `limit` of them). */
  private async pump(limit = Infinity): Promise<void> {
    const held = this.backend.held;
    for (let n = 0; ; n++) {
      await new Promise<void>((resolve) => setImmediate(resolve));
      if (this.stopped && held.length > 0) this.fail('stopQueue resolved while requests were still in flight', () => '');
      if (held.length === 0 || n >= limit) return;
      const [op] = held.splice(this.rng.below(held.length), 1);
      op();
    }
  }

  /** Runs a device entry point; an exception escaping it is a failure. */
  private call(what: string, fn: () => void): void {
    try {
      fn();
    } catch (e) {
      throw new OracleFailure(`exception escaped the device from ${what}: ${describe(e)}`);
    }
  }

  private fail(message: string, context: () => string): never {
    throw new OracleFailure(`${message}\n${context()}`);
  }

  private describePlan(q: QueueState, plan: Plan): string {
    const lines = [`queue ${q.index}: size ${q.size}, eventIdx ${q.eventIdx}, indirect ${q.model.indirect}; ` +
      `disk ${this.diskBytes.length} bytes, ${this.disk.sectorsPerBlock * VIRTIO_BLK_SECTOR_SIZE}-byte blocks, readOnly ${this.disk.readOnly}`];
    for (const s of plan.steps) {
      lines.push(`  head ${s.walk.head}: type ${s.served.type} -> ${s.served.outcome}, used len ${s.served.usedLen} ` +
        `(${s.walk.readableBytes} readable, ${s.walk.writableBytes} writable bytes)`);
    }
    if (plan.broken) lines.push(`  then ${plan.broken}`);
    return lines.join('\n');
  }
}

/** Stream lengths for `len` bytes cut at random places (plus `forced` cuts). */
function cut(rng: Rng, len: number, forced: number[]): number[] {
  if (len === 0) return [];
  const cuts = forced.filter((c) => c > 0 && c < len);
  const n = len < 2 ? 0 : [0, rng.range(1, 2), rng.range(3, 6)][rng.weighted([40, 40, 20])];
  for (let i = 0; i < n; i++) cuts.push(rng.range(1, len - 1));
  // Now and then an empty piece, at either end or in between.
  if (rng.chance(0.01)) cuts.push(rng.range(0, len));
  cuts.sort((a, b) => a - b);
  const out: number[] = [];
  let from = 0;
  for (const c of cuts) {
    out.push(c - from);
    from = c;
  }
  out.push(len - from);
  return out;
}

function halves(addr: number): [number, number] {
  return [addr % 0x1_0000_0000, Math.floor(addr / 0x1_0000_0000)];
}

function encodeDesc(b: Uint8Array, at: number, addr: number, len: number, flags: number, next: number): void {
  const [lo, hi] = halves(addr);
  put32(b, at, lo);
  put32(b, at + 4, hi);
  put32(b, at + 8, len);
  put16(b, at + 12, flags);
  put16(b, at + 14, next);
}

function putDesc(mem: FuzzMemory, addr: number, bufAddr: number, len: number, flags: number, next: number): void {
  const b = new Uint8Array(VIRTQ_DESC_SIZE);
  encodeDesc(b, 0, bufAddr, len, flags, next);
  mem.write(addr, b);
}

interface DescFields {
  lo: number;
  hi: number;
  len: number;
  flags: number;
  next: number;
}

/** Rewrites fields of the descriptor at guest address `addr`. */
function patchDesc(mem: FuzzMemory, addr: number, edit: (d: DescFields) => void): void {
  const ranges = mem.translate(addr % 2 ** 32, Math.floor(addr / 2 ** 32), VIRTQ_DESC_SIZE);
  if (!ranges) throw new Error(`fuzzer bug: descriptor at 0x${addr.toString(16)} is outside memory`);
  const b = gather(mem.host, ranges);
  const d: DescFields = { lo: u32(b, 0), hi: u32(b, 4), len: u32(b, 8), flags: u16(b, 12), next: u16(b, 14) };
  edit(d);
  put32(b, 0, d.lo);
  put32(b, 4, d.hi);
  put32(b, 8, d.len >>> 0);
  put16(b, 12, d.flags & 0xffff);
  put16(b, 14, d.next & 0xffff);
  mem.write(addr, b);
}

function put16(b: Uint8Array, at: number, v: number): void {
  b[at] = v;
  b[at + 1] = v >>> 8;
}

function put32(b: Uint8Array, at: number, v: number): void {
  b[at] = v;
  b[at + 1] = v >>> 8;
  b[at + 2] = v >>> 16;
  b[at + 3] = v >>> 24;
}

function overlaps(a: readonly HostRange[], b: readonly HostRange[]): boolean {
  for (const x of a) {
    for (const y of b) if (x.at < y.at + y.len && y.at < x.at + x.len) return true;
  }
  return false;
}

/** Whether two requests touch the same disk bytes, one of them changing them. */
function diskConflict(a: Served, b: Served): boolean {
  for (const x of a.effects) {
    for (const y of b.effects) {
      if (x.kind === 'id' || y.kind === 'id' || (x.kind === 'read' && y.kind === 'read')) continue;
      const xl = x.kind === 'write' ? x.bytes.length : x.length;
      const yl = y.kind === 'write' ? y.bytes.length : y.length;
      if (x.offset < y.offset + yl && y.offset < x.offset + xl) return true;
    }
  }
  return false;
}

function describe(e: unknown): string {
  return e instanceof Error ? (e.stack ?? e.message) : String(e);
}
