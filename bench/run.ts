/**
 * `npm run bench`: the performance suite of DESIGN.md ("Performance: what we measure").
 * Every comparison is measured in the same run as what it is compared with.
 *
 * - loopback: driver → loopback → BlkDevice → memory backend, 4 KiB random reads at
 *   iodepth 32, as IOPS and as a ratio to a bare loop copying the same blocks (picked by
 *   the same generator, src/cli/block-random.ts): rounds of the two in turn, the median
 *   of the rounds' ratios (see loopbackSection). Reported, not a target.
 * - peers: `vblk serve` against qemu-storage-daemon (default `aio=threads`, and
 *   `aio=io_uring`) on the same raw image in the page cache, each driven by `vblk bench
 *   --socket` (our driver): IOPS, latency, and CPU time per I/O of the backend process
 *   (utime + stime from /proc/PID/stat over the run) and of the driver process.
 * - versus: the serve targets' pattern (4 KiB random read, iodepth 32, one queue) with
 *   `vblk serve`, `vblk serve --io mmap` and qemu-storage-daemon `aio=io_uring` running
 *   side by side and driven in turn, round after round: the median of the per-round
 *   ratios is what the targets use.
 * - fio: `vblk bench --socket` against qemu-storage-daemon (io_uring) next to host `fio
 *   --ioengine=io_uring` on the same file and pattern.
 * - scaling: `vblk serve` at iodepth 1…128, 1 and 2 queues, on the data image and on a
 *   sparse 1 TiB image, with the server's resident memory (VmRSS).
 * - filters: the loopback pattern through filter stacks over the memory backend — none,
 *   stats (what a filter costs), and the throttle at two IOPS limits, measured against
 *   the limit (how closely the token buckets hold it).
 * - nbd: the data image exported by `qemu-nbd`, served over vhost-user by `vblk serve
 *   nbd+unix://…` with one connection and with four, and by qemu-storage-daemon's `nbd`
 *   block driver; 4 KiB random reads and writes at iodepth 32, in rounds as in versus:
 *   IOPS and CPU per I/O of the vhost-user backend as ratios to the daemon's.
 * - qcow2: `vblk serve --format qcow2` against the daemon's qcow2 driver (file
 *   `aio=io_uring`) on the same images, in rounds: 4 KiB random reads of an allocated
 *   image, 4 KiB random writes to a fresh empty image per run, 128 KiB sequential reads of
 *   a zlib-compressed one (bench/qcow2.ts).
 * - migration: the downtime of live-migrating a Linux guest under fio whose disk `vblk
 *   serve` serves, beside qemu-storage-daemon's, in rounds (bench/migration.ts).
 *
 * Prints the tables and a target summary, and writes the same figures as JSON (default
 * bench/results.json). Rows last 2 s by default, the whole suite a few minutes; see
 * {@link USAGE} (`npm run bench -- --help`) for longer runs and smaller ones.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, release, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { bareCopyRate } from '../src/cli/bench-baseline.js';
import { runBench, type BenchParams } from '../src/cli/bench-core.js';
import { openLoopback } from '../src/cli/bench.js';
import { formatSizeValue, parseCommandLine, parseSizeValue } from '../src/cli/args.js';
import { VIRTIO_F } from '../src/spec/virtio.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { applyFilters, parseFilterSpec } from '../src/backends/filters/registry.js';
import { openLoopbackDisk } from '../src/testing/loopback.js';
import {
  hasProgram, makeDataImage, makeSparseImage, NBD_PEER_KINDS, PEER_KINDS, processCpuUs, processMemory, runClient, runFio, startNbdPeer,
  startPeer, startQemuNbdExport, syncImage, type ClientResult, type Pattern, type Peer, type PeerKind,
} from './peers.js';
import { qcow2Report, qcow2Section, qcow2Targets, summarizeQcow2, type Qcow2Row, type Qcow2Summary } from './qcow2.js';
import { migrationReport, migrationSection, migrationTargets, summarizeMigration, type MigrationRow, type MigrationSummary } from './migration.js';
import { GUEST_PEERS, peerPath } from '../scripts/guest/guest.js';
import { median, spread, type Spread } from './stats.js';

const MS_PER_S = 1000;
const MIB = 2 ** 20;
const KIB = 1024;
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const SECTIONS = ['loopback', 'peers', 'versus', 'fio', 'scaling', 'filters', 'nbd', 'qcow2', 'migration'] as const;
type Section = (typeof SECTIONS)[number];

// ---- options ---------------------------------------------------------------------

/** Rounds of the loopback and versus sections. */
const DEFAULT_ROUNDS = 7;
/** Rounds of the migration section: a round boots two guests per backend (some 16 s a round here). */
const DEFAULT_MIGRATION_ROUNDS = 5;

const SPECS = {
  runtime: { kind: 'number', valueName: 'S', description: 'seconds per row' },
  only: { kind: 'string', valueName: 'LIST', description: 'sections: loopback,peers,versus,fio,scaling,filters,nbd,qcow2,migration' },
  out: { kind: 'string', valueName: 'PATH', description: 'JSON output' },
  dir: { kind: 'string', valueName: 'DIR', description: 'scratch directory' },
  'image-size': { kind: 'size', description: 'data image size' },
  'sparse-size': { kind: 'size', description: 'sparse image size' },
  iodepths: { kind: 'string', valueName: 'LIST', description: 'scaling iodepths' },
  queues: { kind: 'string', valueName: 'LIST', description: 'queue counts' },
  rounds: { kind: 'number', valueName: 'N', description: 'rounds of the loopback and versus sections' },
  'migration-rounds': { kind: 'number', valueName: 'N', description: 'rounds of the migration section' },
} as const;

interface Options {
  readonly runtimeS: number;
  readonly sections: readonly Section[];
  readonly out: string;
  readonly dir: string | null;
  readonly imageSize: number;
  readonly sparseSize: number;
  readonly iodepths: readonly number[];
  readonly queues: readonly number[];
  readonly rounds: number;
  readonly migrationRounds: number;
}

