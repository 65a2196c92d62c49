/**
 * A hand-built driver side for the device tests: a guest memory, split rings driven by
 * `SplitDriverQueue`, and requests framed exactly as a test says (header, data and
 * status split any way, or malformed on purpose). Plus backends that record their calls
 * and can hold operations until a test releases them, in any order.
 */
import assert from 'node:assert/strict';
import { BlkDevice, type BlkDeviceOptions } from '../src/blk/device.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import type { BackendResult, BlockBackend } from '../src/backends/backend.js';
import { DmaAllocator } from '../src/memory/dma-allocator.js';
import { GuestMemory } from '../src/memory/guest-memory.js';
import { contiguousRingLayout, VIRTQ_DESC_SIZE } from '../src/spec/split-ring.js';
import { VIRTIO_BLK_DWZ_SEGMENT, VIRTIO_BLK_REQ_HEADER } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, hasFeature } from '../src/spec/virtio.js';
import type { ChainError } from '../src/virtqueue/chain.js';
import type { DeviceHost } from '../src/virtqueue/device.js';
import type { SplitQueueConfig } from '../src/virtqueue/ring-views.js';
import { SplitDeviceQueue } from '../src/virtqueue/split-device.js';
import { SplitDriverQueue, type Segment } from '../src/virtqueue/split-driver.js';

const MEMORY_BASE = 0x10_0000;
const INDIRECT_ENTRIES = 64;

/** A 16-byte request header (a bigint sector reaches every u64). */
export function header(type: number, sector: number | bigint = 0): Uint8Array {
  const h = new Uint8Array(VIRTIO_BLK_REQ_HEADER.size);
  const v = new DataView(h.buffer);
  v.setUint32(VIRTIO_BLK_REQ_HEADER.type, type, true);
  v.setBigUint64(VIRTIO_BLK_REQ_HEADER.sector, BigInt(sector), true);
  return h;
}

/** Discard / write-zeroes segments as bytes. */
export function segments(list: { sector: number; numSectors: number; flags?: number }[]): Uint8Array {
  const b = new Uint8Array(list.length * VIRTIO_BLK_DWZ_SEGMENT.size);
  const v = new DataView(b.buffer);
  list.forEach((s, i) => {
    const at = i * VIRTIO_BLK_DWZ_SEGMENT.size;
    v.setUint32(at + VIRTIO_BLK_DWZ_SEGMENT.sector, s.sector % 2 ** 32, true);
    v.setUint32(at + VIRTIO_BLK_DWZ_SEGMENT.sector + 4, Math.floor(s.sector / 2 ** 32), true);
    v.setUint32(at + VIRTIO_BLK_DWZ_SEGMENT.numSectors, s.numSectors, true);
    v.setUint32(at + VIRTIO_BLK_DWZ_SEGMENT.flags, s.flags ?? 0, true);
  });
  return b;
}

export function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Cuts `bytes` at the given offsets (sorted, inside the array) into pieces. */
export function cut(bytes: Uint8Array, at: number[]): Uint8Array[] {
  const pieces: Uint8Array[] = [];
  let from = 0;
  for (const a of at) {
    pieces.push(bytes.subarray(from, a));
    from = a;
  }
  pieces.push(bytes.subarray(from));
  return pieces;
}

export { pattern } from './support/pattern.js';

/** What came back for one request. */
export interface Completion {
  /** The used length the device reported. */
  readonly len: number;
  /** The last device-writable byte (the status), or -1 when the chain had none. */
  readonly status: number;
  /** The device-writable bytes before the status. */
  readonly data: Uint8Array;
}

/** A request as a test frames it: device-readable pieces, then device-writable lengths. */
export interface Framing {
  readonly readable: Uint8Array[];
  readonly writable: number[];
}

/** The usual framing: header, data pieces, status in their own descriptors. */
export function framed(type: number, sector: number | bigint, opts: { out?: Uint8Array; inLen?: number } = {}): Framing {
  const readable = [header(type, sector)];
  if (opts.out && opts.out.length > 0) readable.push(opts.out);
  const writable = opts.inLen ? [opts.inLen, 1] : [1];
  return { readable, writable };
}

interface DriverSide {
  readonly driver: SplitDriverQueue<number>;
  notifications: number;
  readonly done: Map<number, number>;
  readonly posted: Map<number, Segment[]>;
  readonly allocations: Map<number, number[]>;
}

export class RecordingHost implements DeviceHost {
  configChanges = 0;
  readonly resets: { index: number; reason: ChainError }[] = [];
  configChanged(): void {
    this.configChanges++;
  }
  needsReset(index: number, reason: ChainError): void {
    this.resets.push({ index, reason });
  }
}

