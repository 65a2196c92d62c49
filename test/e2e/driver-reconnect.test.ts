// Our driver rides over a restart of the device it drives: qemu-storage-daemon or `vblk
// serve` killed with SIGKILL in the middle of a write-then-verify workload and started
// again on the same socket and image. The driver reconnects, sets up fresh rings and
// sends again every request that had not completed; the workload sees no error and the
// disk holds exactly what was written; `vblk bench --socket` and `vblk write` run on
// with no error. Kills land after a count of completed requests, never after a time. A
// device that never comes back fails the requests, after the bounded wait, with
// DEVICE_GONE — from the library and from `vblk write` (one line, non-zero exit).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { requirePeer } from '../../scripts/guest/guest.js';
import type { BlkDriver, BlkLogger } from '../../src/blk/driver.js';
import { RequestError } from '../../src/blk/driver-errors.js';
import { connect } from '../../src/node/connect.js';
import { controlStats } from '../../src/node/control.js';
import { pattern } from '../support/pattern.js';
import { waitUntil, within } from '../support/wait.js';
import { CLI, scratchDir, startServe } from './serve-helpers.js';
import { startQsd } from './qsd-helpers.js';

const MiB = 1024 * 1024;
const DISK = 16 * MiB;
const CHUNK = 64 * 1024;
const CHUNKS = DISK / CHUNK;
const SECTOR = 512;
/** Requests kept in flight: many of them are on the rings when the device dies. */
const IODEPTH = 16;
/** Far beyond a restart on a loaded machine; the test never waits for it to run out. */
const RECONNECT_MS = 60_000;
const HANG_MS = 120_000;

/** A device the test can kill and start again on the same socket and image. */
interface Restartable {
  kill(): Promise<void>;
  start(): Promise<void>;
  stop(): Promise<void>;
}

type Kind = 'qemu-storage-daemon' | 'vblk serve';

/**
 * Requests of a write workload the device has completed, at least: what `vblk serve`
 * counts; for the daemon (whose exports count nothing in QMP) the 4 KiB blocks written
 * into the sparse image, each by a completed write.
 */
async function served(kind: Kind, socket: string, image: string): Promise<number> {
  if (kind === 'qemu-storage-daemon') return Math.floor((statSync(image).blocks * SECTOR) / 4096);
  const stats = await controlStats(`${socket}.ctl`);
  let n = 0;
  for (const s of stats.sockets) for (const q of s.queues) for (const v of q.requests) n += v;
  return n;
}

