import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { rangeLimits, splitRange, type RangeConfig } from './range-split.js';

const U32_MAX = 0xffff_ffff;

/** A u32 config field, small values (where the cases are) more often than large ones. */
const u32 = fc.oneof(fc.integer({ min: 0, max: 64 }), fc.integer({ min: 0, max: U32_MAX }));

const config: fc.Arbitrary<RangeConfig> = fc.record({
  maxSectors: u32,
  maxSegments: u32,
  alignment: u32,
  sectorsPerBlock: fc.constantFrom(1, 2, 8, 128),
  segmentsPerChain: fc.integer({ min: 1, max: 4096 }),
});

test('rangeLimits: whole blocks, cuts on multiples of both the block and the alignment, never above the device', () => {
  fc.assert(fc.property(config, (c) => {
    const l = rangeLimits(c);
    const spb = c.sectorsPerBlock;
    assert.equal(l.granularity % spb, 0);
    assert.equal(l.maxSectors % l.granularity, 0);
    const device = c.maxSectors > 0 ? c.maxSectors : U32_MAX;
    // Only a device maximum below one block is exceeded: a segment is at least a block.
    assert.ok(l.maxSectors <= Math.max(device, spb));
    const inBlocks = Math.max(spb, device - (device % spb));
    // As large as it can be in whole granules.
    assert.ok(l.maxSectors + l.granularity > inBlocks);
    // The alignment is honoured whenever a segment can hold one granule of it.
    const lcm = c.alignment > 0 ? lcmOf(c.alignment, spb) : spb;
    assert.equal(l.granularity, inBlocks >= lcm ? lcm : spb);
    assert.equal(l.maxSegments, Math.min(Math.max(1, c.maxSegments), c.segmentsPerChain));
  }), { numRuns: 20_000 });
});

test('splitRange covers the range exactly, in pieces the device takes, cut on granularity boundaries', () => {
  const cases = config.chain((c) => {
    const l = rangeLimits(c);
    const spb = c.sectorsPerBlock;
    // Ranges of up to ~64 pieces: enough to see every kind of cut, few enough to check them all.
    return fc.record({
      c: fc.constant(c),
      start: fc.integer({ min: 0, max: 2 ** 40 }).map((b) => b * spb),
      blocks: fc.integer({ min: 1, max: Math.max(1, Math.floor((l.maxSectors * 64) / spb)) }),
    });
  });
  fc.assert(fc.property(cases, ({ c, start, blocks }) => {
    const l = rangeLimits(c);
    const spb = c.sectorsPerBlock;
    const sectors = blocks * spb;
    const out: number[] = [];
    splitRange(start, sectors, l, out);
    let at = start;
    for (let i = 0; i < out.length; i += 2) {
      const [s, n] = [out[i], out[i + 1]];
      assert.equal(s, at, 'contiguous');
      assert.ok(n > 0 && n <= l.maxSectors, `piece of ${n} within 1..${l.maxSectors}`);
      assert.equal(n % spb, 0, 'whole blocks');
      const isLast = i + 2 === out.length;
      if (!isLast) assert.equal((s + n) % l.granularity, 0, 'cut on a granularity boundary');
      at += n;
    }
    assert.equal(at, start + sectors, 'the whole range');
    // At most one piece more than the fewest possible: the short first one.
    assert.ok(out.length / 2 <= Math.ceil(sectors / l.maxSectors) + 1);
  }), { numRuns: 5_000 });
});

function lcmOf(a: number, b: number): number {
  for (let m = a; ; m += a) if (m % b === 0) return m;
}

test('splitRange: a range inside one piece is one segment, wherever it starts', () => {
  const l = rangeLimits({ maxSectors: 20, maxSegments: 8, alignment: 8, sectorsPerBlock: 1, segmentsPerChain: 64 });
  assert.deepEqual(l, { maxSectors: 16, maxSegments: 8, granularity: 8 });
  const out: number[] = [];
  splitRange(3, 16, l, out);
  assert.deepEqual(out, [3, 16]);
  out.length = 0;
  splitRange(3, 17, l, out);
  assert.deepEqual(out, [3, 13, 16, 4]);
});
