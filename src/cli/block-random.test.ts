import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockRandom } from './block-random.js';

function draws(r: BlockRandom, blocks: number, count: number): number[] {
  return Array.from({ length: count }, () => r.below(blocks));
}

test('one seed gives the same blocks every time; another seed gives others', () => {
  const a = draws(new BlockRandom(42), 1 << 20, 1000);
  assert.deepEqual(draws(new BlockRandom(42), 1 << 20, 1000), a);
  assert.deepEqual(draws(new BlockRandom(), 1 << 20, 1000), draws(new BlockRandom(), 1 << 20, 1000));
  assert.notDeepEqual(draws(new BlockRandom(43), 1 << 20, 1000), a);
});

test('every block number is an integer in [0, blocks), up to 2^32 blocks', () => {
  for (const blocks of [1, 2, 3, 1000, 2 ** 21 + 1, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32]) {
    const r = new BlockRandom(blocks % 1000 + 1);
    for (let i = 0; i < 10_000; i++) {
      const b = r.below(blocks);
      assert.ok(Number.isInteger(b) && b >= 0 && b < blocks, `${b} of ${blocks}`);
    }
  }
});

test('every block comes up within 2 n ln n draws (a fair pick needs n ln n on average)', () => {
  for (const blocks of [7, 1000, 8192, 65536]) {
    const r = new BlockRandom();
    const seen = new Uint8Array(blocks);
    let left = blocks;
    const limit = Math.ceil(2 * blocks * Math.log(blocks));
    for (let i = 0; i < limit && left > 0; i++) {
      const b = r.below(blocks);
      if (seen[b] === 0) left--;
      seen[b] = 1;
    }
    assert.equal(left, 0, `${left} of ${blocks} blocks never came up in ${limit} draws`);
  }
});

test('no block comes up much more often than the others', () => {
  for (const blocks of [7, 1000, 8192]) {
    const r = new BlockRandom();
    const hits = new Uint32Array(blocks);
    for (let i = 0; i < 64 * blocks; i++) hits[r.below(blocks)]++;
    const min = Math.min(...hits);
    const max = Math.max(...hits);
    // 64 expected per block, a standard deviation of 8: a fair pick stays within five of them.
    assert.ok(min >= 64 - 5 * 8 && max <= 64 + 5 * 8, `${blocks} blocks: hit ${min}…${max} times`);
  }
});

test('a seed outside 1 … 2^32 - 1 is refused', () => {
  for (const seed of [0, -1, 1.5, 2 ** 32, Number.NaN]) {
    assert.throws(() => new BlockRandom(seed), { code: 'BAD_OPTION' }, String(seed));
  }
});
