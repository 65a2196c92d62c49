/**
 * Opening a qcow2 image: the header, the L1 table and (writable) the refcount table read
 * and validated, a dirty image repaired first, the driver built over them.
 */
import { BackendError, type BlockBackend } from '../backend.js';
import type { ImageFile } from './image-file.js';
import type { Decompressor } from './inflate.js';
import { repairQcow2 } from './repair.js';
import { Qcow2Backend } from './qcow2.js';
import { INCOMPAT, Qcow2Error, entryOffset, l1EntryReserved, parseHeader, type CompressionType, type Qcow2Header } from './header.js';

/** How {@link openQcow2} opens an image. */
export interface Qcow2Options {
  /** Open read-only. Default: the file's own `readOnly`. */
  readonly readOnly?: boolean;
  /**
   * The backing disk, read-only, resolved by the caller from the header's backing file
   * name and format. Required when the image names one. Reads past its size read zeroes.
   */
  readonly backing?: BlockBackend;
  /** Decompressors by compression type. zlib defaults to `DecompressionStream('deflate-raw')` where the platform has it. */
  readonly decompressors?: Partial<Record<CompressionType, Decompressor>>;
  /** Bytes of L2 tables kept in memory (QEMU's l2-cache-size). Default: enough to map the whole disk, at most 16 MiB; at least 4 tables. */
  readonly l2CacheBytes?: number;
  /**
   * A dirty image (lazy refcounts not written back) opened writable has its refcounts
   * rebuilt from its tables first ({@link repairQcow2}); false refuses it instead. Default true.
   */
  readonly repairDirty?: boolean;
  /** Bytes of refcount blocks kept in memory. Default 256 KiB, at least 4 blocks. */
  readonly refcountCacheBytes?: number;
}

/** Opens a qcow2 image: reads and validates the header, the L1 table and (writable) the refcount table. */
export async function openQcow2(file: ImageFile, options: Qcow2Options = {}): Promise<Qcow2Backend> {
  const readOnly = options.readOnly ?? file.readOnly;
  if (!readOnly && file.readOnly) throw new BackendError('READ_ONLY', 'cannot open a read-only image file writable');
  let header = await readFirstCluster(file);
  if (header.backingFile !== undefined && options.backing === undefined) {
    throw new Qcow2Error('QCOW2_UNSUPPORTED', `the image has a backing file (${header.backingFile}) and none was given`);
  }
  if (!readOnly) {
    if (header.incompatibleFeatures & INCOMPAT.CORRUPT) {
      throw new Qcow2Error('QCOW2_CORRUPT', 'the image is marked corrupt: open it read-only, or repair it (qemu-img check -r all)');
    }
    if (header.incompatibleFeatures & INCOMPAT.DIRTY) {
      // Lazy refcounts were not written back: the refcounts cannot be trusted until rebuilt from the tables.
      // check.ts does not read extended L2 entries yet: a rebuild from them would be wrong.
      if (options.repairDirty === false || (header.incompatibleFeatures & INCOMPAT.EXTL2) !== 0) {
        throw new Qcow2Error('QCOW2_DIRTY', 'the image is marked dirty (lazy refcounts were not written back): repair it (vblk image check --repair) or open it read-only');
      }
      await repairQcow2(file);
      header = await readFirstCluster(file);
      if (header.incompatibleFeatures & INCOMPAT.DIRTY) throw new Qcow2Error('QCOW2_DIRTY', 'the image is marked dirty and its repair did not complete');
    }
  }
  const l1 = new Uint8Array(header.l1Size * 8);
  if (l1.length > 0) await file.read(header.l1TableOffset, [l1]);
  const l1View = new DataView(l1.buffer);
  for (let i = 0; i < header.l1Size; i++) {
    const hi = l1View.getUint32(8 * i), lo = l1View.getUint32(8 * i + 4);
    const off = entryOffset(hi, lo);
    if (l1EntryReserved(hi, lo) || off % 2 ** header.clusterBits !== 0 || (off !== 0 && (off < 2 ** header.clusterBits || off >= file.size))) {
      throw new Qcow2Error('QCOW2_BAD_METADATA', `L1 entry ${i} is invalid (reserved bits, unaligned, on the header or past the end of the file)`);
    }
  }
  let table: Uint8Array | undefined;
  if (!readOnly) {
    table = new Uint8Array(header.refcountTableClusters * 2 ** header.clusterBits);
    await file.read(header.refcountTableOffset, [table]);
  }
  return new Qcow2Backend(file, header, l1, table, readOnly, options);
}

async function readFirstCluster(file: ImageFile): Promise<Qcow2Header> {
  const probe = new Uint8Array(Math.min(file.size, 4096));
  await file.read(0, [probe]);
  const cb = probe.length >= 24 ? new DataView(probe.buffer).getUint32(20) : 0;
  let first = probe;
  if (cb > 12 && cb <= 21 && file.size > probe.length) {
    first = new Uint8Array(Math.min(file.size, 2 ** cb));
    await file.read(0, [first]);
  }
  return parseHeader(first, file.size);
}
