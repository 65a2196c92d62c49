/**
 * Test helpers for the qcow2 driver: a minimal fresh image (header, refcount table, one
 * refcount block, L1), an independent refcount verifier (every cluster's refcount
 * recomputed from the header and L1/L2 tables and compared), and an ImageFile whose
 * every call completes asynchronously so that the driver's concurrent paths run.
 */
import type { BackendResult } from '../../src/backends/backend.js';
import type { ImageFile } from '../../src/backends/qcow2/image-file.js';
import { MemoryImageFile } from '../../src/backends/qcow2/memory-image-file.js';
import {
  INCOMPAT, entryOffset, getRefcount, parseHeader, serializeHeader, writeU64, type Qcow2Header,
} from '../../src/backends/qcow2/header.js';

export interface FreshImageOptions {
  readonly size: number;
  readonly version?: 2 | 3;
  readonly clusterBits?: number;
  readonly refcountOrder?: number;
  readonly backingFile?: string;
  readonly extendedL2?: boolean;
}

/** The bytes of a fresh, empty qcow2 image. */
export function freshImage(o: FreshImageOptions): Uint8Array {
  const cb = o.clusterBits ?? 16, cs = 2 ** cb, version = o.version ?? 3;
  const ext = o.extendedL2 ?? false;
  const l2Entries = cs / (ext ? 16 : 8);
  const l1Size = Math.max(1, Math.ceil(o.size / (cs * l2Entries)));
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const refcountOrder = o.refcountOrder ?? 4;
  const perBlock = (cs * 8) / 2 ** refcountOrder;
  const used = 3 + l1Clusters;
  if (used > perBlock) throw new Error('freshImage: the first refcount block cannot count the initial clusters');
  const h: Qcow2Header = {
    version, backingFileOffset: 0, backingFileSize: 0, clusterBits: cb, size: o.size, cryptMethod: 0, l1Size,
    l1TableOffset: 3 * cs, refcountTableOffset: cs, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: ext ? INCOMPAT.EXTL2 : 0, compatibleFeatures: 0, autoclearFeatures: 0, refcountOrder,
    headerLength: version === 3 ? 112 : 72, compressionType: 'zlib', extensions: [], backingFile: o.backingFile,
  };
  const out = new Uint8Array(used * cs);
  out.set(serializeHeader(h));
  writeU64(new DataView(out.buffer), cs, 2 * cs);
  const block = out.subarray(2 * cs, 3 * cs);
  for (let c = 0; c < used; c++) setRc(block, c, 2 ** refcountOrder, 1);
  return out;
}

function setRc(block: Uint8Array, i: number, bits: number, v: number): void {
  if (bits < 8) { block[Math.floor((i * bits) / 8)] |= v << ((i * bits) % 8); return; }
  block[(i + 1) * (bits / 8) - 1] = v;
}

/**
 * Recomputes every refcount of an image (header, L1, L2 tables, data clusters, refcount
 * table and blocks; no snapshots) and compares: returns the problems found, empty when
 * the image is consistent. `leaks` counts clusters with a refcount but no reference.
 */
export function verifyRefcounts(bytes: Uint8Array): { errors: string[]; leaks: number } {
  const h = parseHeader(bytes.subarray(0, Math.min(bytes.length, 2 ** 21)), bytes.length);
  const cs = 2 ** h.clusterBits, view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const clusters = Math.ceil(bytes.length / cs);
  const expected = new Map<number, number>();
  const errors: string[] = [];
  const ref = (off: number, n = 1): void => {
    for (let k = 0; k < n; k++) {
      const c = Math.floor(off / cs) + k;
      if (c >= clusters) errors.push(`reference to cluster ${c} past the end of the file`);
      expected.set(c, (expected.get(c) ?? 0) + 1);
    }
  };
  const rd = (at: number): [number, number] => [view.getUint32(at), view.getUint32(at + 4)];
  ref(0);
  ref(h.l1TableOffset, Math.ceil((h.l1Size * 8) / cs));
  ref(h.refcountTableOffset, h.refcountTableClusters);
  const ext = (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0;
  const entryBytes = ext ? 16 : 8;
  for (let i = 0; i < h.l1Size; i++) {
    const l2 = entryOffset(...rd(h.l1TableOffset + 8 * i));
    if (l2 === 0) continue;
    ref(l2);
    for (let o = 0; o < cs; o += entryBytes) {
      const [hi, lo] = rd(l2 + o);
      if (hi & 0x4000_0000) continue; // no compressed clusters in these tests
      const off = entryOffset(hi, lo);
      if (off !== 0) ref(off);
    }
  }
  const bits = 2 ** h.refcountOrder, perBlock = (cs * 8) / bits;
  const actual = new Map<number, number>();
  for (let t = 0; t < (h.refcountTableClusters * cs) / 8; t++) {
    const b = entryOffset(...rd(h.refcountTableOffset + 8 * t));
    if (b === 0) continue;
    ref(b);
    const block = bytes.subarray(b, b + cs);
    for (let i = 0; i < perBlock; i++) {
      const v = getRefcount(block, i, bits);
      if (v !== 0) actual.set(t * perBlock + i, v);
    }
  }
  let leaks = 0;
  for (const c of new Set([...expected.keys(), ...actual.keys()])) {
    const e = expected.get(c) ?? 0, a = actual.get(c) ?? 0;
    if (a < e) errors.push(`cluster ${c}: refcount ${a}, referenced ${e} times`);
    else if (a > e) leaks++;
  }
  return { errors, leaks };
}

/** Wraps a MemoryImageFile so that every operation completes on a later turn. */
export class AsyncImageFile implements ImageFile {
  constructor(readonly inner: MemoryImageFile) {}
  get size(): number { return this.inner.size; }
  get readOnly(): boolean { return this.inner.readOnly; }
  #later(fn: () => void): Promise<void> {
    return new Promise((resolve, reject) => setImmediate(() => { try { fn(); resolve(); } catch (e) { reject(e); } }));
  }
  read(offset: number, buffers: readonly Uint8Array[]): BackendResult { return this.#later(() => this.inner.read(offset, buffers)); }
  // The buffers are read only when the write completes, as a real asynchronous write may: a
  // driver that changes a buffer it has handed to a write in flight shows up.
  write(offset: number, buffers: readonly Uint8Array[]): BackendResult { return this.#later(() => this.inner.write(offset, buffers)); }
  flush(): BackendResult { return this.#later(() => this.inner.flush()); }
  truncate(size: number): BackendResult { return this.#later(() => this.inner.truncate(size)); }
  discard(offset: number, length: number): BackendResult { return this.#later(() => this.inner.discard(offset, length)); }
  close(): BackendResult { return this.inner.close(); }
}