export interface HarnessOptions {
  /** Driver features; default: everything the device offers. */
  readonly features?: bigint;
  /** Queues to start; default all of the device's. */
  readonly queues?: number;
  /** Queue size; default the device's maximum. */
  readonly queueSize?: number;
}

/** A driver side over one guest memory, talking to `device` directly (no transport). */
export class Harness {
  readonly memory: GuestMemory;
  readonly dma: DmaAllocator;
  readonly host = new RecordingHost();
  readonly sides: DriverSide[] = [];
  /** Where each queue's rings are, as handed to the device. */
  readonly queueConfigs: SplitQueueConfig[] = [];
  private nextToken = 1;

  constructor(readonly device: BlkDevice, options: HarnessOptions = {}) {
    const size = 16 * 1024 * 1024;
    this.memory = new GuestMemory([{ guestAddress: MEMORY_BASE, bytes: new Uint8Array(size) }]);
    this.dma = new DmaAllocator(MEMORY_BASE, size);
    const features = options.features ?? device.deviceFeatures;
    device.attach(this.host);
    device.setDriverFeatures(features);
    const queueSize = options.queueSize ?? device.maxQueueSize;
    const eventIdx = hasFeature(features, VIRTIO_F.RING_EVENT_IDX);
    const indirect = hasFeature(features, VIRTIO_F.RING_INDIRECT_DESC);
    for (let i = 0; i < (options.queues ?? device.numQueues); i++) {
      const layout = contiguousRingLayout(queueSize);
      const ring = this.dma.alloc(layout.total);
      const config = { size: queueSize, desc: ring + layout.desc, avail: ring + layout.avail, used: ring + layout.used, eventIdx, indirect };
      this.queueConfigs.push(config);
      const area = indirect ? { addr: this.dma.alloc(queueSize * INDIRECT_ENTRIES * VIRTQ_DESC_SIZE), entries: INDIRECT_ENTRIES } : null;
      const driver = SplitDriverQueue.create<number>(this.memory, config, area);
      const deviceQueue = SplitDeviceQueue.create(this.memory, config);
      assert.ok(driver instanceof SplitDriverQueue && deviceQueue instanceof SplitDeviceQueue);
      const side: DriverSide = { driver, notifications: 0, done: new Map(), posted: new Map(), allocations: new Map() };
      this.sides.push(side);
      device.startQueue(i, deviceQueue, () => {
        side.notifications++;
      });
    }
  }

  /** Guest address of `length` fresh bytes. */
  alloc(length: number): number {
    const addr = this.dma.alloc(Math.max(1, length));
    assert.ok(addr >= 0, 'harness memory exhausted');
    return addr;
  }

  /** Posts a request (not yet kicked); returns its token. */
  post(queue: number, f: Framing): number {
    const out: Segment[] = f.readable.map((bytes) => {
      const addr = this.alloc(bytes.length);
      assert.ok(this.memory.write(addr, bytes));
      return { addr, len: bytes.length };
    });
    const inp: Segment[] = f.writable.map((len) => {
      const addr = this.alloc(len);
      // Poison, so a test sees which bytes the device wrote.
      assert.ok(this.memory.write(addr, new Uint8Array(len).fill(0xee)));
      return { addr, len };
    });
    const token = this.nextToken++;
    const side = this.sides[queue];
    assert.ok(side.driver.add(out, inp, token), 'ring full');
    side.posted.set(token, inp);
    side.allocations.set(token, [...out, ...inp].map((s) => s.addr));
    return token;
  }

  /** Publishes posted requests and kicks the device when the ring says so. */
  kick(queue: number): void {
    if (this.sides[queue].driver.kickPrepare()) this.device.queueNotify(queue);
  }

  /** Reaps every used buffer published so far on `queue`. */
  reap(queue: number): number[] {
    const side = this.sides[queue];
    const tokens: number[] = [];
    for (;;) {
      const u = side.driver.getUsed();
      if (u === null) break;
      assert.ok(!(u instanceof Error), `driver queue broke: ${String(u)}`);
      side.done.set(u.token, u.len);
      tokens.push(u.token);
    }
    // Re-arm used-buffer notifications as a driver does after reaping (with EVENT_IDX
    // this moves used_event to the next completion).
    side.driver.enableInterrupts();
    return tokens;
  }

  /** What request `token` got back (it must have completed). */
  result(queue: number, token: number): Completion {
    const side = this.sides[queue];
    const len = side.done.get(token);
    assert.ok(len !== undefined, `request ${token} has not completed`);
    const inp = side.posted.get(token) ?? [];
    const bytes = concat(...inp.map((s) => {
      const b = new Uint8Array(s.len);
      assert.ok(this.memory.read(s.addr, b));
      return b;
    }));
    return { len, status: bytes.length > 0 ? bytes[bytes.length - 1] : -1, data: bytes.subarray(0, Math.max(0, bytes.length - 1)) };
  }