function positiveList(what: string, text: string): number[] {
  const list = text.split(',').map((s) => Number(s.trim()));
  if (list.length === 0 || list.some((n) => !Number.isInteger(n) || n < 1)) throw new Error(`bench: ${what} must be a list of positive integers, got '${text}'`);
  return list;
}

function sizeOf(what: string, text: string | undefined, fallback: number): number {
  if (text === undefined) return fallback;
  const n = parseSizeValue(text);
  if (n === null) throw new Error(`bench: ${what} must be a size, got '${text}'`);
  return n;
}

function parseOptions(argv: readonly string[], env: NodeJS.ProcessEnv): Options {
  const { options: o } = parseCommandLine('bench', SPECS, argv);
  const only = o.only ?? env.BENCH_ONLY;
  const sections = only === undefined ? [...SECTIONS] : only.split(',').map((s) => s.trim());
  for (const s of sections) if (!(SECTIONS as readonly string[]).includes(s)) throw new Error(`bench: unknown section '${s}' (${SECTIONS.join(', ')})`);
  const runtimeS = o.runtime ?? Number(env.BENCH_RUNTIME ?? 2);
  if (!(runtimeS > 0)) throw new Error(`bench: the runtime must be a positive number of seconds, got ${runtimeS}`);
  const rounds = o.rounds ?? Number(env.BENCH_ROUNDS ?? DEFAULT_ROUNDS);
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`bench: the rounds must be a positive integer, got ${rounds}`);
  const migrationRounds = o['migration-rounds'] ?? Number(env.BENCH_MIGRATION_ROUNDS ?? DEFAULT_MIGRATION_ROUNDS);
  if (!Number.isInteger(migrationRounds) || migrationRounds < 1) throw new Error(`bench: the migration rounds must be a positive integer, got ${migrationRounds}`);
  return {
    runtimeS,
    sections: sections as Section[],
    out: resolve(o.out ?? env.BENCH_OUT ?? join(ROOT, 'bench', 'results.json')),
    dir: o.dir ?? env.BENCH_DIR ?? null,
    imageSize: o['image-size'] ?? sizeOf('BENCH_IMAGE_SIZE', env.BENCH_IMAGE_SIZE, 1 << 30),
    sparseSize: o['sparse-size'] ?? sizeOf('BENCH_SPARSE_SIZE', env.BENCH_SPARSE_SIZE, 2 ** 40),
    iodepths: positiveList('--iodepths', o.iodepths ?? '1,4,16,64,128'),
    queues: positiveList('--queues', o.queues ?? '1,2'),
    rounds,
    migrationRounds,
  };
}

// ---- rows ------------------------------------------------------------------------

interface LoopbackRow {
  readonly config: string;
  readonly zero_copy: boolean;
  readonly iops: number;
  readonly baseline_iops: number;
  readonly ratio: number;
  readonly lat_us: { readonly p50: number; readonly p99: number };
  readonly cpu_us_per_io: number;
}

interface PeerRow {
  readonly backend: PeerKind;
  readonly rw: Pattern['rw'];
  readonly bs: number;
  readonly iodepth: number;
  readonly queues: number;
  readonly iops: number;
  readonly lat_us: { readonly p50: number; readonly p99: number };
  /** CPU time of the backend process per I/O (every thread, user + system). */
  readonly backend_cpu_us_per_io: number;
  /** CPU time of `vblk bench` (our driver) per I/O, and its share of one core. */
  readonly driver_cpu_us_per_io: number;
  readonly driver_cpu_share: number;
  readonly backend_rss_bytes: number;
}

/** One backend's run in one round of the versus section. */
interface VersusRow {
  readonly round: number;
  readonly backend: PeerKind;
  readonly iops: number;
  readonly backend_cpu_us_per_io: number;
  readonly driver_cpu_us_per_io: number;
}

/** A backend against qemu-storage-daemon `aio=io_uring` over the rounds: per-round ratios. */
interface VersusSummary {
  readonly backend: PeerKind;
  /** What the ratios divide by: the daemon, or `vblk serve` for the metrics row. */
  readonly base: PeerKind;
  readonly iops_ratio: Spread;
  readonly cpu_ratio: Spread;
}

interface FioRow {
  readonly client: string;
  readonly rw: Pattern['rw'];
  readonly bs: number;
  readonly iodepth: number;
  readonly iops: number;
  readonly lat_us: { readonly p50: number; readonly p99: number };
  readonly client_cpu_us_per_io: number;
  readonly backend_cpu_us_per_io: number | null;
}

interface ScalingRow extends PeerRow {
  readonly image: string;
  readonly image_bytes: number;
  readonly backend_hwm_bytes: number;
}

interface FilterRow {
  /** The `--filter` specs of the stack, or `none`. */
  readonly filters: string;
  readonly iops: number;
  /** The throttle's IOPS limit, when the stack has one. */
  readonly limit_iops: number | null;
  /** Measured IOPS over the limit. */
  readonly ratio_to_limit: number | null;
  readonly lat_us: { readonly p50: number; readonly p99: number };
  readonly cpu_us_per_io: number;
}

/** One NBD-sourced backend, one pattern, one round. */
interface NbdRow {
  readonly round: number;
  readonly backend: PeerKind;
  readonly rw: Pattern['rw'];
  readonly iops: number;
  readonly lat_us: { readonly p50: number; readonly p99: number };
  readonly backend_cpu_us_per_io: number;
  /** qemu-nbd's CPU time per I/O over the same run. */
  readonly server_cpu_us_per_io: number;
}

/** A backend against qemu-storage-daemon's nbd driver for one pattern, over the rounds. */
interface NbdSummary {
  readonly backend: PeerKind;
  readonly rw: Pattern['rw'];
  readonly iops: number;
  readonly backend_cpu_us_per_io: number;
  readonly iops_ratio: Spread | null;
  readonly cpu_ratio: Spread | null;
}

interface Target {
  readonly name: string;
  readonly value: number | null;
  readonly limit: string;
  readonly met: boolean | null;
}

