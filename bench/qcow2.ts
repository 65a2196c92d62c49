/**
 * The qcow2 section of `npm run bench`: `vblk serve IMG --format qcow2` against
 * qemu-storage-daemon's `qcow2` block driver over its `file` driver with `aio=io_uring`
 * (its best configuration here), on the same image, both driven by `vblk bench --socket`
 * (our driver) in rounds of rotating order, as the versus and nbd sections do:
 *
 * - `randread`: 4 KiB random reads, iodepth 32, on a fully allocated image with 64 KiB
 *   clusters (`qemu-img convert` of the random data image), in the page cache;
 * - `randwrite`: 4 KiB random writes, iodepth 32, each run on a fresh empty image of
 *   {@link WRITE_IMAGE_FACTOR} times the data image's size started with a fresh backend,
 *   so that most writes allocate a cluster (and every write in the first part of the row);
 * - `read-compressed`: 128 KiB sequential reads, iodepth 32, of a zlib-compressed image
 *   (`qemu-img convert -c` of compressible data): reported, not a target.
 *
 * Every run lasts the suite's runtime per row. The figures are IOPS and the backend
 * process's CPU time per I/O, and per round their ratios to the daemon's.
 */
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, fdatasyncSync, openSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { startServe } from '../test/e2e/serve-helpers.js';
import { startQsd } from '../test/e2e/qsd-helpers.js';
import { processCpuUs, runClient, warmImage, type Pattern } from './peers.js';
import { median, spread } from './stats.js';

export const QCOW2_KINDS = ['vblk-serve-qcow2', 'qsd-qcow2-io_uring'] as const;
export type Qcow2Kind = (typeof QCOW2_KINDS)[number];
const QCOW2_BASE: Qcow2Kind = 'qsd-qcow2-io_uring';
export const QCOW2_WORKLOADS = ['randread', 'randwrite', 'read-compressed'] as const;
export type Qcow2Workload = (typeof QCOW2_WORKLOADS)[number];
const PATTERNS: Record<Qcow2Workload, Pattern> = {
  randread: { rw: 'randread', bs: 4096, iodepth: 32 },
  randwrite: { rw: 'randwrite', bs: 4096, iodepth: 32 },
  'read-compressed': { rw: 'read', bs: 128 * 1024, iodepth: 32 },
};
/**
 * The empty images of the write rows are this many times the data image (4 GiB by
 * default): room for most writes of a row to allocate a cluster, while the image's L2
 * tables (8 of 64 KiB) fit in both backends' default L2 caches, so the row measures
 * allocation, not a cache too small for the image (a 16 GiB image needs 32 tables: see
 * the qcow2 driver's `l2CacheBytes`).
 */
const WRITE_IMAGE_FACTOR = 4;
/** The compressed image is at most this big: `qemu-img convert -c` compresses at some 100 MB/s. */
const MAX_COMPRESSED_BYTES = 256 << 20;
const CLUSTER = 64 * 1024;
const WARMUP_S = 0.5;

export interface Qcow2Row {
  readonly round: number;
  readonly workload: Qcow2Workload;
  readonly backend: Qcow2Kind;
  readonly iops: number;
  readonly lat_us: { readonly p50: number; readonly p99: number };
  readonly backend_cpu_us_per_io: number;
}

export interface Qcow2Summary {
  readonly workload: Qcow2Workload;
  readonly backend: Qcow2Kind;
  readonly iops: number;
  readonly backend_cpu_us_per_io: number;
  /** Per-round ratios to the daemon's; null for the daemon itself. */
  readonly iops_ratio: { median: number; min: number; max: number } | null;
  readonly cpu_ratio: { median: number; min: number; max: number } | null;
}

interface Running {
  readonly kind: Qcow2Kind;
  readonly pid: number;
  readonly socket: string;
  stop(): Promise<void>;
}

async function startQcow2Peer(kind: Qcow2Kind, image: string, dir: string, readOnly: boolean): Promise<Running> {
  const socket = join(dir, `${kind}.sock`);
  rmSync(socket, { force: true });
  if (kind === 'vblk-serve-qcow2') {
    // The read rows serve one image from both backends at once: vblk read-only and sharing
    // it (a writable qcow2 node of the daemon keeps other writers out, as QEMU's image
    // lock says). The write rows give each backend a fresh image of its own.
    const shared = readOnly ? ['--read-only', '--force-share'] : [];
    const s = await startServe(image, socket, ['--format', 'qcow2', '--queues', '1', ...shared]);
    return {
      kind, pid: s.proc.pid as number, socket,
      stop: async () => {
        const code = await s.stop();
        if (code !== 0) throw new Error(`vblk serve exited with ${code}:\n${s.log()}`);
      },
    };
  }
  const qmp = join(dir, `${kind}.qmp`);
  rmSync(qmp, { force: true });
  const q = await startQsd(image, socket, qmp, { numQueues: 1, writable: true, fileOptions: 'aio=io_uring', format: 'qcow2' });
  return { kind, pid: q.proc.pid as number, socket, stop: () => q.stop() };
}

