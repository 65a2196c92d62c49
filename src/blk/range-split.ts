/**
 * How the driver cuts a discard, write-zeroes or secure-erase range into the segments a
 * device takes (VIRTIO 1.2, 5.2.4 and 5.2.6): at most `max_*_sectors` each, cut where the
 * device's `*_sector_alignment` says. Linux turns that alignment into its queue's discard
 * granularity, and its block layer cuts a discard so that every piece but the last ends
 * on a granularity boundary, stopping the first piece short when the range starts off
 * one; a piece is at most max sectors rounded down to the granularity. This does the same
 * for each range, then the driver groups the segments `maxSegments` per request.
 */

/** Limits for one kind of range request (discard, write-zeroes, secure erase). */
export interface RangeLimits {
  /** Sectors per segment: a multiple of `granularity`. */
  readonly maxSectors: number;
  /** Segments per request, at least 1. */
  readonly maxSegments: number;
  /**
   * Sectors; cuts inside a range fall on multiples of it. A multiple of the logical
   * block and of the device's alignment, unless a segment cannot hold that much.
   */
  readonly granularity: number;
}

/** What the device said and what the driver's chains allow, for {@link rangeLimits}. */
export interface RangeConfig {
  /** `max_*_sectors`; 0 is taken as no limit but the u32 field (Linux: UINT_MAX). */
  readonly maxSectors: number;
  /** `max_*_seg`; 0 is taken as 1, the safe reading. */
  readonly maxSegments: number;
  /** `*_sector_alignment`, or 0 when the device gives none (the logical block is used). */
  readonly alignment: number;
  /** Logical block size in 512-byte sectors: a power of two. */
  readonly sectorsPerBlock: number;
  /** Segments one chain's data can hold (the driver's chain size / 16 bytes each). */
  readonly segmentsPerChain: number;
}

const U32_MAX = 0xffff_ffff;

/** The limits the driver splits by, from the device's fields (u32s) and the logical block. */
export function rangeLimits(c: RangeConfig): RangeLimits {
  const spb = c.sectorsPerBlock;
  const sectors = c.maxSectors > 0 ? c.maxSectors : U32_MAX;
  // A segment must cover whole logical blocks; one block even if the device says less.
  const inBlocks = Math.max(spb, sectors - (sectors % spb));
  // Cuts must fall on whole blocks and on the alignment: on multiples of both. The least
  // common multiple stays a safe integer (a u32 times a power of two up to 2^7).
  const aligned = c.alignment > 0 ? (c.alignment / gcd(c.alignment, spb)) * spb : spb;
  // Linux rounds max sectors down to the granularity. When a segment cannot hold one
  // granule the device's maximum wins (the alignment is only a hint, 5.2.4): cutting at
  // both would leave a sliver between every two full pieces.
  const granularity = inBlocks >= aligned ? aligned : spb;
  return {
    maxSectors: inBlocks - (inBlocks % granularity),
    maxSegments: Math.min(Math.max(1, c.maxSegments), c.segmentsPerChain),
    granularity,
  };
}

/**
 * Appends the segments of [sector, sector + sectors) to `out` as (sector, count) pairs.
 * `sector` and `sectors` are whole logical blocks (the driver checked), `sectors` > 0.
 */
export function splitRange(sector: number, sectors: number, limits: RangeLimits, out: number[]): void {
  let s = sector;
  let left = sectors;
  while (left > 0) {
    let n = Math.min(left, limits.maxSectors);
    if (n < left) {
      // Stop short at the last boundary inside the piece; a piece always keeps some length.
      const past = (s + n) % limits.granularity;
      if (past < n) n -= past;
    }
    out.push(s, n);
    s += n;
    left -= n;
  }
}

function gcd(a: number, b: number): number {
  while (b !== 0) [a, b] = [b, a % b];
  return a;
}
