// The header codec: round trips, the refusals of malformed headers, entry decoding and
// the refcount bit packing for every width.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  EXT, INCOMPAT, Qcow2Error, decodeL2Entry, getRefcount, parseHeader, serializeHeader, setRefcount,
  type Qcow2Header,
} from './header.js';

function header(over: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 1 << 30, cryptMethod: 0,
    l1Size: 2, l1TableOffset: 3 << 16, refcountTableOffset: 1 << 16, refcountTableClusters: 1, nbSnapshots: 0,
    snapshotsOffset: 0, incompatibleFeatures: 0, compatibleFeatures: 0, autoclearFeatures: 0, refcountOrder: 4,
    headerLength: 112, compressionType: 'zlib', extensions: [], ...over,
  };
}

const FILE = 4 << 16;

test('a v3 header with extensions and a backing file round-trips', () => {
  const h = header({
    backingFile: 'base.qcow2', backingFormat: 'qcow2',
    extensions: [{ type: EXT.BACKING_FORMAT, data: new TextEncoder().encode('qcow2') }, { type: 0x12345678, data: new Uint8Array([1, 2, 3]) }],
  });
  const bytes = serializeHeader(h);
  const back = parseHeader(bytes, FILE);
  assert.equal(back.backingFile, 'base.qcow2');
  assert.equal(back.backingFormat, 'qcow2');
  assert.deepEqual(back.extensions.map((e) => [e.type, [...e.data]]), [[EXT.BACKING_FORMAT, [...new TextEncoder().encode('qcow2')]], [0x12345678, [1, 2, 3]]]);
  assert.deepEqual(serializeHeader(back), bytes);
});

test('a v2 header round-trips with v3 fields defaulted', () => {
  const h = parseHeader(serializeHeader(header({ version: 2, headerLength: 72 })), FILE);
  assert.equal(h.version, 2);
  assert.equal(h.refcountOrder, 4);
  assert.equal(h.headerLength, 72);
});

test('malformed headers are refused with a typed error', () => {
  const cases: [Partial<Qcow2Header>, RegExp][] = [
    [{ clusterBits: 8 }, /cluster_bits/],
    [{ clusterBits: 22 }, /cluster_bits/],
    [{ l1Size: 1 }, /too small/],
    [{ l1Size: 2 ** 30 }, /implausibly/],
    [{ l1TableOffset: 0 }, /overlaps the header/],
    [{ l1TableOffset: 3 << 16 | 512 }, /not cluster-aligned/],
    [{ l1TableOffset: 100 << 16 }, /past the end/],
    [{ refcountTableClusters: 0 }, /is 0/],
    [{ refcountTableClusters: 1000 }, /implausibly|past the end/],
    [{ refcountOrder: 7 }, /refcount_order/],
    [{ incompatibleFeatures: 1 << 7 }, /bit\(s\) 7/],
    [{ incompatibleFeatures: INCOMPAT.DATA_FILE }, /external data file/],
    [{ cryptMethod: 1 }, /encrypted/],
  ];
  for (const [over, message] of cases) {
    const bytes = serializeHeader(header(over));
    assert.throws(() => parseHeader(bytes, FILE), (e: unknown) => e instanceof Qcow2Error && message.test(e.message), JSON.stringify(over));
  }
});

test('an extension running past the first cluster is refused', () => {
  const bytes = serializeHeader(header({ extensions: [{ type: 7, data: new Uint8Array(8) }] }));
  new DataView(bytes.buffer).setUint32(112 + 4, 1 << 20);
  assert.throws(() => parseHeader(bytes, FILE), /runs past/);
});

test('any byte flipped in a header gives a header or a typed error, never another exception', () => {
  const base = serializeHeader(header({ backingFile: 'b', extensions: [{ type: EXT.BACKING_FORMAT, data: new Uint8Array([0x71]) }] })).subarray(0, 512);
  fc.assert(fc.property(fc.array(fc.tuple(fc.nat(511), fc.nat(255)), { maxLength: 8 }), (flips) => {
    const bytes = base.slice();
    for (const [at, value] of flips) bytes[at] = value;
    try {
      parseHeader(bytes, FILE);
    } catch (e) {
      if (!(e instanceof Qcow2Error)) throw e;
    }
  }));
});

test('L2 entries decode: standard, zero, compressed, reserved bits', () => {
  assert.deepEqual(decodeL2Entry(0x8000_0000, 0x0005_0000, 16, true), { kind: 'normal', offset: 0x50000, copied: true });
  assert.deepEqual(decodeL2Entry(0, 1, 16, true), { kind: 'zero', offset: 0, copied: false });
  assert.equal(typeof decodeL2Entry(0, 1, 16, false), 'string');
  assert.equal(typeof decodeL2Entry(0, 0x200, 16, true), 'string');
  assert.deepEqual(decodeL2Entry(0, 0, 16, true), { kind: 'unallocated' });
  // cluster_bits 16: x = 54; 3 additional sectors, offset 0x12345.
  const hi = 0x4000_0000 | (3 << (54 - 32));
  assert.deepEqual(decodeL2Entry(hi, 0x12345, 16, true), { kind: 'compressed', offset: 0x12345, length: 4 * 512 - 0x145 });
});

test('refcounts of every width round-trip without touching their neighbours', () => {
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    const block = new Uint8Array(64);
    const n = (64 * 8) / bits;
    const max = bits >= 53 ? 2 ** 53 - 1 : 2 ** bits - 1;
    const expected: number[] = [];
    for (let i = 0; i < n; i++) {
      const v = (i * 2654435761) % (max + 1);
      expected.push(v);
      setRefcount(block, i, bits, v);
    }
    for (let i = 0; i < n; i++) assert.equal(getRefcount(block, i, bits), expected[i], `bits ${bits} entry ${i}`);
  }
  const b1 = new Uint8Array(1);
  setRefcount(b1, 0, 1, 1);
  assert.equal(b1[0], 1, '1-bit refcounts start at the least significant bit');
});
