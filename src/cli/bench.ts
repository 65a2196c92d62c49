/**
 * `vblk bench (--socket PATH | --loopback) [--rw …] [--bs 4k] [--iodepth N] [--queues N]
 * [--runtime SECONDS] [--size SIZE] [--json]`: block I/O through our driver, with
 * `iodepth` requests always outstanding, against a bare copy loop in the same run.
 *
 * The loop (bench-core.ts) takes a {@link BlkDriver} and does not know its transport:
 * `--loopback` builds driver → LoopbackTransport → BlkDevice → memory backend here;
 * `--socket` plugs a vhost-user frontend transport into the same loop.
 */
import { MemoryBackend } from '../backends/memory-backend.js';
import { BlkDevice } from '../blk/device.js';
import { BlkDriver, type BlkDriverOptions } from '../blk/driver.js';
import { LoopbackTransport } from '../transport/loopback.js';
import { RECONNECT_TIMEOUT_OPTION, openSocketDriver, reconnectTimeoutMs } from './socket-driver.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../spec/virtio-blk.js';
import { CliUsageError, EXIT_FAILURE, formatSizeValue } from './args.js';
import { bareCopyRate } from './bench-baseline.js';
import { BENCH_PATTERNS, runBench, type BenchParams, type BenchResult } from './bench-core.js';
import { defineCommand, type CliIo } from './command.js';

const DEFAULT_BS = 4096;
const DEFAULT_IODEPTH = 32;
const DEFAULT_RUNTIME_S = 5;
/** Loopback disk size, and the default region: big enough to leave the CPU caches. */
const DEFAULT_LOOPBACK_SIZE = 64 << 20;
/** The CLI's request timeout: a stuck device fails the run instead of hanging it. */
const DEFAULT_TIMEOUT_S = 30;
/** Loopback guest memory: at least this, and twice the bytes iodepth requests hold. */
const MIN_LOOPBACK_MEMORY = 64 << 20;
const MAX_LOOPBACK_MEMORY = 1 << 30;
/** The bare copy loop runs a quarter of the runtime, within these bounds. */
const BASELINE_SHARE = 4;
const MIN_BASELINE_MS = 200;
const MAX_BASELINE_MS = 2000;
/**
 * The bare copy loop's region is the disk region up to this size: far past every CPU
 * cache already, and a loop over a 1 TiB disk could not allocate its region at all.
 */
const MAX_BASELINE_REGION = 256 << 20;
const MS_PER_S = 1000;
const LOOPBACK_QUEUE_SIZE = 256;
const MIB = 2 ** 20;

/** A driver ready to benchmark and how to let it go. */
export interface BenchTarget {
  readonly driver: BlkDriver;
  /** "loopback" or the socket path, for the summary. */
  readonly label: string;
  close(): Promise<void>;
}

