/**
 * Pieces of the crash-consistency test (test/crash-consistency.test.ts): recognisable
 * sector contents, a ledger of what was written, acknowledged and flushed, and a writer
 * that drives a {@link BlkDriver} hard until the device under it dies.
 *
 * Every sector the writer writes holds a record naming its sector and the generation of
 * the write (a number no other write has), so the image can be read back after a crash
 * and each sector traced to exactly one write — or to none, if it is torn or stray.
 */
import type { BlkDriver } from '../../src/blk/driver.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../../src/spec/virtio-blk.js';
import type { Rng } from './fuzz-prng.js';

const SECTOR = VIRTIO_BLK_SECTOR_SIZE;
const MAGIC = 0x4b4c_4256; // "VBLK"
/** Record layout: magic, sector, generation, checksum of the rest, then filler. */
const HEADER = 16;

/** The record sector `sector` holds after the write of generation `gen` (0: the initial fill). */
export function sectorRecord(sector: number, gen: number, out = new Uint8Array(SECTOR), at = 0): Uint8Array {
  const v = new DataView(out.buffer, out.byteOffset + at, SECTOR);
  v.setUint32(0, MAGIC, true);
  v.setUint32(4, sector, true);
  v.setUint32(8, gen, true);
  // xorshift32 filler: different for every (sector, generation) pair.
  let x = (Math.imul(sector + 1, 0x9e37_79b1) ^ Math.imul(gen + 1, 0x85eb_ca6b)) >>> 0 || 1;
  for (let i = HEADER; i < SECTOR; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    v.setUint32(i, x >>> 0, true);
  }
  v.setUint32(12, checksum(out.subarray(at, at + SECTOR)), true);
  return out;
}

/** FNV-1a over the record minus its checksum field. */
function checksum(rec: Uint8Array): number {
  let h = 0x811c_9dc5;
  for (let i = 0; i < SECTOR; i++) {
    if (i >= 12 && i < HEADER) continue;
    h = Math.imul(h ^ rec[i], 0x0100_0193);
  }
  return h >>> 0;
}

/**
 * The generation of the write whose record `bytes` (one sector) is, or -1 when it is no
 * intact record of `sector` (torn, stray, or another sector's).
 */
export function recordGeneration(bytes: Uint8Array, sector: number): number {
  const v = new DataView(bytes.buffer, bytes.byteOffset, SECTOR);
  if (v.getUint32(0, true) !== MAGIC || v.getUint32(4, true) !== sector) return -1;
  const gen = v.getUint32(8, true);
  const want = sectorRecord(sector, gen);
  for (let i = 0; i < SECTOR; i++) if (want[i] !== bytes[i]) return -1;
  return gen;
}

/** One write as the ledger sees it; times are ledger sequence numbers, -1 for "never". */
interface WriteEntry {
  readonly gen: number;
  ack: number;
}

/** What {@link Ledger.check} found. */
export interface CheckResult {
  /** Sectors whose last write acknowledged before a completed flush was checked present (or overwritten by a later write). */
  readonly flushedChecked: number;
  readonly problems: string[];
}

/**
 * Per sector of the region: the content it started the round with, and every write
 * issued to it during the round, in order. Writes to one sector never overlap in time
 * (the writer waits for each to complete before the next), so "issued after" is an
 * order, and an acknowledged write can only be replaced by a later one.
 */
export class Ledger {
  private seq = 0;
  /** Generation each sector held when the round started (0: the initial fill). */
  private readonly baseline: Uint32Array;
  private writes: WriteEntry[][];
  /** Sequence number at which the latest flush that completed was issued; -1: none. */
  private flushedUpTo = -1;
  /** Acknowledged writes are stable at once (writethrough cache). */
  writethrough = false;
  /**
   * An acknowledged write survives a kill of the process even unflushed: true when the
   * device keeps no write cache of its own (a raw file: the page cache survives SIGKILL);
   * false for a format that holds metadata back until a flush (qcow2's L2 and refcount
   * caches), where only the durability contract applies.
   */
  ackedSurvivesKill = true;
  issued = 0;
  acked = 0;
  flushesDone = 0;

  constructor(readonly firstSector: number, readonly sectors: number) {
    this.baseline = new Uint32Array(sectors);
    this.writes = Array.from({ length: sectors }, () => []);
  }

  /** Records a write of generation `gen` to `count` sectors from `sector`; returns its acknowledger. */
  issueWrite(sector: number, count: number, gen: number): () => void {
    this.issued++;
    const entry: WriteEntry = { gen, ack: -1 };
    for (let s = sector; s < sector + count; s++) this.writes[s - this.firstSector].push(entry);
    return () => {
      entry.ack = this.seq++;
      this.acked++;
    };
  }

  /** Records a flush issued now; returns the function to call when it completes. */
  issueFlush(): () => void {
    const issuedAt = this.seq++;
    return () => {
      this.seq++;
      this.flushesDone++;
      this.flushedUpTo = Math.max(this.flushedUpTo, issuedAt);
    };
  }