const round = (n: number, d = 2): number => Math.round(n * 10 ** d) / 10 ** d;
const lat = (r: { lat_us: { p50: number; p99: number } }): { p50: number; p99: number } => ({ p50: round(r.lat_us.p50, 1), p99: round(r.lat_us.p99, 1) });

// ---- loopback --------------------------------------------------------------------

const LOOPBACK_CONFIGS: readonly { config: string; exclude: number[]; bounce: boolean }[] = [
  { config: 'EVENT_IDX + INDIRECT', exclude: [], bounce: false },
  { config: 'EVENT_IDX + INDIRECT', exclude: [], bounce: true },
  { config: 'EVENT_IDX', exclude: [VIRTIO_F.RING_INDIRECT_DESC], bounce: false },
  { config: 'neither', exclude: [VIRTIO_F.RING_EVENT_IDX, VIRTIO_F.RING_INDIRECT_DESC], bounce: false },
];
const LOOPBACK_SIZE = 64 << 20;
const BS = 4096;
const QD = 32;
/** Seconds of 4 KiB random reads a backend serves before its first measured row. */
const WARMUP_S = 0.5;

/**
 * Each row: rounds of the bare copy loop and the loopback in turn, starting and ending
 * with the bare loop, so that every loopback run has a bare-loop run on either side of
 * it within a second or two. The row's ratio is the median of the rounds' ratios (each
 * round's IOPS over the mean of its two neighbours' copy rates): the machine's drift
 * moves both sides of a round alike, and a round caught in a slow moment does not move
 * the median.
 */
async function loopbackSection(o: Options): Promise<LoopbackRow[]> {
  const rows: LoopbackRow[] = [];
  const runMs = (o.runtimeS * MS_PER_S) / 2;
  const baselineMs = Math.max(100, (o.runtimeS * MS_PER_S) / 8);
  const copy = { rw: 'randread', bs: BS, regionBytes: LOOPBACK_SIZE, durationMs: baselineMs } as const;
  // The first row would otherwise run on code the JIT has not finished optimising.
  const warm = await openLoopback(LOOPBACK_SIZE, 1, QD, BS, 0);
  try {
    await runBench(warm.driver, { rw: 'randread', bs: BS, iodepth: QD, runtimeMs: Math.min(WARMUP_S * 2, o.runtimeS) * MS_PER_S, regionBytes: LOOPBACK_SIZE });
    bareCopyRate(copy);
  } finally {
    await warm.close();
  }
  for (const c of LOOPBACK_CONFIGS) {
    const target = await openLoopback(LOOPBACK_SIZE, 1, QD, BS, 0, { excludeFeatures: c.exclude });
    try {
      const params: BenchParams = { rw: 'randread', bs: BS, iodepth: QD, runtimeMs: runMs, regionBytes: LOOPBACK_SIZE, bounce: c.bounce };
      // Warm the JIT on both paths before timing either.
      await runBench(target.driver, { ...params, runtimeMs: Math.min(500, runMs) });
      const bare = [bareCopyRate(copy)];
      const runs = [];
      for (let round = 0; round < o.rounds; round++) {
        runs.push(await runBench(target.driver, params));
        bare.push(bareCopyRate(copy));
      }
      const baselines = runs.map((_, k) => (bare[k] + bare[k + 1]) / 2);
      const ratio = round(median(runs.map((r, k) => r.iops / baselines[k])), 3);
      const ios = runs.reduce((n, r) => n + r.ios, 0);
      const cpuUs = runs.reduce((n, r) => n + r.cpuUs, 0);
      rows.push({
        config: c.config, zero_copy: !c.bounce, iops: Math.round(median(runs.map((r) => r.iops))),
        baseline_iops: Math.round(median(baselines)), ratio,
        lat_us: lat({ lat_us: { p50: median(runs.map((r) => r.latUs.p50)), p99: median(runs.map((r) => r.latUs.p99)) } }),
        cpu_us_per_io: round(ios ? cpuUs / ios : 0),
      });
      log(`loopback ${c.config}${c.bounce ? ', bounce' : ''}: ${rows[rows.length - 1].iops} IOPS, ratio ${ratio} (median of ${o.rounds} rounds)`);
    } finally {
      await target.close();
    }
  }
  return rows;
}

// ---- filters ---------------------------------------------------------------------

/** Stacks of the filters section: the first two side by side show what a filter costs. */
const FILTER_STACKS: readonly string[][] = [[], ['stats'], ['throttle:iops=2000'], ['throttle:iops=20000']];

/**
 * Each row: the loopback's 4 KiB random reads at iodepth 32 through a filter stack over
 * a memory backend written through once. A warm-up run first (the JIT, and a throttle's
 * initial burst, which would otherwise count towards the measured rate).
 */
async function filtersSection(o: Options): Promise<FilterRow[]> {
  const rows: FilterRow[] = [];
  const params: BenchParams = { rw: 'randread', bs: BS, iodepth: QD, runtimeMs: o.runtimeS * MS_PER_S, regionBytes: LOOPBACK_SIZE };
  for (const texts of FILTER_STACKS) {
    const specs = texts.map(parseFilterSpec);
    const memory = new MemoryBackend({ size: LOOPBACK_SIZE });
    memory.write(0, [new Uint8Array(LOOPBACK_SIZE).fill(0xa5)]);
    const disk = await openLoopbackDisk(applyFilters(memory, specs));
    try {
      await runBench(disk.driver, { ...params, runtimeMs: Math.min(WARMUP_S, o.runtimeS) * MS_PER_S });
      const r = await runBench(disk.driver, params);
      const throttle = specs.find((x) => x.name === 'throttle');
      const limit = throttle?.name === 'throttle' ? throttle.options.iops ?? null : null;
      rows.push({
        filters: texts.join(' ') || 'none', iops: Math.round(r.iops), limit_iops: limit,
        ratio_to_limit: limit === null ? null : round(r.iops / limit, 3), lat_us: lat({ lat_us: r.latUs }), cpu_us_per_io: round(r.ios ? r.cpuUs / r.ios : 0),
      });
      log(`filters ${rows[rows.length - 1].filters}: ${rows[rows.length - 1].iops} IOPS`);
    } finally {
      await disk.close();
    }
  }
  return rows;
}

