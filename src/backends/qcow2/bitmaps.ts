/**
 * The clusters persistent dirty bitmaps hold (docs/interop/qcow2.txt, "Bitmaps
 * extension"): the bitmap directory, each bitmap's table and the data clusters the table
 * names. They count only while the autoclear bit says the extension is valid, as in
 * qemu-img; a program that knows no bitmaps clears that bit and the clusters leak.
 */
import { AUTOCLEAR, EXT, Qcow2Error, entryOffset, readU64, type Qcow2Header } from './header.js';
import type { ImageFile } from './image-file.js';

/** QEMU's limits: bitmaps per image, directory bytes, entries of one bitmap table. */
const MAX_BITMAPS = 65535;
const MAX_DIRECTORY_BYTES = 64 * 1024 * 1024;
const MAX_TABLE_ENTRIES = 0x800_0000;
const DIRECTORY_ENTRY_FIXED = 24;
const TABLE_CHUNK_ENTRIES = 8192;

function bad(message: string): never {
  throw new Qcow2Error('QCOW2_BAD_METADATA', message);
}

/**
 * Calls `count(offset, bytes)` for every region the bitmaps hold, and `misaligned(offset)`
 * for a bitmap table entry whose data cluster is not cluster-aligned. Malformed
 * directories throw {@link Qcow2Error}.
 */
export async function forEachBitmapRegion(
  file: ImageFile, h: Qcow2Header, count: (offset: number, bytes: number) => void, misaligned: (offset: number) => void,
): Promise<void> {
  const ext = h.extensions.find((e) => e.type === EXT.BITMAPS);
  if (ext === undefined || (h.autoclearFeatures & AUTOCLEAR.BITMAPS) === 0) return;
  if (ext.data.length < 24) bad(`the bitmaps extension has ${ext.data.length} bytes (24 needed)`);
  const ev = new DataView(ext.data.buffer, ext.data.byteOffset, ext.data.byteLength);
  const nbBitmaps = ev.getUint32(0);
  const directorySize = readU64(ev, 8, 'bitmap_directory_size');
  const directoryOffset = readU64(ev, 16, 'bitmap_directory_offset');
  if (nbBitmaps > MAX_BITMAPS) bad(`${nbBitmaps} bitmaps (at most ${MAX_BITMAPS})`);
  if (directorySize > MAX_DIRECTORY_BYTES) bad(`a bitmap directory of ${directorySize} bytes (at most ${MAX_DIRECTORY_BYTES})`);
  const clusterSize = 2 ** h.clusterBits;
  count(directoryOffset, directorySize);
  const directory = new Uint8Array(directorySize);
  await file.read(directoryOffset, [directory]);
  const dv = new DataView(directory.buffer);
  let at = 0;
  for (let i = 0; i < nbBitmaps; i++) {
    if (at + DIRECTORY_ENTRY_FIXED > directorySize) bad('the bitmap directory ends inside an entry');
    const tableOffset = readU64(dv, at, 'bitmap_table_offset');
    const tableSize = dv.getUint32(at + 8);
    const nameSize = dv.getUint16(at + 18);
    const extraSize = dv.getUint32(at + 20);
    if (tableSize > MAX_TABLE_ENTRIES) bad(`a bitmap table of ${tableSize} entries (at most ${MAX_TABLE_ENTRIES})`);
    at += Math.ceil((DIRECTORY_ENTRY_FIXED + extraSize + nameSize) / 8) * 8;
    count(tableOffset, tableSize * 8);
    const chunk = new Uint8Array(Math.min(tableSize, TABLE_CHUNK_ENTRIES) * 8);
    const cv = new DataView(chunk.buffer);
    for (let first = 0; first < tableSize; first += TABLE_CHUNK_ENTRIES) {
      const n = Math.min(TABLE_CHUNK_ENTRIES, tableSize - first);
      await file.read(tableOffset + first * 8, [chunk.subarray(0, n * 8)]);
      for (let j = 0; j < n; j++) {
        const offset = entryOffset(cv.getUint32(j * 8), cv.getUint32(j * 8 + 4));
        if (offset === 0) continue; // all zeroes, or all ones (bit 0)
        if (offset % clusterSize !== 0) misaligned(offset);
        count(offset, clusterSize);
      }
    }
  }
}
