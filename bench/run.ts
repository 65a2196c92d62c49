/**
 * `npm run bench`: DESIGN.md's performance measure 1 — loopback, memory backend, 4 KiB
 * random reads, iodepth 32 — as IOPS and as a ratio to a bare loop copying the same
 * blocks, for each ring configuration the driver can negotiate. One JSON line per row,
 * then a table. `BENCH_RUNTIME` (seconds, default 5) sets each row's runtime.
 */
import { VIRTIO_F } from '../src/spec/virtio.js';
import { bareCopyRate } from '../src/cli/bench-baseline.js';
import { runBench, type BenchParams } from '../src/cli/bench-core.js';
import { openLoopback } from '../src/cli/bench.js';

const MS_PER_S = 1000;
const runtimeS = Number(process.env.BENCH_RUNTIME ?? 5);
const CONFIGS: [string, number[]][] = [
  ['default (EVENT_IDX + INDIRECT)', []],
  ['no INDIRECT', [VIRTIO_F.RING_INDIRECT_DESC]],
  ['no EVENT_IDX, no INDIRECT', [VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.RING_INDIRECT_DESC]],
];
const SIZE = 64 << 20;
const BS = 4096;
const IODEPTH = 32;

const rows: string[] = [];
for (const [label, excludeFeatures] of CONFIGS) {
  const target = await openLoopback(SIZE, 1, IODEPTH, BS, 0, { excludeFeatures });
  try {
    const params: BenchParams = { rw: 'randread', bs: BS, iodepth: IODEPTH, runtimeMs: runtimeS * MS_PER_S, regionBytes: SIZE };
    // Warm the JIT on both paths before timing either.
    await runBench(target.driver, { ...params, runtimeMs: MS_PER_S / 2 });
    const baseline = bareCopyRate({ rw: 'randread', bs: BS, regionBytes: SIZE, durationMs: MS_PER_S });
    const r = await runBench(target.driver, params);
    const ratio = r.iops / baseline;
    console.log(JSON.stringify({
      measure: 'loopback-4k-randread-qd32', config: label, iops: Math.round(r.iops), baseline_iops: Math.round(baseline),
      ratio: Number(ratio.toFixed(3)), lat_us: { p50: Number(r.latUs.p50.toFixed(1)), p99: Number(r.latUs.p99.toFixed(1)) }, errors: r.errors,
    }));
    rows.push(`${label.padEnd(32)} ${String(Math.round(r.iops)).padStart(9)} ${String(Math.round(baseline)).padStart(11)} ${ratio.toFixed(3).padStart(7)}`);
  } finally {
    await target.close();
  }
}
console.log(`\n${'ring features'.padEnd(32)} ${'iops'.padStart(9)} ${'bare copy'.padStart(11)} ${'ratio'.padStart(7)}`);
for (const row of rows) console.log(row);
