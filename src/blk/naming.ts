/**
 * Disk names and the process-wide disk index allocator, as the seed's `virtblk_probe`
 * names disks: index 0 … 25 → `vda` … `vdz`, then two letters `vdaa` … `vdzz`, then
 * three `vdaaa` … `vdzzz` (a bijective base-26 numbering after the `vd` prefix).
 */
import { VblkError } from '../errors.js';

const LETTERS = 26;
const LETTER_A = 'a'.charCodeAt(0);
const ONE_LETTER = LETTERS;
const TWO_LETTERS = ONE_LETTER + LETTERS * LETTERS;
/**
 * Disks the seed's scheme can name: 26 + 26² + 26³. Past `vdzzz` the seed's three-letter
 * branch would print characters after `z`; we stop there instead.
 */
export const MAX_DISKS = TWO_LETTERS + LETTERS * LETTERS * LETTERS;

export class DiskIndexError extends VblkError {
  constructor(message: string) {
    super('NO_DISK_INDEX', message);
  }
}

function letter(n: number): string {
  return String.fromCharCode(LETTER_A + n);
}

/** The disk name of `index` (0 → `vda`, 26 → `vdaa`, 702 → `vdaaa`). */
export function diskName(index: number): string {
  if (!Number.isSafeInteger(index) || index < 0 || index >= MAX_DISKS) {
    throw new DiskIndexError(`disk index ${index} is outside 0 … ${MAX_DISKS - 1} (vda … vdzzz)`);
  }
  if (index < ONE_LETTER) return `vd${letter(index)}`;
  if (index < TWO_LETTERS) return `vd${letter(Math.floor(index / LETTERS) - 1)}${letter(index % LETTERS)}`;
  const m1 = Math.floor((Math.floor(index / LETTERS) - 1) / LETTERS) - 1;
  const m2 = (Math.floor(index / LETTERS) - 1) % LETTERS;
  return `vd${letter(m1)}${letter(m2)}${letter(index % LETTERS)}`;
}

/**
 * Hands out the lowest free disk index, like the seed's `ida_simple_get(&vd_index_ida, 0, …)`,
 * so a removed disk's name is reused by the next one.
 */
export class DiskIndexAllocator {
  private readonly used = new Set<number>();

  /** The lowest free index; throws {@link DiskIndexError} when all {@link MAX_DISKS} are taken. */
  allocate(): number {
    for (let i = 0; i < MAX_DISKS; i++) {
      if (!this.used.has(i)) {
        this.used.add(i);
        return i;
      }
    }
    throw new DiskIndexError(`all ${MAX_DISKS} disk names (vda … vdzzz) are in use`);
  }

  /** Frees `index` for reuse; freeing an index that is not allocated is a no-op. */
  release(index: number): void {
    this.used.delete(index);
  }

  /** Whether `index` is allocated. */
  has(index: number): boolean {
    return this.used.has(index);
  }
}

/** The allocator every {@link BlkDriver} of this process shares (the seed's `vd_index_ida`). */
export const diskIndexes = new DiskIndexAllocator();
