// The device serves every request type with the right status and used length, and
// answers every malformed request with the right status — never an exception.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { BlkDevice } from '../src/blk/device.js';
import { VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } from '../src/spec/virtio-blk.js';
import { hasFeature } from '../src/spec/virtio.js';
import {
  Harness, RecordingBackend, concat, cut, framed, header, pattern, segments, setup,
} from './blk-device-harness.js';

const { OK, IOERR, UNSUPP } = VIRTIO_BLK_S;
const T = VIRTIO_BLK_T;
const UNMAP = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
const MiB = 1 << 20;

test('IN reads the backend into the data buffers; used length is data plus status', async () => {
  const backend = new MemoryBackend({ size: MiB });
  const content = pattern(4096, 1);
  backend.write(8 * 512, [content]);
  const { h } = setup({ backend });
  const r = await h.run(0, { readable: [header(T.IN, 8)], writable: [1024, 3072, 1] });
  assert.equal(r.status, OK);
  assert.equal(r.len, 4097);
  assert.deepEqual(r.data, content);
});

test('IN with data and status in one writable descriptor', async () => {
  const backend = new MemoryBackend({ size: MiB });
  backend.write(0, [pattern(512, 2)]);
  const { h } = setup({ backend });
  const r = await h.run(0, { readable: [header(T.IN, 0)], writable: [513] });
  assert.equal(r.status, OK);
  assert.equal(r.len, 513);
  assert.deepEqual(r.data, pattern(512, 2));
});

test('OUT writes the data buffers to the backend; used length is the status byte', async () => {
  const backend = new MemoryBackend({ size: MiB });
  const { h } = setup({ backend });
  const data = pattern(8192, 3);
  const r = await h.run(0, { readable: [header(T.OUT, 16), ...cut(data, [100, 4096])], writable: [1] });
  assert.equal(r.status, OK);
  assert.equal(r.len, 1);
  const back = new Uint8Array(8192);
  backend.read(16 * 512, [back]);
  assert.deepEqual(back, data);
});

test('OUT with the data in the header descriptor', async () => {
  const backend = new MemoryBackend({ size: MiB });
  const { h } = setup({ backend });
  const data = pattern(512, 4);
  const r = await h.run(0, { readable: [concat(header(T.OUT, 1), data)], writable: [1] });
  assert.equal(r.status, OK);
  const back = new Uint8Array(512);
  backend.read(512, [back]);
  assert.deepEqual(back, data);
});

test('a zero-length read inside the disk succeeds', async () => {
  const { h } = setup();
  const r = await h.run(0, framed(T.IN, 0));
  assert.equal(r.status, OK);
  assert.equal(r.len, 1);
});

test('FLUSH asks the backend to flush', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  const r = await h.run(0, framed(T.FLUSH, 0));
  assert.equal(r.status, OK);
  assert.equal(r.len, 1);
  assert.deepEqual(backend.calls, [['flush']]);
});

test('FLUSH is UNSUPP when the backend cannot flush (and FLUSH is not offered)', async () => {
  const backend = new RecordingBackend();
  Object.defineProperty(backend, 'canFlush', { value: false });
  const { h, device } = setup({ backend });
  assert.ok(!hasFeature(device.deviceFeatures, VIRTIO_BLK_F.FLUSH));
  assert.ok(!hasFeature(device.deviceFeatures, VIRTIO_BLK_F.CONFIG_WCE));
  assert.equal((await h.run(0, framed(T.FLUSH, 0))).status, UNSUPP);
  assert.deepEqual(backend.calls, []);
});

for (const [serial, expected] of [
  ['serial-of-19-bytes', 'serial-of-19-bytes\0\0'],
  ['serial-of-19-bytes!', 'serial-of-19-bytes!\0'],
  ['a-serial-of-20-bytes', 'a-serial-of-20-bytes'],
  ['', '\0'.repeat(20)],
] as const) {
  test(`GET_ID answers ${serial.length} serial bytes NUL-padded to 20`, async () => {
    const { h } = setup({ serial });
    const r = await h.run(0, framed(T.GET_ID, 0, { inLen: 20 }));
    assert.equal(r.status, OK);
    assert.equal(r.len, 21);
    assert.equal(new TextDecoder().decode(r.data), expected);
  });
}