// ---- peers -----------------------------------------------------------------------

const PEER_PATTERNS: readonly Pattern[] = [
  { rw: 'randread', bs: 4 * KIB, iodepth: 1 },
  { rw: 'randread', bs: 4 * KIB, iodepth: 32 },
  { rw: 'read', bs: 128 * KIB, iodepth: 32 },
  { rw: 'randwrite', bs: 4 * KIB, iodepth: 1 },
  { rw: 'randwrite', bs: 4 * KIB, iodepth: 32 },
];

/**
 * Starts a backend and runs it briefly before anything is measured: a fresh `vblk serve`
 * has not been JIT-compiled yet, and every backend gets the same treatment.
 */
async function startWarmPeer(kind: (typeof PEER_KINDS)[number], image: string, dir: string, queues: number, runtimeS: number): Promise<Peer> {
  const peer = await startPeer(kind, image, dir, queues);
  try {
    await runClient(peer.socket, { rw: 'randread', bs: BS, iodepth: QD }, queues, Math.min(WARMUP_S, runtimeS));
  } catch (e) {
    await peer.stop().catch(() => {});
    throw e;
  }
  return peer;
}

/** One `vblk bench --socket` run against `peer`, with the backend's CPU time over it. */
async function measure(peer: Peer, p: Pattern, queues: number, runtimeS: number): Promise<PeerRow & { backend_hwm_bytes: number }> {
  const cpu0 = processCpuUs(peer.pid);
  const r: ClientResult = await runClient(peer.socket, p, queues, runtimeS);
  const cpu1 = processCpuUs(peer.pid);
  const mem = processMemory(peer.pid);
  return {
    backend: peer.kind, rw: p.rw, bs: p.bs, iodepth: p.iodepth, queues: r.queues,
    iops: Math.round(r.iops), lat_us: lat(r),
    backend_cpu_us_per_io: round(r.ios ? (cpu1 - cpu0) / r.ios : 0),
    driver_cpu_us_per_io: r.cpu_us_per_io,
    driver_cpu_share: round((r.cpu_us_per_io * r.ios) / (r.runtime_s * 1e6)),
    backend_rss_bytes: mem.rss, backend_hwm_bytes: mem.hwm,
  };
}

async function peersSection(o: Options, image: string, dir: string): Promise<PeerRow[]> {
  const rows: PeerRow[] = [];
  for (const queues of o.queues) {
    // Metrics on costs its own row in the versus section, not a column here.
    for (const kind of PEER_KINDS.filter((k) => k !== 'vblk-serve-metrics')) {
      const peer = await startWarmPeer(kind, image, dir, queues, o.runtimeS);
      try {
        for (const p of PEER_PATTERNS) {
          const { backend_hwm_bytes: _, ...row } = await measure(peer, p, queues, o.runtimeS);
          rows.push(row);
          log(`peers ${kind} q${queues} ${patternName(p)}: ${row.iops} IOPS, backend ${row.backend_cpu_us_per_io} us/IO`);
        }
      } finally {
        await peer.stop();
      }
      syncImage(image);
    }
  }
  return rows;
}

// ---- versus ------------------------------------------------------------------------

/**
 * The serve targets' comparison, 4 KiB random read at iodepth 32 on one queue, measured
 * so that the machine's drift cannot decide it: the three backends run side by side
 * (idle ones sleep), and each round drives each of them in turn, in an order that
 * rotates. Each round gives a ratio to `aio=io_uring` measured within seconds of it; the
 * median over the rounds is the figure. (Here a shared VM's speed moves by up to 30%
 * over a minute: rows measured a minute apart, as in the peers section, can read 0.86 or
 * 1.25 for the same two builds.)
 */
const VERSUS_KINDS: readonly (typeof PEER_KINDS)[number][] = ['vblk-serve', 'vblk-serve-mmap', 'vblk-serve-metrics', 'qsd-io_uring'];
const VERSUS_BASE: PeerKind = 'qsd-io_uring';

async function versusSection(o: Options, image: string, dir: string): Promise<VersusRow[]> {
  const peers: Peer[] = [];
  const rows: VersusRow[] = [];
  try {
    for (const kind of VERSUS_KINDS) peers.push(await startWarmPeer(kind, image, dir, 1, o.runtimeS));
    for (let round = 0; round < o.rounds; round++) {
      for (let k = 0; k < peers.length; k++) {
        const peer = peers[(round + k) % peers.length];
        const r = await measure(peer, { rw: 'randread', bs: BS, iodepth: QD }, 1, o.runtimeS);
        rows.push({ round, backend: peer.kind, iops: r.iops, backend_cpu_us_per_io: r.backend_cpu_us_per_io, driver_cpu_us_per_io: r.driver_cpu_us_per_io });
        log(`versus round ${round + 1}/${o.rounds} ${peer.kind}: ${r.iops} IOPS, backend ${r.backend_cpu_us_per_io} us/IO`);
      }
    }
  } finally {
    for (const peer of peers) await peer.stop();
  }
  return rows;
}

/**
 * Per-round ratios of every backend to {@link VERSUS_BASE}, and of `vblk serve --metrics`
 * to `vblk serve` (what metrics cost).
 */
function summarizeVersus(rows: readonly VersusRow[]): VersusSummary[] {
  const pairs: [PeerKind, PeerKind][] = VERSUS_KINDS.filter((k) => k !== VERSUS_BASE).map((k) => [k, VERSUS_BASE]);
  pairs.push(['vblk-serve-metrics', 'vblk-serve']);
  const out: VersusSummary[] = [];
  for (const [kind, baseKind] of pairs) {
    const iops: number[] = [];
    const cpu: number[] = [];
    for (const r of rows) {
      if (r.backend !== kind) continue;
      const base = rows.find((b) => b.round === r.round && b.backend === baseKind);
      if (base === undefined || base.iops === 0 || base.backend_cpu_us_per_io === 0) continue;
      iops.push(r.iops / base.iops);
      cpu.push(r.backend_cpu_us_per_io / base.backend_cpu_us_per_io);
    }
    if (iops.length > 0) out.push({ backend: kind, base: baseKind, iops_ratio: spread(iops), cpu_ratio: spread(cpu) });
  }
  return out;
}

