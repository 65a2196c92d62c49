// The qcow2 driver's own promises: the shared backend compliance suite, a synchronous
// hot path on a synchronous file, one allocation for concurrent writers of one cluster,
// readers never seeing a cluster before its data, bounded metadata caches.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backendComplianceSuite } from '../../testing/backend-compliance.js';
import { MemoryImageFile } from './memory-image-file.js';
import { openQcow2 } from './qcow2.js';
import { AsyncImageFile, freshImage, verifyRefcounts } from '../../../test/support/qcow2-image.js';
import { pattern } from '../../../test/support/pattern.js';

backendComplianceSuite('qcow2 (v3, 4K clusters, async file)', async (size) => {
  const mem = new MemoryImageFile(freshImage({ size, clusterBits: 12 }));
  const backend = await openQcow2(new AsyncImageFile(mem));
  return {
    backend,
    readOnly: async () => ({ backend: await openQcow2(new MemoryImageFile(mem.bytes(), { readOnly: true })), sameData: true }),
  };
}, { expectCodes: true });

backendComplianceSuite('qcow2 (v2, 64K clusters, sync file)', async (size) => {
  const mem = new MemoryImageFile(freshImage({ size, version: 2 }));
  return { backend: await openQcow2(mem) };
});

test('reads and overwrites of allocated clusters with a cached L2 complete synchronously on a synchronous file', async () => {
  const file = new MemoryImageFile(freshImage({ size: 1 << 24 }));
  const q = await openQcow2(file);
  await q.write(0, [pattern(1 << 20, 1)]);
  const out = new Uint8Array(4096);
  assert.equal(q.read(8192, [out]), undefined);
  assert.deepEqual(out, pattern(1 << 20, 1).subarray(8192, 8192 + 4096));
  assert.equal(q.write(65536 + 512, [new Uint8Array(4096).fill(7)]), undefined);
  assert.equal(q.read(65536 + 512, [out]), undefined);
  assert.deepEqual(out, new Uint8Array(4096).fill(7));
  assert.equal(q.read(3 << 20, [out]), undefined, 'an unallocated cluster reads zeroes at once');
  assert.deepEqual(out, new Uint8Array(4096));
  const first = q.write(2 << 20, [out]);
  assert.ok(first instanceof Promise, 'allocating is asynchronous');
  await first;
  await q.close();
});

test('concurrent writers of one unallocated cluster allocate it once and both land', async () => {
  const mem = new MemoryImageFile(freshImage({ size: 1 << 20, clusterBits: 16 }));
  const q = await openQcow2(new AsyncImageFile(mem));
  const writes = [0, 1, 2, 3, 4, 5, 6, 7].map((k) => Promise.resolve(q.write(k * 8192 + 512, [pattern(4096, k)])));
  await Promise.all(writes);
  const out = new Uint8Array(65536);
  await q.read(0, [out]);
  for (let k = 0; k < 8; k++) assert.deepEqual(out.subarray(k * 8192 + 512, k * 8192 + 512 + 4096), pattern(4096, k), `write ${k}`);
  await q.close();
  const { errors, leaks } = verifyRefcounts(mem.bytes());
  assert.deepEqual(errors, []);
  assert.equal(leaks, 0);
  // Header, refcount table, refcount block, L1, one L2, one data cluster.
  assert.ok(mem.size <= 6 * 65536, `file of ${mem.size} bytes`);
});

test('a read racing an allocation sees the old contents or the new, never an uninitialised cluster', async () => {
  const mem = new MemoryImageFile(freshImage({ size: 1 << 20, clusterBits: 12 }));
  const q = await openQcow2(new AsyncImageFile(mem));
  await q.write(0, [new Uint8Array(4096).fill(1)]); // the L2 table exists and is cached
  const data = new Uint8Array(4096).fill(9);
  const pending: Promise<void>[] = [];
  const reads: Uint8Array[] = [];
  const w = Promise.resolve(q.write(40960, [data]));
  for (let k = 0; k < 8; k++) {
    const out = new Uint8Array(4096).fill(0xee);
    reads.push(out);
    pending.push(Promise.resolve(q.read(40960, [out])));
    await new Promise((r) => setImmediate(r));
  }
  await Promise.all([w, ...pending]);
  for (const r of reads) assert.ok(r.every((b) => b === 0) || r.every((b) => b === 9), 'old (zeroes) or new data');
  await q.close();
});

test('metadata caches stay bounded however much of a large sparse disk is touched', async () => {
  const mem = new MemoryImageFile(freshImage({ size: 2 ** 40, clusterBits: 16 }));
  const q = await openQcow2(mem, { l2CacheBytes: 4 * 65536, refcountCacheBytes: 4 * 65536 });
  const out = new Uint8Array(512);
  for (let k = 0; k < 64; k++) {
    const at = ((k * 2_654_435_761) % 2 ** 20) * 2 ** 20;
    await q.write(at, [new Uint8Array(512).fill(k + 1)]);
    await q.read(at, [out]);
    assert.equal(out[0], k + 1);
  }
  // A whole-disk discard (mkfs does one) skips the unallocated tables' ranges.
  await q.discard(0, 2 ** 40);
  await q.read(2 ** 39, [out]);
  assert.equal(out[0], 0);
  await q.close();
  assert.deepEqual(verifyRefcounts(mem.bytes()).errors, []);
  // 64 L2 tables + 64 data clusters + the fixed metadata, not a table per GiB of disk.
  assert.ok(mem.size < 140 * 65536 + 2 ** 22, `file of ${mem.size} bytes`);
});

test('extents report data, zero and hole runs', async () => {
  const q = await openQcow2(new MemoryImageFile(freshImage({ size: 1 << 20, clusterBits: 16 })));
  await q.write(0, [new Uint8Array(131072).fill(1)]);
  await q.writeZeroes(65536, 65536, false); // stays allocated, flagged zero
  await q.writeZeroes(196608, 65536, false); // was a hole: stays one
  assert.deepEqual(await q.extents(0, 1 << 20), [
    { length: 65536, kind: 'data' }, { length: 65536, kind: 'zero' }, { length: (1 << 20) - 131072, kind: 'hole' },
  ]);
  await q.close();
});
