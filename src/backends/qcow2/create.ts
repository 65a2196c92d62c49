/**
 * Makes a fresh, empty qcow2 image on an {@link ImageFile} (docs/interop/qcow2.txt):
 * the header with its extensions and backing file name in cluster 0, then the refcount
 * table, the refcount blocks and the L1 table, every one of those clusters counted in the
 * refcounts. This is the layout `qemu-img create` makes, and what it accepts as clean.
 */
import { VblkError } from '../../errors.js';
import type { ImageFile } from './image-file.js';
import { refcountBlockEntries, setRefcount } from './refcount-entry.js';

export type CreateErrorCode = 'BAD_CREATE_OPTION';

/** Options of a new image that cannot be made (a size too large for the cluster size, a backing name too long …). */
export class Qcow2CreateError extends VblkError {
  constructor(message: string) {
    super('BAD_CREATE_OPTION', message);
  }
}

export interface Qcow2CreateOptions {
  /** Virtual disk size in bytes, a multiple of 512. */
  readonly size: number;
  /** 3 (compat 1.1, default) or 2 (compat 0.10). */
  readonly version?: 2 | 3;
  /** A power of two from 512 B to 2 MiB; default 64 KiB. */
  readonly clusterSize?: number;
  /** A power of two from 1 to 64; default 16 (version 2 knows only 16). */
  readonly refcountBits?: number;
  /** Name of the backing file, as stored (at most 1023 bytes of UTF-8). */
  readonly backingFile?: string;
  /** Format of the backing file (`raw`, `qcow2` …), stored in its header extension. */
  readonly backingFormat?: string;
  /** Sets the lazy_refcounts compatible feature (version 3 only). */
  readonly lazyRefcounts?: boolean;
  /** Writes the feature name table extension, as qemu-img does; default true. */
  readonly featureNameTable?: boolean;
}

const QCOW_MAGIC = 0x514649fb;
const V2_HEADER_LENGTH = 72;
/** What QEMU 5.1 and later write for version 3: the fields up to compression_type, padded to 8. */
const V3_HEADER_LENGTH = 112;
const EXT_END = 0;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;
/** QEMU refuses a larger L1 table (QCOW_MAX_L1_SIZE). */
const MAX_L1_BYTES = 32 * 1024 * 1024;
/** QEMU refuses a longer backing file name. */
const MAX_BACKING_NAME = 1023;

/** The features qemu-img names in its feature name table: [type (0 incompatible, 1 compatible, 2 autoclear), bit, name]. */
const FEATURE_NAMES: readonly (readonly [number, number, string])[] = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

function log2Exact(value: number, min: number, max: number, what: string): number {
  if (!Number.isSafeInteger(value) || value < min || value > max || (value & (value - 1)) !== 0) {
    throw new Qcow2CreateError(`${what} must be a power of two from ${min} to ${max}, not ${value}`);
  }
  return Math.log2(value);
}

function setU64(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 2 ** 32));
  view.setUint32(offset + 4, value >>> 0);
}

/** Appends one header extension (type, length, data padded to 8 bytes) at `at`; returns the offset after it. */
function putExtension(bytes: Uint8Array, at: number, type: number, data: Uint8Array): number {
  const padded = Math.ceil(data.length / 8) * 8;
  if (at + 8 + padded > bytes.length) throw new Qcow2CreateError('the header extensions and backing file name do not fit in the first cluster; use a larger cluster size');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  view.setUint32(at, type);
  view.setUint32(at + 4, data.length);
  bytes.set(data, at + 8);
  return at + 8 + padded;
}

function featureNameTable(): Uint8Array {
  const table = new Uint8Array(FEATURE_NAMES.length * 48);
  const encoder = new TextEncoder();
  FEATURE_NAMES.forEach(([type, bit, name], i) => {
    table[i * 48] = type;
    table[i * 48 + 1] = bit;
    table.set(encoder.encode(name), i * 48 + 2);
  });
  return table;
}

/** Where each piece of a new image goes, in clusters. */
interface Layout {
  readonly tableClusters: number;
  readonly blockCount: number;
  readonly l1Clusters: number;
  /** Clusters in use: header, table, blocks, L1. */
  readonly used: number;
}

function layout(clusterBits: number, refcountOrder: number, l1Entries: number): Layout {
  const clusterSize = 2 ** clusterBits;
  const perBlock = refcountBlockEntries(clusterBits, refcountOrder);
  const l1Clusters = Math.ceil((l1Entries * 8) / clusterSize);
  // The refcount structures count themselves: grow them until they cover every cluster in use.
  let blockCount = 1;
  for (;;) {
    const tableClusters = Math.ceil((blockCount * 8) / clusterSize);
    const used = 1 + tableClusters + blockCount + l1Clusters;
    const needed = Math.ceil(used / perBlock);
    if (needed <= blockCount) return { tableClusters, blockCount, l1Clusters, used };
    blockCount = needed;
  }
}