/** Waits until the device has completed `n` requests (a hang guard bounds it; so does `hasEnded`). */
async function waitForServed(kind: Kind, socket: string, image: string, n: number, hasEnded: () => boolean): Promise<void> {
  const deadline = Date.now() + HANG_MS;
  for (let count = await served(kind, socket, image); count < n; count = await served(kind, socket, image)) {
    if (hasEnded()) throw new Error(`the workload ended after ${count} requests, before the kill point (${n})`);
    if (Date.now() > deadline) throw new Error(`timed out waiting for the device to complete ${n} requests (${count} so far)`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function device(kind: Kind, image: string, socket: string): Restartable {
  let stop: () => Promise<void> = async () => {};
  let kill: () => Promise<void> = async () => {};
  return {
    async start() {
      if (kind === 'qemu-storage-daemon') {
        // The daemon replaces a dead one's socket files, but startQsd waits for them to appear.
        rmSync(socket, { force: true });
        rmSync(`${socket}.qmp`, { force: true });
        const q = await startQsd(image, socket, `${socket}.qmp`, { numQueues: 2 });
        stop = () => q.stop();
        kill = async () => {
          q.proc.kill('SIGKILL');
          await q.stop();
        };
      } else {
        const s = await startServe(image, socket, ['--queues', '2', '--control', `${socket}.ctl`]);
        stop = async () => void (await s.stop());
        kill = async () => {
          s.proc.kill('SIGKILL');
          await s.exited;
        };
      }
    },
    kill: () => kill(),
    stop: () => stop(),
  };
}

function recordingLogger(lines: string[]): BlkLogger {
  return { notice: (_d, m) => lines.push(`notice: ${m}`), warn: (_d, m) => lines.push(`warn: ${m}`) };
}

/**
 * Runs `op(i)` for i in [0, count) with IODEPTH in flight; after `killAfter` of them have
 * completed, `onKill` runs (once) while the rest go on. Rejects with the first error.
 */
async function pipeline(count: number, killAfter: number, onKill: () => Promise<void>, op: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  let completed = 0;
  let killing: Promise<void> | null = null;
  const lane = async (): Promise<void> => {
    while (next < count) {
      const i = next++;
      await op(i);
      if (++completed === killAfter) killing = onKill();
    }
  };
  await Promise.all(Array.from({ length: IODEPTH }, lane));
  assert.ok(killing !== null, 'the kill point was reached');
  await killing;
}

const needsQsd = requirePeer('qemu-storage-daemon');

for (const kind of ['qemu-storage-daemon', 'vblk serve'] as const) {
  const skip = kind === 'qemu-storage-daemon' ? needsQsd : false;
  describe(`driver reconnect: ${kind} killed and restarted`, { skip, timeout: 300_000 }, () => {
    let scratch: ReturnType<typeof scratchDir>;
    before(() => {
      scratch = scratchDir('vblk-reconnect-');
    });
    after(() => scratch.cleanup());

    it('a write-then-verify workload completes with no error and the disk holds every byte written', async () => {
      const image = join(scratch.dir, 'restart.img');
      const socket = join(scratch.dir, 'restart.sock');
      writeFileSync(image, '');
      truncateSync(image, DISK);
      const dev = device(kind, image, socket);
      await dev.start();
      const log: string[] = [];
      const disk = await connect(socket, {
        queues: 2, memorySize: 32 * MiB, reconnectTimeoutMs: RECONNECT_MS, logger: recordingLogger(log),
      });
      const driver: BlkDriver = disk.driver;
      const restart = async (): Promise<void> => {
        await dev.kill();
        await dev.start();
      };
      try {
        const data = pattern(DISK, 7);
        // Writes, with a flush now and then: the kill lands with both on the rings.
        await within(pipeline(CHUNKS, CHUNKS / 4, restart, async (i) => {
          await driver.write((i * CHUNK) / SECTOR, [data.subarray(i * CHUNK, (i + 1) * CHUNK)]);
          if (i % 16 === 15) await driver.flush();
        }), { what: 'the writes to complete across the restart', timeoutMs: HANG_MS });
        await driver.flush();
        // The read-back is killed half-way too: reads are resubmitted like writes.
        const back = new Uint8Array(DISK);
        await within(pipeline(CHUNKS, CHUNKS / 2, restart, (i) =>
          driver.read((i * CHUNK) / SECTOR, [back.subarray(i * CHUNK, (i + 1) * CHUNK)])),
        { what: 'the reads to complete across the restart', timeoutMs: HANG_MS });
        assert.ok(Buffer.from(back).equals(Buffer.from(data)), 'the driver reads back every byte written');
        await disk.close();
        await dev.stop();
        assert.ok(Buffer.from(readFileSync(image)).equals(Buffer.from(data)), 'the image holds every byte written');
        assert.equal(log.filter((l) => l.startsWith('notice: device back')).length, 2, log.join('\n'));
      } finally {
        await disk.close().catch(() => {});
        await dev.stop();
      }
    });

    it('vblk bench --socket keeps going across the restart: exit 0, no request failed', async () => {
      const image = join(scratch.dir, 'bench.img');
      const socket = join(scratch.dir, 'bench.sock');
      writeFileSync(image, '');
      truncateSync(image, DISK);
      const dev = device(kind, image, socket);
      await dev.start();
      try {
        const bench = spawn(process.execPath, [CLI, 'bench', '--socket', socket, '--rw', 'randwrite', '--iodepth', '16', '--queues', '2',
          '--runtime', '5', '--no-baseline', '--json', '--reconnect-timeout', '60'], { stdio: ['ignore', 'pipe', 'pipe'] });
        let out = '';
        let err = '';
        bench.stdout.on('data', (d: Buffer) => (out += d.toString()));
        bench.stderr.on('data', (d: Buffer) => (err += d.toString()));
        const exited = new Promise<number | null>((res) => bench.on('close', (code) => res(code)));
        // The kill point: a count of requests the device completed, polled (each poll is a QMP or control round trip).
        await waitForServed(kind, socket, image, 256, () => bench.exitCode !== null);
        await dev.kill();
        await dev.start();
        const code = await within(exited, { what: 'vblk bench to exit', timeoutMs: HANG_MS });
        assert.equal(code, 0, err);
        const result = JSON.parse(out) as { errors: number; ios: number };
        assert.equal(result.errors, 0);
        assert.ok(result.ios >= 256);
      } finally {
        await dev.stop();
      }
    });

    it('with the device gone for good, requests fail with DEVICE_GONE after the bounded wait', async () => {
      const image = join(scratch.dir, 'gone.img');
      const socket = join(scratch.dir, 'gone.sock');
      writeFileSync(image, '');
      truncateSync(image, DISK);
      const dev = device(kind, image, socket);
      await dev.start();
      const disk = await connect(socket, { queues: 2, memorySize: 32 * MiB, reconnectTimeoutMs: 500 });
      try {
        const buf = new Uint8Array(CHUNK);
        let completed = 0;
        let failure: unknown = null;
        const lanes = Array.from({ length: IODEPTH }, async (_, lane) => {
          for (let i = lane; failure === null; i += IODEPTH) {
            try {
              await disk.driver.read(((i * CHUNK) % DISK) / SECTOR, [buf]);
              completed++;
            } catch (e) {
              failure ??= e;
            }
          }
        });
        await waitUntil(() => completed >= 64, { what: '64 reads to complete' });
        await dev.kill();
        await within(Promise.all(lanes), { what: 'the reads to fail', timeoutMs: HANG_MS });
        assert.ok(failure instanceof RequestError && failure.code === 'DEVICE_GONE', String(failure));
        assert.match((failure as Error).message, /^vd[a-z]+: the device was lost and not back within 0\.5 s \(.*\)$/);
        // New requests fail at once with the same error.
        await assert.rejects(disk.driver.read(0, [buf]), (e) => e instanceof RequestError && e.code === 'DEVICE_GONE');
      } finally {
        await disk.close().catch(() => {});
        await dev.stop();
      }
    });
  });
}

describe('vblk write --socket across a vblk serve restart', { timeout: 300_000 }, () => {
  let scratch: ReturnType<typeof scratchDir>;
  before(() => {
    scratch = scratchDir('vblk-reconnect-cli-');
  });
  after(() => scratch.cleanup());

  /**
   * Starts `vblk write` fed from a pipe, writes `first` into it and waits until the image
   * holds it (the command is connected and writing); returns the child and its outcome.
   */
  async function writeInProgress(image: string, socket: string, first: Uint8Array, reconnect: string) {
    const p = spawn(process.execPath, [CLI, 'write', '--socket', socket, '--offset', '0', '--reconnect-timeout', reconnect],
      { stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((res) => p.on('close', (code) => res(code)));
    p.stdin.write(first);
    await waitUntil(() => Buffer.from(readFileSync(image).subarray(0, first.length)).equals(Buffer.from(first)),
      { what: 'the first block to reach the image', timeoutMs: 60_000 });
    return { stdin: p.stdin, outcome: async () => ({ code: await exited, stderr }) };
  }

  it('a device restarted meanwhile takes the rest: exit 0, every byte in the image', async () => {
    const image = join(scratch.dir, 'w.img');
    const socket = join(scratch.dir, 'w.sock');
    writeFileSync(image, '');
    truncateSync(image, DISK);
    const dev = device('vblk serve', image, socket);
    await dev.start();
    try {
      const data = pattern(2 * CHUNK, 3);
      const w = await writeInProgress(image, socket, data.subarray(0, CHUNK), '60');
      await dev.kill();
      w.stdin.end(data.subarray(CHUNK));
      await dev.start();
      const r = await within(w.outcome(), { what: 'vblk write to exit', timeoutMs: HANG_MS });
      assert.equal(r.code, 0, r.stderr);
      assert.ok(Buffer.from(readFileSync(image).subarray(0, data.length)).equals(Buffer.from(data)));
    } finally {
      await dev.stop();
    }
  });

  it('a device that never comes back: non-zero exit, one line naming DEVICE_GONE\'s cause', async () => {
    const image = join(scratch.dir, 'g.img');
    const socket = join(scratch.dir, 'g.sock');
    writeFileSync(image, '');
    truncateSync(image, DISK);
    const dev = device('vblk serve', image, socket);
    await dev.start();
    const data = pattern(2 * CHUNK, 4);
    const w = await writeInProgress(image, socket, data.subarray(0, CHUNK), '0.5');
    await dev.kill();
    w.stdin.end(data.subarray(CHUNK));
    const r = await within(w.outcome(), { what: 'vblk write to exit', timeoutMs: HANG_MS });
    assert.notEqual(r.code, 0);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /^vblk write: vd[a-z]+: the device was lost and not back within 0\.5 s \(/);
  });
});
