/**
 * What the benchmark suite drives and measures outside its own process: raw images in
 * the page cache, `vblk serve` and qemu-storage-daemon as vhost-user backends, `vblk
 * bench --socket` and host fio as clients, and each process's CPU time and memory as
 * /proc reports them.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, fdatasyncSync, ftruncateSync, openSync, readFileSync, readSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, startServe } from '../test/e2e/serve-helpers.js';
import { startQsd } from '../test/e2e/qsd-helpers.js';
import { startQemuNbd } from '../test/support/nbd-servers.js';

const US_PER_S = 1e6;
const MS_PER_S = 1000;
const FILL_CHUNK = 1 << 20;
/** Clock ticks per second of /proc/PID/stat's utime and stime (sysconf(_SC_CLK_TCK)). */
const CLK_TCK = clockTicks();

function clockTicks(): number {
  try {
    const n = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
    return Number.isInteger(n) && n > 0 ? n : 100;
  } catch {
    return 100;
  }
}

/** CPU time (user + system, every thread of the process) of a live process, in microseconds. */
export function processCpuUs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Field 2 (the command) may hold spaces and parentheses: count fields after its last ')'.
  // What follows starts at field 3 (state); utime and stime are fields 14 and 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * US_PER_S) / CLK_TCK;
}

/** Resident memory of a live process and its peak (VmRSS, VmHWM), in bytes. */
export function processMemory(pid: number): { rss: number; hwm: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
  return { rss: kib('VmRSS') * 1024, hwm: kib('VmHWM') * 1024 };
}

/**
 * A raw image of `size` bytes full of random data, written once, synced (so writeback
 * does not run under a measurement) and read once (so it sits in the page cache).
 */