  /**
   * Checks the region of `image` (the whole image file) after the device died, then makes
   * what it found the baseline of the next round.
   *
   * Two sets of acceptable contents per sector:
   * - what the VIRTIO durability contract allows (5.2.6.2): the last write acknowledged
   *   before a completed flush was issued (or the round's baseline), or any write issued
   *   after that one;
   * - what a process kill allows when, as in vblk, the device keeps no write cache of its
   *   own (the page cache survives SIGKILL): the last acknowledged write, or the one
   *   still in flight after it.
   */
  check(image: Uint8Array): CheckResult {
    const problems: string[] = [];
    let flushedChecked = 0;
    for (let i = 0; i < this.sectors; i++) {
      const sector = this.firstSector + i;
      const list = this.writes[i];
      let lastAcked = -1;
      let lastDurable = -1;
      for (let k = 0; k < list.length; k++) {
        if (list[k].ack < 0) continue;
        lastAcked = k;
        if (this.writethrough || list[k].ack < this.flushedUpTo) lastDurable = k;
      }
      const found = recordGeneration(image.subarray(sector * SECTOR, (sector + 1) * SECTOR), sector);
      const allowed = (from: number): boolean => {
        if (from < 0 && found === this.baseline[i]) return true;
        for (let k = Math.max(from, 0); k < list.length; k++) if (list[k].gen === found) return true;
        return false;
      };
      if (lastDurable >= 0) flushedChecked++;
      if (found < 0) {
        problems.push(`sector ${sector} holds no intact record of itself (torn or stray data)`);
      } else if (!allowed(lastDurable)) {
        problems.push(`sector ${sector} holds generation ${found}, but generation ${lastDurable >= 0 ? list[lastDurable].gen : this.baseline[i]} was flushed and nothing later was issued with ${found}`);
      } else if (this.ackedSurvivesKill && !allowed(lastAcked)) {
        problems.push(`sector ${sector} holds generation ${found}, older than the acknowledged generation ${list[lastAcked].gen}: an acknowledged write was lost when the process died`);
      }
      this.baseline[i] = Math.max(found, 0);
    }
    this.writes = Array.from({ length: this.sectors }, () => []);
    this.flushedUpTo = -1;
    return { flushedChecked, problems };
  }
}

/** What a round's writer does, and the moments a test may kill the device at. */
export interface WriterHooks {
  /** After the n-th flush of the round was submitted (n from 1). */
  onFlushIssued?(n: number): void;
  /** After the n-th flush of the round completed. */
  onFlushDone?(n: number): void;
  /** After the n-th write of the round was acknowledged. */
  onWriteAcked?(n: number): void;
}

const QUEUE_DEPTH = 8;
const MAX_WRITE_SECTORS = 16;
/** Flush after about this many acknowledged writes (and now and then at random). */
const WRITES_PER_FLUSH = 200;

/**
 * Writes random records to random sectors of the ledger's region, keeping
 * {@link QUEUE_DEPTH} requests in flight and a flush now and then, until told to stop or
 * until a request fails (the device died): after a failure it issues nothing more, so
 * a write that may still land can never be overtaken by a later one to the same sector.
 */
export class CrashWriter {
  private nextGen: number;
  private outstanding = 0;
  private stopping = false;
  private flushing = false;
  private ackedSinceFlush = 0;
  private flushes = 0;
  private flushesDone = 0;
  private writesAcked = 0;
  /** Sectors with a write in flight: no second write may overlap it. */
  private readonly busy: Uint8Array;
  private settled: () => void = () => {};
  /** The first request failure (the device died, or a request timed out). */
  failure: Error | null = null;

  constructor(
    private readonly driver: BlkDriver,
    private readonly ledger: Ledger,
    private readonly rng: Rng,
    firstGen: number,
    private readonly hooks: WriterHooks = {},
  ) {
    this.nextGen = firstGen;
    this.busy = new Uint8Array(ledger.sectors);
  }

  /** The next unused generation (for the next round's writer). */
  get generation(): number {
    return this.nextGen;
  }

  /** Runs until {@link stop} (or a failure), then until every request in flight settled. */
  run(): Promise<void> {
    return new Promise((resolve) => {
      this.settled = resolve;
      this.fill();
    });
  }

  /** Issues nothing more; {@link run} resolves once requests in flight settle. */
  stop(): void {
    this.stopping = true;
    if (this.outstanding === 0) this.settled();
  }

  private fill(): void {
    while (!this.stopping && this.failure === null && this.outstanding < QUEUE_DEPTH) {
      if (!this.flushing && (this.ackedSinceFlush >= WRITES_PER_FLUSH || this.rng.chance(0.01))) this.flush();
      else if (!this.write()) break;
    }
  }

  private write(): boolean {
    const ledger = this.ledger;
    const count = this.rng.range(1, MAX_WRITE_SECTORS);
    for (let attempt = 0; attempt < 8; attempt++) {
      const start = this.rng.below(ledger.sectors - count + 1);
      let free = true;
      for (let i = start; i < start + count && free; i++) free = this.busy[i] === 0;
      if (!free) continue;
      const gen = this.nextGen++;
      const sector = ledger.firstSector + start;
      const data = new Uint8Array(count * SECTOR);
      for (let i = 0; i < count; i++) sectorRecord(sector + i, gen, data, i * SECTOR);
      this.busy.fill(1, start, start + count);
      const acked = ledger.issueWrite(sector, count, gen);
      this.track(this.driver.write(sector, [data]), () => {
        acked();
        this.busy.fill(0, start, start + count);
        this.ackedSinceFlush++;
        this.hooks.onWriteAcked?.(++this.writesAcked);
      });
      return true;
    }
    return false;
  }

  private flush(): void {
    this.flushing = true;
    this.ackedSinceFlush = 0;
    const done = this.ledger.issueFlush();
    const promise = this.driver.flush();
    this.hooks.onFlushIssued?.(++this.flushes);
    this.track(promise, () => {
      done();
      this.flushing = false;
      this.hooks.onFlushDone?.(++this.flushesDone);
    });
  }

  private track(request: Promise<void>, onDone: () => void): void {
    this.outstanding++;
    request.then(onDone, (e: unknown) => {
      this.failure ??= e instanceof Error ? e : new Error(String(e));
    }).finally(() => {
      this.outstanding--;
      if (this.stopping || this.failure) {
        if (this.outstanding === 0) this.settled();
      } else {
        this.fill();
      }
    });
  }
}
