// Hostile images: valid images with bytes flipped in the header and metadata. Opening,
// reading, writing, discarding and flushing either work or fail with a typed error (a
// VblkError: the device turns it into IOERR); nothing else escapes, nothing hangs, and
// the file never grows past a bound.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { VblkError } from '../../errors.js';
import { MemoryBackend } from '../memory-backend.js';
import { MemoryImageFile } from './memory-image-file.js';
import { openQcow2 } from './qcow2.js';
import { freshImage, verifyRefcounts } from '../../../test/support/qcow2-image.js';
import { pattern } from '../../../test/support/pattern.js';

const CS = 4096;
const SIZE = 64 * CS;

/** A small populated image: data, a zeroed cluster, a discarded one, a second L2 table. */
async function populated(version: 2 | 3, refcountOrder: number, withBacking: boolean): Promise<Uint8Array> {
  const file = new MemoryImageFile(freshImage({ size: SIZE, version, clusterBits: 12, refcountOrder: version === 2 ? 4 : refcountOrder, backingFile: withBacking ? 'b' : undefined }));
  const q = await openQcow2(file, { backing: withBacking ? backingDisk() : undefined });
  await q.write(0, [pattern(3 * CS + 512, 1)]);
  await q.write(40 * CS, [pattern(2 * CS, 2)]);
  await q.writeZeroes(CS, CS, false);
  if (q.canDiscard) await q.discard(2 * CS, CS);
  await q.close();
  return file.bytes();
}

function backingDisk(): MemoryBackend {
  const b = new MemoryBackend({ size: 32 * CS });
  b.write(0, [pattern(32 * CS, 3)]);
  return b;
}

async function typedOrOk(what: string, fn: () => unknown): Promise<boolean> {
  try {
    await fn();
    return true;
  } catch (e) {
    if (e instanceof VblkError) return false;
    throw new Error(`${what} threw an untyped ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
  }
}

for (const [version, order, withBacking] of [[3, 4, false], [3, 0, true], [2, 4, false], [3, 6, false]] as const) {
  test(`flipped bytes in a v${version} image (${2 ** order}-bit refcounts${withBacking ? ', backing' : ''}) give typed errors, never a crash or a write out of bounds`, { timeout: 120_000 }, async () => {
    const base = await populated(version, order, withBacking);
    const metadataEnd = Math.min(base.length, 8 * CS); // header, refcount table and block, L1, first L2 tables
    const flip = fc.oneof(
      fc.tuple(fc.integer({ min: 0, max: 111 }), fc.nat(255)),
      fc.tuple(fc.integer({ min: 0, max: metadataEnd - 1 }), fc.nat(255)),
    );
    await fc.assert(fc.asyncProperty(fc.array(flip, { minLength: 1, maxLength: 6 }), fc.boolean(), async (flips, readOnly) => {
      const bytes = base.slice();
      for (const [at, value] of flips) bytes[at] = value;
      const bound = bytes.length + 64 * CS;
      const file = new MemoryImageFile(bytes, { readOnly });
      let maxEnd = 0;
      file.onOperation = (op, offset, length) => {
        if (op === 'write' || op === 'discard') maxEnd = Math.max(maxEnd, offset + length);
        if (op === 'truncate') maxEnd = Math.max(maxEnd, offset);
      };
      let q: Awaited<ReturnType<typeof openQcow2>> | undefined;
      await typedOrOk('open', async () => { q = await openQcow2(file, { backing: withBacking ? backingDisk() : undefined, readOnly }); });
      if (q === undefined) return;
      const disk = q;
      if (disk.size > 1 << 30) return; // a plausible huge virtual size: reading it all proves nothing more
      for (let at = 0; at < Math.min(disk.size, SIZE); at += 8 * CS) {
        const n = Math.min(8 * CS, disk.size - at);
        await typedOrOk('read', () => disk.read(at, [new Uint8Array(n)]));
      }
      await typedOrOk('extents', () => disk.extents(0, disk.size));
      if (!readOnly) {
        await typedOrOk('write', () => disk.write(CS / 2, [pattern(CS, 4)]));
        await typedOrOk('write', () => disk.write(20 * CS, [pattern(2 * CS, 5)]));
        await typedOrOk('write-zeroes', () => disk.writeZeroes(40 * CS, CS, true));
        if (disk.canDiscard) await typedOrOk('discard', () => disk.discard(0, 4 * CS));
        await typedOrOk('flush', () => disk.flush());
      }
      await typedOrOk('close', () => disk.close());
      assert.ok(maxEnd <= bound, `a write reached ${maxEnd}, past the bound of ${bound}`);
    }), { numRuns: 150 });
  });
}

test('a corrupt image is refused writable and opens read-only; a dirty one likewise with repairDirty false', async () => {
  for (const [bit, code, options] of [[2, 'QCOW2_CORRUPT', {}], [1, 'QCOW2_DIRTY', { repairDirty: false }]] as const) {
    const bytes = freshImage({ size: SIZE, clusterBits: 12 });
    bytes[79] |= bit;
    await assert.rejects(openQcow2(new MemoryImageFile(bytes), options), { code });
    const q = await openQcow2(new MemoryImageFile(bytes), { readOnly: true });
    assert.equal(q.readOnly, true);
  }
});

test('a dirty image opened writable has its refcounts rebuilt first: leaks and missing refcounts fixed, dirty bit cleared', async () => {
  const file = new MemoryImageFile(freshImage({ size: SIZE, clusterBits: 12 }));
  const q = await openQcow2(file);
  await q.write(0, [pattern(8 * CS, 1)]);
  await q.close();
  const bytes = file.bytes();
  // Lazy refcounts: the data clusters were never counted, and a stray cluster is.
  const block = 2 * CS;
  bytes.fill(0, block + 2 * 5, block + CS);
  bytes[block + 2 * 60 + 1] = 1;
  bytes[79] |= 1;
  assert.ok(verifyRefcounts(bytes).errors.length > 0, 'the damage is real');
  const dirty = new MemoryImageFile(bytes);
  const r = await openQcow2(dirty);
  assert.equal(dirty.bytes()[79] & 1, 0, 'dirty bit cleared');
  const out = new Uint8Array(8 * CS);
  await r.read(0, [out]);
  assert.deepEqual(out, pattern(8 * CS, 1));
  await r.write(20 * CS, [pattern(CS, 2)]);
  await r.close();
  assert.deepEqual(verifyRefcounts(dirty.bytes()), { errors: [], leaks: 0 });
});

test('unknown autoclear bits are cleared on the first write, and only then', async () => {
  const bytes = freshImage({ size: SIZE, clusterBits: 12 });
  bytes[95] = 0x3;
  const file = new MemoryImageFile(bytes);
  const q = await openQcow2(file);
  await q.read(0, [new Uint8Array(512)]);
  assert.equal(file.bytes()[95], 0x3, 'opening and reading change nothing');
  await q.write(0, [new Uint8Array(512).fill(1)]);
  assert.equal(file.bytes()[95], 0);
  await q.close();
});

test('an image naming a backing file needs one', async () => {
  await assert.rejects(openQcow2(new MemoryImageFile(freshImage({ size: SIZE, backingFile: 'base.img' }))), { code: 'QCOW2_UNSUPPORTED' });
});
