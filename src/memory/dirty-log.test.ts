import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { DirtyLog, logBytesFor } from './dirty-log.js';

const PAGE = 4096;

function pagesSet(bits: Uint8Array): number[] {
  const out: number[] = [];
  for (let p = 0; p < bits.length * 8; p++) if (bits[p >> 3] & (1 << (p & 7))) out.push(p);
  return out;
}

test('a mark sets bit page % 8 of byte page / 8 for every page the range touches', () => {
  const log = new DirtyLog();
  const bits = new Uint8Array(4);
  log.replace(bits);
  log.mark(3 * PAGE + 100, 1);
  assert.deepEqual(pagesSet(bits), [3]);
  log.mark(7 * PAGE - 1, 2); // the last byte of page 6 and the first of page 7
  assert.deepEqual(pagesSet(bits), [3, 6, 7]);
  log.mark(9 * PAGE, 14 * PAGE); // pages 9 … 22, across three bytes
  assert.deepEqual(pagesSet(bits), [3, 6, 7, ...Array.from({ length: 14 }, (_, i) => 9 + i)]);
});

test('without a bitmap, or for an empty range, a mark does nothing', () => {
  const log = new DirtyLog();
  log.mark(0, PAGE);
  assert.equal(log.active, false);
  const bits = new Uint8Array(1);
  log.replace(bits);
  log.mark(PAGE, 0);
  assert.deepEqual(pagesSet(bits), []);
});

test('pages past the end of the bitmap are left out, and nothing past it is written', () => {
  const backing = new Uint8Array(4);
  const bits = backing.subarray(0, 2); // 16 pages; the two bytes after it must stay 0
  const log = new DirtyLog();
  log.replace(bits);
  log.mark(14 * PAGE, 4 * PAGE); // pages 14 … 17: 16 and 17 are beyond
  assert.deepEqual(pagesSet(bits), [14, 15]);
  log.mark(2 ** 52, PAGE);
  assert.deepEqual([...backing.subarray(2)], [0, 0]);
});

test('replace swaps the bitmap and returns the old one', () => {
  const log = new DirtyLog();
  const a = new Uint8Array(1);
  const b = new Uint8Array(1);
  assert.equal(log.replace(a), null);
  assert.equal(log.replace(b), a);
  log.mark(0, 1);
  assert.deepEqual([a[0], b[0]], [0, 1]);
  assert.equal(log.size, 1);
});

test('logBytesFor covers every page below the end address', () => {
  assert.equal(logBytesFor(0), 0);
  assert.equal(logBytesFor(1), 1);
  assert.equal(logBytesFor(8 * PAGE), 1);
  assert.equal(logBytesFor(8 * PAGE + 1), 2);
  assert.equal(logBytesFor(256 * 1024 * 1024), 8192);
});

test('property: a mark sets exactly the pages of the range that the bitmap holds', () => {
  fc.assert(fc.property(fc.integer({ min: 0, max: 200 * PAGE }), fc.integer({ min: 1, max: 40 * PAGE }), (addr, len) => {
    const bits = new Uint8Array(16);
    const log = new DirtyLog();
    log.replace(bits);
    log.mark(addr, len);
    const expected: number[] = [];
    for (let p = Math.floor(addr / PAGE); p <= Math.floor((addr + len - 1) / PAGE); p++) if (p < 128) expected.push(p);
    assert.deepEqual(pagesSet(bits), expected);
  }));
});
