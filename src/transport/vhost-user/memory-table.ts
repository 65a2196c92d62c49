/**
 * Guest memory as a vhost-user frontend shares it (SET_MEM_TABLE): regions given by guest
 * address, the frontend's own user address and an fd with an offset, checked, then
 * mapped through {@link BackendIo}, as one {@link GuestMemory}. Rings are given in user
 * addresses; {@link MemoryTable.toGuest} takes them to guest addresses.
 */
import { GuestMemory, type MemoryRegion } from '../../memory/guest-memory.js';
import type { BackendIo, RegionMapping } from './backend.js';
import type { MappedMemoryRegion } from './messages.js';

interface Region {
  readonly guestAddress: number;
  readonly size: number;
  readonly userAddress: number;
  readonly mapping: RegionMapping;
}

/** Why a table cannot be used, or null: empty regions, addresses past 2^53, overlaps. */
export function memoryTableProblem(table: readonly MappedMemoryRegion[]): string | null {
  for (const r of table) {
    if (r.size === 0) return `memory region at guest 0x${r.guestAddress.toString(16)} is empty`;
    if (r.guestAddress + r.size > Number.MAX_SAFE_INTEGER || r.userAddress + r.size > Number.MAX_SAFE_INTEGER ||
        r.mmapOffset + r.size > Number.MAX_SAFE_INTEGER) {
      return `memory region at guest 0x${r.guestAddress.toString(16)} reaches past 2^53`;
    }
  }
  const overlaps = (key: 'guestAddress' | 'userAddress'): boolean => {
    const sorted = [...table].sort((a, b) => a[key] - b[key]);
    return sorted.some((r, i) => i > 0 && sorted[i - 1][key] + sorted[i - 1].size > r[key]);
  };
  if (overlaps('guestAddress')) return 'memory regions overlap in guest-physical addresses';
  if (overlaps('userAddress')) return 'memory regions overlap in frontend user addresses';
  return null;
}

export class MemoryTable {
  private regions: Region[] = [];
  /** The mapped memory, or null before the first table and after {@link unmap}. */
  memory: GuestMemory | null = null;

  constructor(private readonly io: BackendIo) {}

  /**
   * Maps every region of `table` (checked by {@link memoryTableProblem}) and, once all
   * are mapped, replaces the old table with it. On failure the old table stays and what
   * was mapped is unmapped; the error of {@link BackendIo.mapRegion} is thrown. The fds
   * are the caller's to close.
   */
  replace(table: readonly MappedMemoryRegion[]): void {
    const mapped: Region[] = [];
    try {
      for (const r of table) {
        mapped.push({ guestAddress: r.guestAddress, size: r.size, userAddress: r.userAddress, mapping: this.io.mapRegion(r.fd, r.size, r.mmapOffset) });
      }
    } catch (e) {
      for (const m of mapped) m.mapping.unmap();
      throw e;
    }
    this.unmap();
    this.regions = mapped;
    const parts: MemoryRegion[] = [];
    for (const r of mapped) {
      let at = r.guestAddress;
      for (const chunk of r.mapping.chunks) {
        parts.push({ guestAddress: at, bytes: chunk });
        at += chunk.length;
      }
    }
    this.memory = new GuestMemory(parts);
  }

  /** Frontend user address → guest address, through the table; -1 if unmapped. */
  toGuest(uva: number): number {
    for (const r of this.regions) {
      if (uva >= r.userAddress && uva - r.userAddress < r.size) return r.guestAddress + (uva - r.userAddress);
    }
    return -1;
  }

  /** The highest guest-physical address of the table (0 without one). */
  end(): number {
    return this.regions.reduce((end, r) => Math.max(end, r.guestAddress + r.size), 0);
  }

  unmap(): void {
    for (const r of this.regions) r.mapping.unmap();
    this.regions = [];
    this.memory = null;
  }
}