export const command = defineCommand({
  name: 'bench',
  summary: 'measure block I/O through the vblk driver (IOPS, bandwidth, latency, ratio to a bare copy loop)',
  usage: '(--socket PATH | --loopback) [options]',
  details: [
    'Keeps --iodepth requests outstanding for --runtime seconds and reports IOPS, bandwidth and',
    'latency percentiles, and the rate of a bare JavaScript loop that only copies the same blocks',
    '(baseline_iops; ratio = iops / baseline_iops). Exit status 1 when any request failed.',
  ],
  options: {
    socket: { kind: 'string', valueName: 'PATH', description: 'drive the vhost-user-blk device at this socket' },
    loopback: { kind: 'boolean', description: 'drive an in-process device with a memory backend' },
    rw: { kind: 'choice', choices: BENCH_PATTERNS, default: 'randread', description: 'access pattern' },
    bs: { kind: 'size', min: VIRTIO_BLK_SECTOR_SIZE, default: DEFAULT_BS, description: 'bytes per request, a multiple of the logical block' },
    iodepth: { kind: 'integer', default: DEFAULT_IODEPTH, description: 'requests kept outstanding' },
    queues: { kind: 'integer', default: 1, description: 'virtqueues to spread requests over' },
    runtime: { kind: 'number', valueName: 'SECONDS', default: DEFAULT_RUNTIME_S, description: 'how long to run' },
    size: {
      kind: 'size', min: VIRTIO_BLK_SECTOR_SIZE,
      description: `bytes of disk to use (loopback: the disk size, default ${formatSizeValue(DEFAULT_LOOPBACK_SIZE)}; socket: default the whole disk)`,
    },
    timeout: { kind: 'number', valueName: 'SECONDS', allowZero: true, default: DEFAULT_TIMEOUT_S, description: 'fail a request after this long (0: never)' },
    'reconnect-timeout': RECONNECT_TIMEOUT_OPTION,
    bounce: { kind: 'boolean', description: 'use ordinary buffers, copied through bounce buffers (default: DMA buffers, zero copy)' },
    'no-baseline': { kind: 'boolean', description: 'skip the bare copy loop (baseline_iops and ratio are then 0)' },
    json: { kind: 'boolean', description: 'print one JSON object on one line' },
  },
  async run({ options: o, positionals }, io) {
    if (positionals.length > 0) throw new CliUsageError(`vblk bench: unexpected argument '${positionals[0]}'`);
    if ((o.socket !== undefined) === o.loopback) throw new CliUsageError('vblk bench: give exactly one of --socket PATH or --loopback');
    if (o.bs % VIRTIO_BLK_SECTOR_SIZE !== 0) throw new CliUsageError(`vblk bench: --bs must be a multiple of ${VIRTIO_BLK_SECTOR_SIZE}, got ${o.bs}`);
    if (o.size !== undefined && o.size < o.bs) throw new CliUsageError(`vblk bench: --size ${o.size} is smaller than one --bs ${o.bs} block`);
    const timeoutMs = o.timeout * MS_PER_S;
    const target = o.socket !== undefined
      ? await openSocket(o.socket, o.queues, o.iodepth, o.bs, timeoutMs, reconnectTimeoutMs(o['reconnect-timeout']))
      : await openLoopback(o.size ?? DEFAULT_LOOPBACK_SIZE, o.queues, o.iodepth, o.bs, timeoutMs);
    try {
      const driver = target.driver;
      if (o.bs % driver.logicalBlockSize !== 0) {
        throw new CliUsageError(`vblk bench: --bs ${o.bs} is not a multiple of the disk's ${driver.logicalBlockSize}-byte logical block`);
      }
      const disk = Math.min(driver.sizeBytes, o.size ?? driver.sizeBytes);
      const regionBytes = disk - (disk % o.bs);
      if (regionBytes === 0) throw new CliUsageError(`vblk bench: the disk (${driver.sizeBytes} bytes) holds no --bs ${o.bs} block`);
      const params: BenchParams = { rw: o.rw, bs: o.bs, iodepth: o.iodepth, runtimeMs: o.runtime * MS_PER_S, regionBytes, bounce: o.bounce };
      const baselineMs = Math.min(MAX_BASELINE_MS, Math.max(MIN_BASELINE_MS, params.runtimeMs / BASELINE_SHARE));
      const baselineRegion = Math.min(regionBytes, MAX_BASELINE_REGION - (MAX_BASELINE_REGION % o.bs));
      const baseline = o['no-baseline'] ? 0 : bareCopyRate({ rw: o.rw, bs: o.bs, regionBytes: baselineRegion, durationMs: baselineMs });
      const result = await withCountdown(io, o.runtime, () => runBench(driver, params));
      report(io, o.json, target.label, params, driver.numQueues, result, baseline);
      if (result.errors > 0) {
        io.stderr(`vblk bench: ${result.errors} of ${result.ios} requests failed; the first: ${result.firstError}\n`);
        return EXIT_FAILURE;
      }
    } finally {
      await target.close();
    }
  },
});

/**
 * driver → loopback → BlkDevice → memory backend, the disk written through once so that
 * reads copy real data (an unwritten sparse disk would read as a cheap zero fill).
 */
export async function openLoopback(size: number, queues: number, iodepth: number, bs: number, timeoutMs: number,
  driverOptions: BlkDriverOptions = {}): Promise<BenchTarget> {
  const backend = new MemoryBackend({ size: size - (size % VIRTIO_BLK_SECTOR_SIZE) });
  const device = new BlkDevice({ backend, numQueues: queues, queueSize: LOOPBACK_QUEUE_SIZE });
  const memorySize = Math.min(MAX_LOOPBACK_MEMORY, nextPowerOfTwo(Math.max(MIN_LOOPBACK_MEMORY, 2 * iodepth * bs)));
  const transport = new LoopbackTransport(device, { memorySize });
  let driver: BlkDriver;
  try {
    driver = await BlkDriver.probe(transport, { queues, timeoutMs, ...driverOptions });
  } catch (e) {
    await transport.close();
    throw e;
  }
  const close = async (): Promise<void> => {
    await driver.remove();
    await transport.close();
  };
  try {
    const chunk = new Uint8Array(driver.maxRequestBytes).fill(0xa5);
    for (let at = 0; at < driver.sizeBytes; at += chunk.length) {
      const n = Math.min(chunk.length, driver.sizeBytes - at);
      await driver.write(at / VIRTIO_BLK_SECTOR_SIZE, [n === chunk.length ? chunk : chunk.subarray(0, n)]);
    }
  } catch (e) {
    await close();
    throw e;
  }
  return { driver, label: 'loopback', close };
}

