// Crash consistency of `vblk serve` on a qcow2 image: our driver, over a vhost-user
// connection from this process, writes recognisable sector records (test/support/
// fuzz-crash.ts) and flushes, while serve is killed with SIGKILL at points reached by
// counting the writer's operations — the n-th flush submitted, the n-th flush completed,
// the n-th write acknowledged. The image is an overlay of a raw base that holds every
// sector's initial record, with 64 KiB clusters, so the writes (1 to 16 sectors) keep
// allocating clusters, copying the rest of each from the base, and updating L2 tables and
// refcounts when the kill lands.
//
// After each kill QEMU judges the image: `qemu-img check` finds no corruption (leaked
// clusters are allowed, counted and reported), and `qemu-img convert -O raw` shows every
// sector holding an intact record that the durability contract allows (the ledger's
// check: every write acknowledged before a completed flush was issued is there, or a
// write issued after it; with a writethrough cache every acknowledged write). Serve is then restarted on the same image, and our driver must read what
// qemu-img read. The base never changes.
//
// As in test/crash-consistency.test.ts: SIGKILL ends the process, not the machine, so
// this shows that the metadata on disk is consistent at every point the process can
// die, not that a flush reaches the platter.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeer } from '../../scripts/guest/guest.js';
import { VIRTIO_BLK_SECTOR_SIZE as SECTOR } from '../../src/spec/virtio-blk.js';
import { CrashWriter, Ledger, sectorRecord, type WriterHooks } from '../support/fuzz-crash.js';
import { Rng } from '../support/fuzz-prng.js';
import { assertDiskEqualsRaw, openDisk, QEMU_TOOLS, qemuImg, qemuImgCheck, sha256File } from './qcow2-helpers.js';
import { scratchDir, startServe, type Served } from './serve-helpers.js';

const IMAGE_SECTORS = 65536; // 32 MiB
/** The writer's region: 16 MiB, 256 clusters of 64 KiB, from 2 MiB on. */
const REGION_FIRST = 4096;
const REGION_SECTORS = 32768;
const ROUNDS = 36;
/** Each kill kind in turn; every fourth round runs with a writethrough cache. */
const KILL_POINTS = ['flush-issued', 'flush-done', 'writes-acked'] as const;
/** A hang guard: a writer that has not reached its kill point after this long fails the round. */
const ROUND_HANG_MS = 120_000;

