// Hand-made hostile images (the issue's acceptance list): a valid image made by
// createQcow2 and populated through openQcow2, then exactly one field patched per case.
// Each case ends in a one-line typed error at open, or in a typed error for the affected
// request (the device turns it into IOERR) while a cluster under another L2 table still
// reads and writes; never an untyped throw, a hang, a huge allocation, a write past a
// stated bound, or a write into the header cluster other than the driver's own header
// field rewrites.
//
// The backing chain that loops (a.qcow2 → b.qcow2 → a.qcow2) is covered through openImage
// with real files in src/node/image-open.test.ts ("a loop through names …"): refused with
// the one-line ImageOpenError BACKING_LOOP. It is not duplicated here.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VblkError } from '../../errors.js';
import type { BackendResult } from '../backend.js';
import type { ImageFile } from './image-file.js';
import { MemoryImageFile } from './memory-image-file.js';
import { createQcow2 } from './create.js';
import { openQcow2 } from './qcow2.js';
import { entryOffset, writeU64 } from './header.js';
import { pattern } from '../../../test/support/pattern.js';

const CB = 12;
const CS = 2 ** CB;
/** Two L2 tables' worth of guest clusters (512 per table at 4 KiB clusters). */
const SIZE = 1024 * CS;
/** Guest cluster under the first L2 table (the one the cases damage). */
const HIT = 0;
/** Guest cluster under the second L2 table (must keep working where only the first is damaged). */
const OTHER = 600;
/** How far allocation may legitimately grow the file during one case. */
const GROWTH = 64 * CS;
/** Header fields the driver rewrites in place: size..l1_table_offset (resize), refcount table offset and clusters (growth), autoclear bits. */
const HEADER_WRITES: readonly (readonly [number, number])[] = [[24, 48], [48, 60], [88, 96]];

/** An ImageFile recording every write, truncate and discard. */
class RecordingFile implements ImageFile {
  readonly ops: { op: string; offset: number; length: number }[] = [];
  constructor(readonly inner: MemoryImageFile) {}
  get size(): number { return this.inner.size; }
  get readOnly(): boolean { return this.inner.readOnly; }
  read(offset: number, buffers: readonly Uint8Array[]): BackendResult { return this.inner.read(offset, buffers); }
  write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    this.ops.push({ op: 'write', offset, length: buffers.reduce((n, b) => n + b.length, 0) });
    return this.inner.write(offset, buffers);
  }
  flush(): BackendResult { return this.inner.flush(); }
  truncate(size: number): BackendResult {
    this.ops.push({ op: 'truncate', offset: size, length: 0 });
    return this.inner.truncate(size);
  }
  discard(offset: number, length: number): BackendResult {
    this.ops.push({ op: 'discard', offset, length });
    return this.inner.discard(offset, length);
  }
  close(): BackendResult { return this.inner.close(); }
}

interface Base {
  readonly bytes: Uint8Array;
  readonly l1: number;
  readonly l2: number;
  readonly data: number;
  readonly refTable: number;
}

/** A valid image: data in guest clusters 0..2 and 600, so two L2 tables and data clusters exist. */
async function base(): Promise<Base> {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: SIZE, clusterSize: CS });
  const q = await openQcow2(file);
  await q.write(HIT * CS, [pattern(3 * CS, 1)]);
  await q.write(OTHER * CS, [pattern(CS, 2)]);
  await q.close();
  const bytes = file.bytes();
  const v = new DataView(bytes.buffer);
  const l1 = u64(v, 40);
  const l2 = entryOffset(v.getUint32(l1), v.getUint32(l1 + 4));
  const data = entryOffset(v.getUint32(l2 + 8 * HIT), v.getUint32(l2 + 8 * HIT + 4));
  assert.ok(l2 >= CS && data >= CS && entryOffset(v.getUint32(l1 + 8), v.getUint32(l1 + 12)) !== l2, 'two L2 tables and a data cluster');
  return { bytes, l1, l2, data, refTable: u64(v, 48) };
}

function u64(v: DataView, at: number): number {
  return v.getUint32(at) * 2 ** 32 + v.getUint32(at + 4);
}

/** An L2/L1 entry with the COPIED flag (bit 63), as the driver writes them for refcount 1. */
function copied(v: DataView, at: number, offset: number): void {
  writeU64(v, at, offset);
  v.setUint32(at, v.getUint32(at) | 0x8000_0000);
}

