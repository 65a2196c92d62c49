/**
 * The backend compliance suite (STYLE.md, principle 11): one set of `node:test` tests
 * that every {@link BlockBackend} must pass — the built-in ones, every filter, and any
 * backend a user writes. Register it from a test file:
 *
 * ```ts
 * import { backendComplianceSuite } from 'vblk/testing';
 * backendComplianceSuite('my backend', (size) => ({ backend: new MyBackend(size) }));
 * ```
 *
 * It checks reads and writes (scatter/gather, across boundaries, at the end of the
 * disk), range errors, discard and write-zeroes, flush, resize, read-only refusal,
 * close, the allocation extents, and — the strongest check — random sequences of
 * operations against a plain byte array. What a backend does not declare (no discard,
 * no resize, no extents, no read-only twin) is skipped, saying so.
 *
 * The random sequences come from a small seeded generator rather than a property
 * library, so the kit needs nothing but Node; a failure names the seed and the
 * operations that led to it.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { BlockBackend, Extent } from '../backends/backend.js';

/** A backend made for one test, and what the suite may do with it. */
export interface ComplianceSubject {
  /** A fresh, writable backend of the size asked for, reading as zeroes. */
  readonly backend: BlockBackend;
  /**
   * The same storage read-only (called after `backend` is closed, so a file can be
   * reopened), or any read-only backend of the same kind; without it the read-only
   * test is skipped. `sameData`: it holds what `backend` held, and the suite checks so.
   */
  readOnly?(): Promise<ComplianceReadOnly> | ComplianceReadOnly;
  /** Removes what the test left behind (files, directories), after the backend is closed. */
  cleanup?(): void | Promise<void>;
}

/** A read-only backend for the read-only test. */
export interface ComplianceReadOnly {
  /** A backend whose `readOnly` is true; the suite opens it (when it has an open step) and closes it. */
  readonly backend: BlockBackend;
  /** It holds the data written through the writable backend before it was closed. */
  readonly sameData: boolean;
}

/** Makes a {@link ComplianceSubject} of `size` bytes (a multiple of 512). */
export type ComplianceFactory = (size: number) => ComplianceSubject | Promise<ComplianceSubject>;

/** How {@link backendComplianceSuite} runs. */
export interface ComplianceOptions {
  /** Random operation sequences to check against the byte-array model. Default 40. */
  readonly modelRuns?: number;
  /** Seed of the first sequence (the next ones follow from it). Default 1. */
  readonly seed?: number;
  /**
   * Refusals must carry the built-in backends' `BackendError` codes
   * (`OUT_OF_RANGE`, `READ_ONLY`, `BAD_SIZE`, `CLOSED`). The interface asks only that
   * they fail, so by default any failure will do.
   */
  readonly expectCodes?: boolean;
}

/**
 * The disk size every test asks for: 1 MiB, four of the memory backend's chunks, so the
 * tests cross chunk boundaries there (and 256 KiB is a boundary worth crossing in any
 * backend that allocates in powers of two).
 */
export const COMPLIANCE_DISK_SIZE = 1 << 20;
const BOUNDARY = COMPLIANCE_DISK_SIZE / 4;
const SECTOR = 512;
const DEFAULT_MODEL_RUNS = 40;
/** Most operations in one random sequence. */
const MODEL_OPS = 12;
/** Most sectors one random operation covers. */
const MODEL_MAX_SECTORS = 300;

/**
 * Registers the compliance tests for the backends `factory` makes, as a `describe`
 * block named `name`. Call it at the top level of a test file.
 */
