/**
 * The qcow2 header (QEMU docs/interop/qcow2.txt, "Header"), its extensions, feature bits,
 * and the decoding of L1, L2 and refcount entries: the facts every qcow2 module shares.
 * Big-endian throughout; u64 fields go through {@link readU64}, which refuses anything
 * past 2^53.
 *
 * The driver's public API (src/backends/qcow2/qcow2.ts, opener in open.ts):
 *
 * ```ts
 * openQcow2(file: ImageFile, options?: Qcow2Options): Promise<Qcow2Backend>
 * interface Qcow2Options {
 *   readOnly?: boolean;                     // default file.readOnly
 *   backing?: BlockBackend;                 // read-only; required when the header names one
 *   decompressors?: { zlib?: Decompressor; zstd?: Decompressor };
 *   l2CacheBytes?: number;                  // default: maps the whole disk, at most 16 MiB; at least 4 tables
 *   refcountCacheBytes?: number;            // default 256 KiB, at least 4 blocks
 *   repairDirty?: boolean;                  // default true: rebuild refcounts of a dirty image opened writable
 * }
 * type Decompressor = (compressed: Uint8Array, clusterSize: number) => Uint8Array | Promise<Uint8Array>;
 * class Qcow2Backend implements BlockBackend { readonly header: Qcow2Header; ... }
 * ```
 */
import { VblkError } from '../../errors.js';

/** The stable codes of {@link Qcow2Error}. */
export type Qcow2ErrorCode =
  | 'QCOW2_BAD_HEADER'      // the header or an extension is malformed
  | 'QCOW2_UNSUPPORTED'     // valid, but a feature this driver does not implement
  | 'QCOW2_BAD_METADATA'    // an L1/L2/refcount/snapshot table entry is invalid
  | 'QCOW2_DIRTY'           // dirty bit set and no repair available, on a writable open
  | 'QCOW2_CORRUPT'         // the corrupt bit is set, on a writable open
  | 'QCOW2_NO_DECOMPRESSOR' // a compressed cluster and no decompressor for its type
  | 'QCOW2_NO_SPACE';       // the image would exceed what the format can address

/** A qcow2 image is malformed, hostile or uses something unsupported. */
export class Qcow2Error extends VblkError {
  declare readonly code: Qcow2ErrorCode;
  constructor(code: Qcow2ErrorCode, message: string) {
    super(code, message);
  }
}

/** The first four bytes of every qcow2 image: "QFI\xfb". */
export const QCOW2_MAGIC = 0x514649fb;
export const QCOW2_V2_HEADER_LENGTH = 72;
/** The v3 header length without the compression type byte (QEMU writes 112). */
export const QCOW2_V3_MIN_HEADER_LENGTH = 104;
export const QCOW2_V3_HEADER_LENGTH = 112;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** Extended L2 entries need 32 subclusters of at least 512 bytes. */
export const MIN_EXTENDED_L2_CLUSTER_BITS = 14;
export const MAX_BACKING_FILE_NAME = 1023;
/** Limits on tables read whole into memory (QEMU's, so images it makes open here). */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
/** Host offsets are 56 bits wide in L1/L2/refcount table entries. */
export const MAX_HOST_OFFSET = 2 ** 53 - 1;

/** Incompatible feature bits (header offset 72): an image with an unknown one must not be opened. */
export const INCOMPAT = {
  /** Refcounts may be stale (lazy refcounts): rebuild them before trusting them. */
  DIRTY: 1,
  /** Metadata is known to be corrupt: no writes. */
  CORRUPT: 2,
  /** Data lives in an external data file. */
  DATA_FILE: 4,
  /** The compression_type field is used. */
  COMPRESSION: 8,
  /** L2 entries are 128 bits with subcluster bitmaps. */
  EXTL2: 16,
} as const;
export const INCOMPAT_KNOWN = 0x1f;
/** Compatible feature bits (header offset 80). */
export const COMPAT = {
  /** Refcount updates may be deferred; the dirty bit says when they were. */
  LAZY_REFCOUNTS: 1,
} as const;
/** Autoclear feature bits (header offset 88): a writer that does not maintain one clears it. */
export const AUTOCLEAR = {
  /** The bitmaps extension is consistent. */
  BITMAPS: 1,
  /** The external data file is a raw image. */
  DATA_FILE_RAW: 2,
} as const;

