/**
 * The internal snapshot table (docs/interop/qcow2.txt, "Snapshots"): `nb_snapshots`
 * entries from `snapshots_offset`, each a 40-byte fixed part, extra data, the id and the
 * name, padded to 8 bytes. Read entry by entry, within QEMU's limits, so a hostile count
 * or length costs bounded memory and time.
 */
import { Qcow2Error, readU64, type Qcow2Header } from './header.js';
import type { ImageFile } from './image-file.js';

/** QEMU refuses a larger table (QCOW_MAX_SNAPSHOTS_SIZE) or more extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA). */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
const FIXED_BYTES = 40;

export interface SnapshotEntry {
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly id: string;
  readonly name: string;
}

export interface SnapshotTable {
  readonly snapshots: readonly SnapshotEntry[];
  /** Bytes the table occupies from `snapshots_offset`, padding included. */
  readonly byteLength: number;
}

const text = new TextDecoder('utf-8', { fatal: false });

function bad(message: string): never {
  throw new Qcow2Error('QCOW2_BAD_METADATA', message);
}

/** Reads and validates the snapshot table of `header` (bytes past the end of the file read as zeroes). */
export async function readSnapshotTable(file: ImageFile, header: Qcow2Header): Promise<SnapshotTable> {
  const snapshots: SnapshotEntry[] = [];
  let at = header.snapshotsOffset;
  const fixed = new Uint8Array(FIXED_BYTES);
  const view = new DataView(fixed.buffer);
  for (let i = 0; i < header.nbSnapshots; i++) {
    await file.read(at, [fixed]);
    const l1TableOffset = readU64(view, 0, `snapshot ${i}'s l1_table_offset`);
    const l1Size = view.getUint32(8);
    const idSize = view.getUint16(12);
    const nameSize = view.getUint16(14);
    const extraSize = view.getUint32(36);
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) bad(`snapshot ${i} has ${extraSize} bytes of extra data (at most ${MAX_SNAPSHOT_EXTRA_DATA})`);
    const variable = new Uint8Array(extraSize + idSize + nameSize);
    await file.read(at + FIXED_BYTES, [variable]);
    const id = text.decode(variable.subarray(extraSize, extraSize + idSize));
    const name = text.decode(variable.subarray(extraSize + idSize));
    at += Math.ceil((FIXED_BYTES + variable.length) / 8) * 8;
    if (at - header.snapshotsOffset > MAX_SNAPSHOT_TABLE_BYTES) bad(`the snapshot table is larger than ${MAX_SNAPSHOT_TABLE_BYTES} bytes`);
    snapshots.push({ l1TableOffset, l1Size, id, name });
  }
  return { snapshots, byteLength: at - header.snapshotsOffset };
}
