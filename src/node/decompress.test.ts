// The compressed-cluster decompressors: a cluster comes back exactly cluster-sized,
// bytes after the stream (sector rounding) are ignored, and hostile input fails with
// DecompressError — never another exception, never output of another length.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { deflateRawSync } from 'node:zlib';
import fc from 'fast-check';
import {
  DecompressError, inflateCluster, nodeDecompressors, zstdCluster, zstdFrameEnd,
} from './decompress.js';

const CLUSTER = 65536;

/** The cluster the zstd fixture holds: (i mod 251) × 7, with a marker at 1000. */
function fixtureCluster(): Uint8Array {
  const b = new Uint8Array(CLUSTER);
  for (let i = 0; i < b.length; i++) b[i] = ((i % 251) * 7) & 0xff;
  b.set(new TextEncoder().encode('vblk qcow2 zstd cluster'), 1000);
  return b;
}

// `zstd -19` of fixtureCluster() (frame content size, checksum), made with the zstd 1.5 CLI.
const ZSTD_FIXTURE = Buffer.from(
  'KLUv/WQA/yUJACQRAAcOFRwjKjE4P0ZNVFtiaXB3foWMk5qhqK+2vcTL0tng5+71/AMKERgfJi00O0JJUFdeZWxzeoGIj5adpKuyucDHztXc4+rx+P8GDRQbIikwNz5FTFNaYWhvdn2Ei5KZoKeutbzDytHY3+bt9PsCCRAXHiUsMzpBSE9WXWRrcnmAh46VnKOqsbi/xs3U2+Lp8Pf+BQwTGiEoLzY9REtSWWBnbnV8g4qRmJ+mrbS7wsnQ197l7PP6AQgPFh0kKzI5QEdOVVxjanF4f4aNlJuiqbC3vsXM09rh6O/2/QQLEhkgJy41PENKUVhfZm10e4KJkJeepayzusHIz9Z2YmxrIHFjb3cyIHpzdGQgY2x1c3RlcgMAKXigg9LfS9X26vyVkQLpT8TE',
  'base64');

/** A frame by hand: single segment, 2-byte content size, a raw block then a last RLE block. */
function handFrame(raw: Uint8Array, rleByte: number, rleLength: number): Uint8Array {
  const total = raw.length + rleLength;
  const fcs = total - 256;
  const rawHeader = (raw.length << 3) | 0;
  const rleHeader = (rleLength << 3) | (1 << 1) | 1;
  return Uint8Array.from([
    0x28, 0xb5, 0x2f, 0xfd, 0x60, fcs & 0xff, fcs >> 8,
    rawHeader & 0xff, (rawHeader >> 8) & 0xff, rawHeader >> 16, ...raw,
    rleHeader & 0xff, (rleHeader >> 8) & 0xff, rleHeader >> 16, rleByte,
  ]);
}

const isDecompressError = (e: unknown) => e instanceof DecompressError && e.code === 'BAD_COMPRESSED_CLUSTER' && !e.message.includes('\n');

test('deflate: a cluster round-trips, with the sector padding after the stream ignored', () => {
  const cluster = fixtureCluster();
  const stream = deflateRawSync(cluster);
  const padded = new Uint8Array(Math.ceil((stream.length + 1) / 512) * 512).fill(0xab);
  padded.set(stream);
  assert.deepEqual(inflateCluster(padded, CLUSTER), cluster);
  assert.deepEqual(inflateCluster(stream, CLUSTER), cluster);
});

test('deflate: a stream shorter or longer than the cluster, or garbage, is refused', () => {
  assert.throws(() => inflateCluster(deflateRawSync(new Uint8Array(CLUSTER - 1)), CLUSTER), isDecompressError);
  assert.throws(() => inflateCluster(deflateRawSync(new Uint8Array(CLUSTER + 1)), CLUSTER), isDecompressError);
  assert.throws(() => inflateCluster(Uint8Array.from([1, 2, 3, 4, 5]), CLUSTER), isDecompressError);
  assert.throws(() => inflateCluster(new Uint8Array(0), CLUSTER), isDecompressError);
});

test('deflate: a bomb (4 MiB of zeroes in 4 KiB of stream) stops at the cluster size', () => {
  // 4 MiB of zeroes deflates to about 4 KiB; decoding stops at 64 KiB, refused.
  assert.throws(() => inflateCluster(deflateRawSync(new Uint8Array(4 << 20)), CLUSTER), isDecompressError);
});

test('zstd: the fixture made by the zstd CLI decodes to its cluster, padding ignored', () => {
  const padded = new Uint8Array(512).fill(0x5a);
  padded.set(ZSTD_FIXTURE);
  assert.deepEqual(zstdCluster(padded, CLUSTER), fixtureCluster());
  assert.equal(zstdFrameEnd(padded, CLUSTER), ZSTD_FIXTURE.length);
});

test('zstd: a hand-built frame of a raw and an RLE block decodes', () => {
  const raw = Uint8Array.from({ length: 300 }, (_, i) => i & 0xff);
  const out = zstdCluster(handFrame(raw, 0x42, 4096 - 300), 4096);
  assert.deepEqual(out.subarray(0, 300), raw);
  assert.deepEqual(out.subarray(300), new Uint8Array(4096 - 300).fill(0x42));
});

test('zstd: wrong magic, dictionaries, reserved bits and block types, mismatched size and truncation are refused', () => {
  const good = handFrame(new Uint8Array(10), 1, 4086);
  const broken = (at: number, value: number) => {
    const b = Uint8Array.from(good);
    b[at] = value;
    return b;
  };
  assert.throws(() => zstdCluster(broken(0, 0), 4096), isDecompressError);
  assert.throws(() => zstdCluster(broken(4, 0x61), 4096), /dictionary/);
  assert.throws(() => zstdCluster(broken(4, 0x68), 4096), /reserved descriptor/);
  assert.throws(() => zstdCluster(broken(7, (10 << 3) | 6), 4096), /reserved block type/);
  assert.throws(() => zstdCluster(good, 8192), /content size 4096/);
  for (let cut = 0; cut < good.length; cut++) assert.throws(() => zstdCluster(good.subarray(0, cut), 4096), isDecompressError, `cut at ${cut}`);
});

test('property: any bytes give a cluster-sized result or DecompressError (deflate and zstd)', () => {
  fc.assert(fc.property(fc.uint8Array({ maxLength: 2048 }), fc.constantFrom(512, 4096, 65536), (bytes, clusterSize) => {
    for (const decode of [inflateCluster, zstdCluster]) {
      try {
        assert.equal(decode(bytes, clusterSize).length, clusterSize);
      } catch (e) {
        if (!isDecompressError(e)) throw e;
      }
    }
  }), { numRuns: 2000 });
});

test('property: the zstd fixture with bytes changed gives a cluster or DecompressError', () => {
  fc.assert(fc.property(fc.array(fc.tuple(fc.nat(ZSTD_FIXTURE.length - 1), fc.nat(255)), { minLength: 1, maxLength: 6 }), (edits) => {
    const b = Uint8Array.from(ZSTD_FIXTURE);
    for (const [at, value] of edits) b[at] = value;
    try {
      assert.equal(zstdCluster(b, CLUSTER).length, CLUSTER);
    } catch (e) {
      if (!isDecompressError(e)) throw e;
    }
  }), { numRuns: 3000 });
});

test('nodeDecompressors has one decompressor per qcow2 compression type', () => {
  assert.deepEqual(Object.keys(nodeDecompressors).sort(), ['zlib', 'zstd']);
});
