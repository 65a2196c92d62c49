/**
 * What page alignment does to a 4 KiB copy (src/memory/page-aligned.ts): 4 KiB blocks
 * copied at random out of 64 MiB into 32 buffers in turn — the loopback benchmark's
 * copy without the stack — with source and destination each starting on a page or 16
 * bytes past one (where malloc puts large arrays). All four cases live in one
 * WebAssembly.Memory, whose first byte starts a page, and run in interleaved rounds;
 * each prints its median rate and its ratio to the page-aligned case.
 *
 *   node dist/bench/page-aligned-copy.js [--rounds N]
 */
import { pageAlignedBytes } from '../src/memory/page-aligned.js';

const BLOCK = 4096;
const REGION = 64 << 20;
const LANES = 32;
/** Destination buffers sit this far apart, so a shifted one never overlaps the next. */
const LANE_STRIDE = 2 * BLOCK;
const MALLOC_OFFSET = 16;
const COPIES_PER_ROUND = 300_000;
const WARMUP_COPIES = 300_000;
const DEFAULT_ROUNDS = 9;

const CASES = [
  { name: 'source and destination on a page', src: 0, dst: 0 },
  { name: 'source on a page, destination +16', src: 0, dst: MALLOC_OFFSET },
  { name: 'source +16, destination on a page', src: MALLOC_OFFSET, dst: 0 },
  { name: 'source and destination +16', src: MALLOC_OFFSET, dst: MALLOC_OFFSET },
] as const;

function main(): void {
  const at = process.argv.indexOf('--rounds');
  const rounds = at > 0 ? Number(process.argv[at + 1]) : DEFAULT_ROUNDS;
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error('--rounds takes a positive integer');
  // Source blocks first, one spare page so a shifted block stays inside; then the lanes.
  const memory = pageAlignedBytes(REGION + BLOCK + LANES * LANE_STRIDE);
  for (let i = 0; i < memory.length; i += BLOCK) memory[i] = 1;
  const blocks = REGION / BLOCK;

  const copyRate = (srcShift: number, dstShift: number, copies: number): number => {
    const lanes: Uint8Array[] = [];
    for (let i = 0; i < LANES; i++) {
      const start = REGION + BLOCK + i * LANE_STRIDE + dstShift;
      lanes.push(memory.subarray(start, start + BLOCK));
    }
    const t0 = performance.now();
    for (let k = 0; k < copies; k++) {
      const from = Math.floor(Math.random() * blocks) * BLOCK + srcShift;
      lanes[k % LANES].set(memory.subarray(from, from + BLOCK));
    }
    return copies / ((performance.now() - t0) / 1000);
  };

  copyRate(0, 0, WARMUP_COPIES);
  const rates: number[][] = CASES.map(() => []);
  for (let r = 0; r < rounds; r++) CASES.forEach((c, i) => rates[i].push(copyRate(c.src, c.dst, COPIES_PER_ROUND)));
  const medians = rates.map((list) => {
    const sorted = [...list].sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  });
  console.log(`4 KiB copies from ${REGION >> 20} MiB at random into ${LANES} buffers, median of ${rounds} interleaved rounds`);
  CASES.forEach((c, i) => {
    console.log(`  ${c.name.padEnd(36)} ${(medians[i] / 1e6).toFixed(2)} M copies/s  ${(medians[i] / medians[0]).toFixed(2)}`);
  });
}

main();
