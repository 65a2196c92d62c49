/**
 * `vblk stats --control PATH [--json] [--watch SECONDS]`: the live figures of a running
 * `vblk serve` — IOPS, bandwidth, latency percentiles and requests in flight, in all and
 * per queue — from two samples of its statistics an interval apart: a `top` for one disk.
 */
import { STAT_STATUSES, STAT_TYPES, LATENCY_BUCKETS, type QueueStatsSnapshot } from '../blk/stats.js';
import { controlStats, type ServeStats } from '../node/control.js';
import { CliUsageError } from './args.js';
import { defineCommand } from './command.js';

/** Rates and latencies of one queue (or all) between two samples. */
export interface IntervalFigures {
  readonly readIops: number;
  readonly writeIops: number;
  /** Every other request type, per second. */
  readonly otherIops: number;
  readonly errors: number;
  readonly readBytesPerSecond: number;
  readonly writeBytesPerSecond: number;
  /** Latency percentiles in seconds (a bucket's upper bound), null with no request. */
  readonly p50: number | null;
  readonly p99: number | null;
  readonly inFlight: number;
}

const READ = STAT_TYPES.indexOf('read');
const WRITE = STAT_TYPES.indexOf('write');
const OK = STAT_STATUSES.indexOf('ok');

function sum(a: readonly number[]): number {
  return a.reduce((x, y) => x + y, 0);
}

/** The smallest bucket bound below which `fraction` of the requests completed (+Inf past the last). */
function percentile(buckets: readonly number[], fraction: number): number | null {
  const total = sum(buckets);
  if (total === 0) return null;
  let seen = 0;
  for (let i = 0; i < buckets.length; i++) {
    seen += buckets[i];
    if (seen >= fraction * total) return i < LATENCY_BUCKETS.length ? LATENCY_BUCKETS[i] : Infinity;
  }
  return Infinity;
}

/** Figures between snapshots `a` and `b` of the same queues, `seconds` apart. */
export function intervalFigures(a: readonly QueueStatsSnapshot[], b: readonly QueueStatsSnapshot[], seconds: number): IntervalFigures {
  const n = STAT_STATUSES.length;
  const requests = new Array<number>(STAT_TYPES.length * n).fill(0);
  const buckets = new Array<number>(LATENCY_BUCKETS.length + 1).fill(0);
  let readBytes = 0;
  let writeBytes = 0;
  let inFlight = 0;
  b.forEach((q, i) => {
    const p = a[i];
    q.requests.forEach((v, k) => (requests[k] += v - (p?.requests[k] ?? 0)));
    q.latencyBuckets.forEach((v, k) => (buckets[k] += v - (p?.latencyBuckets[k] ?? 0)));
    readBytes += q.bytesRead - (p?.bytesRead ?? 0);
    writeBytes += q.bytesWritten - (p?.bytesWritten ?? 0);
    inFlight += q.inFlight;
  });
  const ok = requests.filter((_, k) => k % n === OK);
  const rate = (v: number): number => (seconds > 0 ? v / seconds : 0);
  return {
    readIops: rate(ok[READ]),
    writeIops: rate(ok[WRITE]),
    otherIops: rate(sum(ok) - ok[READ] - ok[WRITE]),
    errors: sum(requests) - sum(ok),
    readBytesPerSecond: rate(readBytes),
    writeBytesPerSecond: rate(writeBytes),
    p50: percentile(buckets, 0.5),
    p99: percentile(buckets, 0.99),
    inFlight,
  };
}

