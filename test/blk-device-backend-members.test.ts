// The device and the optional members of BlockBackend: block size hints become the
// topology, an UNSUPPORTED backend error becomes UNSUPP, and a serial backend never sees
// two operations at once — whatever the load the driver puts on it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  BackendError, NO_MAXIMUM_BLOCK_SIZE, type BackendConcurrency, type BackendResult, type BlockBackend, type BlockSizeHints,
} from '../src/backends/backend.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { BlkDevice } from '../src/blk/device.js';
import { decodeBlkConfig, type BlkConfig } from '../src/blk/config.js';
import { IoError, NotSupportedError } from '../src/blk/driver-errors.js';
import { VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { openLoopbackDisk } from '../src/testing/loopback.js';
import { framed, pattern, setup } from './blk-device-harness.js';

const MiB = 1 << 20;

class HintedBackend extends MemoryBackend {
  constructor(readonly blockSize: BlockSizeHints) {
    super({ size: MiB });
  }
}

function config(d: BlkDevice): BlkConfig {
  const c = decodeBlkConfig(d.readConfig(0, VIRTIO_BLK_CONFIG_SIZE));
  assert.ok(!(c instanceof Error));
  return c;
}

test('block size hints become the topology', () => {
  const d = new BlkDevice({ backend: new HintedBackend({ minimum: 4096, preferred: 65536, maximum: MiB }) });
  assert.deepEqual(config(d).topology, { physicalBlockExp: 3, alignmentOffset: 0, minIoSize: 128, optIoSize: 2048 });
});

test('topology options win over the hints, field by field', () => {
  const d = new BlkDevice({
    backend: new HintedBackend({ minimum: 4096, preferred: 65536, maximum: NO_MAXIMUM_BLOCK_SIZE }),
    topology: { minIoSize: 8, alignmentOffset: 1 },
  });
  assert.deepEqual(config(d).topology, { physicalBlockExp: 3, alignmentOffset: 1, minIoSize: 8, optIoSize: 0 });
});

test('a backend without hints gives no topology hints', () => {
  const d = new BlkDevice({ backend: new MemoryBackend({ size: MiB }) });
  assert.deepEqual(config(d).topology, { physicalBlockExp: 0, alignmentOffset: 0, minIoSize: 0, optIoSize: 0 });
});

test('invalid hints are refused when the device is built', () => {
  assert.throws(() => new BlkDevice({ backend: new HintedBackend({ minimum: 3000, preferred: 4096, maximum: 4096 }) }),
    { code: 'BAD_BLOCK_SIZE_HINTS' });
});

test('the driver sees the hinted physical block and I/O sizes', async () => {
  const disk = await openLoopbackDisk(new HintedBackend({ minimum: 4096, preferred: 16384, maximum: 262144 }));
  try {
    assert.equal(disk.driver.physicalBlockSize, 4096);
    assert.equal(disk.driver.ioMin, 16384);
    assert.equal(disk.driver.ioOpt, 262144);
  } finally {
    await disk.close();
  }
});

/** A memory backend whose chosen operation fails with the given error, synchronously or not. */
class FailingBackend extends MemoryBackend {
  constructor(private readonly failing: string, private readonly error: Error, private readonly async: boolean) {
    super({ size: MiB });
  }
  private fail(op: string, run: () => void): BackendResult {
    if (op !== this.failing) return run();
    if (this.async) return Promise.reject(this.error);
    throw this.error;
  }
  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.fail('read', () => super.read(offset, buffers));
  }
  override flush(): BackendResult {
    return this.fail('flush', () => super.flush());
  }
}

for (const async of [false, true]) {
  const how = async ? 'rejected' : 'thrown';
  test(`a ${how} BackendError UNSUPPORTED completes the request with UNSUPP; any other error with IOERR`, async () => {
    for (const [error, status] of [
      [new BackendError('UNSUPPORTED', 'no'), VIRTIO_BLK_S.UNSUPP],
      [new BackendError('IO_ERROR', 'bad sector'), VIRTIO_BLK_S.IOERR],
      [new Error('anything'), VIRTIO_BLK_S.IOERR],
    ] as const) {
      const { h } = setup({ backend: new FailingBackend('read', error, async) });
      assert.equal((await h.run(0, framed(VIRTIO_BLK_T.IN, 0, { inLen: 512 }))).status, status, error.message);
    }
  });

  test(`a ${how} UNSUPPORTED flush completes the FLUSH with UNSUPP`, async () => {
    const { h } = setup({ backend: new FailingBackend('flush', new BackendError('UNSUPPORTED', 'no'), async) });
    assert.equal((await h.run(0, framed(VIRTIO_BLK_T.FLUSH, 0))).status, VIRTIO_BLK_S.UNSUPP);
  });
}

test('the driver reports UNSUPP as NotSupportedError and IOERR as IoError', async () => {
  for (const [error, type] of [[new BackendError('UNSUPPORTED', 'no'), NotSupportedError], [new Error('x'), IoError]] as const) {
    const disk = await openLoopbackDisk(new FailingBackend('read', error, true));
    try {
      await assert.rejects(disk.driver.read(0, [new Uint8Array(512)]), type);
    } finally {
      await disk.close();
    }
  }
});

/**
 * A memory backend that counts the operations in flight and records the most ever at
 * once. Each operation finishes after the number of event-loop turns the test draws
 * (0: synchronously).
 */
class OverlapProbe extends MemoryBackend {
  inFlight = 0;
  maxInFlight = 0;
  operations = 0;
  private nextDelay = 0;

  constructor(readonly concurrency: BackendConcurrency | undefined, private readonly delays: readonly number[]) {
    super({ size: MiB });
  }