  /** Posts, kicks, waits for completion: the whole round trip of one request. */
  async run(queue: number, f: Framing): Promise<Completion> {
    const token = this.post(queue, f);
    this.kick(queue);
    await this.until(() => {
      this.reap(queue);
      return this.sides[queue].done.has(token);
    });
    const result = this.result(queue, token);
    this.free(queue, token);
    return result;
  }

  /** Returns a completed request's buffers to the allocator. */
  free(queue: number, token: number): void {
    const side = this.sides[queue];
    for (const addr of side.allocations.get(token) ?? []) this.dma.release(addr);
    side.allocations.delete(token);
    side.posted.delete(token);
  }

  /** Lets microtasks and I/O callbacks run until `done()` holds (for at most 10 s). */
  async until(done: () => boolean): Promise<void> {
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      if (done()) return;
      await new Promise((r) => setImmediate(r));
    }
    assert.fail('timed out waiting for the device');
  }
}

/** A device over a fresh memory backend (1 MiB unless said otherwise), with a harness. */
export function setup(
  device: Partial<BlkDeviceOptions> = {}, harness: HarnessOptions = {},
): { h: Harness; device: BlkDevice; backend: BlockBackend } {
  const backend = device.backend ?? new MemoryBackend({ size: 1 << 20 });
  const dev = new BlkDevice({ ...device, backend });
  return { h: new Harness(dev, harness), device: dev, backend };
}

/** One call a backend received. */
export type Call = [op: string, ...args: (number | boolean)[]];

interface Held {
  readonly call: Call;
  run(): void;
  fail(e: Error): void;
}

/**
 * A memory backend that records every call and, in `hold` mode, keeps each operation
 * pending until the test releases it (in any order) — to see completion order,
 * batching and durability ordering.
 */
export class RecordingBackend implements BlockBackend {
  readonly inner: MemoryBackend;
  readonly calls: Call[] = [];
  /** Events in the order they happened: "start:op" and "end:op". */
  readonly events: string[] = [];
  readonly held: Held[] = [];
  hold = false;
  /** Make the next call of this op throw (sync) or reject (held). */
  failNext: string | null = null;
  readonly canFlush = true;
  readonly canDiscard = true;
  readonly canWriteZeroes = true;
  /** Offer FUA writes (set before building the device); a FUA write is recorded as ['write', offset, bytes, true]. */
  canFua = false;

  constructor(size = 1 << 20, readonly readOnly = false) {
    this.inner = new MemoryBackend({ size });
  }

  get size(): number {
    return this.inner.size;
  }

  private do(call: Call, body: () => void): BackendResult {
    this.calls.push(call);
    const op = call[0];
    this.events.push(`start:${op}`);
    const failing = this.failNext === op;
    if (failing) this.failNext = null;
    if (!this.hold) {
      if (failing) throw new Error(`injected ${op} failure`);
      body();
      this.events.push(`end:${op}`);
      return;
    }
    return new Promise<void>((resolve, reject) => {
      this.held.push({
        call,
        run: () => {
          if (failing) {
            reject(new Error(`injected ${op} failure`));
            return;
          }
          body();
          this.events.push(`end:${op}`);
          resolve();
        },
        fail: reject,
      });
    });
  }

  /** Completes the held operation at `index` of {@link held} (removing it). */
  release(index = 0): Call {
    const [h] = this.held.splice(index, 1);
    assert.ok(h, `nothing held at ${index}`);
    h.run();
    return h.call;
  }

  releaseAll(): void {
    while (this.held.length > 0) this.release(0);
  }

  read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    const bytes = buffers.reduce((n, b) => n + b.length, 0);
    return this.do(['read', offset, bytes], () => this.inner.read(offset, buffers));
  }
  write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
    const bytes = buffers.reduce((n, b) => n + b.length, 0);
    // Copy now: guest buffers are only valid until completion, and the test may hold.
    const copy = buffers.map((b) => b.slice());
    return this.do(fua === true ? ['write', offset, bytes, true] : ['write', offset, bytes], () => this.inner.write(offset, copy));
  }
  flush(): BackendResult {
    return this.do(['flush'], () => this.inner.flush());
  }
  discard(offset: number, length: number): BackendResult {
    return this.do(['discard', offset, length], () => this.inner.discard(offset, length));
  }
  writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    return this.do(['writeZeroes', offset, length, unmap], () => this.inner.writeZeroes(offset, length, unmap));
  }
  resize(newSize: number): BackendResult {
    return this.do(['resize', newSize], () => this.inner.resize(newSize));
  }
  close(): void {
    this.inner.close();
  }
}
