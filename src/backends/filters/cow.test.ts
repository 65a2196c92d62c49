// The copy-on-write filter: model-based against a plain byte array under concurrent,
// asynchronous operations, with the base byte-identical (and never even asked to write)
// afterwards; allocation status; the overlay's checks; the open step.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BackendError, type BackendResult, type BlockBackend, type Extent } from '../backend.js';
import { MemoryBackend } from '../memory-backend.js';
import { CowFilter } from './cow.js';
import { FilterBackend } from './filter.js';
import { pattern } from '../../../test/support/pattern.js';

const SECTOR = 512;

/** A base that refuses, and counts, every attempt to change it. */
class GuardedBase extends FilterBackend {
  attempts = 0;
  override write(): BackendResult {
    this.attempts++;
    throw new Error('the base was written');
  }
  override discard(): BackendResult {
    this.attempts++;
    throw new Error('the base was discarded');
  }
  override writeZeroes(): BackendResult {
    this.attempts++;
    throw new Error('the base was zeroed');
  }
}

/**
 * Completes each operation after a number of event-loop turns taken in turn from
 * `turns` (0: synchronously), so operations of one batch interleave inside the filter.
 */
class Laggy extends FilterBackend {
  private next = 0;
  constructor(inner: BlockBackend, private readonly turns: readonly number[]) {
    super(inner);
  }
  private lag(run: () => BackendResult): BackendResult {
    const n = this.turns[this.next++ % this.turns.length];
    if (n === 0) return run();
    return (async () => {
      for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
      await run();
    })();
  }
  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.lag(() => this.inner.read(offset, buffers));
  }
  override write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.lag(() => this.inner.write(offset, buffers));
  }
  override discard(offset: number, length: number): BackendResult {
    return this.lag(() => this.inner.discard(offset, length));
  }
  override writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    return this.lag(() => this.inner.writeZeroes(offset, length, unmap));
  }
}

async function readBytes(b: BlockBackend, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length).fill(0xee);
  await b.read(offset, [out]);
  return out;
}

type Op =
  | { readonly kind: 'write'; readonly sector: number; readonly sectors: number; readonly seed: number; readonly split: number }
  | { readonly kind: 'read' | 'discard' | 'zero'; readonly sector: number; readonly sectors: number };

/** Keeps the ops of a batch whose sectors overlap none kept before: their outcome then does not depend on order. */
function disjoint(ops: readonly Op[]): Op[] {
  const kept: Op[] = [];
  for (const op of ops) {
    if (kept.every((k) => op.sector + op.sectors <= k.sector || k.sector + k.sectors <= op.sector)) kept.push(op);
  }
  return kept;
}

test('property: under concurrent asynchronous operations the filter reads as the model, and the base stays byte-identical', async () => {
  // A size that is not a whole number of blocks: the last block is short.
  const size = 256 * 1024 + 3 * SECTOR;
  const sectors = size / SECTOR;
  const range = fc.tuple(fc.integer({ min: 0, max: sectors - 1 }), fc.integer({ min: 1, max: 160 }))
    .map(([s, n]) => ({ sector: s, sectors: Math.min(n, sectors - s) }));
  const op: fc.Arbitrary<Op> = fc.oneof(
    fc.record({ r: range, seed: fc.nat(), split: fc.integer({ min: 1, max: 3 }) })
      .map(({ r, seed, split }) => ({ kind: 'write' as const, ...r, seed, split })),
    fc.record({ r: range, kind: fc.constantFrom('read' as const, 'discard' as const, 'zero' as const) }).map(({ r, kind }) => ({ kind, ...r })),
  );
  const turns = fc.array(fc.nat({ max: 3 }), { minLength: 1, maxLength: 6 });
  await fc.assert(fc.asyncProperty(
    fc.constantFrom(SECTOR, 4096, 65536), fc.array(fc.array(op, { minLength: 1, maxLength: 6 }), { minLength: 1, maxLength: 8 }),
    turns, turns,
    async (granularity, batches, baseTurns, overlayTurns) => {
      const original = pattern(size, granularity);
      const store = new MemoryBackend({ size });
      store.write(0, [original]);
      const base = new GuardedBase(new Laggy(store, baseTurns));
      const cow = new CowFilter(base, { granularity, overlay: new Laggy(new MemoryBackend({ size }), overlayTurns) });
      const model = original.slice();
      for (const batch of batches) {
        await Promise.all(disjoint(batch).map(async (o) => {
          const offset = o.sector * SECTOR;
          const length = o.sectors * SECTOR;
          if (o.kind === 'write') {
            const data = pattern(length, o.seed);
            const cut = Math.floor(length / o.split / SECTOR) * SECTOR || length;
            await cow.write(offset, [data.subarray(0, cut), data.subarray(cut)]);
            model.set(data, offset);
          } else if (o.kind === 'read') {
            // Disjoint from every write of the batch: the model before and after agree here.
            assert.deepEqual(await readBytes(cow, offset, length), model.subarray(offset, offset + length));
          } else {
            await (o.kind === 'discard' ? cow.discard(offset, length) : cow.writeZeroes(offset, length, true));
            model.fill(0, offset, offset + length);
          }
        }));
      }
      assert.deepEqual(await readBytes(cow, 0, size), model);
      assert.equal(base.attempts, 0);
      assert.deepEqual(await readBytes(store, 0, size), original, 'the base is byte-identical');
    }), { numRuns: 150 });
});

