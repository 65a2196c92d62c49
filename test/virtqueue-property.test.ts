// Model-based property test of the split ring: a driver-side queue and a device-side
// queue over one guest memory, random chain shapes, random completion order, random ring
// sizes, with and without EVENT_IDX and indirect descriptors. Each side only acts when
// the other notified it (or its own re-check after re-enabling notifications says so),
// so a wrongly suppressed notification leaves buffers stranded and fails the property.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { GuestMemory } from '../src/memory/guest-memory.js';
import { DmaAllocator } from '../src/memory/dma-allocator.js';
import { contiguousRingLayout, VIRTQ_DESC_SIZE } from '../src/spec/split-ring.js';
import { SplitDeviceQueue } from '../src/virtqueue/split-device.js';
import { SplitDriverQueue, type Segment } from '../src/virtqueue/split-driver.js';
import { ChainError, type DescriptorChain } from '../src/virtqueue/chain.js';

interface Posted {
  id: number;
  out: Segment[];
  inp: Segment[];
  expectedLen: number;
}

interface Shape {
  readonly outLens: number[];
  readonly inLens: number[];
  /** Posted with addFramed (head, optional data either way, tail) rather than add. */
  readonly framed: boolean;
}

const length = fc.integer({ min: 1, max: 300 });
const chainShape: fc.Arbitrary<Shape> = fc.oneof(
  fc.record({
    outLens: fc.array(length, { maxLength: 3 }),
    inLens: fc.array(length, { maxLength: 3 }),
  }).filter((s) => s.outLens.length + s.inLens.length > 0).map((s) => ({ ...s, framed: false })),
  fc.record({ head: length, data: fc.integer({ min: 0, max: 300 }), dataWritable: fc.boolean(), tail: length }).map((f) => ({
    outLens: f.data > 0 && !f.dataWritable ? [f.head, f.data] : [f.head],
    inLens: f.data > 0 && f.dataWritable ? [f.data, f.tail] : [f.tail],
    framed: true,
  })),
);

const scenario = fc.record({
  sizeLog2: fc.integer({ min: 0, max: 6 }),
  // Exclusive memory: ring indices are read and published without atomics (ring-index.ts).
  exclusive: fc.boolean(),
  eventIdx: fc.boolean(),
  indirect: fc.boolean(),
  steps: fc.array(fc.oneof(
    fc.record({ kind: fc.constant('add' as const), chains: fc.array(chainShape, { minLength: 1, maxLength: 6 }) }),
    fc.record({ kind: fc.constant('device' as const), complete: fc.integer({ min: 0, max: 8 }), pick: fc.nat() }),
    fc.record({ kind: fc.constant('driver' as const) }),
    fc.record({ kind: fc.constant('deviceSleep' as const) }),
    // `delay`: the driver coalesces used-buffer notifications (EVENT_IDX used_event ahead).
    fc.record({ kind: fc.constant('driverSleep' as const), delay: fc.integer({ min: 0, max: 8 }) }),
  ), { maxLength: 60 }),
});