  private run(body: () => void): BackendResult {
    this.operations++;
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    const turns = this.delays[this.nextDelay++ % this.delays.length];
    if (turns === 0) {
      try {
        body();
      } finally {
        this.inFlight--;
      }
      return;
    }
    return (async () => {
      for (let i = 0; i < turns; i++) await new Promise((r) => setImmediate(r));
      try {
        body();
      } finally {
        this.inFlight--;
      }
    })();
  }

  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.run(() => super.read(offset, buffers));
  }
  override write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    // Copied now: the guest's buffers are the device's until completion, and this runs later.
    const copy = buffers.map((b) => b.slice());
    return this.run(() => super.write(offset, copy));
  }
  override flush(): BackendResult {
    return this.run(() => super.flush());
  }
  override discard(offset: number, length: number): BackendResult {
    return this.run(() => super.discard(offset, length));
  }
  override writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    return this.run(() => super.writeZeroes(offset, length, unmap));
  }
}

type Op =
  | readonly ['read' | 'write', number, number, number]
  | readonly ['flush']
  | readonly ['discard' | 'zero' | 'erase', number, number];

const SECTORS = MiB / 512;
const range = fc.tuple(fc.integer({ min: 0, max: SECTORS - 1 }), fc.integer({ min: 1, max: 64 }))
  .map(([s, n]) => [s, Math.min(n, SECTORS - s)] as const);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.tuple(fc.constantFrom('read' as const, 'write' as const), range, fc.nat({ max: 255 }))
    .map(([kind, [s, n], seed]): Op => [kind, s, n, seed]),
  fc.constant(['flush'] as const),
  fc.tuple(fc.constantFrom('discard' as const, 'zero' as const, 'erase' as const), range).map(([kind, [s, n]]): Op => [kind, s, n]),
);

/** Issues every op at once, over two queues, and waits for all. */
async function load(backend: OverlapProbe, ops: readonly Op[]): Promise<void> {
  const disk = await openLoopbackDisk(backend, { device: { numQueues: 2 }, driver: { queues: 2 } });
  try {
    const d = disk.driver;
    await Promise.all(ops.map((op, i) => {
      const queue = i % 2;
      switch (op[0]) {
        case 'read': return d.read(op[1], [new Uint8Array(op[2] * 512)], { queue });
        case 'write': return d.write(op[1], [pattern(op[2] * 512, op[3])], { queue });
        case 'flush': return d.flush({ queue });
        case 'discard': return d.discard([{ sector: op[1], sectors: op[2] }], { queue });
        case 'zero': return d.writeZeroes([{ sector: op[1], sectors: op[2] }], { queue });
        case 'erase': return d.secureErase([{ sector: op[1], sectors: op[2] }], { queue });
      }
    }));
  } finally {
    await disk.close();
  }
}

test('property: a serial backend never has two operations in flight, under any concurrent load', async () => {
  await fc.assert(fc.asyncProperty(
    fc.array(opArb, { minLength: 1, maxLength: 40 }), fc.array(fc.nat({ max: 3 }), { minLength: 1, maxLength: 8 }),
    async (ops, delays) => {
      const backend = new OverlapProbe('serial', delays);
      await load(backend, ops);
      assert.equal(backend.maxInFlight, 1);
      assert.equal(backend.inFlight, 0);
      // Flushes that wait together share one backend flush, so fewer calls than requests.
      assert.ok(backend.operations > 0);
    }), { numRuns: 60 });
});

test('the same load overlaps on a parallel backend (the probe can see overlap)', async () => {
  const ops: Op[] = Array.from({ length: 16 }, (_, i) => ['write', i * 8, 8, i] as const);
  const backend = new OverlapProbe(undefined, [2]);
  await load(backend, ops);
  assert.ok(backend.maxInFlight > 1);
});

test('a serial backend still serves: data written under concurrent load reads back', async () => {
  const backend = new OverlapProbe('serial', [1, 0, 2]);
  const disk = await openLoopbackDisk(backend);
  try {
    await Promise.all(Array.from({ length: 32 }, (_, i) => disk.driver.write(i * 8, [pattern(4096, i)])));
    const back = Array.from({ length: 32 }, () => new Uint8Array(4096));
    await Promise.all(back.map((b, i) => disk.driver.read(i * 8, [b])));
    back.forEach((b, i) => assert.deepEqual(b, pattern(4096, i)));
    await disk.device.resize(2 * MiB);
    assert.equal(backend.size, 2 * MiB);
  } finally {
    await disk.close();
  }
});

/** A backend that is only the required members: today's interface, unchanged. */
class MinimalBackend implements BlockBackend {
  readonly size = MiB;
  readonly readOnly = false;
  readonly canFlush = false;
  readonly canDiscard = false;
  readonly canWriteZeroes = false;
  private readonly bytes = new Uint8Array(MiB);
  read(offset: number, buffers: readonly Uint8Array[]): void {
    for (const b of buffers) {
      b.set(this.bytes.subarray(offset, offset + b.length));
      offset += b.length;
    }
  }
  write(offset: number, buffers: readonly Uint8Array[]): void {
    for (const b of buffers) {
      this.bytes.set(b, offset);
      offset += b.length;
    }
  }
  flush(): void {}
  discard(): void {}
  writeZeroes(): void {}
  close(): void {}
}

test('a backend with none of the optional members is served as before', async () => {
  const disk = await openLoopbackDisk(new MinimalBackend());
  try {
    await disk.driver.write(8, [pattern(4096, 9)]);
    const back = new Uint8Array(4096);
    await disk.driver.read(8, [back]);
    assert.deepEqual(back, pattern(4096, 9));
    await assert.rejects(disk.device.resize(2 * MiB), { code: 'RESIZE_UNSUPPORTED' });
  } finally {
    await disk.close();
  }
});
