import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { GuestMemory, MemoryError } from './guest-memory.js';

function twoRegions(): GuestMemory {
  // Two adjacent regions and one apart: [0x1000, 0x2000) [0x2000, 0x3000) [0x8000, 0x9000)
  return new GuestMemory([
    { guestAddress: 0x2000, bytes: new Uint8Array(0x1000).fill(2) },
    { guestAddress: 0x1000, bytes: new Uint8Array(0x1000).fill(1) },
    { guestAddress: 0x8000, bytes: new Uint8Array(0x1000).fill(8) },
  ]);
}

test('memory counts as shared with a peer (ring indices ordered) unless declared exclusive', () => {
  const bytes = new Uint8Array(0x1000);
  assert.equal(new GuestMemory([{ guestAddress: 0x1000, bytes }]).exclusive, false);
  assert.equal(new GuestMemory([{ guestAddress: 0x1000, bytes }], { exclusive: true }).exclusive, true);
});

test('view returns a range inside one region and null otherwise', () => {
  const m = twoRegions();
  assert.deepEqual(m.view(0x1ff0, 16), new Uint8Array(16).fill(1));
  assert.equal(m.view(0x1ff0, 17), null, 'crosses into the next region');
  assert.equal(m.view(0x0fff, 1), null);
  assert.equal(m.view(0x9000, 1), null);
  assert.equal(m.view(0x3000, 0), null, 'a zero-length range must still start inside a region');
  assert.equal(m.view(-1, 1), null);
  assert.equal(m.view(2 ** 60, 1), null);
});

test('gather splits a range at region boundaries and refuses holes', () => {
  const m = twoRegions();
  const out: Uint8Array[] = [];
  assert.equal(m.gather(0x1ffe, 4, out), true);
  assert.deepEqual(out.map((v) => [...v]), [[1, 1], [2, 2]]);
  const before = out.length;
  assert.equal(m.gather(0x2ffe, 4, out), false, '0x3000 is a hole');
  assert.equal(out.length, before, 'a refused gather leaves the list as it was');
});

test('contains agrees with gather on every range', () => {
  const m = twoRegions();
  fc.assert(fc.property(fc.integer({ min: 0, max: 0xa000 }), fc.integer({ min: 0, max: 0x3000 }), (addr, len) => {
    const out: Uint8Array[] = [];
    const ok = m.gather(addr, len, out);
    assert.equal(m.contains(addr, len), ok);
    if (ok) assert.equal(out.reduce((n, v) => n + v.length, 0), len);
  }));
});

test('read and write copy across regions and refuse out-of-range without touching memory', () => {
  const m = twoRegions();
  assert.equal(m.write(0x1ffe, new Uint8Array([9, 9, 9, 9])), true);
  const back = new Uint8Array(6);
  assert.equal(m.read(0x1ffd, back), true);
  assert.deepEqual([...back], [1, 9, 9, 9, 9, 2]);
  assert.equal(m.write(0x2fff, new Uint8Array([7, 7])), false);
  const last = new Uint8Array(1);
  m.read(0x2fff, last);
  assert.equal(last[0], 2, 'nothing was written by the refused write');
});

test('overlapping, empty and out-of-range regions are refused with typed errors', () => {
  assert.throws(() => new GuestMemory([
    { guestAddress: 0, bytes: new Uint8Array(0x1000) },
    { guestAddress: 0xfff, bytes: new Uint8Array(0x10) },
  ]), (e) => e instanceof MemoryError && e.code === 'OVERLAPPING_REGIONS');
  assert.throws(() => new GuestMemory([{ guestAddress: 0, bytes: new Uint8Array(0) }]),
    (e) => e instanceof MemoryError && e.code === 'BAD_REGION');
  assert.throws(() => new GuestMemory([{ guestAddress: Number.MAX_SAFE_INTEGER, bytes: new Uint8Array(2) }]),
    (e) => e instanceof MemoryError && e.code === 'BAD_REGION');
});

test('regionIndex finds the region holding a whole range, or -1', () => {
  const m = twoRegions();
  assert.equal(m.regionIndex(0x1000, 0x1000), 0);
  assert.equal(m.regionIndex(0x2ff0, 16), 1);
  assert.equal(m.regionIndex(0x1ff0, 17), -1, 'crosses a region edge');
  assert.equal(m.regionIndex(0x3000, 1), -1);
  assert.equal(m.regionIndex(-4, 1), -1);
  assert.equal(m.regionIndex(0x8000, 0x1001), -1);
});

test('regionWords are aligned views of a whole region, or null for a misaligned one', () => {
  const backing = new Uint8Array(0x2004);
  const m = new GuestMemory([
    { guestAddress: 0x1000, bytes: backing.subarray(0, 0x1000) },
    { guestAddress: 0x4000, bytes: backing.subarray(0x1002, 0x2002) },
  ]);
  const w = m.regionWords(0);
  assert.ok(w);
  assert.equal(m.regionWords(0), w, 'made once');
  backing.set([1, 0, 0, 0, 2, 0], 8);
  assert.equal(w.u32[2], 1);
  assert.equal(w.u16[6], 2);
  assert.equal(w.u32.length, 0x400);
  assert.equal(m.regionWords(1), null, 'its bytes start 2 bytes into a buffer');
});

test('gather views stay right when the same addresses come back with other lengths', () => {
  const m = twoRegions();
  const seen: number[][] = [];
  for (const [addr, len] of [[0x1010, 16], [0x1010, 16], [0x1010, 4], [0x1020, 16], [0x1010, 16], [0x2000, 8]] as const) {
    const out: Uint8Array[] = [];
    assert.equal(m.gather(addr, len, out), true);
    assert.equal(out.length, 1);
    assert.equal(out[0].length, len);
    seen.push([out[0].byteOffset, out[0].length]);
  }
  assert.deepEqual(seen, [[0x10, 16], [0x10, 16], [0x10, 4], [0x20, 16], [0x10, 16], [0, 8]]);
  // Property: any in-region range gathers to the bytes read returns, whatever came before.
  fc.assert(fc.property(fc.array(fc.tuple(fc.integer({ min: 0x1000, max: 0x2fff }), fc.integer({ min: 1, max: 64 }))), (ranges) => {
    for (const [addr, len] of ranges) {
      const out: Uint8Array[] = [];
      if (!m.gather(addr, len, out)) continue;
      const total = out.reduce((n, v) => n + v.length, 0);
      assert.equal(total, len);
      const copy = new Uint8Array(len);
      assert.equal(m.read(addr, copy), true);
      assert.deepEqual(Uint8Array.from(out.flatMap((v) => [...v])), copy);
    }
  }));
});

test('guestAddressOf finds the guest address of a view the memory handed out, and -1 for a foreign one', () => {
  const m = twoRegions();
  const out: Uint8Array[] = [];
  assert.ok(m.gather(0x1ff0, 0x20, out));
  assert.deepEqual(out.map((v) => m.guestAddressOf(v)), [0x1ff0, 0x2000]);
  assert.equal(m.guestAddressOf(m.view(0x8123, 5) as Uint8Array), 0x8123);
  assert.equal(m.guestAddressOf(new Uint8Array(4)), -1);
});
