/**
 * Decompressors for qcow2's compressed clusters, for the Node layer: deflate through
 * node:zlib, zstd through fzstd (Node 20's zlib has no zstd; fzstd is small, pure
 * JavaScript and has no dependencies).
 *
 * A compressed cluster is hostile input. Both decompressors write into one buffer of
 * exactly the cluster size, so no input can make them allocate more; both finish in
 * time proportional to the input (at most a cluster, since the stored length is bounded
 * by the format); any malformed stream fails with a {@link DecompressError}.
 *
 * The stored length of a compressed cluster is rounded up to whole 512-byte sectors, so
 * bytes follow the stream (the start of the next compressed cluster, or zeroes): both
 * stop at the end of the first stream and ignore the rest.
 *
 * Why fzstd stays in src/node/ although it would run in a browser: the core entry point
 * imports no package at all (test/layering.test.ts enforces it), so the qcow2 core takes
 * its decompressors from the caller; a browser passes fzstd (or its own) the same way.
 */
import { constants, inflateRawSync } from 'node:zlib';
import { decompress as zstdDecompress } from 'fzstd';
import { VblkError } from '../errors.js';

/** Turns one compressed cluster into exactly `clusterSize` bytes, or throws. */
export type ClusterDecompressor = (compressed: Uint8Array, clusterSize: number) => Uint8Array | Promise<Uint8Array>;

/** Why a compressed cluster cannot be read: the image is corrupt there. */
export class DecompressError extends VblkError {
  declare readonly code: 'BAD_COMPRESSED_CLUSTER';
  constructor(message: string) {
    super('BAD_COMPRESSED_CLUSTER', message);
  }
}

/**
 * Raw deflate (RFC 1951, no zlib header: what qcow2 compression type 0 stores). The
 * output must fill the cluster, as QEMU requires; a stream that would write past it is
 * refused rather than cut.
 */
export function inflateCluster(compressed: Uint8Array, clusterSize: number): Uint8Array {
  let out: Buffer;
  try {
    // Z_SYNC_FLUSH: a stream whose end marker is missing still yields what it holds;
    // then the length check below decides, as QEMU does (a full cluster is accepted).
    out = inflateRawSync(compressed, { maxOutputLength: clusterSize, finishFlush: constants.Z_SYNC_FLUSH });
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    if (code === 'ERR_BUFFER_TOO_LARGE') throw new DecompressError(`deflate stream decompresses to more than the ${clusterSize}-byte cluster`);
    throw new DecompressError(`invalid deflate stream: ${(e as Error).message}`);
  }
  if (out.length !== clusterSize) throw new DecompressError(`deflate stream decompresses to ${out.length} bytes, not the ${clusterSize}-byte cluster`);
  return new Uint8Array(out.buffer, out.byteOffset, out.length);
}

/** Zstandard frame facts (RFC 8878, 3.1.1). */
const ZSTD_MAGIC = 0xfd2fb528;
const ZSTD_BLOCK_MAX = 128 * 1024;
const ZSTD_BLOCK_RLE = 1;
const ZSTD_BLOCK_RESERVED = 3;
const ZSTD_CHECKSUM_BYTES = 4;

/**
 * One Zstandard frame (qcow2 compression type 1) into a cluster. The frame's extent is
 * found first by walking its block headers, which also refuses reserved block types,
 * dictionaries and oversized blocks before fzstd sees a byte; fzstd then decodes only
 * that frame, into the cluster-sized buffer (it allocates no window of its own then).
 */
export function zstdCluster(compressed: Uint8Array, clusterSize: number): Uint8Array {
  const end = zstdFrameEnd(compressed, clusterSize);
  const out = new Uint8Array(clusterSize);
  try {
    zstdDecompress(compressed.subarray(0, end), out);
  } catch (e) {
    throw new DecompressError(`invalid zstd frame: ${(e as Error).message}`);
  }
  return out;
}

/** Byte just past the first Zstandard frame of `data`, after checking its framing. */
export function zstdFrameEnd(data: Uint8Array, clusterSize: number): number {
  const fail = (why: string): never => {
    throw new DecompressError(`invalid zstd frame: ${why}`);
  };
  if (data.length < 6) fail(`${data.length} bytes is too short for a frame header`);
  const magic = (data[0] | data[1] << 8 | data[2] << 16 | data[3] << 24) >>> 0;
  if (magic !== ZSTD_MAGIC) fail(`magic 0x${magic.toString(16)} is not 0x${ZSTD_MAGIC.toString(16)}`);
  const descriptor = data[4];
  const contentSizeFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const hasChecksum = (descriptor >> 2) & 1;
  const dictionaryFlag = descriptor & 3;
  if (descriptor & 8) fail('reserved descriptor bit set');
  if (dictionaryFlag !== 0) fail('the frame needs a dictionary (qcow2 uses none)');
  const contentSizeBytes = contentSizeFlag === 0 ? singleSegment : 1 << contentSizeFlag;
  let at = 5 + (singleSegment ? 0 : 1);
  if (at + contentSizeBytes > data.length) fail('truncated frame header');
  if (contentSizeBytes > 0) {
    let size = 0;
    for (let i = contentSizeBytes - 1; i >= 0; i--) size = size * 256 + data[at + i];
    if (contentSizeBytes === 2) size += 256;
    if (size !== clusterSize) fail(`content size ${size} is not the ${clusterSize}-byte cluster`);
  }
  at += contentSizeBytes;
  for (;;) {
    if (at + 3 > data.length) fail('truncated before a block header');
    const header = data[at] | data[at + 1] << 8 | data[at + 2] << 16;
    at += 3;
    const type = (header >> 1) & 3;
    const size = header >>> 3;
    if (type === ZSTD_BLOCK_RESERVED) fail('reserved block type');
    if (size > ZSTD_BLOCK_MAX) fail(`block of ${size} bytes is over the ${ZSTD_BLOCK_MAX}-byte limit`);
    at += type === ZSTD_BLOCK_RLE ? 1 : size;
    if (at > data.length) fail('truncated block');
    if (header & 1) break;
  }
  if (hasChecksum) at += ZSTD_CHECKSUM_BYTES;
  if (at > data.length) fail('truncated checksum');
  return at;
}

/** The decompressors for the qcow2 driver's `decompressors` option, by compression type. */
export const nodeDecompressors = { zlib: inflateCluster, zstd: zstdCluster } as const;