export function backendComplianceSuite(name: string, factory: ComplianceFactory, options: ComplianceOptions = {}): void {
  const SIZE = COMPLIANCE_DISK_SIZE;
  const modelRuns = options.modelRuns ?? DEFAULT_MODEL_RUNS;
  const firstSeed = options.seed ?? 1;
  const expectCodes = options.expectCodes ?? false;
  /** Whether `op` fails (throws or rejects), with `code` when codes are expected. */
  const fails = async (op: () => unknown, code: string): Promise<boolean> => {
    try {
      await op();
      return false;
    } catch (e) {
      return !expectCodes || (e as { code?: unknown }).code === code;
    }
  };

  /** Makes and opens a subject, runs `body`, then closes and cleans up whatever happens. */
  const withBackend = (body: (backend: BlockBackend, subject: ComplianceSubject, skip: (why: string) => void) => Promise<void>) =>
    async (t: { skip(message?: string): void }): Promise<void> => {
      const subject = await factory(SIZE);
      try {
        await subject.backend.open?.();
        await body(subject.backend, subject, (why) => t.skip(why));
      } finally {
        await closeQuietly(subject.backend);
        await subject.cleanup?.();
      }
    };

  describe(name, () => {
    test('reports its size and is writable', withBackend(async (b) => {
      assert.equal(b.size, SIZE);
      assert.equal(b.readOnly, false);
      assert.ok(b.concurrency === undefined || b.concurrency === 'parallel' || b.concurrency === 'serial', 'concurrency');
    }));

    test('a fresh disk reads as zeroes', withBackend(async (b) => {
      const x = new Uint8Array(SECTOR).fill(1);
      const y = new Uint8Array(BOUNDARY).fill(1);
      await b.read(BOUNDARY - SECTOR, [x, y]);
      assert.deepEqual(x, new Uint8Array(SECTOR));
      assert.deepEqual(y, new Uint8Array(BOUNDARY));
    }));

    test('scatter/gather writes read back, across boundaries', withBackend(async (b) => {
      const data = pattern(3 * 4096, 1);
      const at = BOUNDARY - 4096;
      await b.write(at, [data.subarray(0, 100), data.subarray(100, 5000), data.subarray(5000)]);
      const x = new Uint8Array(7000);
      const y = new Uint8Array(3 * 4096 - 7000);
      await b.read(at, [x, y]);
      assert.deepEqual(x, data.subarray(0, 7000));
      assert.deepEqual(y, data.subarray(7000));
      assert.deepEqual(await readBytes(b, at - SECTOR, SECTOR), new Uint8Array(SECTOR), 'neighbours untouched');
    }));

    test('the last sector can be written and read; nothing past the end', withBackend(async (b) => {
      await b.write(SIZE - SECTOR, [pattern(SECTOR, 2)]);
      assert.deepEqual(await readBytes(b, SIZE - SECTOR, SECTOR), pattern(SECTOR, 2));
      assert.ok(await fails(() => b.write(SIZE - SECTOR, [new Uint8Array(2 * SECTOR)]), 'OUT_OF_RANGE'), 'write past the end');
      assert.ok(await fails(() => b.read(SIZE, [new Uint8Array(SECTOR)]), 'OUT_OF_RANGE'), 'read past the end');
      if (b.canDiscard) assert.ok(await fails(() => b.discard(SIZE - SECTOR, 2 * SECTOR), 'OUT_OF_RANGE'), 'discard past the end');
      if (b.canWriteZeroes) assert.ok(await fails(() => b.writeZeroes(-SECTOR, 2 * SECTOR, false), 'OUT_OF_RANGE'), 'negative write-zeroes');
      assert.equal(b.size, SIZE);
    }));

    test('discard makes the range read as zeroes and leaves its neighbours', withBackend(async (b, _s, skip) => {
      if (!b.canDiscard) return skip('the backend cannot discard');
      const data = pattern(SIZE, 3);
      await b.write(0, [data]);
      await b.discard(SECTOR, BOUNDARY * 2);
      assert.deepEqual(await readBytes(b, SECTOR, BOUNDARY * 2), new Uint8Array(BOUNDARY * 2));
      assert.deepEqual(await readBytes(b, 0, SECTOR), data.subarray(0, SECTOR));
      const after = SECTOR + BOUNDARY * 2;
      assert.deepEqual(await readBytes(b, after, SECTOR), data.subarray(after, after + SECTOR));
    }));

    for (const unmap of [false, true]) {
      test(`write-zeroes (unmap ${unmap}) makes the range read as zeroes`, withBackend(async (b, _s, skip) => {
        if (!b.canWriteZeroes) return skip('the backend cannot write zeroes');
        const data = pattern(SIZE, 4);
        await b.write(0, [data]);
        await b.writeZeroes(BOUNDARY, BOUNDARY + 1024, unmap);
        assert.deepEqual(await readBytes(b, BOUNDARY, BOUNDARY + 1024), new Uint8Array(BOUNDARY + 1024));
        const end = 2 * BOUNDARY + 1024;
        assert.deepEqual(await readBytes(b, end, SECTOR), data.subarray(end, end + SECTOR));
        assert.deepEqual(await readBytes(b, BOUNDARY - SECTOR, SECTOR), data.subarray(BOUNDARY - SECTOR, BOUNDARY));
      }));
    }

    test('flush completes, or fails only when the backend cannot flush', withBackend(async (b) => {
      await b.write(0, [pattern(4096, 5)]);
      if (b.canFlush) await b.flush();
    }));

    test('resize grows the disk; the new part reads as zeroes; shrinking is refused', withBackend(async (b, _s, skip) => {
      if (!b.resize) return skip('the backend cannot resize');
      await b.resize(SIZE * 2);
      assert.equal(b.size, SIZE * 2);
      assert.deepEqual(await readBytes(b, SIZE * 2 - 4096, 4096), new Uint8Array(4096));
      await b.write(SIZE * 2 - SECTOR, [pattern(SECTOR, 6)]);
      assert.deepEqual(await readBytes(b, SIZE * 2 - SECTOR, SECTOR), pattern(SECTOR, 6));
      assert.ok(await fails(() => b.resize?.(SIZE), 'BAD_SIZE'), 'shrink');
      assert.ok(await fails(() => b.resize?.(SIZE * 2 + 100), 'BAD_SIZE'), 'not a multiple of 512');
      assert.equal(b.size, SIZE * 2);
    }));

    test('a read-only backend reads but refuses writes, discards and write-zeroes', withBackend(async (b, subject, skip) => {
      if (!subject.readOnly) return skip('the factory makes no read-only backend');
      await b.write(0, [pattern(SECTOR, 7)]);
      if (b.canFlush) await b.flush();
      await b.close();
      const ro = await subject.readOnly();
      try {
        await ro.backend.open?.();
        assert.equal(ro.backend.readOnly, true);
        assert.ok(await fails(() => ro.backend.write(0, [new Uint8Array(SECTOR)]), 'READ_ONLY'), 'write');
        assert.ok(await fails(() => ro.backend.discard(0, SECTOR), 'READ_ONLY'), 'discard');
        assert.ok(await fails(() => ro.backend.writeZeroes(0, SECTOR, true), 'READ_ONLY'), 'write-zeroes');
        if (ro.sameData) assert.deepEqual(await readBytes(ro.backend, 0, SECTOR), pattern(SECTOR, 7));
      } finally {
        await ro.backend.close();
      }
    }));

    test('after close every call fails', withBackend(async (b) => {
      await b.close();
      assert.ok(await fails(() => b.read(0, [new Uint8Array(SECTOR)]), 'CLOSED'), 'read');
      assert.ok(await fails(() => b.write(0, [new Uint8Array(SECTOR)]), 'CLOSED'), 'write');
      assert.ok(await fails(() => b.flush(), 'CLOSED'), 'flush');
    }));

    test('extents describe the disk: contiguous runs, and zero or hole runs read as zeroes', withBackend(async (b, _s, skip) => {
      if (!b.extents) return skip('the backend reports no extents');
      await b.write(BOUNDARY + SECTOR, [pattern(3 * SECTOR, 8)]);
      if (b.canWriteZeroes) await b.writeZeroes(2 * BOUNDARY, BOUNDARY, false);
      for (const [offset, length] of [[0, SIZE], [SECTOR, BOUNDARY], [BOUNDARY + SECTOR, SECTOR]]) {
        const runs = await allExtents(b, offset, length);
        let at = offset;
        for (const run of runs) {
          if (run.kind !== 'data') {
            assert.deepEqual(await readBytes(b, at, run.length), new Uint8Array(run.length), `${run.kind} run at ${at}`);
          }
          at += run.length;
        }
        assert.equal(at, offset + length, 'the runs cover the range');
      }
      const written = await allExtents(b, BOUNDARY + SECTOR, 3 * SECTOR);
      assert.ok(written.every((r) => r.kind === 'data'), 'written data is data');
      assert.ok(await fails(() => b.extents?.(SIZE - SECTOR, 2 * SECTOR), 'OUT_OF_RANGE'), 'past the end');
    }));

    test('random operation sequences match a plain byte array', withBackend(async (b) => {
      const model = new Uint8Array(SIZE);
      const random = xorshift(firstSeed);
      for (let run = 0; run < modelRuns; run++) {
        const seed = random() || 1;
        const ops = randomOps(seed, b, SIZE / SECTOR);
        const done: string[] = [];
        try {
          for (const op of ops) {
            done.push(describeOp(op));
            await applyOp(b, model, op);
          }
          done.push('read whole disk');
          assert.deepEqual(await readBytes(b, 0, SIZE), model);
        } catch (e) {
          assert.fail(`sequence with seed ${seed} failed at the last of: ${done.join('; ')}\n${String(e)}`);
        }
      }
    }));
  });
}

