import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BlkRequest, parseRequest, parseSegments, REQUEST_PARSE, SECTOR_UNREPRESENTABLE } from './request.js';
import { VIRTIO_BLK_T } from '../spec/virtio-blk.js';
import type { DescriptorChain } from '../virtqueue/chain.js';

const T = VIRTIO_BLK_T;

function chain(readable: Uint8Array[], writable: Uint8Array[]): DescriptorChain {
  return {
    head: 3, readable, writable,
    readableBytes: readable.reduce((n, b) => n + b.length, 0),
    writableBytes: writable.reduce((n, b) => n + b.length, 0),
    descriptors: readable.length + writable.length,
    longestDescriptor: Math.max(0, ...readable.map((b) => b.length), ...writable.map((b) => b.length)),
  };
}

function header(type: number, sector: bigint): Uint8Array {
  const h = new Uint8Array(16);
  const v = new DataView(h.buffer);
  v.setUint32(0, type, true);
  v.setUint32(4, 0xdeadbeef, true); // reserved (ioprio): ignored
  v.setBigUint64(8, sector, true);
  return h;
}

function split(bytes: Uint8Array, cuts: number[]): Uint8Array[] {
  const at = [...new Set(cuts.filter((c) => c > 0 && c < bytes.length))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let from = 0;
  for (const c of at) {
    out.push(bytes.subarray(from, c));
    from = c;
  }
  out.push(bytes.subarray(from));
  return out;
}

const total = (bs: readonly Uint8Array[]): number => bs.reduce((n, b) => n + b.length, 0);

test('a read: data is the writable part minus the status byte, which is the last writable byte', () => {
  const data = new Uint8Array(512);
  const status = new Uint8Array(1);
  const r = new BlkRequest();
  assert.equal(parseRequest(chain([header(T.IN, 7n)], [data, status]), r), REQUEST_PARSE.OK);
  assert.equal(r.head, 3);
  assert.equal(r.type, T.IN);
  assert.equal(r.sector, 7);
  assert.deepEqual(r.data, [data]);
  assert.equal(r.dataBytes, 512);
  assert.equal(r.statusBuffer, status);
  assert.equal(r.statusAt, 0);
});

test('a write: data is the readable part after the 16 header bytes', () => {
  const data = new Uint8Array(1024);
  const r = new BlkRequest();
  assert.equal(parseRequest(chain([header(T.OUT, 1n), data], [new Uint8Array(1)]), r), REQUEST_PARSE.OK);
  assert.deepEqual(r.data, [data]);
  assert.equal(r.dataBytes, 1024);
});

test('sectors above 2^53 - 1 are flagged unrepresentable', () => {
  const r = new BlkRequest();
  parseRequest(chain([header(T.IN, 2n ** 53n)], [new Uint8Array(1)]), r);
  assert.equal(r.sector, SECTOR_UNREPRESENTABLE);
  parseRequest(chain([header(T.IN, 2n ** 53n - 1n)], [new Uint8Array(1)]), r);
  assert.equal(r.sector, 2 ** 53 - 1);
});

test('malformed framings are recognised', () => {
  const r = new BlkRequest();
  assert.equal(parseRequest(chain([header(T.IN, 0n)], []), r), REQUEST_PARSE.NO_STATUS);
  assert.equal(r.statusBuffer, null);
  assert.equal(parseRequest(chain([new Uint8Array(15)], [new Uint8Array(1)]), r), REQUEST_PARSE.SHORT_HEADER);
  assert.equal(parseRequest(chain([], [new Uint8Array(1)]), r), REQUEST_PARSE.SHORT_HEADER);
  assert.equal(parseRequest(chain([header(T.IN, 0n), new Uint8Array(1)], [new Uint8Array(1)]), r), REQUEST_PARSE.READABLE_DATA_ON_IN);
  assert.equal(parseRequest(chain([header(T.GET_ID, 0n), new Uint8Array(1)], [new Uint8Array(21)]), r), REQUEST_PARSE.READABLE_DATA_ON_IN);
  for (const type of [T.OUT, T.DISCARD, T.WRITE_ZEROES, T.SECURE_ERASE]) {
    assert.equal(parseRequest(chain([header(type, 0n)], [new Uint8Array(2)]), r), REQUEST_PARSE.WRITABLE_DATA_ON_OUT);
  }
});

test('FLUSH and unknown types carry no data, whatever surrounds them', () => {
  const r = new BlkRequest();
  for (const type of [T.FLUSH, T.SCSI_CMD, 12345]) {
    assert.equal(parseRequest(chain([header(type, 0n), new Uint8Array(8)], [new Uint8Array(8), new Uint8Array(1)]), r), REQUEST_PARSE.OK);
    assert.equal(r.dataBytes, 0);
    assert.deepEqual(r.data, []);
  }
});

test('property: any split of header, data and status parses to the same request', () => {
  fc.assert(fc.property(
    fc.constantFrom(T.IN, T.OUT, T.GET_ID, T.DISCARD),
    fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
    fc.integer({ min: 0, max: 64 }),
    fc.array(fc.integer({ min: 1, max: 80 }), { maxLength: 5 }),
    fc.array(fc.integer({ min: 1, max: 80 }), { maxLength: 5 }),
    (type, sector, dataLen, readCuts, writeCuts) => {
      const isIn = type === T.IN || type === T.GET_ID;
      const data = new Uint8Array(dataLen).map((_, i) => i + 1);
      const readable = new Uint8Array(16 + (isIn ? 0 : dataLen));
      readable.set(header(type, sector));
      if (!isIn) readable.set(data, 16);
      const writable = new Uint8Array((isIn ? dataLen : 0) + 1);
      const r = new BlkRequest();
      assert.equal(parseRequest(chain(split(readable, readCuts), split(writable, writeCuts)), r), REQUEST_PARSE.OK);
      assert.equal(r.type, type);
      assert.equal(r.sector, sector < 2n ** 53n ? Number(sector) : SECTOR_UNREPRESENTABLE);
      assert.equal(r.dataBytes, dataLen);
      assert.equal(total(r.data), dataLen);
      const flat = new Uint8Array(dataLen);
      let at = 0;
      for (const b of r.data) {
        flat.set(b, at);
        at += b.length;
      }
      if (!isIn) assert.deepEqual(flat, data);
      // The status is the very last writable byte.
      (r.statusBuffer as Uint8Array)[r.statusAt] = 0x5a;
      assert.equal(writable[writable.length - 1], 0x5a);
      if (isIn) {
        flat.fill(0x77);
        for (const b of r.data) b.fill(0x77);
        assert.deepEqual(writable.subarray(0, dataLen), flat, 'IN data views cover exactly the bytes before the status');
      }
    },
  ), { numRuns: 500 });
});

test('property: arbitrary chains never make the parser throw', () => {
  const bufs = fc.array(fc.uint8Array({ maxLength: 40 }), { maxLength: 5 });
  fc.assert(fc.property(bufs, bufs, (readable, writable) => {
    const r = new BlkRequest();
    const result = parseRequest(chain(readable, writable), r);
    assert.ok(Object.values(REQUEST_PARSE).includes(result));
  }), { numRuns: 1000 });
});

test('segments are read from one buffer or across many', () => {
  const bytes = new Uint8Array(32);
  const v = new DataView(bytes.buffer);
  v.setBigUint64(0, 5n, true);
  v.setUint32(8, 9, true);
  v.setUint32(12, 1, true);
  v.setBigUint64(16, 2n ** 60n, true);
  v.setUint32(24, 3, true);
  const expected = [{ sector: 5, numSectors: 9, flags: 1 }, { sector: SECTOR_UNREPRESENTABLE, numSectors: 3, flags: 0 }];
  assert.deepEqual(parseSegments([bytes], 2), expected);
  assert.deepEqual(parseSegments(split(bytes, [3, 15, 16, 30]), 2), expected);
});
