/**
 * A/B of the loopback data path: CPU per request of two builds, measured in interleaved
 * rounds in one process so that the machine's drift hits both alike (on a shared VM the
 * same build moves 10–20% between runs; an A/B of medians sees a few percent).
 *
 *   node dist/bench/ab.js DIST_A DIST_B [--rounds N] [--backend memory|null]
 *
 * DIST_A and DIST_B are compiled trees (`dist/` of two checkouts; bench/ab.sh builds a
 * git ref into one). `memory`: the benchmark's memory backend (copies included); `null`:
 * a backend that moves no data, so the stack's own cost stands alone.
 */
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { BlkDriver } from '../src/blk/driver.js';

const IODEPTH = 32;
const BS = 4096;
const DISK = 64 << 20;
const WARMUP_REQUESTS = 100_000;
const MEASURED_REQUESTS = 600_000;
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

async function main(argv: string[]): Promise<void> {
  const [a, b, ...rest] = argv;
  let rounds = 7;
  let nullBackend = false;
  for (let i = 0; i < rest.length; i += 2) {
    if (rest[i] === '--rounds') rounds = Number(rest[i + 1]);
    else if (rest[i] === '--backend' && (rest[i + 1] === 'memory' || rest[i + 1] === 'null')) nullBackend = rest[i + 1] === 'null';
    else throw new Error(`ab: unknown option ${rest[i]} (--rounds N, --backend memory|null)`);
  }
  if (a === undefined || b === undefined || !Number.isInteger(rounds) || rounds < 1) {
    throw new Error('usage: node dist/bench/ab.js DIST_A DIST_B [--rounds N] [--backend memory|null]');
  }
  const [buildA, buildB] = [await load(a), await load(b)];
  const ra: number[] = [];
  const rb: number[] = [];
  for (let r = 0; r < rounds; r++) {
    ra.push(await cpuPerRequest(buildA, nullBackend));
    rb.push(await cpuPerRequest(buildB, nullBackend));
  }
  const [ma, mb] = [median(ra), median(rb)];
  process.stdout.write(`loopback 4K randread qd32, ${nullBackend ? 'null' : 'memory'} backend, CPU us per request ` +
    `(median of ${rounds}): A ${ma.toFixed(3)}  B ${mb.toFixed(3)}  B/A ${(mb / ma).toFixed(3)}\n`);
}

main(process.argv.slice(2)).catch((e: unknown) => {
  process.stderr.write(`${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
});
