/**
 * A/B of the loopback data path: CPU per request of two builds, measured in interleaved
 * rounds so that the machine's drift hits both alike (on a shared VM the same build
 * moves 10–20% between runs). Each round runs A and B back to back, each in a fresh
 * process (two builds in one process bias each other: an A/A test there read 5%); the
 * verdict is the median of the rounds' B/A ratios, which a slow phase of the machine
 * spanning a whole round does not move.
 *
 *   node dist/bench/ab.js DIST_A DIST_B [--rounds N] [--backend memory|null]
 *
 * DIST_A and DIST_B are compiled trees (`dist/` of two checkouts; bench/ab.sh builds a
 * git ref into one). `memory`: the benchmark's memory backend (copies included); `null`:
 * a backend that moves no data, so the stack's own cost stands alone.
 */
import { execFileSync } from 'node:child_process';
import { resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { BlkDriver } from '../src/blk/driver.js';

const IODEPTH = 32;
const BS = 4096;
const DISK = 64 << 20;
const WARMUP_REQUESTS = 500_000;
/**
 * About two seconds with the memory backend: measurements of 300 000 requests (a third
 * of a second) read a 4% difference (fences in the loopback's rings) as none here.
 */
const MEASURED_REQUESTS = 2_000_000;
const SECTOR = 512;

interface Build {
  open(nullBackend: boolean): Promise<{ driver: BlkDriver; close(): Promise<void> }>;
}

async function load(dist: string): Promise<Build> {
  const at = (p: string): string => pathToFileURL(resolve(dist, p)).href;
  const { BlkDevice } = await import(at('src/blk/device.js'));
  const { BlkDriver: Driver } = await import(at('src/blk/driver.js'));
  const { LoopbackTransport } = await import(at('src/transport/loopback.js'));
  const { MemoryBackend } = await import(at('src/backends/memory-backend.js'));
  return {
    async open(nullBackend) {
      const backend = nullBackend
        ? {
            size: DISK, readOnly: false, canFlush: true, canDiscard: false, canWriteZeroes: false,
            read() {}, write() {}, flush() {}, discard() {}, writeZeroes() {}, close() {},
          }
        : new MemoryBackend({ size: DISK });
      if (!nullBackend) {
        const fill = new Uint8Array(1 << 20).fill(0xa5);
        for (let at = 0; at < DISK; at += fill.length) backend.write(at, [fill]);
      }
      const transport = new LoopbackTransport(new BlkDevice({ backend, numQueues: 1, queueSize: 256 }), { memorySize: DISK });
      const driver: BlkDriver = await Driver.probe(transport, { queues: 1, timeoutMs: 30_000 });
      return { driver, close: async () => { await driver.remove(); await transport.close(); } };
    },
  };
}

/** `count` random 4 KiB reads at iodepth 32 (callbacks where the build has them); resolves when done. */
function run(driver: BlkDriver, buffers: Uint8Array[][], count: number): Promise<void> {
  const blocks = DISK / BS;
  const callbacks = typeof driver.submitRead === 'function';
  return new Promise((done, fail) => {
    let left = count;
    let lanes = IODEPTH;
    for (const lane of buffers) {
      const next = (): void => {
        if (left-- <= 0) {
          if (--lanes === 0) done();
          return;
        }
        const sector = Math.floor(Math.random() * blocks) * (BS / SECTOR);
        if (callbacks) driver.submitRead(sector, lane, completed);
        else driver.read(sector, lane).then(next, fail);
      };
      const completed = (e: Error | null): void => (e ? fail(e) : next());
      next();
    }
  });
}

async function cpuPerRequest(build: Build, nullBackend: boolean): Promise<number> {
  const { driver, close } = await build.open(nullBackend);
  const buffers = Array.from({ length: IODEPTH }, () => [driver.allocBuffer(BS)]);
  await run(driver, buffers, WARMUP_REQUESTS);
  const start = process.cpuUsage();
  await run(driver, buffers, MEASURED_REQUESTS);
  const used = process.cpuUsage(start);
  await close();
  return (used.user + used.system) / MEASURED_REQUESTS;
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1];

/** One measurement in a fresh process: CPU µs per request of the build at `dist`. */
function measureInChild(dist: string, nullBackend: boolean): number {
  const out = execFileSync(process.execPath, [fileURLToPath(import.meta.url), '--measure', dist, nullBackend ? 'null' : 'memory'],
    { encoding: 'utf8' });
  return Number(out.trim());
}

async function main(argv: string[]): Promise<void> {
  if (argv[0] === '--measure') {
    const us = await cpuPerRequest(await load(argv[1]), argv[2] === 'null');
    process.stdout.write(`${us}\n`);
    return;
  }
  const [a, b, ...rest] = argv;
  let rounds = 15;
  let nullBackend = false;
  for (let i = 0; i < rest.length; i += 2) {
    if (rest[i] === '--rounds') rounds = Number(rest[i + 1]);
    else if (rest[i] === '--backend' && (rest[i + 1] === 'memory' || rest[i + 1] === 'null')) nullBackend = rest[i + 1] === 'null';
    else throw new Error(`ab: unknown option ${rest[i]} (--rounds N, --backend memory|null)`);
  }
  if (a === undefined || b === undefined || !Number.isInteger(rounds) || rounds < 1) {
    throw new Error('usage: node dist/bench/ab.js DIST_A DIST_B [--rounds N] [--backend memory|null]');
  }
  const ra: number[] = [];
  const rb: number[] = [];
  const ratios: number[] = [];
  for (let r = 0; r < rounds; r++) {
    // Alternate which goes first, so neither always runs on a warmer machine.
    const first = r % 2 === 0;
    const x = measureInChild(first ? a : b, nullBackend);
    const y = measureInChild(first ? b : a, nullBackend);
    const [ta, tb] = first ? [x, y] : [y, x];
    ra.push(ta);
    rb.push(tb);
    ratios.push(tb / ta);
  }
  const sorted = [...ratios].sort((p, q) => p - q);
  const quartile = (k: number): string => sorted[Math.floor((k * (sorted.length - 1)) / 4)].toFixed(3);
  process.stdout.write(`loopback 4K randread qd32, ${nullBackend ? 'null' : 'memory'} backend, CPU us per request ` +
    `(${rounds} rounds): A ${median(ra).toFixed(3)}  B ${median(rb).toFixed(3)}  ` +
    `B/A median ${median(ratios).toFixed(3)} (quartiles ${quartile(1)}–${quartile(3)})\n`);
}

main(process.argv.slice(2)).catch((e: unknown) => {
  process.stderr.write(`${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
});
