/**
 * The copy-on-write filter: the guest writes into an overlay, and the base is never
 * written — serve a golden image to a throw-away guest, or a read-only image writable.
 *
 * The disk is cut into blocks of `granularity` bytes, each in one of three states, kept
 * in memory (a table that grows with the blocks written, never with the disk size):
 * - base: never written; reads come from the base;
 * - data: the whole block is in the overlay, at the same offset; reads come from there;
 * - zero: discarded or zeroed whole; reads are zeroes, and nothing is read.
 *
 * A write covering whole blocks goes to the overlay as it is. A write covering part of
 * a block not yet in the overlay copies the block up first: the block is read from the
 * base (or taken as zeroes), the new bytes laid over it, and the whole block written to
 * the overlay — so the overlay's own earlier contents are never read and any writable
 * backend can hold it, a fresh memory backend or a scratch file alike. Discard and
 * write-zeroes turn whole blocks to `zero` (and let the overlay free them) and zero
 * partial ones in the overlay.
 *
 * Concurrency: a block changing state (a copy-up, a first whole-block write, a discard)
 * is marked busy until the overlay has it; a later write, discard or write-zeroes that
 * touches a busy block waits for it, so two writes to different sectors of a block
 * never copy it up twice and lose one. Reads never wait: a block's state changes only
 * once the overlay holds what the new state promises.
 *
 * The block table lives in this process, so the overlay means nothing without it: the
 * filter's flush has nothing to make durable, and the guest's writes last as long as the
 * filter does. It cannot resize (that would change the base).
 */
import {
  BackendError, checkRange, totalLength, type BackendConcurrency, type BackendResult, type BlockBackend,
  type Extent, type ExtentKind,
} from '../backend.js';
import { MemoryBackend } from '../memory-backend.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../../spec/virtio-blk.js';
import { copyFromBuffers, sliceBuffers } from '../../virtqueue/chain.js';
import { FilterBackend } from './filter.js';

/** How the copy-on-write filter keeps its writes. */
export interface CowOptions {
  /**
   * Bytes per block: a power of two from 512 to {@link MAX_COW_GRANULARITY}. Smaller
   * blocks copy less on a first small write and cost more table. Default 64 KiB (qcow2's
   * default cluster).
   */
  readonly granularity?: number;
  /**
   * Where written blocks go: a writable backend at least as large as the base, whose
   * contents do not matter (they are never read before being written), or a function
   * that makes one of the size given — called once the base's size is known, which for
   * a base with an `open` step is at open. Default a memory backend. The filter owns
   * it: closing the filter closes it.
   */
  readonly overlay?: BlockBackend | ((size: number) => BlockBackend);
}

/** Default block: 64 KiB. */
export const DEFAULT_COW_GRANULARITY = 64 * 1024;
/** Largest block: 16 MiB (a copy-up holds one block in memory). */
export const MAX_COW_GRANULARITY = 16 * 1024 * 1024;

const BASE = 0;
const DATA = 1;
const ZERO = 2;
type BlockState = typeof BASE | typeof DATA | typeof ZERO;

/** Block states per page of the table. */
const STATES_PER_PAGE = 4096;
/** Most runs one `extents` call returns (the caller asks again from where they end). */
const MAX_EXTENT_RUNS = 1024;

/**
 * Block states by index, in pages allocated when a block first leaves `base`: a disk
 * written in one place costs one page, whatever its size.
 */
class StateTable {
  private readonly pages = new Map<number, Uint8Array>();

  get(block: number): BlockState {
    const page = this.pages.get(Math.floor(block / STATES_PER_PAGE));
    return page === undefined ? BASE : page[block % STATES_PER_PAGE] as BlockState;
  }

  set(block: number, state: BlockState): void {
    const p = Math.floor(block / STATES_PER_PAGE);
    let page = this.pages.get(p);
    if (page === undefined) {
      if (state === BASE) return;
      page = new Uint8Array(STATES_PER_PAGE);
      this.pages.set(p, page);
    }
    page[block % STATES_PER_PAGE] = state;
  }

  /** Sets every block of [first, last]. */
  setRange(first: number, last: number, state: BlockState): void {
    for (let b = first; b <= last; b++) this.set(b, state);
  }
}

/** Copy-on-write over a base that is never written; see the module comment. */
export class CowFilter extends FilterBackend {
  private readonly granularity: number;
  private overlayStore: BlockBackend | null = null;
  private readonly makeOverlay: (size: number) => BlockBackend;
  private readonly states = new StateTable();
  /** Blocks changing state, each with the promise that settles when it has. */
  private readonly busy = new Map<number, Promise<void>>();
  private closed = false;
  /** Zeroes for partial write-zeroes into an overlay that cannot write zeroes itself. */
  private zeroes: Uint8Array | null = null;

