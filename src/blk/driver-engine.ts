/**
 * The driver's queue engine: requests in, chains on rings, completions out. It picks a
 * queue, posts a chain (header, data through a bounce block or the caller's DMA buffer,
 * status byte) or keeps it in the queue's software FIFO while the ring is full (the
 * seed's stop/start of the request queue), batches kicks, reaps used rings with
 * coalesced notifications, settles requests, fails the ones past their timeout, and
 * holds requests while the disk has no queues (frozen, reconnecting). It never talks to
 * the device beyond the rings: bring-up and teardown of the device are the lifecycle's.
 */
import { UsageError } from '../errors.js';
import { VIRTIO_BLK_REQ_HEADER, VIRTIO_BLK_S, VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T } from '../spec/virtio-blk.js';
import type { DriverTransport } from '../virtqueue/device.js';
import { copyFromBuffers, copyToBuffers } from '../virtqueue/chain.js';
import { DriverQueueError, type Segment } from '../virtqueue/split-driver.js';
import { soon } from '../soon.js';
import { BouncePool, type DmaBlock } from './driver-dma.js';
import { QueueBrokenError, RequestError, TimeoutError, statusToError } from './driver-errors.js';
import { CHAIN_OVERHEAD_DESCS, type DiskLimits } from './driver-limits.js';
import type { BlkLogger, Completion, RequestOptions } from './driver-options.js';
import { QueueState, type Slot } from './driver-queue.js';
import { Req, SPARE_REQS, callBack, callBackSoon, describe } from './driver-request.js';

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

/**
 * What the engine does with a chain it is given: `post` it to its ring (running,
 * removing); `queue` it in the FIFO unposted (probing, freezing: the rings are about to
 * go); `hold` it aside until queues exist again (frozen, reconnecting).
 */
export type EngineMode = 'post' | 'queue' | 'hold';

export class RequestEngine {
  mode: EngineMode = 'queue';
  queues: QueueState[] = [];
  /** Queues the disk has; kept while it has none set up (frozen, reconnecting). */
  queueCount = 0;
  private nextQueue = 0;
  /** Ops accepted and not settled. */
  liveOps = 0;
  /** Chains on rings whose op is unsettled (timed-out and failed ops' chains are not counted). */
  liveChains = 0;
  /** Chunks in software FIFOs, all queues. */
  private pendingTotal = 0;
  /** Chunks held while there are no queues, in the order they are to go out. */
  private held: Req[] = [];
  private readonly waiters: { isDone: () => boolean; resolve: () => void }[] = [];
  /** A submitted request is being launched: its callback must not run yet (see settle). */
  private launching = false;
  private timer: ReturnType<typeof setTimeout> | null = null;
  /** Timeout sweeps so far. */
  private sweeps = 0;
  private readonly onTimer = (): void => this.expireTimedOut();
  /** Completed one-chain requests, reused by the next reads and writes (at most SPARE_REQS). */
  readonly spareReqs: Req[] = [];
  private readonly pool: BouncePool;

  constructor(
    private readonly name: string,
    private readonly transport: DriverTransport,
    private readonly limits: DiskLimits,
    private readonly logger: BlkLogger,
    private readonly timeoutMs: number,
  ) {
    this.pool = new BouncePool(transport.memory, transport.dma, Math.min(MAX_BOUNCE_CACHE, transport.dma.size / BOUNCE_CACHE_SHARE));
  }

  // ---- Taking requests -------------------------------------------------------------

