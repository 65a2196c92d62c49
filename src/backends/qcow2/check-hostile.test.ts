// Properties of create, check and repair without qemu-img: a fresh image of any
// geometry checks clean; a populated image with bytes flipped in its metadata checks and
// repairs to a result or a typed error, never anything else, and a repair leaves no leak.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { VblkError } from '../../errors.js';
import { checkQcow2 } from './check.js';
import { createQcow2 } from './create.js';
import { AUTOCLEAR, EXT, parseHeader, serializeHeader } from './header.js';
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

/** Writes a big-endian u64 (below 2^53) at `at`, with `flags` or'ed into its top byte. */
function putU64(file: MemoryImageFile, at: number, value: number, flags = 0): void {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, Math.floor(value / 2 ** 32));
  v.setUint32(4, value >>> 0);
  b[0] |= flags;
  file.write(at, [b]);
}

function u64At(file: MemoryImageFile, at: number): number {
  const v = new DataView(file.bytes().buffer);
  return v.getUint32(at) * 2 ** 32 + v.getUint32(at + 4);
}

test('every L1 entry naming one L2 table whose entries all name one cluster: counted once per table, overflow reported', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 8 * 2 ** 30, clusterSize: CS }); // 4096 L1 entries
  const l1 = u64At(file, 40);
  const l2 = file.size, data = file.size + CS;
  file.truncate(data + CS);
  for (let i = 0; i < CS / 8; i++) putU64(file, l2 + i * 8, data, 0x80);
  for (let i = 0; i < 4096; i++) putU64(file, l1 + i * 8, l2, 0x80);
  const r = await checkQcow2(file);
  // 4096 x 512 references to one 16-bit refcount: all but 65535 overflow.
  assert.ok(r.corruptions >= 4096 * 512 - 65535, `${r.corruptions} corruptions`);
  assert.ok(r.messages.length <= 1000);
});

test('snapshots whose L1 tables add up past the walk limit: a typed error, not a hang', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 2 ** 30, clusterSize: CS });
  const table = file.size;
  const count = 40;
  file.truncate(table + CS);
  for (let i = 0; i < count; i++) {
    putU64(file, table + i * 40, 16 * CS); // any aligned offset; past the end reads zeroes
    const v = new Uint8Array(4);
    new DataView(v.buffer).setUint32(0, 4 * 1024 * 1024); // QEMU's largest L1
    file.write(table + i * 40 + 8, [v]);
  }
  const header = new Uint8Array(12);
  new DataView(header.buffer).setUint32(0, count);
  new DataView(header.buffer).setUint32(8, table);
  file.write(60, [header]);
  await assert.rejects(checkQcow2(file), { code: 'QCOW2_BAD_METADATA' });
});

test('a snapshot entry with too much extra data is a typed error', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 2 ** 20, clusterSize: CS });
  const table = file.size;
  file.truncate(table + CS);
  const entry = new Uint8Array(40);
  new DataView(entry.buffer).setUint32(36, 1 << 20);
  file.write(table, [entry]);
  const header = new Uint8Array(12);
  new DataView(header.buffer).setUint32(0, 1);
  new DataView(header.buffer).setUint32(8, table);
  file.write(60, [header]);
  await assert.rejects(checkQcow2(file), { code: 'QCOW2_BAD_METADATA' });
});

test('a refcount table whose entries all name one block: corruptions, and a repair gives each range its own block', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 2 ** 20, clusterSize: CS });
  const table = u64At(file, 48);
  const block = u64At(file, table);
  for (let i = 1; i < CS / 8; i++) putU64(file, table + i * 8, block);
  const r = await checkQcow2(file);
  assert.equal(r.needsRebuild, true);
  assert.ok(r.corruptions >= CS / 8 - 1);
  const repaired = await repairQcow2(file);
  assert.deepEqual([repaired.after.corruptions, repaired.after.leaks, repaired.after.checkErrors], [0, 0, 0]);
});

test('a bitmaps extension claiming too many bitmaps, or a directory past its limit, is a typed error', async () => {
  for (const [nb, size] of [[70000, 0], [1, 2 ** 30]]) {
    const file = new MemoryImageFile();
    await createQcow2(file, { size: 2 ** 20, clusterSize: CS });
    const h = parseHeader(file.bytes().subarray(0, CS), file.size);
    const data = new Uint8Array(24);
    const v = new DataView(data.buffer);
    v.setUint32(0, nb);
    v.setUint32(12, size);
    v.setUint32(20, CS);
    file.write(0, [serializeHeader({ ...h, autoclearFeatures: AUTOCLEAR.BITMAPS, extensions: [...h.extensions, { type: EXT.BITMAPS, data }] })]);
    await assert.rejects(checkQcow2(file), { code: 'QCOW2_BAD_METADATA' });
  }
});