function expectTyped(what: string, e: unknown): VblkError {
  if (!(e instanceof VblkError)) {
    throw new Error(`${what} threw an untyped ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
  }
  assert.ok(!e.message.includes('\n'), `${what}: the message is one line: ${JSON.stringify(e.message)}`);
  return e;
}

async function attempt(what: string, fn: () => unknown): Promise<VblkError | undefined> {
  try {
    await fn();
    return undefined;
  } catch (e) {
    return expectTyped(what, e);
  }
}

interface Outcome {
  /** The open's error, if it was refused. */
  readonly open?: VblkError;
  /** Errors of the requests on the damaged cluster (read, write). */
  readonly hitRead?: VblkError;
  readonly hitWrite?: VblkError;
  /** The file's bytes after the run. */
  readonly after: Uint8Array;
}

/**
 * Opens the patched image (writable unless `readOnly`), reads and writes the damaged
 * cluster, reads and writes the cluster under the other L2 table (which must work when the
 * open did and `otherWorks`), flushes and closes; checks every write against the bounds.
 */
async function run(bytes: Uint8Array, o: { readOnly?: boolean; otherWorks?: boolean } = {}): Promise<Outcome> {
  const inner = new MemoryImageFile(bytes, { readOnly: o.readOnly ?? false });
  const file = new RecordingFile(inner);
  const bound = bytes.length + GROWTH;
  const heapBefore = process.memoryUsage().arrayBuffers;
  let outcome: Outcome;
  let q: Awaited<ReturnType<typeof openQcow2>>;
  try {
    q = await openQcow2(file, { readOnly: o.readOnly });
  } catch (e) {
    outcome = { open: expectTyped('open', e), after: inner.bytes() };
    checkWrites(file, bound);
    return outcome;
  }
  const hitRead = await attempt('read of the damaged cluster', () => q.read(HIT * CS, [new Uint8Array(CS)]));
  let hitWrite: VblkError | undefined;
  if (!q.readOnly) hitWrite = await attempt('write of the damaged cluster', () => q.write(HIT * CS, [pattern(CS, 7)]));
  const otherRead = new Uint8Array(CS);
  const otherReadError = await attempt('read of the other cluster', () => q.read(OTHER * CS, [otherRead]));
  let otherWriteError: VblkError | undefined;
  if (!q.readOnly) otherWriteError = await attempt('write of another cluster', () => q.write((OTHER + 1) * CS, [pattern(CS, 8)]));
  await attempt('flush', () => q.flush());
  await attempt('close', () => q.close());
  if (o.otherWorks ?? true) {
    assert.equal(otherReadError, undefined, `the other L2 table still reads: ${otherReadError?.message}`);
    assert.deepEqual(otherRead, pattern(CS, 2));
    assert.equal(otherWriteError, undefined, `the other L2 table still writes: ${otherWriteError?.message}`);
  }
  checkWrites(file, bound);
  assert.ok(process.memoryUsage().arrayBuffers - heapBefore < 64 * 2 ** 20, 'no large allocation');
  return { hitRead, hitWrite, after: inner.bytes() };
}

function checkWrites(file: RecordingFile, bound: number): void {
  for (const { op, offset, length } of file.ops) {
    assert.ok(offset + length <= bound, `${op} of ${length} bytes at ${offset} ends past the bound ${bound}`);
    if (op === 'truncate') continue;
    if (offset < CS) {
      assert.ok(HEADER_WRITES.some(([from, to]) => offset >= from && offset + length <= to),
        `${op} of ${length} bytes at ${offset} lands in the header cluster outside the header fields the driver rewrites`);
    }
  }
}

function patched(b: Base, patch: (v: DataView, b: Base) => void): Uint8Array {
  const bytes = b.bytes.slice();
  patch(new DataView(bytes.buffer), b);
  return bytes;
}

async function refused(b: Base, patch: (v: DataView, b: Base) => void, code: string, message?: RegExp): Promise<void> {
  for (const readOnly of [false, true]) {
    const out = await run(patched(b, patch), { readOnly });
    assert.ok(out.open !== undefined, `open ${readOnly ? 'read-only' : 'writable'} is refused`);
    assert.equal(out.open.code, code, out.open.message);
    if (message) assert.match(out.open.message, message);
  }
}

const eof = (b: Base): number => Math.ceil(b.bytes.length / CS) * CS + 16 * CS;

test('the base image is valid: both L2 tables read and write, no write outside the bounds', async () => {
  const b = await base();
  const out = await run(b.bytes.slice());
  assert.equal(out.open, undefined);
  assert.equal(out.hitRead, undefined);
  assert.equal(out.hitWrite, undefined);
});

test('header offsets of tables: the L1 table past EOF or at 0 (over the header), the refcount table past EOF or at 0, are refused at open', async () => {
  const b = await base();
  await refused(b, (v) => writeU64(v, 40, eof(b)), 'QCOW2_BAD_HEADER', /L1 table .*past the end/);
  await refused(b, (v) => writeU64(v, 40, 0), 'QCOW2_BAD_HEADER', /L1 table .*overlaps the header/);
  // The L1 table ending past EOF (its start inside the file, its l1_size entries not).
  await refused(b, (v) => { writeU64(v, 40, Math.floor(b.bytes.length / CS) * CS - CS); v.setUint32(36, 2 * CS / 8); }, 'QCOW2_BAD_HEADER', /past the end/);
  await refused(b, (v) => writeU64(v, 48, eof(b)), 'QCOW2_BAD_HEADER', /refcount table .*past the end/);
  await refused(b, (v) => writeU64(v, 48, 0), 'QCOW2_BAD_HEADER', /refcount table .*overlaps the header/);
  await refused(b, (v) => v.setUint32(56, 0xffff_ffff), 'QCOW2_BAD_HEADER', /implausibly large/);
});

test('cluster_bits 8 and 22 are refused at open', async () => {
  const b = await base();
  for (const bits of [8, 22, 0, 0xffff_ffff]) await refused(b, (v) => v.setUint32(20, bits), 'QCOW2_BAD_HEADER', /cluster_bits/);
});

test('an L1 table of 2^32 - 1 entries is refused before it is allocated; an l1_size too small for the virtual size is refused', async () => {
  const b = await base();
  const before = process.memoryUsage().arrayBuffers;
  await refused(b, (v) => v.setUint32(36, 0xffff_ffff), 'QCOW2_BAD_HEADER', /l1_size .*implausibly large/);
  assert.ok(process.memoryUsage().arrayBuffers - before < 64 * 2 ** 20, 'no L1 buffer was allocated');
  await refused(b, (v) => v.setUint32(36, 1), 'QCOW2_BAD_HEADER', /l1_size 1 is too small/);
  await refused(b, (v) => v.setUint32(36, 0), 'QCOW2_BAD_HEADER', /l1_size 0 is too small/);
  // A virtual size past what l1_size maps.
  await refused(b, (v) => writeU64(v, 24, 2 ** 40), 'QCOW2_BAD_HEADER', /too small/);
});

test('an L1 entry past EOF, on the header cluster or unaligned is refused at open', async () => {
  const b = await base();
  for (const [what, at] of [['past EOF', eof(b)], ['unaligned, inside the header cluster', 512], ['just past the last cluster', Math.ceil(b.bytes.length / CS) * CS]] as const) {
    const out = await run(patched(b, (v) => copied(v, b.l1, at)));
    assert.equal(out.open?.code, 'QCOW2_BAD_METADATA', `${what}: ${out.open?.message}`);
  }
  // Offset 0 is "no L2 table" whatever the flags: the cluster reads as zeroes, and a write allocates a new table, never at the header.
  const out = await run(patched(b, (v) => copied(v, b.l1, 0)));
  assert.equal(out.open, undefined);
  assert.equal(out.hitRead, undefined);
  assert.equal(out.hitWrite, undefined);
});

test('an L2 entry past EOF, on the header (COPIED with offset 0, or unaligned) fails the requests under that table with a typed error; the other table works', async () => {
  const b = await base();
  const cases: readonly (readonly [string, (v: DataView) => void])[] = [
    ['past EOF', (v) => copied(v, b.l2 + 8 * HIT, eof(b))],
    ['COPIED at offset 0', (v) => copied(v, b.l2 + 8 * HIT, 0)],
    ['unaligned inside the header cluster', (v) => copied(v, b.l2 + 8 * HIT, 512)],
    ['a neighbour entry past EOF', (v) => copied(v, b.l2 + 8 * (HIT + 5), eof(b))],
  ];
  for (const [what, patch] of cases) {
    for (const readOnly of [false, true]) {
      const out = await run(patched(b, patch), { readOnly });
      assert.equal(out.open, undefined, `${what}: the open succeeds (L2 tables are read on demand)`);
      assert.equal(out.hitRead?.code, 'QCOW2_BAD_METADATA', `${what}: ${out.hitRead?.message}`);
      if (!readOnly) assert.equal(out.hitWrite?.code, 'QCOW2_BAD_METADATA', `${what}: ${out.hitWrite?.message}`);
    }
  }
});

test('an L2 entry pointing at the L1 or the refcount table fails the requests under that table, and never frees nor overwrites the table', async () => {
  const b = await base();
  // Before the fix, the entry without COPIED made a write copy the cluster away and free the
  // L1 table's cluster (refcount 1 → 0), which was then discarded: the L1 table on disk was zeroes.
  for (const [what, at] of [['L1 table', b.l1], ['refcount table', b.refTable]] as const) {
    for (const flag of [false, true]) {
      const patch = (v: DataView): void => (flag ? copied(v, b.l2 + 8 * HIT, at) : writeU64(v, b.l2 + 8 * HIT, at));
      const out = await run(patched(b, patch));
      assert.equal(out.open, undefined);
      assert.equal(out.hitRead?.code, 'QCOW2_BAD_METADATA', `${what}, COPIED ${flag}: ${out.hitRead?.message}`);
      assert.equal(out.hitWrite?.code, 'QCOW2_BAD_METADATA', `${what}, COPIED ${flag}: ${out.hitWrite?.message}`);
      assert.deepEqual(out.after.subarray(at, at + CS), b.bytes.subarray(at, at + CS), `${what}, COPIED ${flag}: the table on disk is intact`);
    }
  }
  // Read-only, the L1 table is known (the refcount table is not read).
  const ro = await run(patched(b, (v) => copied(v, b.l2 + 8 * HIT, b.l1)), { readOnly: true });
  assert.equal(ro.hitRead?.code, 'QCOW2_BAD_METADATA');
});

test('an L2 entry pointing at an L2 table (the other one, or its own) or at a refcount block fails the requests under that table, and its write never lands there', async () => {
  const b = await base();
  const v0 = new DataView(b.bytes.buffer);
  const otherL2 = entryOffset(v0.getUint32(b.l1 + 8), v0.getUint32(b.l1 + 12));
  const block = u64(v0, b.refTable);
  for (const [what, at] of [['the other L2 table', otherL2], ['its own L2 table', b.l2], ['a refcount block', block]] as const) {
    for (const flag of [false, true]) {
      const patch = (v: DataView): void => (flag ? copied(v, b.l2 + 8 * HIT, at) : writeU64(v, b.l2 + 8 * HIT, at));
      // The other table is what the case damages when it points there: it must not work then.
      const out = await run(patched(b, patch), { otherWorks: at !== otherL2 });
      assert.equal(out.open, undefined);
      assert.equal(out.hitRead?.code, 'QCOW2_BAD_METADATA', `${what}, COPIED ${flag}: ${out.hitRead?.message}`);
      assert.match(out.hitRead?.message ?? '', /is metadata \(an L1, L2, refcount or snapshot table, or a refcount block\)/);
      assert.equal(out.hitWrite?.code, 'QCOW2_BAD_METADATA', `${what}, COPIED ${flag}: ${out.hitWrite?.message}`);
      // The table may change by the harness's own writes under the other table; never by the refused write's data.
      assert.notDeepEqual(out.after.subarray(at, at + CS), pattern(CS, 7), `${what}, COPIED ${flag}: the refused write landed on the table`);
    }
  }
});

test('an L1 entry pointing at a refcount block fails the requests under it, and never overwrites the block', async () => {
  const b = await base();
  const block = u64(new DataView(b.bytes.buffer), b.refTable);
  const out = await run(patched(b, (v) => copied(v, b.l1, block)));
  assert.equal(out.open, undefined);
  assert.equal(out.hitRead?.code, 'QCOW2_BAD_METADATA', out.hitRead?.message);
  assert.match(out.hitRead?.message ?? '', /is a refcount block/);
  assert.equal(out.hitWrite?.code, 'QCOW2_BAD_METADATA', out.hitWrite?.message);
});

test('a data cluster whose refcount says free, handed out as a new L2 table: the write through the old entry is refused and the table survives', async () => {
  const b = await base();
  const block = u64(new DataView(b.bytes.buffer), b.refTable);
  // 16-bit refcounts: the data cluster of guest cluster HIT counted 0, so the allocator's first free cluster.
  const bytes = patched(b, (v) => v.setUint16(block + 2 * (b.data / CS), 0));
  const file = new RecordingFile(new MemoryImageFile(bytes));
  const q = await openQcow2(file);
  // HIT's table loaded (and checked) while its data cluster is still data.
  await q.read(HIT * CS, [new Uint8Array(CS)]);
  // A write past the old size needs a new L2 table: it lands on the data cluster of HIT.
  await q.resize(2 * SIZE);
  const far = 1500;
  await q.write(far * CS, [pattern(CS, 5)]);
  await q.flush();
  const now = new DataView(file.inner.bytes().buffer);
  const l1 = u64(now, 40);
  const newTable = entryOffset(now.getUint32(l1 + 8 * 2), now.getUint32(l1 + 8 * 2 + 4));
  assert.equal(newTable, b.data, 'the new L2 table took the cluster the damaged refcount freed');
  // Through the old entry, a write would overwrite that table, a discard free it.
  for (const [what, op] of [['write', () => q.write(HIT * CS, [pattern(CS, 7)])], ['discard', () => q.discard(HIT * CS, CS)],
    ['write-zeroes', () => q.writeZeroes(HIT * CS, CS, false)]] as const) {
    const e = await attempt(what, op);
    assert.equal(e?.code, 'QCOW2_BAD_METADATA', `${what}: ${e?.message}`);
    assert.match(e.message, /holds the image's metadata/);
  }
  const back = new Uint8Array(CS);
  await q.read(far * CS, [back]);
  assert.deepEqual(back, pattern(CS, 5), 'the new table still maps the far cluster');
  await q.flush();
  await q.close();
  checkWrites(file, bytes.length + GROWTH);
});

test('a refcount table entry at offset 0 or past EOF: refused writable, readable read-only', async () => {
  const b = await base();
  for (const [what, at] of [['past EOF', eof(b)], ['on the header cluster (512)', 512]] as const) {
    const out = await run(patched(b, (v) => writeU64(v, b.refTable, at)));
    assert.equal(out.open?.code, 'QCOW2_BAD_METADATA', `${what}: ${out.open?.message}`);
    const ro = await run(patched(b, (v) => writeU64(v, b.refTable, at)), { readOnly: true });
    assert.equal(ro.open, undefined, `${what}: read-only needs no refcounts`);
    assert.equal(ro.hitRead, undefined);
  }
});

test('a refcount table whose entry 0 is empty (no block counts the header): refused writable, readable read-only', async () => {
  const b = await base();
  // Before the fix, the whole range of block 0 looked free: a write that allocated reused the
  // first L2 table's cluster for data (the header itself was spared, being reserved).
  const bytes = patched(b, (v) => writeU64(v, b.refTable, 0));
  const out = await run(bytes);
  assert.equal(out.open?.code, 'QCOW2_BAD_METADATA', out.open?.message);
  assert.match(out.open?.message ?? '', /refcount table entry 0 is empty/);
  const ro = await run(bytes, { readOnly: true });
  assert.equal(ro.open, undefined);
  assert.equal(ro.hitRead, undefined);
});

test('a refcount block claiming the header (and the refcount table) free: writes that allocate never land there', async () => {
  const b = await base();
  const block = u64(new DataView(b.bytes.buffer), b.refTable);
  // 16-bit refcounts: clusters 0 (header) and 1 (refcount table) counted 0.
  const out = await run(patched(b, (v) => { v.setUint16(block, 0); v.setUint16(block + 2, 0); }));
  assert.equal(out.open, undefined);
  assert.equal(out.hitWrite, undefined);
  // run() checked that no write touched the header cluster outside the header fields; the refcount table is intact but for its own entries' updates.
  assert.deepEqual(out.after.subarray(b.refTable, b.refTable + 8), b.bytes.subarray(b.refTable, b.refTable + 8));
  // Allocate many clusters: none lands on the header or the refcount table.
  const file = new RecordingFile(new MemoryImageFile(patched(b, (v) => { v.setUint16(block, 0); v.setUint16(block + 2, 0); })));
  const q = await openQcow2(file);
  for (let c = 100; c < 140; c++) await q.write(c * CS, [pattern(CS, c)]);
  await q.close();
  for (const { op, offset, length } of file.ops) {
    if (op !== 'write') continue;
    assert.ok(offset + length <= CS ? HEADER_WRITES.some(([f, t]) => offset >= f && offset + length <= t) : true, `write at ${offset}`);
    assert.ok(!(offset < b.refTable + CS && offset + length > b.refTable) || length <= 8, `a data write of ${length} bytes at ${offset} over the refcount table`);
  }
});

test('a compressed cluster whose length runs past EOF, or whose offset is past EOF, fails its read with a typed error', async () => {
  const b = await base();
  // x = 62 - (cluster_bits - 8) = 58: host offset in bits 0..57, additional sectors in bits 58..61.
  const compressed = (v: DataView, offset: number, sectors: number): void => {
    const x = 62 - (CB - 8);
    writeU64(v, b.l2 + 8 * HIT, offset);
    v.setUint32(b.l2 + 8 * HIT, v.getUint32(b.l2 + 8 * HIT) | 0x4000_0000 | ((sectors - 1) << (x - 32)));
  };
  const last = Math.floor(b.bytes.length / 512) * 512 - 512;
  for (const [what, offset, sectors] of [['length past EOF', last, 16], ['offset past EOF', eof(b), 1], ['offset on the header', 0, 8]] as const) {
    for (const readOnly of [false, true]) {
      const out = await run(patched(b, (v) => compressed(v, offset, sectors)), { readOnly });
      assert.equal(out.open, undefined, what);
      assert.equal(out.hitRead?.code, 'QCOW2_BAD_METADATA', `${what}: ${out.hitRead?.message}`);
    }
  }
});

test('header_length past the cluster, an extension longer than the header cluster: refused at open', async () => {
  const b = await base();
  await refused(b, (v) => v.setUint32(100, CS + 8), 'QCOW2_BAD_HEADER', /header_length/);
  await refused(b, (v) => v.setUint32(100, 0xffff_fff8), 'QCOW2_BAD_HEADER', /header_length/);
  // createQcow2 writes the feature name table as the first extension, at header_length 112.
  const v0 = new DataView(b.bytes.buffer);
  assert.notEqual(v0.getUint32(112), 0, 'an extension follows the header');
  await refused(b, (v) => v.setUint32(116, CS), 'QCOW2_BAD_HEADER', /runs past its area/);
  await refused(b, (v) => v.setUint32(116, 0xffff_fff8), 'QCOW2_BAD_HEADER', /runs past its area/);
  // No end marker: extensions running up to the end of the cluster.
  await refused(b, (v) => { for (let at = 112; at + 8 <= CS; at += 8) { v.setUint32(at, 0x1234); v.setUint32(at + 4, 0); } }, 'QCOW2_BAD_HEADER', /no end marker/);
});

test('a backing file name offset or size past the header cluster is refused at open', async () => {
  const b = await base();
  await refused(b, (v) => { writeU64(v, 8, CS - 4); v.setUint32(16, 100); }, 'QCOW2_BAD_HEADER', /backing file name/);
  await refused(b, (v) => { writeU64(v, 8, eof(b)); v.setUint32(16, 8); }, 'QCOW2_BAD_HEADER', /backing file name/);
  await refused(b, (v) => { writeU64(v, 8, 512); v.setUint32(16, 0xffff_ffff); }, 'QCOW2_BAD_HEADER', /backing file name/);
  await refused(b, (v) => { writeU64(v, 8, 2 ** 52); v.setUint32(16, 8); }, 'QCOW2_BAD_HEADER', /backing file name/);
  await refused(b, (v) => { writeU64(v, 8, 8); v.setUint32(16, 8); }, 'QCOW2_BAD_HEADER', /over the header/);
});

test('nb_snapshots huge, or snapshots_offset past EOF, is refused at open', async () => {
  const b = await base();
  await refused(b, (v) => { v.setUint32(60, 0xffff_ffff); writeU64(v, 64, eof(b)); }, 'QCOW2_BAD_HEADER', /nb_snapshots/);
  await refused(b, (v) => { v.setUint32(60, 1000); writeU64(v, 64, eof(b)); }, 'QCOW2_BAD_HEADER', /snapshot table .*past the end/);
  await refused(b, (v) => { v.setUint32(60, 1); writeU64(v, 64, 0); }, 'QCOW2_BAD_HEADER', /snapshot table .*overlaps the header/);
});