  /**
   * The queue for a new request: the caller's, or the next healthy one round robin. While
   * there are no queues, the count they had is used, and they are re-checked when back.
   */
  pickQueue(options: RequestOptions | undefined): number | Error {
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

  /** Launches a prepared request (null: nothing to do; an Error: refused) and returns its promise. */
  promised(prepared: Req | Error | null): Promise<void> {
    if (prepared === null) return Promise.resolve();
    if (prepared instanceof Error) return Promise.reject(prepared);
    const promise = this.promiseOf(prepared);
    this.launch(prepared);
    return promise;
  }

  /**
   * Launches a prepared request (null: nothing to do; an Error: refused) that reports to
   * `done`. Here rather than in the caller: one call less on the hot path keeps V8's
   * inlining budget for the completion side (bench/ab.sh --backend null).
   */
  submitted(prepared: Req | Error | null, done: Completion): void {
    if (typeof done !== 'function') throw new UsageError('BAD_CALLBACK', `${this.name}: a submitted request needs a completion function`);
    if (prepared === null || prepared instanceof Error) {
      callBackSoon(done, prepared);
      return;
    }
    const root = prepared;
    root.done = done;
    // A request that fails while being launched (a broken queue, a freed buffer) must
    // not call back from inside the submit call: settle defers it meanwhile.
    this.launching = true;
    try {
      this.launch(root);
    } finally {
      this.launching = false;
    }
  }

  /** Tracks a prepared read or write and queues its chains: the first, then one per further maxChainBytes. */
  private launch(root: Req): void {
    const total = root.opBytes;
    const max = this.limits.maxChainBytes;
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

  /** Launches a request made of the given chains (the first is the root): flush, GET_ID, range requests. */
  launchChains(chains: readonly Req[], firstSector: number): Promise<void> {
    const root = chains[0];
    const promise = this.promiseOf(root);
    this.track(root, firstSector);
    root.remaining = chains.length;
    for (const c of chains) this.enqueue(c);
    return promise;
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

  settle(op: Req, error: Error | null): void {
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

  // ---- Software queue and posting ------------------------------------------------

  private enqueue(chunk: Req): void {
    const op = chunk.root ?? chunk;
    if (op.settled) return;
    const qs = this.queues[chunk.queue];
    if (qs === undefined || this.mode === 'hold') {
      this.held.push(chunk);
      return;
    }
    if (qs.broken) {
      this.settle(op, qs.broken);
      return;
    }
    if (this.mode !== 'post') {
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
    while (qs.pendingHead !== null && !qs.broken && this.mode === 'post') {
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
          this.settle(op, new RequestError('NO_DMA_MEMORY', `${describe(this.name, op)}: no DMA memory for ${chunk.length} bytes`));
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
      this.settle(op, new UsageError('BUFFER_FREED', `${describe(this.name, op)}: its DMA buffer was freed before the request was sent`));
      return true;
    }
    const length = chunk.length;
    const sizeMax = this.limits.sizeMax;
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

  /** Takes every completion the device published (it is gone: nothing will notify). */
  reapAll(): void {
    for (const qs of this.queues) this.reapQueue(qs);
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
      if (status !== VIRTIO_BLK_S.OK) error = statusToError(status, describe(this.name, op));
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
  breakQueue(qs: QueueState, cause: DriverQueueError<Slot>): void {
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
        this.settle(op, new TimeoutError(`${describe(this.name, op)} timed out after ${this.timeoutMs} ms`));
      }
    };
    for (const qs of this.queues) {
      for (const slot of qs.slots) if (slot.chunk) expire(slot.chunk);
      for (let c = qs.pendingHead; c !== null; c = c.next) expire(c);
    }
    for (const c of this.held) expire(c);
    for (const qs of this.queues) this.pump(qs);
    if (this.liveOps > 0) this.armTimer();
  }

  private armTimer(): void {
    this.timer = setTimeout(this.onTimer, Math.max(1, this.timeoutMs / TIMEOUT_SWEEPS));
  }

  stopTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  // ---- Quiescing -------------------------------------------------------------------

  /** Resolves once `isDone()` holds, checked whenever a request settles or a queue is reaped. */
  waitFor(isDone: () => boolean): Promise<void> {
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

  /** Fails every request held for queues to come back with `error`. */
  failHeld(error: Error): void {
    const held = this.held;
    this.held = [];
    for (const chunk of held) this.settle(chunk.root ?? chunk, error);
  }

  /** Sends every held request on the queues now set up (a queue that no longer exists hands its requests on). */
  releaseHeld(): void {
    const held = this.held;
    this.held = [];
    const n = this.queues.length;
    for (const chunk of held) {
      chunk.queue %= n;
      this.enqueue(chunk);
    }
  }

  /** Releases the bounce blocks kept for reuse (the disk is going away). */
  drainPool(): void {
    this.pool.drain();
  }

  // ---- Queues ------------------------------------------------------------------------

  /** Sets up queue `index` of `size` entries at the transport and adds it. */
  async addQueue(index: number, size: number, indirectEntries: number): Promise<void> {
    const state = await QueueState.create(this.name, this.transport, index, size, indirectEntries);
    state.reap = () => this.reapQueue(state);
    state.kick = () => this.kickQueue(state);
    this.queues.push(state);
  }

  /** The queues are all set up: `count` is how many the disk has from now on. */
  queuesReady(count: number): void {
    this.queueCount = count;
    this.nextQueue = 0;
  }

  /**
   * Stops the queues at the device, takes every chain back and releases their memory.
   * Chains of unsettled ops go back to the held list in their order when `resubmit`
   * (the device is gone and knows nothing of them); otherwise only chains of settled ops
   * can still be on the rings (callers wait for the rest).
   */
  async teardown(resubmit = false): Promise<void> {
    const queues = this.queues;
    for (const qs of queues) {
      qs.isLive = false;
      if (qs.lateReap !== null) clearTimeout(qs.lateReap);
      qs.lateReap = null;
    }
    await this.transport.teardownQueues();
    const fromRings: Req[] = [];
    for (const qs of queues) {
      qs.queue.detachAll();
      for (const slot of qs.slots) {
        if (slot.bounce !== null) this.pool.put(slot.bounce);
        slot.bounce = null;
        const chunk = slot.chunk;
        if (chunk === null) continue;
        // The device no longer uses the rings: a zero-copy buffer may be freed now.
        if (chunk.zc) chunk.zc.onRings--;
        slot.chunk = null;
        const op = chunk.root ?? chunk;
        if (resubmit && !op.settled) {
          op.inFlight--;
          this.liveChains--;
          fromRings.push(chunk);
        }
      }
    }
    // Posted chains went out before anything waiting in a FIFO: they go out first again.
    const waiting: Req[] = [];
    for (const qs of queues) {
      while (qs.pendingHead !== null) {
        waiting.push(qs.pendingHead);
        this.popPending(qs);
      }
      this.transport.dma.release(qs.headerArea);
    }
    this.held = [...fromRings, ...waiting, ...this.held];
    this.queues = [];
  }
}
