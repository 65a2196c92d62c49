// Crash consistency. Every write the driver makes to the image file is recorded; a crash
// image is what was durable at the last flush plus any subset of the writes made since
// (power loss: unflushed writes may or may not have reached the disk, in any order), or
// every completed write (SIGKILL). Whatever the crash point, the image has at worst leaked
// clusters: no reference to a cluster past the end of the file or above its refcount,
// and it opens and reads.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import type { BackendResult } from '../backend.js';
import type { ImageFile } from './image-file.js';
import { MemoryImageFile } from './memory-image-file.js';
import { openQcow2 } from './qcow2.js';
import { freshImage, verifyRefcounts } from '../../../test/support/qcow2-image.js';
import { pattern } from '../../../test/support/pattern.js';

/** Records the image's history: the bytes at each flush, and the writes between. */
class RecordingFile implements ImageFile {
  durable: Uint8Array;
  pending: { offset: number; data: Uint8Array }[] = [];
  /** Crash images: [durable bytes, writes since], taken before every write. */
  readonly points: [Uint8Array, { offset: number; data: Uint8Array }[]][] = [];
  constructor(readonly inner: MemoryImageFile) { this.durable = inner.bytes(); }
  get size(): number { return this.inner.size; }
  get readOnly(): boolean { return false; }
  read(offset: number, buffers: readonly Uint8Array[]): BackendResult { return this.inner.read(offset, buffers); }
  write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    this.points.push([this.durable, [...this.pending]]);
    const data = new Uint8Array(buffers.reduce((n, b) => n + b.length, 0));
    let at = 0;
    for (const b of buffers) { data.set(b, at); at += b.length; }
    this.pending.push({ offset, data });
    return this.inner.write(offset, buffers);
  }
  flush(): BackendResult {
    this.durable = this.inner.bytes();
    this.pending = [];
    return this.inner.flush();
  }
  truncate(size: number): BackendResult { return this.inner.truncate(size); }
  discard(offset: number, length: number): BackendResult { return this.inner.discard(offset, length); }
  close(): BackendResult { return this.inner.close(); }
}

function crashImage(durable: Uint8Array, writes: { offset: number; data: Uint8Array }[], keep: (i: number) => boolean): Uint8Array {
  let end = durable.length;
  writes.forEach((w, i) => { if (keep(i)) end = Math.max(end, w.offset + w.data.length); });
  const out = new Uint8Array(end);
  out.set(durable);
  writes.forEach((w, i) => { if (keep(i)) out.set(w.data, w.offset); });
  return out;
}

async function assertUsable(bytes: Uint8Array, what: string): Promise<void> {
  const { errors } = verifyRefcounts(bytes);
  assert.deepEqual(errors, [], what);
  const q = await openQcow2(new MemoryImageFile(bytes), { readOnly: true });
  const probe = new Uint8Array(1 << 20);
  for (let at = 0; at < q.size; at += probe.length) {
    const n = Math.min(probe.length, q.size - at);
    // Sparse tails of a grown disk are skipped a table at a time.
    const [first] = await q.extents(at, n);
    if (first.kind === 'hole' && first.length === n) continue;
    await q.read(at, [probe.subarray(0, n)]);
  }
}

for (const [clusterBits, refcountOrder] of [[9, 6], [12, 4], [14, 0]]) {
  test(`a crash at any write leaves at worst leaks (${2 ** clusterBits}-byte clusters, ${2 ** refcountOrder}-bit refcounts)`, { timeout: 120_000 }, async () => {
    const cs = 2 ** clusterBits;
    const size = 256 * cs;
    const file = new RecordingFile(new MemoryImageFile(freshImage({ size, clusterBits, refcountOrder })));
    const q = await openQcow2(file, { l2CacheBytes: 1, refcountCacheBytes: 1 });
    for (let k = 0; k < 60; k++) {
      const at = ((k * 7919) % 250) * cs + (k % 3) * 512;
      await q.write(at, [pattern(cs + 512 * (k % 4), k)]);
      if (k % 7 === 3) await q.discard(((k * 31) % 200) * cs, 3 * cs);
      if (k % 11 === 5) await q.flush();
      if (k === 30) await q.resize(size * 40); // past what the first L1 cluster maps with 512-byte clusters
    }
    await q.close();
    // SIGKILL: every completed write is there.
    for (const [i, [durable, writes]] of file.points.entries()) {
      await assertUsable(crashImage(durable, writes, () => true), `SIGKILL before write ${i}`);
    }
    // Power loss: any subset of the unflushed writes.
    await fc.assert(fc.asyncProperty(fc.nat(file.points.length - 1), fc.array(fc.boolean(), { minLength: 64, maxLength: 64 }), async (p, keep) => {
      const [durable, writes] = file.points[p];
      await assertUsable(crashImage(durable, writes, (i) => keep[i % 64]), `power loss before write ${p}`);
    }), { numRuns: 100 });
  });
}