function human(bytesPerSecond: number): string {
  const units = ['B/s', 'KiB/s', 'MiB/s', 'GiB/s'];
  let v = bytesPerSecond;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(u === 0 ? 0 : 1)} ${units[u]}`;
}

function latency(s: number | null): string {
  if (s === null) return '-';
  if (s === Infinity) return `>${LATENCY_BUCKETS[LATENCY_BUCKETS.length - 1]} s`;
  return s < 0.001 ? `≤${Math.round(s * 1e6)} µs` : `≤${s * 1000} ms`;
}

function row(label: string, f: IntervalFigures): string {
  return [
    label.padEnd(8), f.readIops.toFixed(0).padStart(9), f.writeIops.toFixed(0).padStart(9), f.otherIops.toFixed(0).padStart(7),
    human(f.readBytesPerSecond).padStart(12), human(f.writeBytesPerSecond).padStart(12),
    latency(f.p50).padStart(10), latency(f.p99).padStart(10), String(f.inFlight).padStart(6), String(f.errors).padStart(6),
  ].join(' ');
}

/** The text report of one interval. */
export function formatInterval(a: ServeStats, b: ServeStats): string {
  const seconds = (b.time - a.time) / 1000;
  const lines: string[] = [];
  for (const s of b.sockets) {
    const before = a.sockets.find((x) => x.socket === s.socket)?.queues ?? [];
    lines.push(`${s.socket}: ${s.diskSizeBytes} bytes, ${s.connected ? 'frontend connected' : 'no frontend'}, ` +
      `${s.connections} connections, ${s.resubmitted} resubmitted, over ${seconds.toFixed(1)} s`);
    lines.push(`${'queue'.padEnd(8)} ${'read/s'.padStart(9)} ${'write/s'.padStart(9)} ${'other/s'.padStart(7)} ` +
      `${'read'.padStart(12)} ${'write'.padStart(12)} ${'p50'.padStart(10)} ${'p99'.padStart(10)} ${'infl'.padStart(6)} ${'errors'.padStart(6)}`);
    lines.push(row('all', intervalFigures(before, s.queues, seconds)));
    s.queues.forEach((q, i) => {
      const f = intervalFigures(before[i] ? [before[i]] : [], [q], seconds);
      // Idle queues say nothing: a guest with 2 vCPUs uses 2 of the 16 queues offered.
      if (f.readIops + f.writeIops + f.otherIops + f.inFlight + f.errors > 0) lines.push(row(String(i), f));
    });
  }
  return `${lines.join('\n')}\n`;
}

export const command = defineCommand({
  name: 'stats',
  summary: 'live figures of a running `vblk serve`: IOPS, bandwidth, latency, in flight, per queue',
  usage: '--control PATH [--json] [--watch SECONDS]',
  details: [
    'Samples the statistics of the serve process twice, an interval apart (1 s, or --watch),',
    'and prints the rates between them; --watch repeats until interrupted. Latencies are the',
    'upper bounds of the histogram buckets that vblk_request_duration_seconds exports.',
  ],
  options: {
    control: { kind: 'string', valueName: 'PATH', description: "the serve process's --control socket (required)" },
    json: { kind: 'boolean', description: 'one JSON object per line and sample, for scripts' },
    watch: { kind: 'integer', valueName: 'SECONDS', min: 1, max: 3600, description: 'repeat every SECONDS until interrupted' },
  },
  async run({ options, positionals }, io) {
    if (options.control === undefined) throw new CliUsageError('vblk stats: --control PATH is required');
    if (positionals.length !== 0) throw new CliUsageError(`vblk stats: unexpected argument '${positionals[0]}'`);
    const path = options.control;
    const interval = (options.watch ?? 1) * 1000;
    let stop = false;
    const onInt = (): void => {
      stop = true;
    };
    process.once('SIGINT', onInt);
    try {
      let previous = await controlStats(path);
      do {
        await new Promise((r) => setTimeout(r, interval));
        const now = await controlStats(path);
        if (options.json) {
          const seconds = (now.time - previous.time) / 1000;
          io.stdout(`${JSON.stringify({
            seconds,
            sockets: now.sockets.map((s) => {
              const before = previous.sockets.find((x) => x.socket === s.socket)?.queues ?? [];
              return {
                socket: s.socket, disk_size_bytes: s.diskSizeBytes, connected: s.connected, connections: s.connections, resubmitted: s.resubmitted,
                all: intervalFigures(before, s.queues, seconds),
                queues: s.queues.map((q, i) => intervalFigures(before[i] ? [before[i]] : [], [q], seconds)),
              };
            }),
          })}\n`);
        } else {
          io.stdout(formatInterval(previous, now));
        }
        previous = now;
      } while (options.watch !== undefined && !stop);
    } finally {
      process.off('SIGINT', onInt);
    }
  },
});