test('two writes to different sectors of one block, at once, both land (one copy-up, not two)', async () => {
  const size = 1 << 20;
  const store = new MemoryBackend({ size });
  store.write(0, [pattern(size, 1)]);
  const cow = new CowFilter(new Laggy(store, [2, 1]), { overlay: new Laggy(new MemoryBackend({ size }), [1, 3]) });
  await Promise.all([cow.write(0, [pattern(SECTOR, 2)]), cow.write(4096, [pattern(SECTOR, 3)])]);
  const expected = pattern(65536, 1);
  expected.set(pattern(SECTOR, 2), 0);
  expected.set(pattern(SECTOR, 3), 4096);
  assert.deepEqual(await readBytes(cow, 0, 65536), expected);
});

test('extents: written blocks are data, discarded ones zero, the rest as the base says', async () => {
  const size = 1 << 20;
  const base = new MemoryBackend({ size });
  base.write(768 * 1024, [new Uint8Array(SECTOR).fill(1)]);
  const cow = new CowFilter(base, { granularity: 65536 });
  await cow.write(0, [new Uint8Array(SECTOR).fill(2)]);
  await cow.discard(65536, 65536);
  const runs: Extent[] = [];
  for (let at = 0; at < size;) {
    const part = await (cow.extents as (o: number, l: number) => Extent[] | Promise<Extent[]>)(at, size - at);
    for (const r of part) at += r.length;
    runs.push(...part);
  }
  assert.deepEqual(runs, [
    { length: 65536, kind: 'data' },
    { length: 65536, kind: 'zero' },
    // The memory base's own report: its last chunk (256 KiB) was written, nothing before.
    { length: 655360, kind: 'hole' },
    { length: 262144, kind: 'data' },
  ]);
});

test('over a read-only base: writable, discards and zeroes, offers no resize', async () => {
  const base = new MemoryBackend({ size: 1 << 20, readOnly: true });
  const cow = new CowFilter(base);
  assert.equal(cow.readOnly, false);
  assert.ok(cow.canFlush && cow.canDiscard && cow.canWriteZeroes);
  assert.equal(cow.resize, undefined);
  await cow.write(4096, [pattern(8192, 5)]);
  await cow.flush();
  assert.deepEqual(await readBytes(cow, 4096, 8192), pattern(8192, 5));
});

test('the overlay must be writable and hold the whole base', () => {
  const base = new MemoryBackend({ size: 1 << 20 });
  assert.throws(() => new CowFilter(base, { overlay: new MemoryBackend({ size: 1 << 19 }) }), { code: 'BAD_SIZE' });
  assert.throws(() => new CowFilter(base, { overlay: new MemoryBackend({ size: 1 << 20, readOnly: true }) }), { code: 'READ_ONLY' });
  assert.throws(() => new CowFilter(base, { granularity: 3000 }), RangeError);
});

test('a base with an open step: opened first, the overlay sized once it knows its size', async () => {
  /** Knows its size only once opened, as a network backend would. */
  class LateBase extends FilterBackend {
    opened = false;
    override open = (): Promise<void> => {
      this.opened = true;
      return Promise.resolve();
    };
    constructor() {
      super(new MemoryBackend({ size: 1 << 20 }));
    }
    override get size(): number {
      return this.opened ? this.inner.size : 0;
    }
  }
  const base = new LateBase();
  const cow = new CowFilter(base);
  assert.ok(cow.open);
  await cow.open();
  assert.ok(base.opened);
  assert.equal(cow.size, 1 << 20);
  await cow.write((1 << 20) - SECTOR, [pattern(SECTOR, 6)]);
  assert.deepEqual(await readBytes(cow, (1 << 20) - SECTOR, SECTOR), pattern(SECTOR, 6));
});

test('serial when the base or the overlay is', () => {
  const serial = Object.assign(new MemoryBackend({ size: 1 << 20 }), { concurrency: 'serial' as const });
  assert.equal(new CowFilter(serial).concurrency, 'serial');
  assert.equal(new CowFilter(new MemoryBackend({ size: 1 << 20 }), { overlay: serial }).concurrency, 'serial');
  assert.equal(new CowFilter(new MemoryBackend({ size: 1 << 20 })).concurrency, undefined);
});

test('after close every operation fails, zero blocks included', async () => {
  const cow = new CowFilter(new MemoryBackend({ size: 1 << 20 }));
  await cow.discard(0, 65536);
  await cow.close();
  assert.throws(() => cow.read(0, [new Uint8Array(SECTOR)]), (e) => e instanceof BackendError && e.code === 'CLOSED');
  assert.throws(() => cow.discard(0, SECTOR), { code: 'CLOSED' });
});

test('an overlay made by a function once the size is known, opened by the filter when it has an open step', async () => {
  class LateOverlay extends FilterBackend {
    opened = false;
    override open = (): void => {
      this.opened = true;
    };
  }
  const sizes: number[] = [];
  let overlay: LateOverlay | null = null;
  const cow = new CowFilter(new MemoryBackend({ size: 1 << 20 }), {
    overlay: (size) => {
      sizes.push(size);
      overlay = new LateOverlay(new MemoryBackend({ size }));
      return overlay;
    },
  });
  assert.deepEqual(sizes, [1 << 20]);
  assert.ok(cow.open, 'the overlay has an open step, so the filter has one');
  await cow.open();
  assert.ok((overlay as LateOverlay | null)?.opened);
  await cow.write(0, [pattern(SECTOR, 9)]);
  assert.deepEqual(await readBytes(cow, 0, SECTOR), pattern(SECTOR, 9));
});