/** The compression_type byte (header offset 104) by name. */
export const COMPRESSION_TYPE = {
  /** Raw deflate (RFC 1951), the only type before the field existed. */
  zlib: 0,
  /** Zstandard. */
  zstd: 1,
} as const;
/** A compression type by name. */
export type CompressionType = keyof typeof COMPRESSION_TYPE;

/** Header extension types. */
export const EXT = {
  /** End of the extension area. */
  END: 0,
  /** The backing file's format name. */
  BACKING_FORMAT: 0xe2792aca,
  /** Names of the feature bits. */
  FEATURE_NAMES: 0x6803f857,
  /** Persistent dirty bitmaps. */
  BITMAPS: 0x23852875,
  /** Full disk encryption header. */
  CRYPTO: 0x0537be77,
  /** External data file name. */
  DATA_FILE: 0x44415441,
} as const;

/** L1 and L2 entry bits. */
export const QCOW_OFLAG_COPIED = 2 ** 63;
export const QCOW_OFLAG_COMPRESSED = 2 ** 62;
export const QCOW_OFLAG_ZERO = 1;

/** One header extension, kept byte-exact so a header rewrite preserves it. */
export interface HeaderExtension {
  /** The extension type ({@link EXT}, or one unknown here). */
  readonly type: number;
  /** Its data, without the padding to 8 bytes. */
  readonly data: Uint8Array;
}

/** The decoded header. Feature words are split in two u32 halves (hi, lo): no BigInt. */
export interface Qcow2Header {
  /** 2 (compat 0.10) or 3 (compat 1.1). */
  readonly version: 2 | 3;
  /** Offset of the backing file name in the first cluster, 0 for none. */
  readonly backingFileOffset: number;
  /** Length of the backing file name in bytes. */
  readonly backingFileSize: number;
  /** log2 of the cluster size, 9 to 21. */
  readonly clusterBits: number;
  /** Virtual disk size in bytes. */
  readonly size: number;
  /** 0: no encryption (the only method supported). */
  readonly cryptMethod: number;
  /** Entries in the active L1 table. */
  readonly l1Size: number;
  /** Offset of the active L1 table. */
  readonly l1TableOffset: number;
  /** Offset of the refcount table. */
  readonly refcountTableOffset: number;
  /** Clusters the refcount table occupies. */
  readonly refcountTableClusters: number;
  /** Internal snapshots. */
  readonly nbSnapshots: number;
  /** Offset of the snapshot table. */
  readonly snapshotsOffset: number;
  /** Incompatible feature bits ({@link INCOMPAT}), low 32 bits; a set high bit is refused at parse. */
  readonly incompatibleFeatures: number;
  /** Compatible feature bits ({@link COMPAT}), low 32 bits. */
  readonly compatibleFeatures: number;
  /** Autoclear feature bits ({@link AUTOCLEAR}), low 32 bits. */
  readonly autoclearFeatures: number;
  /** log2 of the refcount width in bits, 0 to 6 (4 in version 2). */
  readonly refcountOrder: number;
  /** Bytes of the fixed header (72 in version 2). */
  readonly headerLength: number;
  /** How compressed clusters are compressed. */
  readonly compressionType: CompressionType;
  /** Header extensions in on-disk order, kept byte for byte. */
  readonly extensions: readonly HeaderExtension[];
  /** The backing file name, or undefined. */
  readonly backingFile?: string;
  /** The backing format extension's text, or undefined. */
  readonly backingFormat?: string;
}

const text = new TextDecoder('utf-8', { fatal: false });

function bad(message: string): never {
  throw new Qcow2Error('QCOW2_BAD_HEADER', message);
}

/** A big-endian u64 as a number; throws (with `what` in the message) past 2^53 - 1. */
export function readU64(view: DataView, at: number, what: string): number {
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (hi >= 0x200000) throw new Qcow2Error('QCOW2_BAD_METADATA', `${what} does not fit 53 bits`);
  return hi * 0x1_0000_0000 + lo;
}

/** Writes a non-negative safe integer as a big-endian u64. */
export function writeU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / 0x1_0000_0000));
  view.setUint32(at + 4, value >>> 0);
}

