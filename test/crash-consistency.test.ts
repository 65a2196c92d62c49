// Crash consistency of `vblk serve` (file backend): the blk driver, over a vhost-user
// connection from this process, writes recognisable sector records and flushes while
// the serve process is killed with SIGKILL at random moments — mid-stream, right after a
// flush was submitted, right after one completed. After each kill the image file itself
// is inspected:
// - every write acknowledged before a completed flush was issued is there, or was
//   overwritten by a write issued after it (VIRTIO 1.2, 5.2.6.2);
// - every acknowledged write is there, or the write still in flight after it;
// - every sector holds an intact record of itself (nothing torn, nothing stray); sectors
//   never written keep their initial record; sectors outside the region are untouched.
// Serve is then restarted on the same image and a fresh driver must read what the file
// holds.
//
// What this proves, honestly: SIGKILL ends the process, not the machine, and the page
// cache survives it. So this shows that vblk never acknowledges a write — nor a flush
// covering it — before the data has reached the kernel, keeps no write cache of its own,
// writes nothing outside the requested ranges, never tears a sector, and serves an image
// correctly after a crash. It cannot show that a flush reaches the disk platter (that
// fdatasync is called is the device durability tests' job, and the device fuzzer's).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlkDriver } from '../src/blk/driver.js';
import { connectVhostUser, type ConnectOptions } from '../src/node/vhost-user-client.js';
import { VIRTIO_BLK_SECTOR_SIZE as SECTOR } from '../src/spec/virtio-blk.js';
import { scratchDir, startServe, type Served } from './e2e/serve-helpers.js';
import { CrashWriter, Ledger, sectorRecord, type WriterHooks } from './support/fuzz-crash.js';
import { Rng } from './support/fuzz-prng.js';

const IMAGE_SECTORS = 8192; // 4 MiB
/** The writer's region: the middle 1 MiB; the sectors around it must never change. */
const REGION_FIRST = 2048;
const REGION_SECTORS = 2048;
const ROUNDS = 60;
/**
 * Where a round's kill lands, each in turn for four rounds (one of them writethrough), so
 * that every run covers every kind whatever the seed: at a random moment of the stream
 * (timer), or at a count of the writer's events, reached however fast or slow the
 * machine is — the writer writes until the kill.
 */
const KILL_POINTS = ['timer', 'flush-issued', 'flush-done', 'writes-acked'] as const;
/** A hang guard: a writer that has not reached its kill point after this long fails the round. */
const ROUND_HANG_MS = 60_000;
/**
 * A backstop only: requests to a killed serve fail at once ("device lost"). Short enough
 * that a request nobody answers cannot stall a round, long enough that a loaded machine
 * does not fail the verification reads.
 */
const REQUEST_TIMEOUT_MS = 5000;
const CONNECT: ConnectOptions = { memorySize: 16 << 20, replyTimeoutMs: 5000 };
const DRIVER = { queues: 2, queueSize: 64, maxRequestBytes: 64 << 10, timeoutMs: REQUEST_TIMEOUT_MS };
const READ_CHUNK = 64 << 10;

async function connect(socket: string): Promise<{ driver: BlkDriver; close(): Promise<void> }> {
  const transport = await connectVhostUser(socket, CONNECT);
  const driver = await BlkDriver.probe(transport, DRIVER);
  return {
    driver,
    close: async () => {
      // The device may be dead: removal then fails, and the transport still closes.
      await driver.remove().catch(() => {});
      await transport.close();
    },
  };
}

/** Reads the whole disk through the driver and compares it with the image file. */
async function assertDriverReadsFile(driver: BlkDriver, file: Uint8Array): Promise<void> {
  const buf = new Uint8Array(READ_CHUNK);
  for (let at = 0; at < file.length; at += READ_CHUNK) {
    await driver.read(at / SECTOR, [buf]);
    if (Buffer.compare(buf, file.subarray(at, at + READ_CHUNK)) !== 0) {
      assert.fail(`after a restart the driver reads other bytes than the image holds in [${at}, ${at + READ_CHUNK})`);
    }
  }
}

