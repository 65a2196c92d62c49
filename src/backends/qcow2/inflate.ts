/**
 * Decompression of compressed clusters: the pluggable decompressor type, and the default
 * for zlib (raw deflate) on platforms that have `DecompressionStream`. The Node layer
 * passes node:zlib and a zstd implementation instead.
 */

/** Inflates one compressed cluster; returns exactly `clusterSize` bytes. */
export type Decompressor = (compressed: Uint8Array, clusterSize: number) => Uint8Array | Promise<Uint8Array>;

/** The platform's raw-deflate stream, where there is one: enough output for one cluster, trailing bytes ignored. */
export const defaultInflate: Decompressor | undefined = typeof DecompressionStream === 'undefined' ? undefined : async (compressed, clusterSize) => {
  const stream = new DecompressionStream('deflate-raw');
  const writer = stream.writable.getWriter();
  writer.write(compressed as Uint8Array<ArrayBuffer>).catch(() => {});
  writer.close().catch(() => {});
  const reader = stream.readable.getReader();
  const out = new Uint8Array(clusterSize);
  let got = 0;
  try {
    while (got < clusterSize) {
      const { value, done } = await reader.read();
      if (done) break;
      const n = Math.min(value.length, clusterSize - got);
      out.set(value.subarray(0, n), got);
      got += n;
    }
  } catch (e) {
    // Padding after the deflate stream makes some streams fail once the cluster is complete.
    if (got < clusterSize) throw e;
  } finally {
    reader.cancel().catch(() => {});
  }
  return got === clusterSize ? out : out.subarray(0, got);
};