// ---- fio ---------------------------------------------------------------------------

const FIO_PATTERNS: readonly Pattern[] = [
  { rw: 'randread', bs: 4 * KIB, iodepth: 1 },
  { rw: 'randread', bs: 4 * KIB, iodepth: 32 },
  { rw: 'read', bs: 128 * KIB, iodepth: 32 },
];

async function fioSection(o: Options, image: string, dir: string): Promise<FioRow[]> {
  const rows: FioRow[] = [];
  const peer = await startWarmPeer('qsd-io_uring', image, dir, 1, o.runtimeS);
  try {
    for (const p of FIO_PATTERNS) {
      const r = await measure(peer, p, 1, o.runtimeS);
      rows.push({
        client: 'vblk bench → qsd-io_uring', rw: p.rw, bs: p.bs, iodepth: p.iodepth, iops: r.iops, lat_us: r.lat_us,
        client_cpu_us_per_io: r.driver_cpu_us_per_io, backend_cpu_us_per_io: r.backend_cpu_us_per_io,
      });
      const f = await runFio(image, p, o.runtimeS);
      rows.push({
        client: 'host fio io_uring', rw: p.rw, bs: p.bs, iodepth: p.iodepth, iops: Math.round(f.iops), lat_us: lat(f),
        client_cpu_us_per_io: round(f.cpu_us_per_io), backend_cpu_us_per_io: null,
      });
      log(`fio ${patternName(p)}: vblk bench ${r.iops} IOPS, fio ${Math.round(f.iops)} IOPS`);
    }
  } finally {
    await peer.stop();
  }
  return rows;
}

// ---- scaling ---------------------------------------------------------------------

async function scalingSection(o: Options, images: readonly { name: string; path: string; bytes: number }[], dir: string): Promise<ScalingRow[]> {
  const rows: ScalingRow[] = [];
  for (const img of images) {
    for (const queues of o.queues) {
      const peer = await startWarmPeer('vblk-serve', img.path, dir, queues, o.runtimeS);
      try {
        for (const iodepth of o.iodepths) {
          const r = await measure(peer, { rw: 'randread', bs: BS, iodepth }, queues, o.runtimeS);
          rows.push({ ...r, image: img.name, image_bytes: img.bytes });
          log(`scaling ${img.name} q${queues} qd${iodepth}: ${r.iops} IOPS, RSS ${(r.backend_rss_bytes / MIB).toFixed(1)} MiB`);
        }
      } finally {
        await peer.stop();
      }
    }
  }
  return rows;
}

// ---- nbd ---------------------------------------------------------------------------

const NBD_PATTERNS: readonly Pattern[] = [
  { rw: 'randread', bs: 4 * KIB, iodepth: 32 },
  { rw: 'randwrite', bs: 4 * KIB, iodepth: 32 },
];
const NBD_BASE: PeerKind = 'qsd-nbd';

/**
 * One qemu-nbd in front of the data image; the three vhost-user backends on its export
 * side by side, each round driving each of them in turn (rotating order) through every
 * pattern, so each round's ratios are measured within seconds of each other.
 */
async function nbdSection(o: Options, image: string, dir: string): Promise<NbdRow[]> {
  const server = await startQemuNbdExport(image, dir);
  const peers: Peer[] = [];
  const rows: NbdRow[] = [];
  try {
    for (const kind of NBD_PEER_KINDS) {
      const peer = await startNbdPeer(kind, server.socket, dir, 1);
      peers.push(peer);
      await runClient(peer.socket, { rw: 'randread', bs: BS, iodepth: QD }, 1, Math.min(WARMUP_S, o.runtimeS));
    }
    for (let n = 0; n < o.rounds; n++) {
      for (let k = 0; k < peers.length; k++) {
        const peer = peers[(n + k) % peers.length];
        for (const p of NBD_PATTERNS) {
          const s0 = processCpuUs(server.pid);
          const r = await measure(peer, p, 1, o.runtimeS);
          const s1 = processCpuUs(server.pid);
          const ios = (r.iops * o.runtimeS) || 1;
          rows.push({
            round: n, backend: peer.kind, rw: p.rw, iops: r.iops, lat_us: r.lat_us, backend_cpu_us_per_io: r.backend_cpu_us_per_io,
            server_cpu_us_per_io: round((s1 - s0) / ios),
          });
          log(`nbd round ${n + 1}/${o.rounds} ${peer.kind} ${patternName(p)}: ${r.iops} IOPS, backend ${r.backend_cpu_us_per_io} us/IO`);
        }
      }
    }
  } finally {
    for (const peer of peers) await peer.stop();
    await server.stop();
  }
  return rows;
}

/** Medians per backend and pattern, and per-round ratios to qemu-storage-daemon's nbd driver. */
function summarizeNbd(rows: readonly NbdRow[]): NbdSummary[] {
  const out: NbdSummary[] = [];
  for (const kind of NBD_PEER_KINDS) {
    for (const p of NBD_PATTERNS) {
      const mine = rows.filter((r) => r.backend === kind && r.rw === p.rw);
      if (mine.length === 0) continue;
      const iops: number[] = [];
      const cpu: number[] = [];
      for (const r of mine) {
        const base = rows.find((b) => b.round === r.round && b.backend === NBD_BASE && b.rw === r.rw);
        if (base === undefined || base.iops === 0 || base.backend_cpu_us_per_io === 0) continue;
        iops.push(r.iops / base.iops);
        cpu.push(r.backend_cpu_us_per_io / base.backend_cpu_us_per_io);
      }
      out.push({
        backend: kind, rw: p.rw, iops: Math.round(median(mine.map((r) => r.iops))),
        backend_cpu_us_per_io: round(median(mine.map((r) => r.backend_cpu_us_per_io))),
        iops_ratio: kind === NBD_BASE || iops.length === 0 ? null : spread(iops),
        cpu_ratio: kind === NBD_BASE || cpu.length === 0 ? null : spread(cpu),
      });
    }
  }
  return out;
}

