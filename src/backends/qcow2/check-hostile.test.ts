// Properties of create, check and repair without qemu-img: a fresh image of any
// geometry checks clean; a populated image with bytes flipped in its metadata checks and
// repairs to a result or a typed error, never anything else, and a repair leaves no leak.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { VblkError } from '../../errors.js';
import { checkQcow2 } from './check.js';
import { createQcow2 } from './create.js';
import { MemoryImageFile } from './memory-image-file.js';
import { openQcow2 } from './qcow2.js';
import { repairQcow2 } from './repair.js';
import { pattern } from '../../../test/support/pattern.js';

test('create then check is clean for any geometry', async () => {
  const options = fc.record({
    version: fc.constantFrom(2 as const, 3 as const),
    clusterBits: fc.integer({ min: 9, max: 21 }),
    refcountOrder: fc.integer({ min: 0, max: 6 }),
    sectors: fc.integer({ min: 0, max: 2 ** 31 }),
    lazyRefcounts: fc.boolean(),
    backing: fc.option(fc.string({ minLength: 1, maxLength: 40 }).filter((s) => !s.includes('\0')), { nil: undefined }),
  });
  await fc.assert(fc.asyncProperty(options, async (o) => {
    const version = o.version;
    const clusterSize = 2 ** o.clusterBits;
    // Keep the L1 table within QEMU's 32 MiB: shrink the size for small clusters.
    const maxSize = Math.min(2 ** 46, ((32 * 2 ** 20) / 8) * (clusterSize / 8) * clusterSize);
    const size = Math.min(o.sectors * 512, Math.floor(maxSize / 512) * 512);
    const file = new MemoryImageFile();
    await createQcow2(file, {
      size, version, clusterSize, refcountBits: version === 2 ? 16 : 2 ** o.refcountOrder,
      lazyRefcounts: version === 3 && o.lazyRefcounts, backingFile: o.backing, backingFormat: o.backing && 'raw',
    });
    const r = await checkQcow2(file);
    assert.deepEqual([r.corruptions, r.leaks, r.checkErrors, r.imageEndOffset], [0, 0, 0, file.size]);
    assert.equal(r.totalClusters, Math.ceil(size / clusterSize));
  }), { numRuns: 60 });
});

const CS = 4096;

/** A small image written by the driver: data in two L2 tables, a zeroed and a discarded cluster. */
async function populated(version: 2 | 3, refcountBits: number): Promise<Uint8Array> {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 2048 * CS, version, clusterSize: CS, refcountBits });
  const q = await openQcow2(file);
  await q.write(0, [pattern(3 * CS + 512, 1)]);
  await q.write(1000 * CS, [pattern(2 * CS, 2)]);
  await q.writeZeroes(CS, CS, false);
  if (q.canDiscard) await q.discard(2 * CS, CS);
  await q.close();
  return file.bytes();
}

async function typedOrValue<T>(what: string, fn: () => Promise<T>): Promise<T | undefined> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof VblkError) return undefined;
    throw new Error(`${what} threw an untyped ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
  }
}

for (const [version, refcountBits] of [[3, 16], [3, 1], [2, 16], [3, 64]] as const) {
  test(`flipped metadata bytes of a v${version} image (${refcountBits}-bit refcounts): check and repair end in a result or a typed error`, { timeout: 300_000 }, async () => {
    const base = await populated(version, refcountBits);
    const metadataEnd = Math.min(base.length, 8 * CS);
    const flip = fc.oneof(
      fc.tuple(fc.integer({ min: 0, max: 111 }), fc.nat(255)),
      fc.tuple(fc.integer({ min: 0, max: metadataEnd - 1 }), fc.nat(255)),
      fc.tuple(fc.integer({ min: 0, max: base.length - 1 }), fc.nat(255)),
    );
    await fc.assert(fc.asyncProperty(fc.array(flip, { minLength: 1, maxLength: 8 }), async (flips) => {
      const bytes = base.slice();
      for (const [at, value] of flips) bytes[at] = value;
      await typedOrValue('check', () => checkQcow2(new MemoryImageFile(bytes)));
      // The file may grow by the near-end allowance of a repair and its new refcount structures, no more.
      const file = new MemoryImageFile(bytes, { maxSize: bytes.length + 96 * 2 ** 20 });
      const repaired = await typedOrValue('repair', () => repairQcow2(file));
      if (repaired === undefined) return;
      const again = await checkQcow2(file);
      assert.equal(again.leaks, 0, again.messages.join('\n'));
      assert.ok(again.corruptions <= repaired.before.corruptions, 'a repair adds no corruption');
      assert.deepEqual([again.corruptions, again.leaks, again.checkErrors], [repaired.after.corruptions, repaired.after.leaks, repaired.after.checkErrors]);
    }), { numRuns: 150 });
  });
}