export function makeDataImage(path: string, size: number): void {
  const chunk = randomFillSync(new Uint8Array(FILL_CHUNK));
  const fd = openSync(path, 'w', 0o600);
  try {
    for (let at = 0; at < size; at += chunk.length) writeSync(fd, chunk, 0, Math.min(chunk.length, size - at), at);
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
  warmImage(path, size);
}

/** Reads the first `size` bytes of an image once, so they are in the page cache. */
export function warmImage(path: string, size: number): void {
  const buf = new Uint8Array(FILL_CHUNK);
  const fd = openSync(path, 'r');
  try {
    for (let at = 0; at < size;) {
      const n = readSync(fd, buf, 0, buf.length, at);
      if (n === 0) break;
      at += n;
    }
  } finally {
    closeSync(fd);
  }
}

/** A sparse raw image of `size` bytes: a hole, nothing allocated. */
export function makeSparseImage(path: string, size: number): void {
  const fd = openSync(path, 'w', 0o600);
  try {
    ftruncateSync(fd, size);
  } finally {
    closeSync(fd);
  }
}

/** Makes what was written to an image durable, so writeback does not run under the next row. */
export function syncImage(path: string): void {
  const fd = openSync(path, 'r+');
  try {
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** The vhost-user backends compared. */
export const PEER_KINDS = ['vblk-serve', 'vblk-serve-mmap', 'vblk-serve-metrics', 'qsd', 'qsd-io_uring'] as const;
/**
 * The vhost-user backends on an NBD export: `vblk serve URI` with one connection and
 * with four, and qemu-storage-daemon's `nbd` block driver (one connection; QEMU 7.2's
 * NBD client has no multi-conn).
 */
export const NBD_PEER_KINDS = ['vblk-serve-nbd', 'vblk-serve-nbd-4', 'qsd-nbd'] as const;
export type PeerKind = (typeof PEER_KINDS)[number] | (typeof NBD_PEER_KINDS)[number];

/** A vhost-user backend process serving one image. */
export interface Peer {
  readonly kind: PeerKind;
  readonly pid: number;
  readonly socket: string;
  stop(): Promise<void>;
}

/**
 * Starts `kind` on `image` with `queues` queues, listening in `dir`. qemu-storage-daemon
 * runs in its default configuration (`aio=threads`) or with `aio=io_uring`, its best one
 * here; `vblk serve` in its default one (`--io auto`) or with `--io mmap`, its best one
 * for an image in the page cache, or with `--metrics` and a scraper reading them every
 * second (a busier Prometheus than any real one).
 */
export async function startPeer(kind: (typeof PEER_KINDS)[number], image: string, dir: string, queues: number): Promise<Peer> {
  const socket = join(dir, `${kind}.sock`);
  rmSync(socket, { force: true });
  if (kind === 'vblk-serve' || kind === 'vblk-serve-mmap' || kind === 'vblk-serve-metrics') {
    const extra = kind === 'vblk-serve-mmap' ? ['--io', 'mmap'] : kind === 'vblk-serve-metrics' ? ['--metrics', '127.0.0.1:0'] : [];
    // --force-share: the versus section runs every peer side by side on the one image,
    // which the image lock refuses otherwise (qemu-storage-daemon's exports share it).
    const s = await startServe(image, socket, ['--queues', String(queues), '--force-share', ...extra]);
    await s.waitForLog(/serving /);
    const url = /metrics on (\S+)/.exec(s.log())?.[1];
    const scraper = url === undefined ? null : setInterval(() => void fetch(url).then((r) => r.text()).catch(() => ''), 1000);
    return {
      kind, pid: s.proc.pid as number, socket,
      stop: async () => {
        if (scraper) clearInterval(scraper);
        const code = await s.stop();
        if (code !== 0) throw new Error(`vblk serve exited with ${code}:\n${s.log()}`);
      },
    };
  }
  const qmp = join(dir, `${kind}.qmp`);
  rmSync(qmp, { force: true });
  const q = await startQsd(image, socket, qmp, {
    numQueues: queues, writable: true, fileOptions: kind === 'qsd-io_uring' ? 'aio=io_uring' : undefined,
  });
  return { kind, pid: q.proc.pid as number, socket, stop: () => q.stop() };
}

/**
 * `qemu-nbd` exporting `image` (raw, in the page cache) as `disk` on a unix socket in
 * `dir`, with up to eight clients (the backends' 1 + 4 + 1 connections; above one it advertises
 * multi-conn), writeback cache as qemu's
 * default. Resolves once it accepts connections.
 */
export async function startQemuNbdExport(image: string, dir: string): Promise<{ pid: number; socket: string; uri: string; stop(): Promise<void> }> {
  const socket = join(dir, 'export.nbd');
  const s = await startQemuNbd(image, socket, { shared: 8, discard: false });
  return { pid: s.proc.pid as number, socket, uri: s.uri, stop: () => s.stop() };
}

/** Starts an NBD-sourced backend (see {@link NBD_PEER_KINDS}) on the export at `nbdSocket`. */
export async function startNbdPeer(kind: (typeof NBD_PEER_KINDS)[number], nbdSocket: string, dir: string, queues: number): Promise<Peer> {
  const socket = join(dir, `${kind}.sock`);
  rmSync(socket, { force: true });
  if (kind === 'qsd-nbd') {
    const qmp = join(dir, `${kind}.qmp`);
    rmSync(qmp, { force: true });
    const q = await startQsd('', socket, qmp, { numQueues: queues, writable: true, nbd: { socket: nbdSocket, export: 'disk' } });
    return { kind, pid: q.proc.pid as number, socket, stop: () => q.stop() };
  }
  const uri = `nbd+unix:///disk?socket=${nbdSocket}`;
  const s = await startServe(uri, socket, ['--queues', String(queues), '--nbd-connections', kind === 'vblk-serve-nbd-4' ? '4' : '1']);
  return {
    kind, pid: s.proc.pid as number, socket,
    stop: async () => {
      const code = await s.stop();
      if (code !== 0) throw new Error(`vblk serve exited with ${code}:\n${s.log()}`);
    },
  };
}

/** What one `vblk bench --json` run printed (the fields the suite uses). */
export interface ClientResult {
  readonly ios: number;
  readonly iops: number;
  readonly bw_bytes: number;
  readonly runtime_s: number;
  readonly lat_us: { readonly p50: number; readonly p99: number; readonly mean: number; readonly max: number };
  readonly errors: number;
  readonly queues: number;
  readonly cpu_us_per_io: number;
}

/** One access pattern, as `vblk bench` and fio name it. */
export interface Pattern {
  readonly rw: 'randread' | 'randwrite' | 'read' | 'write';
  readonly bs: number;
  readonly iodepth: number;
}

/** Runs `vblk bench --socket` (our driver) in a child process; rejects when it fails or reports errors. */
export function runClient(socket: string, p: Pattern, queues: number, runtimeS: number): Promise<ClientResult> {
  const args = [
    CLI, 'bench', '--socket', socket, '--rw', p.rw, '--bs', String(p.bs), '--iodepth', String(p.iodepth),
    '--queues', String(queues), '--runtime', String(runtimeS), '--json', '--no-baseline',
  ];
  return runJson<ClientResult>(process.execPath, args).then((r) => {
    if (r.errors > 0) throw new Error(`vblk bench ${args.slice(2).join(' ')}: ${r.errors} requests failed`);
    return r;
  });
}

/** Host fio's figures for one run. */
export interface FioResult {
  readonly ios: number;
  readonly iops: number;
  readonly lat_us: { readonly p50: number; readonly p99: number };
  /** fio's own CPU time (user + system) per I/O, in microseconds. */
  readonly cpu_us_per_io: number;
}

interface FioJson {
  jobs: {
    read: FioDir;
    write: FioDir;
    usr_cpu: number;
    sys_cpu: number;
  }[];
}
interface FioDir {
  total_ios: number;
  iops: number;
  runtime: number;
  clat_ns?: { percentile?: Record<string, number> };
}

/** Runs host fio with io_uring on `image` (buffered, as both backends read it). */
export async function runFio(image: string, p: Pattern, runtimeS: number): Promise<FioResult> {
  const args = [
    '--name=vblk-bench', `--filename=${image}`, `--rw=${p.rw}`, `--bs=${p.bs}`, `--iodepth=${p.iodepth}`,
    // --invalidate=0: fio otherwise drops the file's page cache first, and the image must
    // stay cached (for this row and for every row after it).
    '--ioengine=io_uring', '--invalidate=0', `--runtime=${runtimeS}`, '--time_based', '--output-format=json',
  ];
  const out = await runJson<FioJson>('fio', args);
  const job = out.jobs[0];
  const dir = p.rw === 'randread' || p.rw === 'read' ? job.read : job.write;
  const pct = dir.clat_ns?.percentile ?? {};
  const cpuUs = ((job.usr_cpu + job.sys_cpu) / 100) * dir.runtime * (US_PER_S / MS_PER_S);
  return {
    ios: dir.total_ios,
    iops: dir.iops,
    lat_us: { p50: (pct['50.000000'] ?? 0) / MS_PER_S, p99: (pct['99.000000'] ?? 0) / MS_PER_S },
    cpu_us_per_io: dir.total_ios > 0 ? cpuUs / dir.total_ios : 0,
  };
}

/** Whether a program is on the PATH. */
export function hasProgram(name: string): boolean {
  const path = process.env.PATH ?? '';
  return path.split(':').some((d) => d !== '' && existsSync(join(d, name)));
}

/** Runs a program and parses its stdout as JSON (fio may print notes before it). */
function runJson<T>(program: string, args: readonly string[]): Promise<T> {
  return new Promise((resolve, reject) => {
    const child = spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const start = out.indexOf('{');
      if (code !== 0 || start < 0) {
        reject(new Error(`${program} ${args.join(' ')} exited with ${code}: ${err.trim() || out.trim()}`));
        return;
      }
      try {
        resolve(JSON.parse(out.slice(start)) as T);
      } catch (e) {
        reject(new Error(`${program}: unreadable JSON (${(e as Error).message}): ${out.slice(0, 200)}`));
      }
    });
  });
}