  /**
   * Throws `RangeError` for a bad granularity, {@link BackendError} `BAD_SIZE` for an
   * overlay smaller than the base and `READ_ONLY` for a read-only one — at open instead
   * when the base or the overlay has an open step.
   */
  constructor(base: BlockBackend, options: CowOptions = {}) {
    super(base);
    const g = options.granularity ?? DEFAULT_COW_GRANULARITY;
    if (!Number.isSafeInteger(g) || g < VIRTIO_BLK_SECTOR_SIZE || g > MAX_COW_GRANULARITY || (g & (g - 1)) !== 0) {
      throw new RangeError(`granularity ${g} is not a power of two from ${VIRTIO_BLK_SECTOR_SIZE} to ${MAX_COW_GRANULARITY}`);
    }
    this.granularity = g;
    const overlay = options.overlay;
    this.makeOverlay = typeof overlay === 'function' ? overlay : overlay ? () => overlay : (size) => new MemoryBackend({ size });
    // Never resized: that would change the base.
    this.resize = undefined;
    this.extents = (offset, length) => this.allocation(offset, length);
    // The overlay is made once the base's size is known: now, or after the base opens.
    // The filter has an open step when either side has one.
    if (base.open) this.open = () => this.openBoth(base);
    else {
      const made = this.makeOverlay(base.size);
      const open = made.open;
      if (open) this.open = () => this.openOverlay(made, open.call(made));
      else this.takeOverlay(made);
    }
  }

  override get readOnly(): boolean {
    return false;
  }

  /** Flush has nothing to do (see the module comment), but the guest gets an ordinary disk it may flush. */
  override get canFlush(): boolean {
    return true;
  }

  override get canDiscard(): boolean {
    return true;
  }

  override get canWriteZeroes(): boolean {
    return true;
  }

  /** Writes go to the throwaway overlay, never to the source: nothing for a FUA to make durable. */
  override get canFua(): boolean {
    return false;
  }

  /** Serial when either side is: the filter calls both, and may call one while a guest request waits on the other. */
  override get concurrency(): BackendConcurrency | undefined {
    return this.inner.concurrency === 'serial' || this.overlayStore?.concurrency === 'serial' ? 'serial' : this.inner.concurrency;
  }