/** Bytes the header occupies on disk up to and including its extensions and the end marker. */
export function headerAreaBytes(h: Qcow2Header): number {
  let n = h.headerLength;
  for (const e of h.extensions) n += 8 + align8(e.data.length);
  return n + 8;
}

function align8(n: number): number {
  return (n + 7) & ~7;
}

/**
 * Parses and validates a header from the first bytes of an image (give it the whole first
 * cluster, or at least 64 KiB, or the whole file if smaller). `fileSize` bounds offsets.
 * Throws {@link Qcow2Error} with a one-line message on anything malformed.
 */
export function parseHeader(bytes: Uint8Array, fileSize: number): Qcow2Header {
  if (bytes.length < QCOW2_V2_HEADER_LENGTH) bad(`file too small for a qcow2 header (${bytes.length} bytes)`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (v.getUint32(0) !== QCOW2_MAGIC) bad('not a qcow2 image (bad magic)');
  const version = v.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new Qcow2Error('QCOW2_UNSUPPORTED', `qcow2 version ${version} is not supported (only 2 and 3)`);
  }
  const clusterBits = v.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    bad(`cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 2 ** clusterBits;
  const backingFileOffset = readU64(v, 8, 'backing_file_offset');
  const backingFileSize = v.getUint32(16);
  const size = readU64(v, 24, 'size');
  const cryptMethod = v.getUint32(32);
  if (cryptMethod !== 0) throw new Qcow2Error('QCOW2_UNSUPPORTED', `encrypted qcow2 images (crypt_method ${cryptMethod}) are not supported`);
  const l1Size = v.getUint32(36);
  const l1TableOffset = readU64(v, 40, 'l1_table_offset');
  const refcountTableOffset = readU64(v, 48, 'refcount_table_offset');
  const refcountTableClusters = v.getUint32(56);
  const nbSnapshots = v.getUint32(60);
  const snapshotsOffset = readU64(v, 64, 'snapshots_offset');

  let incompatibleFeatures = 0, compatibleFeatures = 0, autoclearFeatures = 0;
  let refcountOrder = 4, headerLength = QCOW2_V2_HEADER_LENGTH;
  let compressionType: CompressionType = 'zlib';
  if (version === 3) {
    if (bytes.length < QCOW2_V3_MIN_HEADER_LENGTH) bad('file too small for a version 3 header');
    const incompatHi = v.getUint32(72);
    incompatibleFeatures = v.getUint32(76);
    compatibleFeatures = v.getUint32(84);
    autoclearFeatures = v.getUint32(92);
    if (incompatHi !== 0 || (incompatibleFeatures & ~INCOMPAT_KNOWN) !== 0) {
      const bits: number[] = [];
      for (let i = 0; i < 32; i++) if (incompatibleFeatures & ~INCOMPAT_KNOWN & (1 << i)) bits.push(i);
      for (let i = 0; i < 32; i++) if (incompatHi & (1 << i)) bits.push(32 + i);
      throw new Qcow2Error('QCOW2_UNSUPPORTED', `unknown incompatible feature bit(s) ${bits.join(', ')}: refusing the image`);
    }
    refcountOrder = v.getUint32(96);
    if (refcountOrder > 6) bad(`refcount_order ${refcountOrder} is outside 0..6`);
    headerLength = v.getUint32(100);
    if (headerLength < QCOW2_V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > Math.min(clusterSize, bytes.length)) {
      bad(`header_length ${headerLength} is invalid (at least ${QCOW2_V3_MIN_HEADER_LENGTH}, a multiple of 8, inside the first cluster)`);
    }
    if (incompatibleFeatures & INCOMPAT.COMPRESSION) {
      if (headerLength < 105) bad('compression type bit set but the header has no compression_type field');
      const t = bytes[104];
      if (t === 0) compressionType = 'zlib';
      else if (t === 1) compressionType = 'zstd';
      else throw new Qcow2Error('QCOW2_UNSUPPORTED', `unknown compression type ${t}`);
    } else if (headerLength > 104 && bytes[104] !== 0) {
      bad(`compression_type ${bytes[104]} needs the compression type incompatible bit`);
    }
    if (incompatibleFeatures & INCOMPAT.DATA_FILE) {
      throw new Qcow2Error('QCOW2_UNSUPPORTED', 'qcow2 images with an external data file are not supported');
    }
    if ((incompatibleFeatures & INCOMPAT.EXTL2) && clusterBits < MIN_EXTENDED_L2_CLUSTER_BITS) {
      bad(`extended L2 entries need clusters of at least 16 KiB (cluster_bits ${clusterBits})`);
    }
  }

  // Sizes and offsets: every table inside the file, cluster-aligned, not over the header.
  const mask = clusterSize - 1;
  if (size % 512 !== 0) bad(`virtual size ${size} is not a multiple of 512`);
  const l2Entries = clusterSize / ((incompatibleFeatures & INCOMPAT.EXTL2) ? 16 : 8);
  const neededL1 = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size < neededL1) bad(`l1_size ${l1Size} is too small for a virtual size of ${size} bytes (needs ${neededL1})`);
  if (l1Size * 8 > MAX_L1_BYTES) bad(`l1_size ${l1Size} is implausibly large (more than ${MAX_L1_BYTES} bytes)`);
  // Virtual offsets are limited to what the L1 table can map, which must stay below 2^53.
  if (l1Size * l2Entries * clusterSize > MAX_HOST_OFFSET + 1) bad(`l1_size ${l1Size} maps past 2^53 bytes`);
  checkTable('L1 table', l1TableOffset, l1Size * 8, mask, clusterSize, fileSize, l1Size === 0);
  if (refcountTableClusters === 0) bad('refcount_table_clusters is 0');
  if (refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    bad(`refcount table of ${refcountTableClusters} clusters is implausibly large (more than ${MAX_REFTABLE_BYTES} bytes)`);
  }
  checkTable('refcount table', refcountTableOffset, refcountTableClusters * clusterSize, mask, clusterSize, fileSize, false);
  if (nbSnapshots > MAX_SNAPSHOTS) bad(`nb_snapshots ${nbSnapshots} is implausibly large`);
  if (nbSnapshots > 0) checkTable('snapshot table', snapshotsOffset, nbSnapshots * 40, mask, clusterSize, fileSize, false);

  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize === 0 || backingFileSize > MAX_BACKING_FILE_NAME) bad(`backing file name length ${backingFileSize} is outside 1..${MAX_BACKING_FILE_NAME}`);
    if (backingFileOffset < headerLength || backingFileOffset + backingFileSize > Math.min(clusterSize, bytes.length)) {
      bad('backing file name lies outside the first cluster or over the header');
    }
    backingFile = text.decode(bytes.subarray(backingFileOffset, backingFileOffset + backingFileSize));
  }

  const extensions: HeaderExtension[] = [];
  let backingFormat: string | undefined;
  // Extensions end before the backing file name when there is one, else at the cluster end.
  const extLimit = Math.min(backingFileOffset !== 0 ? backingFileOffset : clusterSize, bytes.length);
  let at = headerLength;
  for (;;) {
    if (at + 8 > extLimit) bad('header extensions run past their area (no end marker)');
    const type = v.getUint32(at);
    const length = v.getUint32(at + 4);
    if (type === EXT.END) break;
    if (length > extLimit - at - 8 || align8(length) > extLimit - at - 8) bad(`header extension 0x${type.toString(16)} of ${length} bytes runs past its area`);
    const data = bytes.slice(at + 8, at + 8 + length);
    if (type === EXT.BACKING_FORMAT) backingFormat = text.decode(data);
    if (type === EXT.CRYPTO) throw new Qcow2Error('QCOW2_UNSUPPORTED', 'encrypted qcow2 images (LUKS extension) are not supported');
    if (type === EXT.DATA_FILE) throw new Qcow2Error('QCOW2_UNSUPPORTED', 'qcow2 images with an external data file are not supported');
    extensions.push({ type, data });
    at += 8 + align8(length);
  }

  return {
    version, backingFileOffset, backingFileSize, clusterBits, size, cryptMethod, l1Size, l1TableOffset,
    refcountTableOffset, refcountTableClusters, nbSnapshots, snapshotsOffset, incompatibleFeatures,
    compatibleFeatures, autoclearFeatures, refcountOrder, headerLength, compressionType, extensions,
    backingFile, backingFormat,
  };
}

function checkTable(what: string, offset: number, bytes: number, mask: number, clusterSize: number, fileSize: number, empty: boolean): void {
  if (empty && offset === 0) return;
  if (offset % (mask + 1) !== 0) bad(`${what} offset ${offset} is not cluster-aligned`);
  if (offset < clusterSize) bad(`${what} at offset ${offset} overlaps the header`);
  if (offset > fileSize || bytes > fileSize - offset) bad(`${what} (${bytes} bytes at ${offset}) runs past the end of the file (${fileSize} bytes)`);
}

/**
 * Serializes a header: the fixed fields, the extensions (preserved byte for byte), the end
 * marker and the backing file name, into `clusterSize` bytes (the whole first cluster,
 * zero-filled). Throws when they do not fit.
 */
export function serializeHeader(h: Qcow2Header): Uint8Array {
  const clusterSize = 2 ** h.clusterBits;
  const out = new Uint8Array(clusterSize);
  const v = new DataView(out.buffer);
  const headerLength = h.version === 2 ? QCOW2_V2_HEADER_LENGTH : h.headerLength;
  v.setUint32(0, QCOW2_MAGIC);
  v.setUint32(4, h.version);
  v.setUint32(20, h.clusterBits);
  writeU64(v, 24, h.size);
  v.setUint32(32, h.cryptMethod);
  v.setUint32(36, h.l1Size);
  writeU64(v, 40, h.l1TableOffset);
  writeU64(v, 48, h.refcountTableOffset);
  v.setUint32(56, h.refcountTableClusters);
  v.setUint32(60, h.nbSnapshots);
  writeU64(v, 64, h.snapshotsOffset);
  if (h.version === 3) {
    v.setUint32(76, h.incompatibleFeatures);
    v.setUint32(84, h.compatibleFeatures);
    v.setUint32(92, h.autoclearFeatures);
    v.setUint32(96, h.refcountOrder);
    v.setUint32(100, headerLength);
    if (headerLength > 104) out[104] = COMPRESSION_TYPE[h.compressionType];
  }
  let at = headerLength;
  for (const e of h.extensions) {
    if (at + 8 + align8(e.data.length) + 8 > clusterSize) throw new Qcow2Error('QCOW2_BAD_HEADER', 'header extensions do not fit the first cluster');
    v.setUint32(at, e.type);
    v.setUint32(at + 4, e.data.length);
    out.set(e.data, at + 8);
    at += 8 + align8(e.data.length);
  }
  at += 8; // end marker: zeroes
  if (h.backingFile !== undefined) {
    const name = new TextEncoder().encode(h.backingFile);
    if (name.length === 0 || name.length > MAX_BACKING_FILE_NAME || at + name.length > clusterSize) {
      throw new Qcow2Error('QCOW2_BAD_HEADER', 'backing file name does not fit the first cluster');
    }
    out.set(name, at);
    writeU64(v, 8, at);
    v.setUint32(16, name.length);
  }
  return out;
}

// ---- Entry decoding. Entries are read as two u32 halves (hi, lo) to avoid BigInt. ----

/** Offset bits 9..55 of an L1, L2 (standard) or refcount table entry from its halves. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ff_ffff) * 0x1_0000_0000 + ((lo & ~0x1ff) >>> 0);
}

/** Reserved bits of an L1 entry: 1..8 and 56..62 must be zero. */
export function l1EntryReserved(hi: number, lo: number): boolean {
  return (hi & 0x7f00_0000) !== 0 || (lo & 0x1ff) !== 0;
}

/** An L2 entry, decoded. */
export type L2Entry =
  | { readonly kind: 'unallocated' }
  | { readonly kind: 'zero'; readonly offset: number; readonly copied: boolean }
  | { readonly kind: 'normal'; readonly offset: number; readonly copied: boolean }
  | { readonly kind: 'compressed'; readonly offset: number; readonly length: number };

/**
 * Decodes a standard L2 entry. `v3` enables the zero flag. Returns an error string for
 * reserved bits set or unaligned offsets.
 */
export function decodeL2Entry(hi: number, lo: number, clusterBits: number, v3: boolean): L2Entry | string {
  if (hi & 0x4000_0000) {
    // Compressed: offset in bits 0..x-1, additional sector count in x..61, x = 62 - (cluster_bits - 8).
    const x = 62 - (clusterBits - 8);
    // x >= 49 for cluster_bits <= 21, so both fields split at the high half without BigInt.
    const offset = (hi & ((1 << (x - 32)) - 1)) * 0x1_0000_0000 + (lo >>> 0);
    const sectors = ((hi & 0x3fff_ffff) >>> (x - 32)) + 1;
    if (offset > MAX_HOST_OFFSET) return 'compressed cluster offset past 2^53';
    return { kind: 'compressed', offset, length: sectors * 512 - (offset % 512) };
  }
  const copied = (hi & 0x8000_0000) !== 0;
  const offset = entryOffset(hi, lo);
  if ((hi & 0x3f00_0000) !== 0 || (lo & 0x1fe) !== 0) return 'reserved bits set in an L2 entry';
  if (offset % 2 ** clusterBits !== 0) return `L2 entry offset ${offset} is not cluster-aligned`;
  if (v3 && (lo & QCOW_OFLAG_ZERO)) return { kind: 'zero', offset, copied };
  if (!v3 && (lo & QCOW_OFLAG_ZERO)) return 'zero flag in a version 2 image';
  if (offset === 0) return copied ? 'L2 entry with COPIED but no offset' : { kind: 'unallocated' };
  return { kind: 'normal', offset, copied };
}

/** Refcount bits per entry and entries per refcount block. */
export function refcountGeometry(h: Qcow2Header): { bits: number; perBlock: number } {
  const bits = 2 ** h.refcountOrder;
  return { bits, perBlock: (2 ** h.clusterBits * 8) / bits };
}

/**
 * Reads refcount entry `i` of a block. Entries narrower than a byte are packed from the
 * least significant bit; wider ones are big-endian.
 */
export function getRefcount(block: Uint8Array, i: number, bits: number): number {
  switch (bits) {
    case 1: case 2: case 4: {
      const perByte = 8 / bits;
      return (block[Math.floor(i / perByte)] >> ((i % perByte) * bits)) & ((1 << bits) - 1);
    }
    case 8: return block[i];
    case 16: return (block[2 * i] << 8) | block[2 * i + 1];
    case 32: return ((block[4 * i] << 24) | (block[4 * i + 1] << 16) | (block[4 * i + 2] << 8) | block[4 * i + 3]) >>> 0;
    default: {
      const at = 8 * i;
      const hi = ((block[at] << 24) | (block[at + 1] << 16) | (block[at + 2] << 8) | block[at + 3]) >>> 0;
      const lo = ((block[at + 4] << 24) | (block[at + 5] << 16) | (block[at + 6] << 8) | block[at + 7]) >>> 0;
      // Refcounts past 2^53 are absurd; saturate so callers see "shared, do not free".
      return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x1_0000_0000 + lo;
    }
  }
}

/** Writes refcount entry `i`; `value` must fit `bits` (callers check with {@link maxRefcount}). */
export function setRefcount(block: Uint8Array, i: number, bits: number, value: number): void {
  switch (bits) {
    case 1: case 2: case 4: {
      const perByte = 8 / bits;
      const shift = (i % perByte) * bits;
      const at = Math.floor(i / perByte);
      block[at] = (block[at] & ~(((1 << bits) - 1) << shift)) | (value << shift);
      return;
    }
    case 8: block[i] = value; return;
    case 16: block[2 * i] = value >>> 8; block[2 * i + 1] = value & 0xff; return;
    case 32: {
      const at = 4 * i;
      block[at] = value >>> 24; block[at + 1] = value >>> 16; block[at + 2] = value >>> 8; block[at + 3] = value;
      return;
    }
    default: {
      const at = 8 * i;
      const hi = Math.floor(value / 0x1_0000_0000), lo = value >>> 0;
      block[at] = hi >>> 24; block[at + 1] = hi >>> 16; block[at + 2] = hi >>> 8; block[at + 3] = hi;
      block[at + 4] = lo >>> 24; block[at + 5] = lo >>> 16; block[at + 6] = lo >>> 8; block[at + 7] = lo;
    }
  }
}

/** The largest refcount an entry of `bits` can hold (capped at 2^53 - 1). */
export function maxRefcount(bits: number): number {
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
}