type Op =
  | { readonly kind: 'write'; readonly offset: number; readonly length: number; readonly seed: number; readonly pieces: number }
  | { readonly kind: 'discard' | 'read'; readonly offset: number; readonly length: number }
  | { readonly kind: 'zero'; readonly offset: number; readonly length: number; readonly unmap: boolean };

/** A random sequence of up to {@link MODEL_OPS} operations the backend can do. */
function randomOps(seed: number, b: BlockBackend, sectors: number): Op[] {
  const random = xorshift(seed);
  const below = (n: number): number => random() % n;
  const ops: Op[] = [];
  const count = below(MODEL_OPS + 1);
  for (let i = 0; i < count; i++) {
    const sector = below(sectors);
    const offset = sector * SECTOR;
    const length = Math.min(1 + below(MODEL_MAX_SECTORS), sectors - sector) * SECTOR;
    const pick = below(4);
    if (pick === 0) ops.push({ kind: 'write', offset, length, seed: below(256), pieces: 1 + below(4) });
    else if (pick === 1 && b.canDiscard) ops.push({ kind: 'discard', offset, length });
    else if (pick === 2 && b.canWriteZeroes) ops.push({ kind: 'zero', offset, length, unmap: below(2) === 1 });
    else ops.push({ kind: 'read', offset, length });
  }
  return ops;
}