test(`vblk serve on a qcow2 overlay, SIGKILLed at ${ROUNDS} counted points, leaves an image qemu-img check finds uncorrupted and loses no write acknowledged before a completed flush`,
  { skip: requirePeer(...QEMU_TOOLS), timeout: 900_000 }, async (t) => {
    const scratch = scratchDir('vblk-qcow2-crash-');
    const seed = (Math.random() * 0x1_0000_0000) >>> 0;
    const rng = new Rng(seed);
    t.diagnostic(`seed ${seed}`);
    const base = join(scratch.dir, 'base.raw');
    const image = join(scratch.dir, 'overlay.qcow2');
    const raw = join(scratch.dir, 'now.raw');
    const initial = new Uint8Array(IMAGE_SECTORS * SECTOR);
    for (let s = 0; s < IMAGE_SECTORS; s++) sectorRecord(s, 0, initial, s * SECTOR);
    writeFileSync(base, initial);
    const baseHash = sha256File(base);
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', 'base.raw', '-F', 'raw', image);

    const ledger = new Ledger(REGION_FIRST, REGION_SECTORS);
    // The qcow2 driver holds L2 and refcount updates until a flush: an unflushed write may
    // be lost with the process, and only the durability contract applies.
    ledger.ackedSurvivesKill = false;
    let generation = 1;
    let flushedChecked = 0;
    let flushesPlanned = 0;
    const leaksAfter: number[] = [];
    const killedAt: Record<string, number> = {};
    let serve: Served | null = null;
    let conn: Awaited<ReturnType<typeof openDisk>> | null = null;
    try {
      for (let round = 0; round <= ROUNDS; round++) {
        const socket = join(scratch.dir, `serve-${round}.sock`);
        const writethrough = round % 4 === 3;
        serve = await startServe(image, socket, ['--format', 'qcow2', '--queues', '2', '--cache', writethrough ? 'writethrough' : 'writeback']);
        conn = await openDisk(socket, { queues: 2, queueSize: 64, maxRequestBytes: 64 << 10, timeoutMs: 30_000 });
        // After a crash, a restarted serve reads what qemu-img reads.
        if (round > 0) await assertDiskEqualsRaw(conn.driver, raw, `round ${round}, after restarting serve`);
        if (round === ROUNDS) {
          await conn.close();
          conn = null;
          assert.equal(await serve.stop(), 0, serve.log());
          serve = null;
          break;
        }

        const victim = serve;
        let killed = false;
        const kill = (): void => {
          killed = true;
          if (victim.proc.exitCode === null && victim.proc.signalCode === null) victim.proc.kill('SIGKILL');
        };
        const hooks: WriterHooks = {};
        const how = KILL_POINTS[round % KILL_POINTS.length];
        const nth = rng.range(1, 3);
        const acks = rng.range(1, 1500);
        if (how === 'flush-issued') hooks.onFlushIssued = (n) => n === nth && kill();
        if (how === 'flush-done') {
          hooks.onFlushDone = (n) => n === nth && kill();
          flushesPlanned += nth;
        }
        if (how === 'writes-acked') hooks.onWriteAcked = (n) => n === acks && kill();
        let stalled = false;
        let failedEarly: string | null = null;
        const guard = setTimeout(() => {
          stalled = true;
          kill();
        }, ROUND_HANG_MS);
        ledger.writethrough = writethrough;
        const writer = new CrashWriter(conn.driver, ledger, rng, generation, hooks);
        // The writer ends by itself only when a request failed while serve still ran.
        const writing = writer.run().then(() => {
          if (!killed) failedEarly = writer.failure?.message ?? 'stopped';
          kill();
        });
        await victim.exited;
        clearTimeout(guard);
        assert.ok(!stalled, `round ${round}: the writer did not reach its kill point (${how}) in ${ROUND_HANG_MS / 1000} s; log:\n${victim.log()}`);
        assert.equal(failedEarly, null, `round ${round}: a request failed before the kill:\n${victim.log()}`);
        killedAt[how] = (killedAt[how] ?? 0) + 1;
        writer.stop();
        await writing;
        generation = writer.generation;
        await conn.close();
        conn = null;
        serve = null;

        const check = qemuImgCheck(image);
        assert.equal(check.corruptions + check.checkErrors, 0, `round ${round} (killed on ${how}): qemu-img check:\n${check.text}\n${victim.log()}`);
        leaksAfter.push(check.leaks);
        qemuImg('convert', '-O', 'raw', image, raw);
        const now = new Uint8Array(readFileSync(raw));
        const regionStart = REGION_FIRST * SECTOR;
        const regionEnd = (REGION_FIRST + REGION_SECTORS) * SECTOR;
        assert.equal(Buffer.compare(now.subarray(0, regionStart), initial.subarray(0, regionStart)), 0, 'bytes before the region changed');
        assert.equal(Buffer.compare(now.subarray(regionEnd), initial.subarray(regionEnd)), 0, 'bytes after the region changed');
        const result = ledger.check(now);
        flushedChecked += result.flushedChecked;
        assert.deepEqual(result.problems.slice(0, 10), [], `round ${round} (killed on ${how}): ${result.problems.length} bad sectors\n${victim.log()}`);
      }
    } finally {
      await conn?.close();
      if (serve) await serve.stop();
    }
    try {
      assert.equal(sha256File(base), baseHash, 'the backing file changed');
      const increments = leaksAfter.map((n, i) => n - (i > 0 ? leaksAfter[i - 1] : 0));
      t.diagnostic(`${ROUNDS} kills (${Object.entries(killedAt).map(([k, v]) => `${k} ${v}`).join(', ')}); ` +
        `${ledger.issued} writes issued, ${ledger.acked} acknowledged, ${ledger.flushesDone} flushes completed, ${flushedChecked} sectors checked against a flushed write`);
      t.diagnostic(`leaked clusters (qemu-img check) after the last kill: ${leaksAfter[leaksAfter.length - 1] ?? 0}; ` +
        `per kill: ${increments.join(' ')}; image ${qemuImg('info', '--output=json', image).match(/"actual-size": (\d+)/)?.[1]} bytes allocated`);
      assert.ok(ledger.flushesDone >= flushesPlanned && flushesPlanned > 0, `${ledger.flushesDone} flushes completed, ${flushesPlanned} planned`);
      assert.ok(flushedChecked > 0, 'no sector was checked against a write flushed before the kill');
    } finally {
      scratch.cleanup();
    }
  });