test('GET_ID copies min(20, room) bytes and leaves the rest of a larger buffer alone', async () => {
  const { h } = setup({ serial: 'abcdefghij' });
  const small = await h.run(0, framed(T.GET_ID, 0, { inLen: 4 }));
  assert.equal(small.status, OK);
  assert.equal(small.len, 5);
  assert.equal(new TextDecoder().decode(small.data), 'abcd');
  const big = await h.run(0, framed(T.GET_ID, 0, { inLen: 32 }));
  assert.equal(big.len, 21);
  assert.deepEqual(big.data.subarray(20), new Uint8Array(12).fill(0xee));
});

test('DISCARD with several segments discards each range', async () => {
  const backend = new RecordingBackend();
  backend.inner.write(0, [pattern(64 * 1024, 5)]);
  const { h } = setup({ backend });
  const segs = segments([{ sector: 0, numSectors: 8 }, { sector: 64, numSectors: 16 }]);
  const r = await h.run(0, framed(T.DISCARD, 0, { out: segs }));
  assert.equal(r.status, OK);
  assert.equal(r.len, 1);
  assert.deepEqual(backend.calls, [['discard', 0, 4096], ['discard', 64 * 512, 8192]]);
  const back = new Uint8Array(4096);
  backend.inner.read(0, [back]);
  assert.deepEqual(back, new Uint8Array(4096));
});

test('WRITE_ZEROES passes the unmap flag of each segment', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  const segs = segments([{ sector: 8, numSectors: 8, flags: UNMAP }, { sector: 32, numSectors: 1 }]);
  const r = await h.run(0, framed(T.WRITE_ZEROES, 0, { out: segs }));
  assert.equal(r.status, OK);
  assert.deepEqual(backend.calls, [['writeZeroes', 4096, 4096, true], ['writeZeroes', 32 * 512, 512, false]]);
});

test('SECURE_ERASE zeroes then discards each segment, then flushes', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  const segs = segments([{ sector: 0, numSectors: 2 }, { sector: 10, numSectors: 4 }]);
  const r = await h.run(0, framed(T.SECURE_ERASE, 0, { out: segs }));
  assert.equal(r.status, OK);
  assert.deepEqual(backend.calls, [
    ['writeZeroes', 0, 1024, false], ['discard', 0, 1024],
    ['writeZeroes', 5120, 2048, false], ['discard', 5120, 2048],
    ['flush'],
  ]);
});

test('a range segment spanning the whole disk is accepted; one sector more is IOERR', async () => {
  const backend = new RecordingBackend(64 * 1024);
  const { h } = setup({ backend });
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: segments([{ sector: 0, numSectors: 128 }]) }))).status, OK);
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: segments([{ sector: 1, numSectors: 128 }]) }))).status, IOERR);
});

for (const [name, type] of [
  ['SCSI_CMD', T.SCSI_CMD], ['GET_LIFETIME', T.GET_LIFETIME], ['ZONE_REPORT', T.ZONE_REPORT],
  ['ZONE_APPEND', T.ZONE_APPEND], ['an unknown type', 0x7fff_ffff], ['FLUSH_OUT (legacy 5)', 5],
] as const) {
  test(`${name} is UNSUPP`, async () => {
    const backend = new RecordingBackend();
    const { h } = setup({ backend });
    const r = await h.run(0, framed(type, 0, { inLen: 512 }));
    assert.equal(r.status, UNSUPP);
    assert.equal(r.len, 1);
    assert.deepEqual(backend.calls, []);
  });
}

// ---- malformed requests ----

test('a header shorter than 16 bytes is IOERR', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  const r = await h.run(0, { readable: [header(T.IN, 0).subarray(0, 15)], writable: [512, 1] });
  assert.equal(r.status, IOERR);
  assert.equal(r.len, 1);
  assert.deepEqual(backend.calls, []);
});

test('a chain with no device-writable byte completes with used length 0 and no status', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  const r = await h.run(0, { readable: [header(T.OUT, 0), new Uint8Array(512)], writable: [] });
  assert.equal(r.len, 0);
  assert.equal(r.status, -1);
  assert.deepEqual(backend.calls, []);
  // And the queue goes on.
  assert.equal((await h.run(0, framed(T.IN, 0, { inLen: 512 }))).status, OK);
});

test('an empty chain (one zero-length readable descriptor) completes with used length 0', async () => {
  const { h } = setup();
  const r = await h.run(0, { readable: [new Uint8Array(0)], writable: [] });
  assert.equal(r.len, 0);
});