// ---- targets and tables ------------------------------------------------------------

/** The targets; the loopback ratio is reported, not judged (DESIGN.md, Performance). */
function targets(peers: PeerRow[], versus: VersusSummary[], scaling: ScalingRow[], filters: FilterRow[], nbd: NbdSummary[], qcow2: Qcow2Summary[], migration: MigrationSummary[]): Target[] {
  const out: Target[] = [];
  const check = (name: string, value: number | null, limit: string, isMet: (v: number) => boolean): void => {
    out.push({ name, value: value === null ? null : round(value, 3), limit, met: value === null ? null : isMet(value) });
  };
  const row = (kind: PeerKind): PeerRow | undefined => peers.find((r) => r.backend === kind && r.rw === 'randread' && r.bs === BS && r.iodepth === QD && r.queues === 1);
  const uring = row('qsd-io_uring');
  for (const [kind, label] of [['vblk-serve', 'vblk serve'], ['vblk-serve-mmap', 'vblk serve --io mmap']] as const) {
    // The versus section's medians when it ran (see versusSection), else the peers rows.
    const duel = versus.find((v) => v.backend === kind && v.base === VERSUS_BASE);
    const serve = row(kind);
    const iops = duel ? duel.iops_ratio.median : serve && uring ? serve.iops / uring.iops : null;
    const cpu = duel ? duel.cpu_ratio.median : serve && uring ? serve.backend_cpu_us_per_io / uring.backend_cpu_us_per_io : null;
    const how = duel ? ' (median of rounds)' : '';
    check(`${label} / qsd aio=io_uring IOPS, 4k randread qd32${how}`, iops, '>= 1.0', (v) => v >= 1);
    check(`${label} / qsd aio=io_uring CPU per I/O${how}`, cpu, '<= 1.5', (v) => v <= 1.5);
  }
  const metered = versus.find((v) => v.backend === 'vblk-serve-metrics' && v.base === 'vblk-serve');
  check('vblk serve --metrics (scraped every second) / vblk serve IOPS, 4k randread qd32 (median of rounds)',
    metered?.iops_ratio.median ?? null, '>= 0.97', (v) => v >= 0.97);
  check('driver CPU per I/O (us) against qsd aio=io_uring, 4k randread qd32', uring?.driver_cpu_us_per_io ?? null, '<= 3', (v) => v <= 3);
  const sparse = scaling.filter((r) => r.image === 'sparse');
  const rss = sparse.length ? Math.max(...sparse.map((r) => r.backend_rss_bytes)) / MIB : null;
  check(`vblk serve VmRSS (MiB) on the sparse ${formatSizeValue(sparse[0]?.image_bytes ?? 0)} image`, rss, '< 150', (v) => v < 150);
  for (const f of filters) {
    if (f.ratio_to_limit === null) continue;
    check(`${f.filters}, loopback 4k randread qd32: IOPS / limit`, f.ratio_to_limit, '0.9 to 1.1', (v) => v >= 0.9 && v <= 1.1);
  }
  for (const x of nbd) {
    if (x.iops_ratio === null || x.cpu_ratio === null) continue;
    const label = `${x.backend === 'vblk-serve-nbd-4' ? 'vblk serve nbd, 4 connections' : 'vblk serve nbd, 1 connection'} / qsd nbd driver`;
    check(`${label} IOPS, 4k ${x.rw} qd32 (median of rounds)`, x.iops_ratio.median, '>= 1.0', (v) => v >= 1);
    check(`${label} CPU per I/O, 4k ${x.rw} qd32 (median of rounds)`, x.cpu_ratio.median, '<= 1.0', (v) => v <= 1);
  }
  if (qcow2.length) for (const x of qcow2Targets(qcow2)) check(x.name, x.value, x.limit, x.isMet);
  if (migration.length) for (const x of migrationTargets(migration)) check(x.name, x.value, x.limit, x.isMet);
  return out;
}

function patternName(p: { rw: string; bs: number; iodepth: number }): string {
  return `${p.rw} ${formatSizeValue(p.bs)} qd${p.iodepth}`;
}

function table(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map(String))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => r[i].length)));
  const line = (r: string[]): string => `| ${r.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ')} |`;
  return [line(header), `|${widths.map((w, i) => (i === 0 ? `:${'-'.repeat(w + 1)}` : `${'-'.repeat(w + 1)}:`)).join('|')}|`, ...cells.slice(1).map(line)].join('\n');
}