test(`vblk serve killed with SIGKILL at ${ROUNDS} random points loses no acknowledged or flushed write and changes nothing else`, { timeout: 300_000 }, async (t) => {
  const scratch = scratchDir('vblk-crash-');
  const seed = (Math.random() * 0x1_0000_0000) >>> 0;
  const rng = new Rng(seed);
  t.diagnostic(`seed ${seed}`);
  const image = join(scratch.dir, 'disk.img');
  const initial = new Uint8Array(IMAGE_SECTORS * SECTOR);
  for (let s = 0; s < IMAGE_SECTORS; s++) sectorRecord(s, 0, initial, s * SECTOR);
  writeFileSync(image, initial);
  const ledger = new Ledger(REGION_FIRST, REGION_SECTORS);
  const started = performance.now();
  let generation = 1;
  let flushedChecked = 0;
  /** Flushes that the flush-done kills waited for: completed on any machine. */
  let flushesPlanned = 0;
  const writerFailures: string[] = [];
  const killedAt: Record<string, number> = {};
  let file: Uint8Array = initial;
  let serve: Served | null = null;
  let conn: Awaited<ReturnType<typeof connect>> | null = null;
  try {
    for (let round = 0; round <= ROUNDS; round++) {
      const socket = join(scratch.dir, `serve-${round}.sock`);
      const writethrough = round % 4 === 3;
      serve = await startServe(image, socket, ['--queues', '2', '--cache', writethrough ? 'writethrough' : 'writeback']);
      conn = await connect(socket);
      // After a crash, a restarted device serves exactly what the image holds.
      await assertDriverReadsFile(conn.driver, file);
      if (round === ROUNDS) {
        await conn.close();
        conn = null;
        assert.equal(await serve.stop(), 0, serve.log());
        serve = null;
        break;
      }

      // Kill at a random moment, or right after a flush was submitted or completed, or
      // after a number of acknowledged writes.
      const victim = serve;
      let killed = false;
      const kill = (): void => {
        killed = true;
        if (victim.proc.exitCode === null && victim.proc.signalCode === null) victim.proc.kill('SIGKILL');
      };
      const hooks: WriterHooks = {};
      const how = KILL_POINTS[Math.floor(round / 4) % KILL_POINTS.length];
      const nth = rng.range(1, 4);
      const acks = rng.range(1, 2000);
      if (how === 'flush-issued') hooks.onFlushIssued = (n) => n === nth && kill();
      if (how === 'flush-done') {
        hooks.onFlushDone = (n) => n === nth && kill();
        flushesPlanned += nth;
      }
      if (how === 'writes-acked') hooks.onWriteAcked = (n) => n === acks && kill();
      let stalled = false;
      const timer = how === 'timer'
        ? setTimeout(kill, rng.range(5, 400))
        : setTimeout(() => {
          stalled = true;
          kill();
        }, ROUND_HANG_MS);
      ledger.writethrough = writethrough;
      const writer = new CrashWriter(conn.driver, ledger, rng, generation, hooks);
      // The writer ends by itself only when a request failed while serve still ran (a
      // request timeout): it issues nothing more then, so kill at once.
      const writing = writer.run().then(() => {
        if (!killed) writerFailures.push(`round ${round}: ${writer.failure?.message}`);
        kill();
      });
      await victim.exited;
      clearTimeout(timer);
      assert.ok(!stalled, `round ${round}: the writer did not reach its kill point (${how}) in ${ROUND_HANG_MS / 1000} s; log:\n${victim.log()}`);
      killedAt[how] = (killedAt[how] ?? 0) + 1;
      writer.stop();
      await writing;
      generation = writer.generation;
      await conn.close();
      conn = null;
      serve = null;

      file = new Uint8Array(readFileSync(image));
      assert.equal(file.length, initial.length, 'the image changed size');
      const regionStart = REGION_FIRST * SECTOR;
      const regionEnd = (REGION_FIRST + REGION_SECTORS) * SECTOR;
      assert.equal(Buffer.compare(file.subarray(0, regionStart), initial.subarray(0, regionStart)), 0, 'bytes before the region changed');
      assert.equal(Buffer.compare(file.subarray(regionEnd), initial.subarray(regionEnd)), 0, 'bytes after the region changed');
      const result = ledger.check(file);
      flushedChecked += result.flushedChecked;
      assert.deepEqual(result.problems.slice(0, 10), [], `round ${round} (killed on ${how}): ${result.problems.length} bad sectors\n${victim.log()}`);
    }
  } finally {
    await conn?.close();
    if (serve) await serve.stop();
    scratch.cleanup();
  }
  t.diagnostic(`${ROUNDS} kills (${Object.entries(killedAt).map(([k, v]) => `${k} ${v}`).join(', ')}) in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  t.diagnostic(`${ledger.issued} writes issued, ${ledger.acked} acknowledged, ${ledger.flushesDone} flushes completed; ` +
    `${flushedChecked} sectors checked against a write flushed before the kill`);
  const failures = writerFailures.length > 0 ? `; writers that failed before their kill: ${writerFailures.join('; ')}` : '';
  if (failures) t.diagnostic(failures.slice(2));
  // How much was written depends on the machine; that flushes completed and flushed writes
  // were checked does not: every flush-done round waited for its flushes.
  assert.ok(ledger.flushesDone >= flushesPlanned && flushesPlanned > 0, `${ledger.flushesDone} flushes completed, ${flushesPlanned} planned${failures}`);
  assert.ok(flushedChecked > 0, 'no sector was checked against a write flushed before the kill');
});
