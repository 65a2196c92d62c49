import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as native from './native.js';
import { isNativeError } from './native.js';
import { MappedRegion } from './mapped-memory.js';

const PAGE = native.PAGE_SIZE;

test('a region mapped in small windows covers every byte once, at its file offset', () => {
  const fd = native.memfdCreate('vblk-windows', 16 * PAGE);
  const whole = MappedRegion.map(fd, 16 * PAGE);
  const file = whole.windows[0].bytes;
  for (let i = 0; i < file.length; i++) file[i] = (i * 7) & 0xff;

  // Starts 100 bytes into page 1 (not page-aligned), 3-page windows.
  const start = PAGE + 100;
  const size = 10 * PAGE;
  const region = MappedRegion.map(fd, size, { fileOffset: start, maxWindowBytes: 3 * PAGE, writable: false });
  native.close(fd);
  try {
    let at = 0;
    for (const w of region.windows) {
      assert.equal(w.offset, at);
      for (let i = 0; i < w.bytes.length; i += 97) assert.equal(w.bytes[i], ((start + at + i) * 7) & 0xff);
      at += w.bytes.length;
    }
    assert.equal(at, size);
    assert.equal(region.windows[0].bytes.length, 3 * PAGE - 100);
    assert.ok(region.windows.length > 1);
  } finally {
    region.unmap();
    whole.unmap();
  }
});

test('a write through one region is seen through another mapping of the same fd', () => {
  const fd = native.memfdCreate('vblk-shared', 4 * PAGE);
  const a = MappedRegion.map(fd, 4 * PAGE);
  const b = MappedRegion.map(fd, 2 * PAGE, { fileOffset: 2 * PAGE });
  native.close(fd);
  a.windows[0].bytes[2 * PAGE + 5] = 99;
  assert.equal(b.windows[0].bytes[5], 99);
  assert.notEqual(b.windows[0].address, a.windows[0].address);
  a.unmap();
  b.unmap();
});

test('unmap detaches every window; it is idempotent', () => {
  const fd = native.memfdCreate('vblk-unmap', 4 * PAGE);
  const r = MappedRegion.map(fd, 4 * PAGE, { maxWindowBytes: PAGE });
  native.close(fd);
  const views = r.windows.map((w) => w.bytes);
  assert.equal(views.length, 4);
  r.unmap();
  r.unmap();
  assert.equal(r.isMapped, false);
  for (const v of views) {
    assert.equal(v.length, 0);
    assert.equal(v[0], undefined);
  }
});

test('a region larger than 4 GiB is mapped as several windows', () => {
  // A memfd is sparse: only the pages touched here take memory.
  const size = 5 * 1024 * 1024 * 1024 + 3 * PAGE;
  const fd = native.memfdCreate('vblk-big', size);
  const r = MappedRegion.map(fd, size);
  try {
    assert.equal(r.windows.length, 2);
    assert.equal(r.windows[0].bytes.length, native.MMAP_MAX_LENGTH);
    assert.equal(r.windows[1].offset, native.MMAP_MAX_LENGTH);
    assert.equal(r.windows[1].bytes.length, size - native.MMAP_MAX_LENGTH);
    const last = r.windows[1].bytes;
    last[last.length - 1] = 0xab;
    const check = new Uint8Array(1);
    native.preadv(fd, [check], size - 1);
    assert.equal(check[0], 0xab);
  } finally {
    r.unmap();
    native.close(fd);
  }
});

test('a region beyond the end of the file is refused, and nothing stays mapped', () => {
  const fd = native.memfdCreate('vblk-short', 4 * PAGE);
  const before = native.mappingCount();
  assert.throws(() => MappedRegion.map(fd, 8 * PAGE, { maxWindowBytes: 2 * PAGE }),
    (e: unknown) => isNativeError(e, 'ERR_OUT_OF_RANGE') && /beyond the end of the file/.test(e.message));
  assert.equal(native.mappingCount(), before);
  native.close(fd);
});

test('bad sizes and window sizes are refused', () => {
  const fd = native.memfdCreate('vblk-args', PAGE);
  assert.throws(() => MappedRegion.map(fd, 0), RangeError);
  assert.throws(() => MappedRegion.map(fd, PAGE, { maxWindowBytes: PAGE + 1 }), RangeError);
  assert.throws(() => MappedRegion.map(fd, PAGE, { fileOffset: -1 }), RangeError);
  native.close(fd);
});

test('unmap throws EBUSY while asynchronous I/O uses the memory, and succeeds afterwards', async () => {
  const fd = native.memfdCreate('vblk-busy', PAGE);
  const target = native.memfdCreate('vblk-busy-target', 0);
  const r = MappedRegion.map(fd, PAGE);
  const io = native.pwritevAsync(target, [r.windows[0].bytes.subarray(0, 64)], 0);
  assert.throws(() => r.unmap(), (e: unknown) => isNativeError(e, 'EBUSY'));
  assert.equal(r.isMapped, true);
  await io;
  r.unmap();
  assert.equal(r.isMapped, false);
  native.close(fd);
  native.close(target);
});
