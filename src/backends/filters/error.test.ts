// The error filter fails exactly what it is told to: the chosen sectors (seen from a
// guest's driver, sector by sector), the chosen kinds of operation, the nth one, a seeded
// fraction — with the status chosen — and lets everything else through.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { IoError, NotSupportedError } from '../../blk/driver-errors.js';
import { openLoopbackDisk } from '../../testing/loopback.js';
import { MemoryBackend } from '../memory-backend.js';
import { ErrorFilter } from './error.js';

const SECTOR = 512;

/** Whether `run` fails; a failure must be the injected kind. */
function fails(run: () => unknown, code = 'IO_ERROR'): boolean {
  try {
    run();
    return false;
  } catch (e) {
    assert.equal((e as { code?: string }).code, code);
    return true;
  }
}

test('property: through the driver, reads and writes fail on exactly the chosen sectors', async () => {
  const sectors = 64;
  const span = fc.tuple(fc.nat({ max: sectors - 1 }), fc.nat({ max: 5 })).map(([first, n]) => ({ first, last: Math.min(sectors - 1, first + n) }));
  await fc.assert(fc.asyncProperty(fc.array(span, { minLength: 1, maxLength: 4 }), async (spans) => {
    const chosen = (s: number): boolean => spans.some((r) => s >= r.first && s <= r.last);
    const disk = await openLoopbackDisk(new ErrorFilter(new MemoryBackend({ size: sectors * SECTOR }), { sectors: spans }));
    try {
      for (let s = 0; s < sectors; s++) {
        for (const op of [
          () => disk.driver.read(s, [new Uint8Array(SECTOR)]),
          () => disk.driver.write(s, [new Uint8Array(SECTOR)]),
        ]) {
          let error: unknown = null;
          await op().catch((e: unknown) => {
            error = e;
          });
          if (chosen(s)) assert.ok(error instanceof IoError, `sector ${s} should fail`);
          else assert.equal(error, null, `sector ${s} should succeed`);
        }
      }
      // A request over several sectors fails when any of them is chosen.
      for (let s = 0; s + 4 <= sectors; s += 4) {
        const failed = await disk.driver.read(s, [new Uint8Array(4 * SECTOR)]).then(() => false, () => true);
        assert.equal(failed, [s, s + 1, s + 2, s + 3].some(chosen), `sectors ${s}-${s + 3}`);
      }
    } finally {
      await disk.close();
    }
  }), { numRuns: 25 });
});

test('status unsupp reaches the guest as UNSUPP (NotSupportedError), ioerr as IOERR', async () => {
  for (const [status, type] of [['unsupp', NotSupportedError], ['ioerr', IoError]] as const) {
    const disk = await openLoopbackDisk(new ErrorFilter(new MemoryBackend({ size: 1 << 20 }), { ops: ['flush'], status }));
    try {
      await assert.rejects(disk.driver.flush(), type);
      await disk.driver.read(0, [new Uint8Array(SECTOR)]);
    } finally {
      await disk.close();
    }
  }
});

test('only the chosen kinds of operation fail', () => {
  const f = new ErrorFilter(new MemoryBackend({ size: 1 << 20 }), { ops: ['write', 'zero'] });
  assert.ok(fails(() => f.write(0, [new Uint8Array(SECTOR)])));
  assert.ok(fails(() => f.writeZeroes(0, SECTOR, false)));
  assert.ok(!fails(() => f.read(0, [new Uint8Array(SECTOR)])));
  assert.ok(!fails(() => f.discard(0, SECTOR)));
  assert.ok(!fails(() => f.flush()));
});

test('a flush touches no sector, so it never fails under sectors', () => {
  const f = new ErrorFilter(new MemoryBackend({ size: 1 << 20 }), { sectors: [{ first: 0, last: 2047 }] });
  assert.ok(!fails(() => f.flush()));
  assert.ok(!fails(() => f.read(0, [])), 'an empty read touches nothing either');
  assert.ok(fails(() => f.discard(1024 * SECTOR, SECTOR)));
});

test('nth fails the nth qualifying operation only, counting those on the chosen sectors', () => {
  const f = new ErrorFilter(new MemoryBackend({ size: 1 << 20 }), { nth: 3, sectors: [{ first: 10, last: 10 }] });
  const results: boolean[] = [];
  for (let i = 0; i < 6; i++) {
    results.push(fails(() => f.read(0, [new Uint8Array(SECTOR)])));
    results.push(fails(() => f.read(10 * SECTOR, [new Uint8Array(SECTOR)])));
  }
  assert.deepEqual(results.map((r, i) => (r ? i : -1)).filter((i) => i >= 0), [5], 'the third read of sector 10, nothing else');
});

test('rate fails about that fraction, and the same seed fails the same operations', () => {
  const run = (seed: number): boolean[] => {
    const f = new ErrorFilter(new MemoryBackend({ size: 1 << 20 }), { rate: 0.25, seed });
    return Array.from({ length: 4000 }, () => fails(() => f.read(0, [new Uint8Array(SECTOR)])));
  };
  const a = run(7);
  assert.deepEqual(run(7), a);
  assert.notDeepEqual(run(8), a);
  const failed = a.filter(Boolean).length;
  assert.ok(failed > 850 && failed < 1150, `${failed} of 4000`);
});

test('options out of range are refused', () => {
  const inner = new MemoryBackend({ size: 1 << 20 });
  assert.throws(() => new ErrorFilter(inner, { rate: 2 }), RangeError);
  assert.throws(() => new ErrorFilter(inner, { nth: -1 }), RangeError);
  assert.throws(() => new ErrorFilter(inner, { sectors: [{ first: 5, last: 4 }] }), RangeError);
  assert.throws(() => new ErrorFilter(inner, { ops: ['trim' as 'read'] }), RangeError);
});