  private get overlay(): BlockBackend {
    return this.overlayStore as BlockBackend;
  }

  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    const length = totalLength(buffers);
    this.check(offset, length);
    return this.readRuns(offset, offset + length, buffers, 0);
  }

  override write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    const length = totalLength(buffers);
    this.check(offset, length);
    return this.writeRuns(offset, offset + length, buffers, 0);
  }

  override flush(): BackendResult {
    this.check(0, 0);
  }

  override discard(offset: number, length: number): BackendResult {
    this.check(offset, length);
    return this.zero(offset, offset + length);
  }

  /** With or without unmap alike: a zero block holds nothing in the overlay either way. */
  override writeZeroes(offset: number, length: number, _unmap: boolean): BackendResult {
    this.check(offset, length);
    return this.zero(offset, offset + length);
  }

  override close(): BackendResult {
    this.closed = true;
    const overlay = this.overlayStore;
    const r = overlay === null ? undefined : overlay.close();
    if (r === undefined) return this.inner.close();
    return r.then(() => this.inner.close());
  }

  private async openBoth(base: BlockBackend): Promise<void> {
    await base.open?.();
    const overlay = this.makeOverlay(base.size);
    await overlay.open?.();
    this.takeOverlay(overlay);
  }

  private openOverlay(overlay: BlockBackend, opened: BackendResult): BackendResult {
    if (opened === undefined) return this.takeOverlay(overlay);
    return opened.then(() => this.takeOverlay(overlay));
  }

  /** Checks the overlay against the base, and uses it. */
  private takeOverlay(overlay: BlockBackend): void {
    const size = this.inner.size;
    if (overlay.readOnly) throw new BackendError('READ_ONLY', 'the copy-on-write overlay is read-only');
    if (overlay.size < size) {
      throw new BackendError('BAD_SIZE', `the copy-on-write overlay holds ${overlay.size} bytes, less than the base's ${size}`);
    }
    this.overlayStore = overlay;
  }

  private check(offset: number, length: number): void {
    if (this.closed) throw new BackendError('CLOSED', 'the copy-on-write filter is closed');
    checkRange(this.inner.size, offset, length);
  }

  // ---- reads ----------------------------------------------------------------------

  /**
   * Reads [pos, end) into `buffers` from byte `done` on: each run of blocks in one state
   * from where that state keeps it. Synchronous while the layers below are.
   */
  private readRuns(pos: number, end: number, buffers: readonly Uint8Array[], done: number): BackendResult {
    while (pos < end) {
      const state = this.states.get(Math.floor(pos / this.granularity));
      const runEnd = this.runEnd(pos, end, state);
      const n = runEnd - pos;
      const views = this.views(buffers, done, n);
      let r: BackendResult = undefined;
      if (state === BASE) r = this.inner.read(pos, views);
      else if (state === DATA) r = this.overlay.read(pos, views);
      else for (const v of views) v.fill(0);
      pos = runEnd;
      done += n;
      if (r !== undefined) {
        const p = pos;
        const d = done;
        return r.then(() => this.readRuns(p, end, buffers, d));
      }
    }
  }

  /** Where the run of blocks in `state` that holds `pos` ends, at most `end`. */
  private runEnd(pos: number, end: number, state: BlockState): number {
    const g = this.granularity;
    let next = (Math.floor(pos / g) + 1) * g;
    while (next < end && this.states.get(next / g) === state) next += g;
    return Math.min(next, end);
  }

  /** `n` bytes of `buffers` from byte `done`: the list itself when that is all of it (no allocation). */
  private views(buffers: readonly Uint8Array[], done: number, n: number): readonly Uint8Array[] {
    if (done === 0 && n === totalLength(buffers)) return buffers;
    return sliceBuffers(buffers, done, n) as Uint8Array[];
  }

  // ---- writes ---------------------------------------------------------------------

  /**
   * Writes [pos, end) from `buffers` (byte `done` on): whole blocks straight to the
   * overlay, a partial block into the overlay when it is there already, else by a
   * copy-up. One step at a time, so the layers below never see this request twice at
   * once; each step first waits for the blocks it touches to be settled.
   */
  private writeRuns(pos: number, end: number, buffers: readonly Uint8Array[], done: number): BackendResult {
    const g = this.granularity;
    while (pos < end) {
      const block = Math.floor(pos / g);
      const stop = this.stepEnd(pos, end);
      const wait = this.busyIn(pos, stop - pos);
      if (wait !== null) return wait.then(() => this.writeRuns(pos, end, buffers, done));
      let r: BackendResult;
      if (pos === block * g && stop - pos >= this.blockLength(block)) {
        r = this.writeWhole(pos, stop, this.views(buffers, done, stop - pos));
      } else if (this.states.get(block) === DATA) {
        r = this.overlay.write(pos, this.views(buffers, done, stop - pos));
      } else {
        const from = done;
        r = this.copyUp(block, pos, stop, (copy, at, n) => {
          copyFromBuffers(buffers, from, copy.subarray(at, at + n));
        });
      }
      done += stop - pos;
      pos = stop;
      if (r !== undefined) {
        const p = pos;
        const d = done;
        return r.then(() => this.writeRuns(p, end, buffers, d));
      }
    }
  }

  /**
   * Where the step of a write or zeroing from `pos` ends: after the whole blocks from
   * `pos` when it starts a block the request covers whole, else at the end of its block
   * (or of the request).
   */
  private stepEnd(pos: number, end: number): number {
    const g = this.granularity;
    const size = this.inner.size;
    const block = Math.floor(pos / g);
    const blockEnd = Math.min((block + 1) * g, size);
    if (pos !== block * g || end < blockEnd) return Math.min(end, blockEnd);
    // A request ending at the disk's end covers its last block whole, however short.
    return end === size ? size : Math.floor(end / g) * g;
  }

  /** Bytes in block `block`: the granularity, or less for the disk's last block. */
  private blockLength(block: number): number {
    return Math.min(this.granularity, this.inner.size - block * this.granularity);
  }

  /** Writes whole blocks [start, stop) to the overlay; they are `data` once it has them. */
  private writeWhole(start: number, stop: number, views: readonly Uint8Array[]): BackendResult {
    const g = this.granularity;
    const first = start / g;
    const last = Math.ceil(stop / g) - 1;
    const r = this.overlay.write(start, views);
    if (r === undefined) {
      this.states.setRange(first, last, DATA);
      return;
    }
    return this.hold(first, last, r.then(() => this.states.setRange(first, last, DATA)));
  }

  /**
   * Puts block `block` in the overlay with [from, to) replaced by what `fill` writes into
   * the copy (given the offset in the copy and the length): the rest comes from the
   * base, or is zeroes for a `zero` block.
   */
  private copyUp(block: number, from: number, to: number, fill: (copy: Uint8Array, at: number, n: number) => void): BackendResult {
    const start = block * this.granularity;
    const stop = Math.min(start + this.granularity, this.inner.size);
    // One allocation per block's life: a block is copied up once, then lives in the overlay.
    const copy = new Uint8Array(stop - start);
    const finish = (): BackendResult => {
      fill(copy, from - start, to - from);
      const w = this.overlay.write(start, [copy]);
      if (w === undefined) {
        this.states.set(block, DATA);
        return;
      }
      return w.then(() => this.states.set(block, DATA));
    };
    const r = this.states.get(block) === BASE ? this.inner.read(start, [copy]) : undefined;
    const f = r === undefined ? finish() : r.then(finish);
    return f === undefined ? f : this.hold(block, block, f);
  }

  // ---- discard and write-zeroes ---------------------------------------------------

  /** Makes [offset, offset + length) read as zeroes, a step at a time as {@link writeRuns}. */
  private zero(pos: number, end: number): BackendResult {
    const g = this.granularity;
    while (pos < end) {
      const block = Math.floor(pos / g);
      const stop = this.stepEnd(pos, end);
      const wait = this.busyIn(pos, stop - pos);
      if (wait !== null) return wait.then(() => this.zero(pos, end));
      let r: BackendResult = undefined;
      if (pos === block * g && stop - pos >= this.blockLength(block)) {
        r = this.zeroWhole(block, Math.ceil(stop / g) - 1, pos, stop);
      } else {
        const state = this.states.get(block);
        if (state === DATA) r = this.zeroInOverlay(pos, stop - pos);
        else if (state === BASE) r = this.copyUp(block, pos, stop, (copy, at, n) => copy.fill(0, at, at + n));
      }
      pos = stop;
      if (r !== undefined) {
        const p = pos;
        return r.then(() => this.zero(p, end));
      }
    }
  }

  /**
   * Blocks [first, last] become `zero` at once (reads stop looking anywhere); the
   * overlay frees them if it can, the blocks busy until it has.
   */
  private zeroWhole(first: number, last: number, start: number, stop: number): BackendResult {
    this.states.setRange(first, last, ZERO);
    if (!this.overlay.canDiscard) return;
    const r = this.overlay.discard(start, stop - start);
    return r === undefined ? r : this.hold(first, last, r);
  }

  /** Zeroes part of a block that lives in the overlay. */
  private zeroInOverlay(offset: number, length: number): BackendResult {
    if (this.overlay.canWriteZeroes) return this.overlay.writeZeroes(offset, length, false);
    this.zeroes ??= new Uint8Array(this.granularity);
    return this.overlay.write(offset, [this.zeroes.subarray(0, length)]);
  }

  // ---- busy blocks ----------------------------------------------------------------

  /** Marks blocks [first, last] busy until `p` settles; returns `p`. */
  private hold(first: number, last: number, p: Promise<void>): Promise<void> {
    const done = p.finally(() => {
      for (let b = first; b <= last; b++) if (this.busy.get(b) === done) this.busy.delete(b);
    });
    for (let b = first; b <= last; b++) this.busy.set(b, done);
    return done;
  }

  /** A promise that settles when every busy block touching the range has, or null when none is busy. */
  private busyIn(offset: number, length: number): Promise<unknown> | null {
    if (this.busy.size === 0 || length === 0) return null;
    const first = Math.floor(offset / this.granularity);
    const last = Math.floor((offset + length - 1) / this.granularity);
    const waits: Promise<void>[] = [];
    for (const [b, p] of this.busy) if (b >= first && b <= last && !waits.includes(p)) waits.push(p);
    return waits.length === 0 ? null : Promise.allSettled(waits);
  }

  // ---- allocation -----------------------------------------------------------------

  /**
   * `data` and `zero` blocks as such; a run of `base` blocks as the base reports it (and
   * the answer stops there, as the contract allows), or `data` when the base reports
   * nothing.
   */
  private allocation(offset: number, length: number): Extent[] | Promise<Extent[]> {
    this.check(offset, length);
    const runs: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end && runs.length < MAX_EXTENT_RUNS) {
      const state = this.states.get(Math.floor(pos / this.granularity));
      const stop = this.runEnd(pos, end, state);
      if (state === BASE && this.inner.extents) {
        const base = this.inner.extents(pos, stop - pos);
        if (base instanceof Promise) return base.then((more) => runs.concat(more));
        return runs.concat(base);
      }
      const kind: ExtentKind = state === ZERO ? 'zero' : 'data';
      const last = runs[runs.length - 1];
      if (last !== undefined && last.kind === kind) runs[runs.length - 1] = { length: last.length + stop - pos, kind };
      else runs.push({ length: stop - pos, kind });
      pos = stop;
    }
    return runs;
  }
}