async function applyOp(b: BlockBackend, model: Uint8Array, op: Op): Promise<void> {
  const end = op.offset + op.length;
  switch (op.kind) {
    case 'write': {
      const data = pattern(op.length, op.seed);
      // Split anywhere, not on sectors: a backend takes any split of its buffers.
      const step = Math.ceil(op.length / op.pieces);
      const pieces: Uint8Array[] = [];
      for (let at = 0; at < op.length; at += step) pieces.push(data.subarray(at, Math.min(op.length, at + step)));
      await b.write(op.offset, pieces);
      model.set(data, op.offset);
      return;
    }
    case 'discard':
      await b.discard(op.offset, op.length);
      model.fill(0, op.offset, end);
      return;
    case 'zero':
      await b.writeZeroes(op.offset, op.length, op.unmap);
      model.fill(0, op.offset, end);
      return;
    case 'read':
      assert.deepEqual(await readBytes(b, op.offset, op.length), model.subarray(op.offset, end));
  }
}

function describeOp(op: Op): string {
  const where = `${op.length} bytes at ${op.offset}`;
  switch (op.kind) {
    case 'write': return `write ${where} (pattern ${op.seed}, ${op.pieces} pieces)`;
    case 'zero': return `write-zeroes ${where}${op.unmap ? ' (unmap)' : ''}`;
    default: return `${op.kind} ${where}`;
  }
}

/** Every run of `[offset, offset + length)`, asking again where a backend stopped early. */
async function allExtents(b: BlockBackend, offset: number, length: number): Promise<Extent[]> {
  const runs: Extent[] = [];
  let at = offset;
  const end = offset + length;
  while (at < end) {
    const part = await (b.extents as NonNullable<BlockBackend['extents']>)(at, end - at);
    assert.ok(part.length > 0, `no runs for ${end - at} bytes at ${at}`);
    for (const run of part) {
      assert.ok(Number.isSafeInteger(run.length) && run.length > 0, `run length ${run.length}`);
      assert.ok(run.kind === 'data' || run.kind === 'zero' || run.kind === 'hole', `run kind ${run.kind}`);
      at += run.length;
      runs.push(run);
    }
    assert.ok(at <= end, 'runs past the range');
  }
  return runs;
}

/** Recognisable bytes that depend on `seed`. */
function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 131 + seed * 7 + 1) & 0xff;
  return b;
}

async function readBytes(b: BlockBackend, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length).fill(0xee);
  await b.read(offset, [out]);
  return out;
}

/** Closes a backend a test may have closed already (a second close may fail; that is not the test's subject). */
async function closeQuietly(b: BlockBackend): Promise<void> {
  try {
    await b.close();
  } catch {
    // Nothing to do: the test's own assertions are what count.
  }
}

/** xorshift32: a cheap seeded generator of unsigned 32-bit numbers (never 0 from a non-zero seed). */
function xorshift(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}