function qemuImg(...args: string[]): void {
  execFileSync('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/**
 * A raw image whose clusters compress about fourfold: each 64 KiB holds 12 KiB of random
 * bytes and a 4 KiB random phrase repeated (what a real disk's text and code are like,
 * more or less), so zlib has work to do on every cluster and none is all zeroes.
 */
function makeCompressibleRaw(path: string, size: number): void {
  const cluster = new Uint8Array(CLUSTER);
  const fd = openSync(path, 'w', 0o600);
  try {
    for (let at = 0; at < size; at += CLUSTER) {
      randomFillSync(cluster, 0, 16 * 1024);
      for (let k = 16 * 1024; k < CLUSTER; k += 4096) cluster.copyWithin(k, 12 * 1024, 16 * 1024);
      writeSync(fd, cluster, 0, Math.min(CLUSTER, size - at), at);
    }
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

async function measure(peer: Running, workload: Qcow2Workload, round: number, runtimeS: number): Promise<Qcow2Row> {
  const cpu0 = processCpuUs(peer.pid);
  const r = await runClient(peer.socket, PATTERNS[workload], 1, runtimeS);
  const cpu1 = processCpuUs(peer.pid);
  return {
    round, workload, backend: peer.kind, iops: Math.round(r.iops),
    lat_us: { p50: Math.round(r.lat_us.p50 * 10) / 10, p99: Math.round(r.lat_us.p99 * 10) / 10 },
    backend_cpu_us_per_io: Math.round((r.ios ? (cpu1 - cpu0) / r.ios : 0) * 100) / 100,
  };
}

/** Both backends on one image side by side, each round driving each in turn (rotating order). */
async function sideBySide(image: string, workload: Qcow2Workload, dir: string, runtimeS: number, rounds: number, log: (l: string) => void): Promise<Qcow2Row[]> {
  const peers: Running[] = [];
  const rows: Qcow2Row[] = [];
  try {
    for (const kind of QCOW2_KINDS) {
      const peer = await startQcow2Peer(kind, image, dir, true);
      peers.push(peer);
      await runClient(peer.socket, PATTERNS[workload], 1, Math.min(WARMUP_S, runtimeS));
    }
    for (let n = 0; n < rounds; n++) {
      for (let k = 0; k < peers.length; k++) {
        const row = await measure(peers[(n + k) % peers.length], workload, n, runtimeS);
        rows.push(row);
        log(`qcow2 ${workload} round ${n + 1}/${rounds} ${row.backend}: ${row.iops} IOPS, backend ${row.backend_cpu_us_per_io} us/IO`);
      }
    }
  } finally {
    for (const peer of peers) await peer.stop();
  }
  return rows;
}

/**
 * Each run: a fresh empty image, a fresh backend warmed by reading it (so no cluster is
 * allocated before the measured writes), then the writes.
 */
async function freshWrites(size: number, dir: string, runtimeS: number, rounds: number, log: (l: string) => void): Promise<Qcow2Row[]> {
  const rows: Qcow2Row[] = [];
  const image = join(dir, 'empty.qcow2');
  for (let n = 0; n < rounds; n++) {
    for (let k = 0; k < QCOW2_KINDS.length; k++) {
      const kind = QCOW2_KINDS[(n + k) % QCOW2_KINDS.length];
      rmSync(image, { force: true });
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, image, String(size));
      const peer = await startQcow2Peer(kind, image, dir, false);
      try {
        await runClient(peer.socket, PATTERNS.randread, 1, Math.min(WARMUP_S, runtimeS));
        const row = await measure(peer, 'randwrite', n, runtimeS);
        rows.push(row);
        log(`qcow2 randwrite (fresh image) round ${n + 1}/${rounds} ${kind}: ${row.iops} IOPS, backend ${row.backend_cpu_us_per_io} us/IO`);
      } finally {
        await peer.stop();
      }
    }
  }
  rmSync(image, { force: true });
  return rows;
}

/** The qcow2 rows of every workload; `dataImage` is the suite's raw image of random data. */
export async function qcow2Section(o: { runtimeS: number; rounds: number; imageSize: number }, dataImage: string, dir: string,
  log: (l: string) => void): Promise<Qcow2Row[]> {
  const allocated = join(dir, 'allocated.qcow2');
  const compressibleRaw = join(dir, 'compressible.raw');
  const compressed = join(dir, 'compressed.qcow2');
  try {
    qemuImg('convert', '-O', 'qcow2', '-o', `cluster_size=${CLUSTER}`, dataImage, allocated);
    warmImage(allocated, o.imageSize * 2);
    const rows = await sideBySide(allocated, 'randread', dir, o.runtimeS, o.rounds, log);
    rmSync(allocated, { force: true });
    rows.push(...await freshWrites(o.imageSize * WRITE_IMAGE_FACTOR, dir, o.runtimeS, o.rounds, log));
    const compressedSize = Math.min(o.imageSize, MAX_COMPRESSED_BYTES);
    makeCompressibleRaw(compressibleRaw, compressedSize);
    qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zlib', compressibleRaw, compressed);
    rmSync(compressibleRaw, { force: true });
    warmImage(compressed, compressedSize);
    rows.push(...await sideBySide(compressed, 'read-compressed', dir, o.runtimeS, o.rounds, log));
    return rows;
  } finally {
    for (const f of [allocated, compressibleRaw, compressed]) rmSync(f, { force: true });
  }
}

/** Medians per workload and backend, and per-round ratios to the daemon's. */
export function summarizeQcow2(rows: readonly Qcow2Row[]): Qcow2Summary[] {
  const out: Qcow2Summary[] = [];
  for (const workload of QCOW2_WORKLOADS) {
    for (const kind of QCOW2_KINDS) {
      const mine = rows.filter((r) => r.workload === workload && r.backend === kind);
      if (mine.length === 0) continue;
      const iops: number[] = [];
      const cpu: number[] = [];
      for (const r of mine) {
        const base = rows.find((b) => b.round === r.round && b.workload === workload && b.backend === QCOW2_BASE);
        if (base === undefined || base.iops === 0 || base.backend_cpu_us_per_io === 0) continue;
        iops.push(r.iops / base.iops);
        cpu.push(r.backend_cpu_us_per_io / base.backend_cpu_us_per_io);
      }
      const isBase = kind === QCOW2_BASE || iops.length === 0;
      out.push({
        workload, backend: kind, iops: Math.round(median(mine.map((r) => r.iops))),
        backend_cpu_us_per_io: Math.round(median(mine.map((r) => r.backend_cpu_us_per_io)) * 100) / 100,
        iops_ratio: isBase ? null : spread(iops), cpu_ratio: isBase ? null : spread(cpu),
      });
    }
  }
  return out;
}

/** The targets: IOPS at least the daemon's and CPU per I/O at most its, on the random read and write rows. */
export function qcow2Targets(summary: readonly Qcow2Summary[]): { name: string; value: number | null; limit: string; isMet(v: number): boolean }[] {
  const out = [];
  for (const workload of ['randread', 'randwrite'] as const) {
    const x = summary.find((s) => s.workload === workload && s.backend === 'vblk-serve-qcow2');
    const what = workload === 'randread' ? '4k randread qd32, allocated 64K-cluster image' : '4k randwrite qd32, fresh empty image';
    out.push({ name: `vblk serve qcow2 / qsd qcow2 aio=io_uring IOPS, ${what} (median of rounds)`, value: x?.iops_ratio?.median ?? null, limit: '>= 1.0', isMet: (v: number) => v >= 1 });
    out.push({ name: `vblk serve qcow2 / qsd qcow2 aio=io_uring CPU per I/O, ${what} (median of rounds)`, value: x?.cpu_ratio?.median ?? null, limit: '<= 1.0', isMet: (v: number) => v <= 1 });
  }
  return out;
}

/** The section's table for the report. */
export function qcow2Report(summary: readonly Qcow2Summary[], rounds: number, imageBytes: number, table: (h: string[], rows: (string | number)[][]) => string): string {
  const text = (x: { median: number; min: number; max: number } | null): string => (x === null ? '1' : `${x.median.toFixed(2)} (${x.min.toFixed(2)}–${x.max.toFixed(2)})`);
  const name: Record<Qcow2Workload, string> = {
    randread: 'randread 4K qd32, allocated',
    randwrite: `randwrite 4K qd32, fresh empty ${WRITE_IMAGE_FACTOR}x image`,
    'read-compressed': `read 128K qd32, zlib-compressed ${Math.min(imageBytes, MAX_COMPRESSED_BYTES) >> 20}M`,
  };
  return `qcow2: vblk serve --format qcow2 vs qemu-storage-daemon qcow2 driver (file aio=io_uring), 1 queue, ${rounds} rounds in rotating order (medians)\n` + table(
    ['workload', 'backend', 'IOPS', 'backend CPU us/IO', 'IOPS / qsd (range)', 'CPU / qsd (range)'],
    summary.map((x) => [name[x.workload], x.backend, x.iops, x.backend_cpu_us_per_io, text(x.iops_ratio), text(x.cpu_ratio)]),
  );
}
