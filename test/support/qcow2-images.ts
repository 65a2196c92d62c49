// Helpers for the qcow2 create/check tests: qemu-img and qemu-io on images written to a
// temporary directory.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { entryOffset, parseHeader, setRefcount, writeU64, type Qcow2Header } from '../../src/backends/qcow2/header.js';
import { MemoryImageFile } from '../../src/backends/qcow2/memory-image-file.js';
import { requirePeer } from '../../scripts/guest/guest.js';

/** Skip message when qemu-img/qemu-io are missing (throws with CI=true), else false. */
export const qemuSkip = requirePeer('qemu-img', 'qemu-io');

export interface TempDir {
  readonly path: string;
  file(name: string): string;
  remove(): void;
}

export function tempDir(): TempDir {
  const path = mkdtempSync(join(tmpdir(), 'vblk-qcow2-'));
  return { path, file: (name) => join(path, name), remove: () => rmSync(path, { recursive: true, force: true }) };
}

export function writeImage(path: string, file: MemoryImageFile): void {
  writeFileSync(path, file.bytes());
}

export function readImage(path: string): MemoryImageFile {
  return new MemoryImageFile(new Uint8Array(readFileSync(path)));
}

/** `qemu-img check --output=json`: its report, whatever the exit status (2: corruptions, 3: leaks). */
export function qemuCheck(path: string, repair?: 'leaks' | 'all'): Record<string, number | string> {
  const args = ['check', '--output=json', ...(repair ? ['-r', repair] : []), path];
  const result = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (!result.stdout.trim()) throw new Error(`qemu-img check printed nothing (status ${result.status}): ${result.stderr}`);
  return JSON.parse(result.stdout) as Record<string, number | string>;
}

export function qemuInfo(path: string): Record<string, unknown> {
  return JSON.parse(execFileSync('qemu-img', ['info', '--output=json', path], { encoding: 'utf8' })) as Record<string, unknown>;
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

export function qemuIo(path: string, ...commands: string[]): string {
  return execFileSync('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), path], { encoding: 'utf8' });
}

/** Whether two images show the guest the same bytes (`qemu-img compare`, which skips what both leave unallocated). */
export function sameContents(a: string, b: string): boolean {
  const result = spawnSync('qemu-img', ['compare', '-q', a, b], { encoding: 'utf8' });
  if (result.status !== 0 && result.status !== 1) throw new Error(`qemu-img compare failed (status ${result.status}): ${result.stderr}`);
  return result.status === 0;
}

/** Direct access to an image's metadata, for corrupting it by hand. */
export class Surgery {
  readonly h: Qcow2Header;
  readonly clusterSize: number;
  constructor(readonly file: MemoryImageFile) {
    this.h = parseHeader(file.bytes().subarray(0, 2 ** 21), file.size);
    this.clusterSize = 2 ** this.h.clusterBits;
  }
  u64(offset: number): number {
    const b = this.file.bytes();
    const v = new DataView(b.buffer, b.byteOffset);
    return entryOffset(v.getUint32(offset), v.getUint32(offset + 4));
  }
  setU64(offset: number, value: number, flags = 0): void {
    const b = new Uint8Array(8);
    writeU64(new DataView(b.buffer), 0, value);
    b[0] |= flags;
    this.file.write(offset, [b]);
  }
  l2Table(l1Index: number): number {
    return this.u64(this.h.l1TableOffset + l1Index * 8);
  }
  /** Where L2 entry `index` of the table of L1 entry `l1Index` lives. */
  l2EntryAt(l1Index: number, index: number): number {
    return this.l2Table(l1Index) + index * 8;
  }
  setStoredRefcount(cluster: number, value: number): void {
    const bits = 2 ** this.h.refcountOrder;
    const perBlock = (this.clusterSize * 8) / bits;
    const block = this.u64(this.h.refcountTableOffset + Math.floor(cluster / perBlock) * 8);
    assert.ok(block > 0, `cluster ${cluster} has a refcount block`);
    const bytes = this.file.bytes().slice(block, block + this.clusterSize);
    setRefcount(bytes, cluster % perBlock, bits, value);
    this.file.write(block, [bytes]);
  }
}

/**
 * Hand-made damage to an image with data in its first L2 table (entries 0, 1 and 16 at
 * least, 64 KiB clusters, an L1 table of 3 entries or more), each named for what it breaks.
 */
export const MUTATIONS: readonly (readonly [string, (s: Surgery) => void])[] = [
  ['a leaked cluster past the data', (s) => { s.file.truncate(s.file.size + 2 * s.clusterSize); s.setStoredRefcount(s.file.size / s.clusterSize - 1, 1); }],
  ['a data cluster with refcount 2', (s) => s.setStoredRefcount(s.u64(s.l2EntryAt(0, 0)) / s.clusterSize, 2)],
  ['a data cluster with refcount 0', (s) => s.setStoredRefcount(s.u64(s.l2EntryAt(0, 1)) / s.clusterSize, 0)],
  ['an L2 table with refcount 0', (s) => s.setStoredRefcount(s.l2Table(0) / s.clusterSize, 0)],
  ['an L2 entry into the active L1 table', (s) => s.setU64(s.l2EntryAt(0, 5), s.h.l1TableOffset, 0x80)],
  ['an L2 entry into the refcount table', (s) => s.setU64(s.l2EntryAt(0, 5), s.h.refcountTableOffset, 0x80)],
  ['an L2 entry past the end of the file', (s) => s.setU64(s.l2EntryAt(0, 6), s.file.size + 10 * s.clusterSize, 0x80)],
  ['a misaligned L2 entry', (s) => s.setU64(s.l2EntryAt(0, 7), s.file.size - s.clusterSize + 512, 0x80)],
  ['a misaligned L2 table', (s) => s.setU64(s.h.l1TableOffset + 8, s.l2Table(0) + 4096, 0x80)],
  ['an L1 entry past the end', (s) => s.setU64(s.h.l1TableOffset + 16, s.file.size + 4 * s.clusterSize, 0x80)],
  ['reserved bits in an L1 entry', (s) => s.setU64(s.h.l1TableOffset, s.l2Table(0) + 256, 0x80)],
  ['reserved bits in an L2 entry', (s) => s.setU64(s.l2EntryAt(0, 0), s.u64(s.l2EntryAt(0, 0)) + 2, 0x80)],
  ['COPIED missing on an L1 entry', (s) => s.setU64(s.h.l1TableOffset, s.l2Table(0))],
  ['COPIED missing on an L2 entry', (s) => s.setU64(s.l2EntryAt(0, 0), s.u64(s.l2EntryAt(0, 0)))],
  ['a misaligned refcount block', (s) => s.setU64(s.h.refcountTableOffset, s.u64(s.h.refcountTableOffset) + 512)],
  ['a refcount block past the end', (s) => s.setU64(s.h.refcountTableOffset + 8, s.file.size + s.clusterSize)],
  ['a second refcount table entry naming the same block', (s) => s.setU64(s.h.refcountTableOffset + 8, s.u64(s.h.refcountTableOffset))],
];