/**
 * driver → vhost-user frontend → the device at `path` (qemu-storage-daemon, `vblk
 * serve`, …): the same loop over real sockets and shared memory.
 */
async function openSocket(path: string, queues: number, iodepth: number, bs: number, timeoutMs: number,
  reconnectMs: number): Promise<BenchTarget> {
  const memorySize = Math.min(MAX_LOOPBACK_MEMORY, nextPowerOfTwo(Math.max(MIN_LOOPBACK_MEMORY, 4 * queues * iodepth * bs)));
  const { driver, close } = await openSocketDriver(path, { queues, timeoutMs, memorySize, reconnectTimeoutMs: reconnectMs });
  return { driver, label: path, close };
}

function nextPowerOfTwo(n: number): number {
  return 2 ** Math.ceil(Math.log2(n));
}

const US_DECIMALS = 2;
const RATIO_DECIMALS = 3;

function round(n: number, decimals: number): number {
  const f = 10 ** decimals;
  return Math.round(n * f) / f;
}

function report(io: CliIo, json: boolean, label: string, p: BenchParams, queues: number, r: BenchResult, baseline: number): void {
  const ratio = baseline > 0 ? r.iops / baseline : 0;
  if (json) {
    io.stdout(`${JSON.stringify({
      transport: label,
      rw: p.rw,
      bs: p.bs,
      iodepth: p.iodepth,
      queues,
      region_bytes: p.regionBytes,
      runtime_s: round(r.elapsedMs / MS_PER_S, RATIO_DECIMALS),
      ios: r.ios,
      iops: Math.round(r.iops),
      bw_bytes: Math.round(r.bwBytes),
      lat_us: {
        p50: round(r.latUs.p50, US_DECIMALS),
        p99: round(r.latUs.p99, US_DECIMALS),
        mean: round(r.latUs.mean, US_DECIMALS),
        max: round(r.latUs.max, US_DECIMALS),
      },
      errors: r.errors,
      zero_copy: !p.bounce,
      cpu_us_per_io: r.ios > 0 ? round(r.cpuUs / r.ios, US_DECIMALS) : 0,
      baseline_iops: Math.round(baseline),
      ratio: round(ratio, RATIO_DECIMALS),
    })}\n`);
    return;
  }
  const mib = r.bwBytes / MIB;
  io.stdout([
    `vblk bench: ${label}, ${p.rw}, bs ${formatSizeValue(p.bs)}, iodepth ${p.iodepth}, queues ${queues}, ` +
      `region ${formatSizeValue(p.regionBytes)}, ${(r.elapsedMs / MS_PER_S).toFixed(2)} s`,
    `  iops       ${Math.round(r.iops)}`,
    `  bandwidth  ${mib.toFixed(1)} MiB/s`,
    `  latency    p50 ${r.latUs.p50.toFixed(1)} us, p99 ${r.latUs.p99.toFixed(1)} us, mean ${r.latUs.mean.toFixed(1)} us, max ${r.latUs.max.toFixed(1)} us`,
    `  errors     ${r.errors}`,
    `  cpu        ${r.ios > 0 ? (r.cpuUs / r.ios).toFixed(2) : '0'} us per I/O in this process (${p.bounce ? 'bounce buffers' : 'zero copy'})`,
    baseline > 0 ? `  bare copy  ${Math.round(baseline)} blocks/s (ratio ${ratio.toFixed(RATIO_DECIMALS)})` : '  bare copy  skipped',
    '',
  ].join('\n'));
}

/**
 * Runs `task` while a terminal shows how far into `seconds` it is; off a terminal, or
 * with output going elsewhere, nothing is printed. The line is cleared at the end so the
 * report stands alone.
 */
async function withCountdown<T>(io: CliIo, seconds: number, task: () => Promise<T>): Promise<T> {
  if (!process.stderr.isTTY) return task();
  const started = Date.now();
  const timer = setInterval(() => {
    const elapsed = Math.min(seconds, (Date.now() - started) / MS_PER_S);
    io.stderr(`\rbench: ${elapsed.toFixed(0)}/${seconds} s`);
  }, 500);
  try {
    return await task();
  } finally {
    clearInterval(timer);
    io.stderr('\r\x1b[K');
  }
}
