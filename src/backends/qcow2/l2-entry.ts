/**
 * L2 entries as the driver uses them (qcow2.txt, "Cluster mapping" and "Extended L2
 * Entries"): decoded with their subcluster bitmaps, and whole tables validated once
 * when loaded so that the hot path can trust what it reads.
 */
import { Qcow2Error, decodeL2Entry } from './header.js';

/** What decoding needs to know of the image. */
export interface L2Geometry {
  readonly clusterBits: number;
  readonly v3: boolean;
  readonly extended: boolean;
}

/** A decoded L2 entry with its subcluster state: `alloc`/`zero` are bitmaps (bit 0 only without extended L2). */
export interface Entry {
  readonly kind: 'unallocated' | 'zero' | 'normal' | 'compressed';
  readonly offset: number;
  readonly length: number;
  readonly copied: boolean;
  readonly alloc: number;
  readonly zero: number;
}

export const UNALLOCATED: Entry = { kind: 'unallocated', offset: 0, length: 0, copied: false, alloc: 0, zero: 0 };
export const ALL_SUBCLUSTERS = 0xffff_ffff;

/** Decodes the entry at byte `o` of an L2 table. */
export function decodeEntry(view: DataView, o: number, g: L2Geometry): Entry {
  const hi = view.getUint32(o), lo = view.getUint32(o + 4);
  // With extended L2 entries, bit 0 is not the zero flag: the bitmap says which subclusters read as zeroes.
  const d = decodeL2Entry(hi, g.extended ? lo & ~1 : lo, g.clusterBits, g.v3);
  if (typeof d === 'string') throw new Qcow2Error('QCOW2_BAD_METADATA', d);
  if (d.kind === 'unallocated' && !g.extended) return UNALLOCATED;
  const offset = d.kind === 'unallocated' ? 0 : d.offset;
  const length = d.kind === 'compressed' ? d.length : 0;
  const copied = d.kind === 'normal' || d.kind === 'zero' ? d.copied : false;
  if (g.extended) return { kind: d.kind, offset, length, copied, alloc: view.getUint32(o + 12), zero: view.getUint32(o + 8) };
  return { kind: d.kind, offset, length, copied, alloc: d.kind === 'normal' ? 1 : 0, zero: d.kind === 'zero' ? 1 : 0 };
}

/**
 * Throws {@link Qcow2Error} unless every entry of the L2 table at `off` is well-formed:
 * no reserved bits, aligned offsets off the header and inside the file, none on one of the
 * `metadata` clusters (the header, L1, refcount and snapshot tables, L2 tables and refcount
 * blocks), which a write or a free through a data entry would destroy; consistent bitmaps.
 */
export function validateL2Table(data: Uint8Array, off: number, g: L2Geometry, fileSize: number, metadata: { has(cluster: number): boolean }): void {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const entryBytes = g.extended ? 16 : 8, clusterSize = 2 ** g.clusterBits;
  for (let o = 0; o < data.length; o += entryBytes) {
    const hi = view.getUint32(o), lo = view.getUint32(o + 4);
    const d = decodeL2Entry(hi, g.extended ? lo & ~1 : lo, g.clusterBits, g.v3);
    const where = `L2 table at ${off}, entry ${o / entryBytes}`;
    if (typeof d === 'string') throw new Qcow2Error('QCOW2_BAD_METADATA', `${where}: ${d}`);
    if (d.kind !== 'unallocated' && d.offset !== 0) {
      if (d.offset < clusterSize || d.offset >= fileSize) {
        throw new Qcow2Error('QCOW2_BAD_METADATA', `${where}: cluster offset ${d.offset} is on the header or past the end of the file`);
      }
      if (metadata.has(Math.floor(d.offset / clusterSize))) {
        throw new Qcow2Error('QCOW2_BAD_METADATA', `${where}: cluster offset ${d.offset} is metadata (an L1, L2, refcount or snapshot table, or a refcount block)`);
      }
    }
    if (g.extended && d.kind !== 'compressed') {
      const zero = view.getUint32(o + 8), alloc = view.getUint32(o + 12);
      if ((zero & alloc) !== 0 || (alloc !== 0 && d.kind === 'unallocated')) {
        throw new Qcow2Error('QCOW2_BAD_METADATA', `${where}: invalid subcluster bitmap`);
      }
    }
  }
}

/** 1: allocated data, 2: reads as zeroes, 0: from the backing (or zeroes without one). */
export function subclusterState(e: Entry, sc: number): 0 | 1 | 2 {
  const bit = 2 ** sc; // sc < 32; ** keeps bit 31 positive
  if (Math.floor(e.alloc / bit) % 2 === 1) return 1;
  if (Math.floor(e.zero / bit) % 2 === 1) return 2;
  return 0;
}