test('IN with device-readable data past the header is IOERR', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  const r = await h.run(0, { readable: [header(T.IN, 0), new Uint8Array(512)], writable: [512, 1] });
  assert.equal(r.status, IOERR);
  assert.equal(r.len, 1);
  assert.deepEqual(backend.calls, []);
});

test('OUT with device-writable data besides the status is IOERR', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  const r = await h.run(0, { readable: [header(T.OUT, 0), new Uint8Array(512)], writable: [512, 1] });
  assert.equal(r.status, IOERR);
  assert.deepEqual(backend.calls, []);
});

test('DISCARD with device-writable data besides the status is IOERR', async () => {
  const { h } = setup();
  const r = await h.run(0, { readable: [header(T.DISCARD, 0), segments([{ sector: 0, numSectors: 1 }])], writable: [16, 1] });
  assert.equal(r.status, IOERR);
});

for (const [name, sector, bytes] of [
  ['starting past the capacity', 2048 + 1, 512],
  ['starting at the capacity', 2048, 512],
  ['running past the capacity', 2047, 1024],
  ['with a sector beyond 2^53', 2 ** 53 + 2 ** 32, 512],
  ['with a sector of 2^64 - 1', 2n ** 64n - 1n, 512],
] as const) {
  test(`IN and OUT ${name} are IOERR`, async () => {
    const backend = new RecordingBackend(MiB);
    const { h } = setup({ backend });
    assert.equal((await h.run(0, framed(T.IN, sector, { inLen: bytes }))).status, IOERR);
    assert.equal((await h.run(0, framed(T.OUT, sector, { out: new Uint8Array(bytes) }))).status, IOERR);
    assert.deepEqual(backend.calls, []);
  });
}

test('the last sector of the disk can be read and written', async () => {
  const { h } = setup();
  assert.equal((await h.run(0, framed(T.OUT, 2047, { out: pattern(512, 9) }))).status, OK);
  const r = await h.run(0, framed(T.IN, 2047, { inLen: 512 }));
  assert.equal(r.status, OK);
  assert.deepEqual(r.data, pattern(512, 9));
});

test('data lengths that are not a multiple of 512 are IOERR', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  assert.equal((await h.run(0, framed(T.IN, 0, { inLen: 511 }))).status, IOERR);
  assert.equal((await h.run(0, framed(T.OUT, 0, { out: new Uint8Array(513) }))).status, IOERR);
  assert.deepEqual(backend.calls, []);
});

test('with 4096-byte blocks, requests must start on a block and cover whole blocks', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend, blockSize: 4096 });
  assert.equal((await h.run(0, framed(T.IN, 1, { inLen: 4096 }))).status, IOERR);
  assert.equal((await h.run(0, framed(T.IN, 8, { inLen: 512 }))).status, IOERR);
  assert.equal((await h.run(0, framed(T.OUT, 4, { out: new Uint8Array(4096) }))).status, IOERR);
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: segments([{ sector: 8, numSectors: 1 }]) }))).status, IOERR);
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: segments([{ sector: 4, numSectors: 8 }]) }))).status, IOERR);
  assert.deepEqual(backend.calls, []);
  assert.equal((await h.run(0, framed(T.IN, 8, { inLen: 8192 }))).status, OK);
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: segments([{ sector: 16, numSectors: 8 }]) }))).status, OK);
});

test('a discard with more segments than max_discard_seg is IOERR', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend, discard: { maxSegments: 2 } });
  const three = segments([0, 1, 2].map((i) => ({ sector: i * 8, numSectors: 8 })));
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: three }))).status, IOERR);
  assert.deepEqual(backend.calls, []);
});

test('256 segments are accepted by default, 257 are not', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  const list = Array.from({ length: 257 }, (_, i) => ({ sector: i * 4, numSectors: 4 }));
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: segments(list.slice(0, 256)) }))).status, OK);
  assert.equal(backend.calls.length, 256);
  assert.equal((await h.run(0, framed(T.WRITE_ZEROES, 0, { out: segments(list) }))).status, IOERR);
});