function report(r: Results): string {
  const parts: string[] = [];
  if (r.loopback.length) {
    parts.push(`Loopback, memory backend, 4 KiB random read, iodepth 32: medians of ${r.rounds} rounds, each run between two of the bare copy loop\n` + table(
      ['ring features', 'buffers', 'IOPS', 'bare copy/s', 'ratio', 'p50 us', 'p99 us', 'CPU us/IO'],
      r.loopback.map((x) => [x.config, x.zero_copy ? 'zero copy' : 'bounce', x.iops, x.baseline_iops, x.ratio.toFixed(3), x.lat_us.p50, x.lat_us.p99, x.cpu_us_per_io]),
    ));
  }
  if (r.peers.length) {
    const uring = (x: PeerRow): PeerRow | undefined => r.peers.find((y) => y.backend === 'qsd-io_uring' && y.rw === x.rw && y.bs === x.bs && y.iodepth === x.iodepth && y.queues === x.queues);
    parts.push('vblk serve vs qemu-storage-daemon (same image, page cache), driven by vblk bench --socket\n' + table(
      ['queues, pattern', 'backend', 'IOPS', 'p50 us', 'p99 us', 'backend CPU us/IO', 'driver CPU us/IO', 'driver core', 'IOPS / io_uring', 'CPU / io_uring'],
      r.peers.map((x) => {
        const u = uring(x);
        return [`q${x.queues} ${patternName(x)}`, x.backend, x.iops, x.lat_us.p50, x.lat_us.p99, x.backend_cpu_us_per_io, x.driver_cpu_us_per_io,
          `${Math.round(x.driver_cpu_share * 100)}%`, u ? (x.iops / u.iops).toFixed(2) : '', u ? (x.backend_cpu_us_per_io / u.backend_cpu_us_per_io).toFixed(2) : ''];
      }),
    ));
  }
  if (r.versus.length) {
    const spreadText = (x: Spread): string => `${x.median.toFixed(2)} (${x.min.toFixed(2)}–${x.max.toFixed(2)})`;
    parts.push(`Versus: 4 KiB random read, iodepth 32, 1 queue, backends side by side, ${r.rounds} rounds in rotating order\n` + table(
      ['backend', 'IOPS / io_uring, median (range)', 'CPU / io_uring, median (range)', 'IOPS per round'],
      r.versus_summary.map((x) => [x.base === VERSUS_BASE ? x.backend : `${x.backend} (ratios to ${x.base})`, spreadText(x.iops_ratio), spreadText(x.cpu_ratio),
        r.versus.filter((y) => y.backend === x.backend).map((y) => y.iops).join(' ')]).concat(
        [[VERSUS_BASE, '1', '1', r.versus.filter((y) => y.backend === VERSUS_BASE).map((y) => y.iops).join(' ')]]),
    ));
  }
  if (r.fio.length) {
    parts.push('vblk bench --socket → qemu-storage-daemon (aio=io_uring) vs host fio --ioengine=io_uring, same file\n' + table(
      ['pattern', 'client', 'IOPS', 'p50 us', 'p99 us', 'client CPU us/IO', 'backend CPU us/IO'],
      r.fio.map((x) => [patternName(x), x.client, x.iops, x.lat_us.p50, x.lat_us.p99, x.client_cpu_us_per_io, x.backend_cpu_us_per_io ?? '']),
    ));
  }
  if (r.scaling.length) {
    parts.push('Scaling: vblk serve, 4 KiB random read\n' + table(
      ['image', 'queues', 'iodepth', 'IOPS', 'p50 us', 'p99 us', 'serve CPU us/IO', 'driver CPU us/IO', 'serve RSS MiB', 'peak MiB'],
      r.scaling.map((x) => [`${x.image} ${formatSizeValue(x.image_bytes)}`, x.queues, x.iodepth, x.iops, x.lat_us.p50, x.lat_us.p99,
        x.backend_cpu_us_per_io, x.driver_cpu_us_per_io, (x.backend_rss_bytes / MIB).toFixed(1), (x.backend_hwm_bytes / MIB).toFixed(1)]),
    ));
  }
  if (r.filters.length) {
    parts.push('Filters: loopback, memory backend, 4 KiB random read, iodepth 32, through each stack\n' + table(
      ['filters', 'IOPS', 'IOPS / limit', 'p50 us', 'p99 us', 'CPU us/IO'],
      r.filters.map((x) => [x.filters, x.iops, x.ratio_to_limit ?? '', x.lat_us.p50, x.lat_us.p99, x.cpu_us_per_io]),
    ));
  }
  if (r.nbd_summary.length) {
    const spreadText = (x: Spread | null): string => (x === null ? '1' : `${x.median.toFixed(2)} (${x.min.toFixed(2)}–${x.max.toFixed(2)})`);
    parts.push(`NBD: qemu-nbd on the data image, served over vhost-user, 1 queue, ${r.rounds} rounds in rotating order (medians)\n` + table(
      ['pattern', 'backend', 'IOPS', 'backend CPU us/IO', 'qemu-nbd CPU us/IO', 'IOPS / qsd nbd (range)', 'CPU / qsd nbd (range)'],
      r.nbd_summary.map((x) => [`${x.rw} 4K qd32`, x.backend, x.iops, x.backend_cpu_us_per_io,
        round(median(r.nbd.filter((y) => y.backend === x.backend && y.rw === x.rw).map((y) => y.server_cpu_us_per_io))),
        spreadText(x.iops_ratio), spreadText(x.cpu_ratio)]),
    ));
  }
  if (r.qcow2_summary.length) parts.push(qcow2Report(r.qcow2_summary, r.rounds, r.meta.image_bytes as number, table));
  if (r.migration.length) parts.push(migrationReport(r.migration, r.migration_summary, table));
  if (r.targets.length) {
    parts.push('Targets\n' + table(['target', 'measured', 'wanted', 'met'], r.targets.map((t) => [t.name, t.value ?? 'n/a', t.limit, t.met === null ? 'n/a' : t.met ? 'yes' : 'NO'])));
  }
  if (r.skipped.length) parts.push(`Skipped: ${r.skipped.join('; ')}`);
  return parts.join('\n\n');
}

// ---- main --------------------------------------------------------------------------

interface Results {
  readonly meta: Record<string, unknown>;
  loopback: LoopbackRow[];
  peers: PeerRow[];
  versus: VersusRow[];
  rounds: number;
  versus_summary: VersusSummary[];
  fio: FioRow[];
  scaling: ScalingRow[];
  filters: FilterRow[];
  nbd: NbdRow[];
  nbd_summary: NbdSummary[];
  qcow2: Qcow2Row[];
  qcow2_summary: Qcow2Summary[];
  migration: MigrationRow[];
  migration_summary: MigrationSummary[];
  targets: Target[];
  skipped: string[];
}

function log(line: string): void {
  process.stderr.write(`bench: ${line}\n`);
}