/**
 * Writes a new empty qcow2 image to `file`, replacing whatever it held, and flushes it.
 * Throws {@link Qcow2CreateError} for options qemu-img would refuse.
 */
export async function createQcow2(file: ImageFile, options: Qcow2CreateOptions): Promise<void> {
  const version = options.version ?? 3;
  if (version !== 2 && version !== 3) throw new Qcow2CreateError(`version must be 2 or 3, not ${String(version)}`);
  const clusterBits = log2Exact(options.clusterSize ?? 65536, 512, 2 * 1024 * 1024, 'the cluster size');
  const refcountOrder = log2Exact(options.refcountBits ?? 16, 1, 64, 'refcount bits');
  if (version === 2 && refcountOrder !== 4) throw new Qcow2CreateError('a version 2 image has 16 refcount bits only');
  if (version === 2 && options.lazyRefcounts) throw new Qcow2CreateError('lazy refcounts need a version 3 image');
  const { size } = options;
  if (!Number.isSafeInteger(size) || size < 0 || size % 512 !== 0) {
    throw new Qcow2CreateError(`the virtual size must be a multiple of 512 bytes, not ${size}`);
  }
  if (options.backingFormat !== undefined && options.backingFile === undefined) {
    throw new Qcow2CreateError('a backing format needs a backing file');
  }
  const clusterSize = 2 ** clusterBits;
  const l2Coverage = (clusterSize / 8) * clusterSize;
  const l1Entries = Math.ceil(size / l2Coverage);
  if (l1Entries * 8 > MAX_L1_BYTES) {
    throw new Qcow2CreateError(`a virtual size of ${size} bytes needs an L1 table over 32 MiB with ${clusterSize}-byte clusters; use larger clusters`);
  }
  const encoder = new TextEncoder();
  const backingName = options.backingFile === undefined ? undefined : encoder.encode(options.backingFile);
  if (backingName !== undefined && (backingName.length === 0 || backingName.length > MAX_BACKING_NAME)) {
    throw new Qcow2CreateError(`the backing file name must be 1 to ${MAX_BACKING_NAME} bytes long`);
  }

  const plan = layout(clusterBits, refcountOrder, l1Entries);
  const tableOffset = clusterSize;
  const firstBlock = 1 + plan.tableClusters;
  const l1Offset = (firstBlock + plan.blockCount) * clusterSize;

  const header = new Uint8Array(clusterSize);
  const view = new DataView(header.buffer);
  view.setUint32(0, QCOW_MAGIC);
  view.setUint32(4, version);
  view.setUint32(20, clusterBits);
  setU64(view, 24, size);
  view.setUint32(36, l1Entries);
  setU64(view, 40, l1Offset);
  setU64(view, 48, tableOffset);
  view.setUint32(56, plan.tableClusters);
  let at = V2_HEADER_LENGTH;
  if (version === 3) {
    setU64(view, 80, options.lazyRefcounts ? 1 : 0);
    view.setUint32(96, refcountOrder);
    view.setUint32(100, V3_HEADER_LENGTH);
    at = V3_HEADER_LENGTH;
  }
  if (options.backingFormat !== undefined) at = putExtension(header, at, EXT_BACKING_FORMAT, encoder.encode(options.backingFormat));
  if (options.featureNameTable ?? true) at = putExtension(header, at, EXT_FEATURE_NAMES, featureNameTable());
  at = putExtension(header, at, EXT_END, new Uint8Array(0));
  if (backingName !== undefined) {
    if (at + backingName.length > clusterSize) throw new Qcow2CreateError('the backing file name does not fit in the first cluster; use a larger cluster size');
    header.set(backingName, at);
    setU64(view, 8, at);
    view.setUint32(16, backingName.length);
  }

  const table = new Uint8Array(plan.tableClusters * clusterSize);
  const tableView = new DataView(table.buffer);
  for (let i = 0; i < plan.blockCount; i++) setU64(tableView, i * 8, (firstBlock + i) * clusterSize);
  const blocks = new Uint8Array(plan.blockCount * clusterSize);
  for (let cluster = 0; cluster < plan.used; cluster++) setRefcount(blocks, cluster, refcountOrder, 1);

  // The header goes last: until it is written, the file is no image at all.
  await file.truncate(0);
  await file.write(tableOffset, [table, blocks]);
  await file.truncate(l1Offset + plan.l1Clusters * clusterSize);
  await file.flush();
  await file.write(0, [header]);
  await file.flush();
}