test('a segment over the maximum sectors is IOERR', async () => {
  const { h } = setup({ writeZeroes: { maxSectors: 16 } });
  assert.equal((await h.run(0, framed(T.WRITE_ZEROES, 0, { out: segments([{ sector: 0, numSectors: 17 }]) }))).status, IOERR);
  assert.equal((await h.run(0, framed(T.WRITE_ZEROES, 0, { out: segments([{ sector: 0, numSectors: 16 }]) }))).status, OK);
});

test('range payloads that are empty or not whole segments are IOERR', async () => {
  const { h } = setup();
  assert.equal((await h.run(0, framed(T.DISCARD, 0))).status, IOERR);
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: new Uint8Array(24) }))).status, IOERR);
});

test('unknown segment flags are UNSUPP, even next to an out-of-range segment', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  for (const type of [T.DISCARD, T.WRITE_ZEROES, T.SECURE_ERASE]) {
    const segs = segments([{ sector: 1 << 30, numSectors: 1 }, { sector: 0, numSectors: 1, flags: 2 }]);
    assert.equal((await h.run(0, framed(type, 0, { out: segs }))).status, UNSUPP);
  }
  assert.deepEqual(backend.calls, []);
});

test('unmap on a DISCARD or SECURE_ERASE segment is UNSUPP', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  for (const type of [T.DISCARD, T.SECURE_ERASE]) {
    const segs = segments([{ sector: 0, numSectors: 1 }, { sector: 8, numSectors: 1, flags: UNMAP }]);
    assert.equal((await h.run(0, framed(type, 0, { out: segs }))).status, UNSUPP);
  }
  assert.deepEqual(backend.calls, []);
});

test('range requests whose feature was not negotiated are UNSUPP', async () => {
  const backend = new RecordingBackend();
  const dev = new BlkDevice({ backend });
  const features = dev.deviceFeatures & ~((1n << BigInt(VIRTIO_BLK_F.DISCARD)) | (1n << BigInt(VIRTIO_BLK_F.WRITE_ZEROES)) |
    (1n << BigInt(VIRTIO_BLK_F.SECURE_ERASE)));
  const h = new Harness(dev, { features });
  for (const type of [T.DISCARD, T.WRITE_ZEROES, T.SECURE_ERASE]) {
    assert.equal((await h.run(0, framed(type, 0, { out: segments([{ sector: 0, numSectors: 1 }]) }))).status, UNSUPP);
  }
  assert.deepEqual(backend.calls, []);
});

test('options can leave discard, write-zeroes and secure erase out', () => {
  const dev = new BlkDevice({ backend: new MemoryBackend({ size: MiB }), discard: false, writeZeroes: false, secureErase: false });
  for (const bit of [VIRTIO_BLK_F.DISCARD, VIRTIO_BLK_F.WRITE_ZEROES, VIRTIO_BLK_F.SECURE_ERASE]) {
    assert.ok(!hasFeature(dev.deviceFeatures, bit));
  }
});

// ---- read-only ----

test('a read-only device refuses OUT with IOERR, writes nothing, and offers RO and no range requests', async () => {
  const backend = new RecordingBackend();
  const { h, device } = setup({ backend, readOnly: true });
  assert.ok(hasFeature(device.deviceFeatures, VIRTIO_BLK_F.RO));
  for (const bit of [VIRTIO_BLK_F.DISCARD, VIRTIO_BLK_F.WRITE_ZEROES, VIRTIO_BLK_F.SECURE_ERASE]) {
    assert.ok(!hasFeature(device.deviceFeatures, bit));
  }
  assert.equal((await h.run(0, framed(T.OUT, 0, { out: pattern(512, 1) }))).status, IOERR);
  assert.equal((await h.run(0, framed(T.DISCARD, 0, { out: segments([{ sector: 0, numSectors: 1 }]) }))).status, UNSUPP);
  assert.equal((await h.run(0, framed(T.WRITE_ZEROES, 0, { out: segments([{ sector: 0, numSectors: 1 }]) }))).status, UNSUPP);
  assert.equal((await h.run(0, framed(T.IN, 0, { inLen: 512 }))).status, OK);
  assert.deepEqual(backend.calls, [['read', 0, 512]]);
});

test('a read-only backend makes the device read-only', () => {
  const dev = new BlkDevice({ backend: new MemoryBackend({ size: MiB, readOnly: true }) });
  assert.ok(dev.readOnly);
  assert.ok(hasFeature(dev.deviceFeatures, VIRTIO_BLK_F.RO));
});