const USAGE = `usage: npm run bench [-- options]   (each option also an environment variable)
  --runtime S        BENCH_RUNTIME      seconds per row (default 2)
  --only LIST        BENCH_ONLY         sections, comma-separated: ${SECTIONS.join(',')}
  --out PATH         BENCH_OUT          JSON results (default bench/results.json)
  --dir DIR          BENCH_DIR          scratch directory for images and sockets (default: a temporary one)
  --image-size SIZE  BENCH_IMAGE_SIZE   data image (default 1G)
  --sparse-size SIZE BENCH_SPARSE_SIZE  sparse image of the scaling rows (default 1T)
  --iodepths LIST                       scaling iodepths (default 1,4,16,64,128)
  --queues LIST                         queue counts (default 1,2)
  --rounds N         BENCH_ROUNDS       rounds of the loopback, versus, nbd and qcow2 sections (default ${DEFAULT_ROUNDS})
  --migration-rounds N BENCH_MIGRATION_ROUNDS  rounds of the migration section (default ${DEFAULT_MIGRATION_ROUNDS})
`;

export async function main(argv: readonly string[], env: NodeJS.ProcessEnv): Promise<Results | null> {
  if (argv.some((a) => a === '--help' || a === '-h')) {
    process.stdout.write(USAGE);
    return null;
  }
  const o = parseOptions(argv, env);
  const started = Date.now();
  const results: Results = {
    meta: {
      command: ['npm run bench', ...(argv.length ? ['--', ...argv] : [])].join(' '),
      date: new Date(started).toISOString(), runtime_s_per_row: o.runtimeS, node: process.version, kernel: release(),
      cpus: cpus().length, cpu_model: cpus()[0]?.model ?? 'unknown', image_bytes: o.imageSize, sparse_image_bytes: o.sparseSize,
    },
    loopback: [], peers: [], versus: [], rounds: o.rounds, versus_summary: [], fio: [], scaling: [], filters: [], nbd: [], nbd_summary: [], qcow2: [], qcow2_summary: [], migration: [], migration_summary: [], targets: [], skipped: [],
  };
  const wants = (s: Section): boolean => o.sections.includes(s);
  if (wants('loopback')) results.loopback = await loopbackSection(o);

  const needsPeers = wants('peers') || wants('versus') || wants('fio') || wants('scaling') || wants('nbd') || wants('qcow2');
  const missing = ['qemu-storage-daemon', 'fio'].filter((p) => !hasProgram(p));
  if (needsPeers) {
    const own = o.dir === null;
    const dir = own ? mkdtempSync(join(tmpdir(), 'vblk-bench-')) : (mkdirSync(o.dir as string, { recursive: true }), o.dir as string);
    const image = join(dir, 'data.raw');
    try {
      log(`writing a ${formatSizeValue(o.imageSize)} image in ${dir}`);
      makeDataImage(image, o.imageSize);
      if (wants('peers')) {
        if (missing.includes('qemu-storage-daemon')) results.skipped.push('peers: qemu-storage-daemon is not installed');
        else results.peers = await peersSection(o, image, dir);
      }
      if (wants('versus')) {
        if (missing.includes('qemu-storage-daemon')) results.skipped.push('versus: qemu-storage-daemon is not installed');
        else {
          results.versus = await versusSection(o, image, dir);
          results.versus_summary = summarizeVersus(results.versus);
        }
      }
      if (wants('fio')) {
        if (missing.length) results.skipped.push(`fio: ${missing.join(' and ')} not installed`);
        else results.fio = await fioSection(o, image, dir);
      }
      if (wants('scaling')) {
        const sparse = join(dir, 'sparse.raw');
        makeSparseImage(sparse, o.sparseSize);
        results.scaling = await scalingSection(o, [
          { name: 'data', path: image, bytes: o.imageSize },
          { name: 'sparse', path: sparse, bytes: o.sparseSize },
        ], dir);
      }
      if (wants('nbd')) {
        const absent = ['qemu-storage-daemon', 'qemu-nbd'].filter((p) => !hasProgram(p));
        if (absent.length) results.skipped.push(`nbd: ${absent.join(' and ')} not installed`);
        else {
          results.nbd = await nbdSection(o, image, dir);
          results.nbd_summary = summarizeNbd(results.nbd);
        }
      }
      if (wants('qcow2')) {
        const absent = ['qemu-storage-daemon', 'qemu-img'].filter((p) => !hasProgram(p));
        if (absent.length) results.skipped.push(`qcow2: ${absent.join(' and ')} not installed`);
        else {
          results.qcow2 = await qcow2Section(o, image, dir, log);
          results.qcow2_summary = summarizeQcow2(results.qcow2);
        }
      }
    } finally {
      if (own) rmSync(dir, { recursive: true, force: true });
      else rmSync(image, { force: true });
    }
  }
  if (wants('filters')) results.filters = await filtersSection(o);
  if (wants('migration')) {
    const absent = ['qemu-storage-daemon', ...GUEST_PEERS].filter((p) => peerPath(p) === undefined);
    if (absent.length) results.skipped.push(`migration: ${absent.join(' and ')} not installed`);
    else {
      const own = o.dir === null;
      const dir = own ? mkdtempSync(join(tmpdir(), 'vblk-bench-migration-')) : join(o.dir as string, 'migration');
      try {
        results.migration = await migrationSection(o.migrationRounds, dir, log);
        results.migration_summary = summarizeMigration(results.migration);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  }
  results.targets = targets(results.peers, results.versus_summary, results.scaling, results.filters, results.nbd_summary, results.qcow2_summary, results.migration_summary);
  (results.meta as { total_s?: number }).total_s = round((Date.now() - started) / MS_PER_S, 1);
  mkdirSync(dirname(o.out), { recursive: true });
  writeFileSync(o.out, `${JSON.stringify(results, null, 1)}\n`);
  process.stdout.write(`${report(results)}\n\n${results.meta.command} (${o.runtimeS} s per row, ${(results.meta as { total_s: number }).total_s} s in all); JSON: ${o.out}\n`);
  return results;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2), process.env).catch((e: unknown) => {
    // Option errors come named after the CLI's parser ("vblk bench: --runtime must be …").
    const message = (e instanceof Error ? e.message : String(e)).replace(/^(vblk )?bench: /, '').replace('vblk bench --help', 'npm run bench -- --help');
    process.stderr.write(`bench: ${message}\n`);
    process.exitCode = 1;
  });
}