test('every buffer comes back exactly once with the right length and bytes; no needed notification is suppressed', () => {
  fc.assert(fc.property(scenario, (sc) => {
    const size = 2 ** sc.sizeLog2;
    const base = 0x10_0000;
    const memory = new GuestMemory([{ guestAddress: base, bytes: new Uint8Array(1 << 20) }], { exclusive: sc.exclusive });
    const dma = new DmaAllocator(base, 1 << 20);
    const layout = contiguousRingLayout(size);
    const ring = dma.alloc(layout.total);
    const indirectEntries = 8;
    const table = dma.alloc(size * indirectEntries * VIRTQ_DESC_SIZE);
    const config = {
      size, desc: ring + layout.desc, avail: ring + layout.avail, used: ring + layout.used,
      eventIdx: sc.eventIdx, indirect: sc.indirect,
    };
    const driver = SplitDriverQueue.create<Posted>(memory, config, { addr: table, entries: indirectEntries });
    const device = SplitDeviceQueue.create(memory, config);
    assert.ok(driver instanceof SplitDriverQueue && device instanceof SplitDeviceQueue);

    let nextId = 0;
    // A side is awake from the other's notification until it re-enables notifications
    // and its re-check finds nothing; the steps in between may interleave with the other
    // side's, which is where a lost wake-up would hide.
    let deviceAwake = false;
    let driverAwake = false;
    const waiting: { shape: Shape }[] = [];
    const inDevice: { chain: DescriptorChain; }[] = [];
    const returned = new Map<number, number>();
    const posted: Posted[] = [];

    const tryAdd = (): void => {
      let added = false;
      while (waiting.length > 0) {
        const { shape } = waiting[0];
        if (!driver.canAdd(shape.outLens.length + shape.inLens.length)) break;
        waiting.shift();
        const id = nextId++;
        const seg = (len: number, fill: number): Segment => {
          const addr = dma.alloc(len);
          assert.ok(addr >= 0);
          memory.view(addr, len)!.fill(fill);
          return { addr, len };
        };
        const p: Posted = {
          id, out: shape.outLens.map((l) => seg(l, id & 0xff)), inp: shape.inLens.map((l) => seg(l, 0)), expectedLen: -1,
        };
        if (shape.framed) {
          const data = p.out.length === 2 ? p.out[1] : p.inp.length === 2 ? p.inp[0] : null;
          const tail = p.inp[p.inp.length - 1];
          assert.equal(driver.addFramed(p.out[0].addr, p.out[0].len, data?.addr ?? 0, data?.len ?? 0, p.inp.length === 2,
            tail.addr, tail.len, p), true);
        } else {
          assert.equal(driver.add(p.out, p.inp, p), true);
        }
        posted.push(p);
        added = true;
      }
      if (added && driver.kickPrepare()) deviceAwake = true;
    };

    const devicePoll = (): void => {
      if (!deviceAwake) return;
      device.disableNotifications();
      for (let c = device.pop(); c !== null; c = device.pop()) {
        assert.ok(!(c instanceof ChainError), `valid chain refused: ${String(c)}`);
        inDevice.push({ chain: c });
      }
    };
    const deviceSleep = (): void => {
      if (deviceAwake && !device.enableNotifications()) deviceAwake = false;
    };

    const deviceComplete = (count: number, pick: number): void => {
      let any = false;
      for (let k = 0; k < count && inDevice.length > 0; k++) {
        const [{ chain }] = inDevice.splice((pick + k) % inDevice.length, 1);
        const p = posted.find((x) => chain.readableBytes === x.out.reduce((n, s) => n + s.len, 0) &&
          chain.writableBytes === x.inp.reduce((n, s) => n + s.len, 0) && x.expectedLen === -1 &&
          chain.readable.every((v) => v.every((b) => b === (x.id & 0xff))))!;
        assert.ok(p, 'the device sees what the driver posted');
        // Write a pattern into part of the writable buffers.
        const len = Math.floor(chain.writableBytes / 2);
        let left = len;
        for (const w of chain.writable) {
          const n = Math.min(left, w.length);
          w.fill(0xee, 0, n);
          left -= n;
        }
        p.expectedLen = len;
        device.pushUsed(chain.head, len);
        any = true;
      }
      if (any && device.publishUsed()) driverAwake = true;
    };

    const driverPoll = (): void => {
      if (!driverAwake) return;
      {
        driver.disableInterrupts();
        for (let u = driver.getUsed(); u !== null; u = driver.getUsed()) {
          assert.ok(!('code' in u), `device broke the rules: ${String(u)}`);
          const { token, len } = u as { token: Posted; len: number };
          assert.equal(returned.has(token.id), false, 'returned once');
          assert.equal(len, token.expectedLen);
          let left = len;
          for (const s of token.inp) {
            const v = memory.view(s.addr, s.len)!;
            for (let i = 0; i < v.length; i++) assert.equal(v[i], i < left ? 0xee : 0);
            left = Math.max(0, left - s.len);
          }
          returned.set(token.id, len);
          for (const s of [...token.out, ...token.inp]) dma.release(s.addr);
        }
      }
      tryAdd();
    };
    const driverSleep = (delay = 0): void => {
      if (driverAwake && !driver.enableInterrupts(delay)) driverAwake = false;
    };

    for (const step of sc.steps) {
      if (step.kind === 'add') {
        for (const shape of step.chains) {
          // A chain longer than the ring can only go indirect.
          const n = shape.outLens.length + shape.inLens.length;
          if (n <= size || (sc.indirect && n <= indirectEntries)) waiting.push({ shape });
        }
        tryAdd();
      } else if (step.kind === 'device') {
        devicePoll();
        deviceComplete(step.complete, step.pick);
      } else if (step.kind === 'driver') {
        driverPoll();
      } else if (step.kind === 'deviceSleep') {
        deviceSleep();
      } else {
        driverSleep(step.delay);
      }
    }
    // Quiesce: both sides act only on notifications; stranded buffers mean a lost one.
    for (let rounds = 0; rounds < 10_000 && (waiting.length > 0 || returned.size < nextId); rounds++) {
      devicePoll();
      deviceComplete(inDevice.length, 0);
      deviceSleep();
      driverPoll();
      driverSleep();
    }
    assert.equal(waiting.length, 0, 'every request was posted');
    assert.equal(returned.size, nextId, 'every posted buffer came back');
    assert.equal(driver.numInFlight, 0);
    assert.equal(driver.numFree, size);
  }), { numRuns: 300 });
});