// ---- backend failures ----

test('a backend that throws makes the request IOERR and is reported', async () => {
  const backend = new RecordingBackend();
  const errors: unknown[] = [];
  const { h } = setup({ backend, onBackendError: (e) => errors.push(e) });
  backend.failNext = 'read';
  assert.equal((await h.run(0, framed(T.IN, 0, { inLen: 512 }))).status, IOERR);
  backend.failNext = 'write';
  const r = await h.run(0, framed(T.OUT, 0, { out: new Uint8Array(512) }));
  assert.equal(r.status, IOERR);
  assert.equal(r.len, 1);
  assert.equal(errors.length, 2);
  assert.equal((await h.run(0, framed(T.IN, 0, { inLen: 512 }))).status, OK);
});

test('a backend promise that rejects makes the request IOERR', async () => {
  const backend = new RecordingBackend();
  const { h } = setup({ backend });
  backend.hold = true;
  backend.failNext = 'discard';
  const token = h.post(0, framed(T.DISCARD, 0, { out: segments([{ sector: 0, numSectors: 1 }, { sector: 8, numSectors: 1 }]) }));
  h.kick(0);
  await h.until(() => backend.held.length === 1);
  backend.release();
  await h.until(() => h.reap(0).length > 0);
  assert.equal(h.result(0, token).status, IOERR);
  // The second segment never ran: a failed segment ends the request (5.2.6: indeterminate).
  assert.equal(backend.calls.length, 1);
});

// ---- framing: any split works, any chain is answered ----

test('property: header, data and status split at any points parse the same', async () => {
  const backend = new MemoryBackend({ size: MiB });
  const { h } = setup({ backend });
  await fc.assert(fc.asyncProperty(
    fc.integer({ min: 0, max: 2000 }),
    fc.uniqueArray(fc.integer({ min: 1, max: 16 + 1024 - 1 }), { maxLength: 6 }),
    fc.uniqueArray(fc.integer({ min: 1, max: 1024 }), { maxLength: 6 }),
    async (sector, outCuts, inCuts) => {
      const data = pattern(1024, sector);
      const write = concat(header(T.OUT, sector), data);
      const w = await h.run(0, { readable: cut(write, outCuts.sort((a, b) => a - b)), writable: [1] });
      assert.equal(w.status, OK);
      // A read whose writable part (data + status = 1025 bytes) is cut anywhere.
      const hdr = header(T.IN, sector);
      const hdrCut = outCuts.filter((c) => c < 16).sort((a, b) => a - b);
      const lens = cut(new Uint8Array(1025), inCuts.sort((a, b) => a - b)).map((p) => p.length);
      const r = await h.run(0, { readable: cut(hdr, hdrCut), writable: lens });
      assert.equal(r.status, OK);
      assert.equal(r.len, 1025);
      assert.deepEqual(r.data, data);
    },
  ), { numRuns: 100 });
});

test('property: arbitrary chains never throw and always complete with a valid status or no status', async () => {
  const backend = new MemoryBackend({ size: MiB });
  const { h } = setup({ backend, queueSize: 64 });
  const types = [T.IN, T.OUT, T.FLUSH, T.GET_ID, T.DISCARD, T.WRITE_ZEROES, T.SECURE_ERASE, T.SCSI_CMD, 0xdead];
  await fc.assert(fc.asyncProperty(
    fc.constantFrom(...types),
    fc.oneof(fc.integer({ min: 0, max: 4096 }), fc.constant(2n ** 64n - 1n)),
    fc.array(fc.uint8Array({ minLength: 0, maxLength: 64 }), { maxLength: 4 }),
    fc.array(fc.integer({ min: 1, max: 1100 }), { maxLength: 4 }),
    fc.integer({ min: 0, max: 16 }),
    async (type, sector, extra, writable, headerLen) => {
      const readable = [header(type, sector).subarray(0, headerLen), ...extra];
      const r = await h.run(0, { readable, writable });
      if (writable.length === 0) {
        assert.equal(r.len, 0);
      } else {
        assert.ok([OK, IOERR, UNSUPP].includes(r.status as 0 | 1 | 2), `status ${r.status}`);
        assert.ok(r.len >= 1 && r.len <= writable.reduce((a, b) => a + b, 0));
      }
    },
  ), { numRuns: 300 });
  assert.equal(h.host.resets.length, 0);
});
