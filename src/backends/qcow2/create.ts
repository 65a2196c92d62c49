/**
 * Makes a fresh, empty qcow2 image on an {@link ImageFile} (docs/interop/qcow2.txt):
 * the header with its extensions and backing file name in cluster 0, then the refcount
 * table, the refcount blocks and the L1 table, every one of those clusters counted in the
 * refcounts. This is the layout `qemu-img create` makes, and what it accepts as clean.
 */
import { UsageError } from '../../errors.js';
import type { ImageFile } from './image-file.js';
import {
  COMPAT, EXT, MAX_BACKING_FILE_NAME, MAX_L1_BYTES, Qcow2Error, QCOW2_V2_HEADER_LENGTH, QCOW2_V3_HEADER_LENGTH,
  serializeHeader, setRefcount, writeU64, type HeaderExtension,
} from './header.js';

/** Options of a new image that cannot be made (a size too large for the cluster size, a backing name too long …); code `BAD_OPTION`. */
export class Qcow2CreateError extends UsageError {
  constructor(message: string) {
    super('BAD_OPTION', message);
  }
}

/** What {@link createQcow2} makes: the virtual size and the image's geometry and features. */
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
  /** Writes the feature name table extension, as qemu-img does; default: when it fits in the first cluster. */
  readonly featureNameTable?: boolean;
}

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

/** Whether the header, `extensions`, the end marker and the backing file name fit in one cluster. */
function fits(clusterSize: number, version: 2 | 3, extensions: readonly HeaderExtension[], backingName: Uint8Array | undefined): boolean {
  let bytes = version === 2 ? QCOW2_V2_HEADER_LENGTH : QCOW2_V3_HEADER_LENGTH;
  for (const e of extensions) bytes += 8 + Math.ceil(e.data.length / 8) * 8;
  return bytes + 8 + (backingName?.length ?? 0) <= clusterSize;
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
  const perBlock = 2 ** (clusterBits + 3 - refcountOrder);
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
  if (backingName !== undefined && (backingName.length === 0 || backingName.length > MAX_BACKING_FILE_NAME)) {
    throw new Qcow2CreateError(`the backing file name must be 1 to ${MAX_BACKING_FILE_NAME} bytes long`);
  }

  const plan = layout(clusterBits, refcountOrder, l1Entries);
  const tableOffset = clusterSize;
  const firstBlock = 1 + plan.tableClusters;
  const l1Offset = (firstBlock + plan.blockCount) * clusterSize;

  const extensions: HeaderExtension[] = [];
  if (options.backingFormat !== undefined) extensions.push({ type: EXT.BACKING_FORMAT, data: encoder.encode(options.backingFormat) });
  // The feature name table is optional: by default it goes only where it fits, as qemu-img does.
  const names = { type: EXT.FEATURE_NAMES, data: featureNameTable() };
  if (options.featureNameTable ?? fits(clusterSize, version, [...extensions, names], backingName)) extensions.push(names);
  let header: Uint8Array;
  try {
    header = serializeHeader({
      version, backingFileOffset: 0, backingFileSize: 0, clusterBits, size, cryptMethod: 0, l1Size: l1Entries,
      l1TableOffset: l1Offset, refcountTableOffset: tableOffset, refcountTableClusters: plan.tableClusters,
      nbSnapshots: 0, snapshotsOffset: 0, incompatibleFeatures: 0,
      compatibleFeatures: options.lazyRefcounts ? COMPAT.LAZY_REFCOUNTS : 0, autoclearFeatures: 0, refcountOrder,
      headerLength: version === 2 ? QCOW2_V2_HEADER_LENGTH : QCOW2_V3_HEADER_LENGTH, compressionType: 'zlib',
      extensions, backingFile: options.backingFile, backingFormat: options.backingFormat,
    });
  } catch (e) {
    if (e instanceof Qcow2Error) throw new Qcow2CreateError(`${e.message}; use a larger cluster size or a shorter backing file name`);
    throw e;
  }

  const table = new Uint8Array(plan.tableClusters * clusterSize);
  const tableView = new DataView(table.buffer);
  for (let i = 0; i < plan.blockCount; i++) writeU64(tableView, i * 8, (firstBlock + i) * clusterSize);
  const blocks = new Uint8Array(plan.blockCount * clusterSize);
  for (let cluster = 0; cluster < plan.used; cluster++) setRefcount(blocks, cluster, 2 ** refcountOrder, 1);

  // The header goes last: until it is written, the file is no image at all.
  await file.truncate(0);
  await file.write(tableOffset, [table, blocks]);
  await file.truncate(l1Offset + plan.l1Clusters * clusterSize);
  await file.flush();
  await file.write(0, [header]);
  await file.flush();
}
