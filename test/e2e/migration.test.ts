// Live migration of a guest whose disk `vblk serve` serves: a Linux guest running fio
// --verify=crc32c on two queues moves from one QEMU to another and back (QMP `migrate`
// to a QEMU started with `-incoming`), with no I/O error and every verify passing —
// served by one `vblk serve` on two sockets (of a raw image, and of a qcow2 one), by two
// `vblk serve` over one NBD export (two hosts' setup, migrating over TCP), and by
// qemu-storage-daemon for the downtime to set beside ours.
//
// The dirty log is put to the proof by a probe that only a correct log passes: once the
// migration (slowed down, and unable to converge until the host lets it) has sent all
// memory once, the guest reads three disk regions into its page cache, dropping the cache
// before each. Those page-cache pages are written by the backend alone (the guest CPU
// never touches them, so QEMU's own dirty tracking cannot see them), and each region's
// contents appear in guest memory for the first time then: after the switchover the guest
// checksums the last region *from the page cache* on the destination. A backend that did
// not mark the pages leaves the destination with the copies sent before the reads: the
// checksum is wrong — which the last case shows with a `vblk serve` whose data marks are
// patched out (test/support/serve-without-data-log.ts).
//
// Every guest has 256 MiB less 8 KiB of RAM, which keeps QEMU 7.2 from losing the guest
// CPU's own writes under TCG (migration-helpers.ts, MIGRATION_GUEST_KIB).
//
// The guest's workloads run until the host tells them to stop, never "until this much
// is done", and the migration waits on QEMU's own counters, not on the clock.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_PEERS, ensureGuest, requirePeer, startGuest, type Guest, type GuestImage } from '../../scripts/guest/guest.js';
import {
  IMAGE_SIZE, REGION_MIB, REGION_START_MIB, REGIONS, migrate, migrationGuest, nbdHostsServer, note, qsdServer, vblkServer,
  type DiskServer,
} from './migration-helpers.js';
import { qemuImg, qemuImgCheck } from './qcow2-helpers.js';
import { scratchDir } from './serve-helpers.js';
import { within } from '../support/wait.js';

const MiB = 1024 * 1024;

/** A 128 MiB image whose probe regions hold distinct 4 KiB blocks; their SHA-256, by region. */
function makeImage(path: string): string[] {
  const image = Buffer.alloc(IMAGE_SIZE);
  let x = 0x9e3779b9;
  for (let at = REGION_START_MIB * MiB; at < IMAGE_SIZE; at += 4) {
    // xorshift32: cheap, and no two blocks alike.
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    image.writeUInt32LE(x, at);
  }
  writeFileSync(path, image);
  return Array.from({ length: REGIONS }, (_, r) => {
    const from = (REGION_START_MIB + r * REGION_MIB) * MiB;
    return createHash('sha256').update(image.subarray(from, from + REGION_MIB * MiB)).digest('hex');
  });
}

/** `vblk_dirty_log_active` of each socket, from the server's metrics. */
async function dirtyLogGauges(server: DiskServer): Promise<number[]> {
  const res = await fetch(server.metricsUrl!, { signal: AbortSignal.timeout(10_000) });
  assert.equal(res.status, 200, `metrics scrape of ${server.metricsUrl}`);
  const text = await res.text();
  return server.sockets.map((s) => Number(new RegExp(`^vblk_dirty_log_active\\{socket="${s}"\\} (\\d+)$`, 'm').exec(text)?.[1] ?? NaN));
}

interface Outcome {
  /** query-migrate's downtime, ms: there, and back (only there when the run stopped at the check). */
  downtimes: number[];
  /** The dirty-log gauges of the two sockets (when the server has metrics): before, during and after the first migration. */
  gauges?: { before: number[]; during: number[]; after: number[] };
  /** The destination's checksum of the region read last, and how much of the disk was in its page cache then. */
  check: { region: number; sum: string; cachedKib: number };
  output: string;
  exitCode: number | null;
}

/** The console of the guests of a run, with a crash's first lines brought forward. */
function crashReport(g: Guest): string {
  const out = g.output();
  const crash = out.search(/BUG:|Oops|general protection|Kernel panic|WARNING:/);
  return crash >= 0 ? `\n--- from the first crash line ---\n${out.slice(crash).split('\n').slice(0, 40).join('\n')}` : '';
}

/**
 * Boots the guest on QEMU A (socket 0), migrates it to B (socket 1) with the probe
 * running, checks, migrates it back to a fresh A, and lets it finish — or, with
 * `checkOnly`, ends at the check. `uriOf` names where a destination listens.
 */
async function scenario(image: GuestImage, server: DiskServer, uriOf: (to: 'a' | 'b') => Promise<string>, checkOnly = false): Promise<Outcome> {
  const base = migrationGuest(image);
  const on = (s: string) => [{ path: s, numQueues: 2 }];
  const guests: Guest[] = [];
  const output = () => guests.map((g) => g.output()).join('\n=== next QEMU ===\n');
  try {
    const a = await startGuest({ ...base, vhostUserSockets: on(server.sockets[0]) });
    guests.push(a);
    await a.waitFor('READY', 180_000);
    await a.waitFor(/^FIO-ROUND 1/, 180_000);

    const toB = await uriOf('b');
    const b = await startGuest({ ...base, vhostUserSockets: on(server.sockets[1]), extraArgs: ['-incoming', toB] });
    guests.push(b);
    const metered = server.metricsUrl !== undefined;
    const gauges = metered ? { before: await dirtyLogGauges(server), during: [] as number[], after: [] as number[] } : undefined;
    const first = await migrate(a, b, toB, async () => {
      a.send('read');
      await a.waitFor('READ-DONE', 300_000);
      // Still short of the switchover (migrate() holds it back until this returns).
      if (gauges) gauges.during = await dirtyLogGauges(server);
    });
    // Right at the switchover, before the source quits: a log left on would still show.
    if (gauges) gauges.after = await dirtyLogGauges(server);
    await a.qmp('quit');
    b.send('check');
    const line = await b.waitFor(/^CHECK region=\d sum=[0-9a-f]+ cached-kib=\d+/, 120_000).catch((e: unknown) => {
      // The waitFor error shows the console's last lines; a guest that crashed on the
      // destination says what broke in its first ones.
      throw new Error(`${(e as Error).message}${crashReport(b)}`);
    });
    const m = /region=(\d) sum=([0-9a-f]+) cached-kib=(\d+)/.exec(line)!;
    const check = { region: Number(m[1]), sum: m[2], cachedKib: Number(m[3]) };
    note(`there: ${first.downtime} ms downtime; ${line}`);
    if (checkOnly) return { downtimes: [first.downtime ?? NaN], check, gauges, output: output(), exitCode: null };

    // And back, to a new QEMU on the first socket.
    const toA = await uriOf('a');
    const a2 = await startGuest({ ...base, vhostUserSockets: on(server.sockets[0]), extraArgs: ['-incoming', toA] });
    guests.push(a2);
    await b.waitFor(/^FIO-ROUND \d+/, 300_000);
    const second = await migrate(b, a2, toA);
    note(`back: ${second.downtime} ms downtime`);
    await b.qmp('quit');
    await a2.waitFor(/^FIO-ROUND \d+/, 300_000);
    a2.send('stop');
    const r = await within(a2.done, { what: 'the guest to end its fio round and power off after stop', timeoutMs: 300_000 });
    return { downtimes: [first.downtime ?? NaN, second.downtime ?? NaN], check, gauges, output: output(), exitCode: r.exitCode };
  } finally {
    for (const g of guests) await g.kill();
  }
}

describe('live migration of a guest served over vhost-user', { skip: requirePeer(...GUEST_PEERS, 'qemu-storage-daemon', 'qemu-nbd', 'qemu-img') }, () => {
  let scratch: { dir: string; cleanup(): void };
  let guestImage: GuestImage;
  const downtimes = new Map<string, number[]>();
  before(async () => {
    scratch = scratchDir('vblk-migration-e2e-');
    // A copy of our own: every QEMU of a run must boot the same files, and a build started
    // elsewhere meanwhile (another test run on this checkout) replaces the cached initramfs.
    const built = await ensureGuest();
    guestImage = { kernel: join(scratch.dir, 'vmlinuz'), initrd: join(scratch.dir, 'initrd.cpio.zst') };
    copyFileSync(built.kernel, guestImage.kernel);
    copyFileSync(built.initrd, guestImage.initrd);
  });
  after(() => {
    if (downtimes.size > 0) {
      const line = [...downtimes].map(([name, d]) => `${name} ${d.join(', ')}`).join('; ');
      console.log(`migration downtime (ms), there and back: ${line} (compared over many runs by npm run bench -- --only migration)`);
    }
    scratch.cleanup();
  });

  const unixUri = (dir: string) => async (to: 'a' | 'b') => `unix:${join(dir, `mig-${to}.sock`)}`;
  // Port 0: the destination QEMU picks a free one, and migrate() asks it which.
  const tcpUri = async () => 'tcp:127.0.0.1:0';

  const run = async (name: string, serverOf: (image: string, dir: string) => Promise<DiskServer>, tcp = false, checkOnly = false, qcow2 = false) => {
    const dir = join(scratch.dir, name.replaceAll(' ', '-'));
    mkdirSync(dir);
    const raw = join(dir, 'disk.img');
    const expected = makeImage(raw);
    const image = qcow2 ? `${raw}.qcow2` : raw;
    if (qcow2) qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, image);
    const server = await serverOf(image, dir);
    try {
      const o = await scenario(guestImage, server, tcp ? tcpUri : unixUri(dir), checkOnly);
      return { o, expected, log: server.log(), image };
    } finally {
      await server.stop();
    }
  };

  const assertClean = (o: Outcome, log: string): void => {
    const tail = o.output.split('\n').slice(-60).join('\n');
    assert.equal(o.exitCode, 0, `guest failed:\n${tail}\n${log}`);
    assert.match(o.output, /FIO-DONE/);
    assert.doesNotMatch(o.output, /IO-ERRORS-LOGGED|FIO-FAILED/);
  };

  /** The check read the region from the page cache the backend filled, not from the disk again. */
  const assertProbeCached = (o: Outcome): void => {
    assert.ok(o.check.cachedKib >= REGION_MIB * 1024, `only ${o.check.cachedKib} KiB of the disk in the page cache before the check: the region read during the migration was dropped, and the check proves nothing`);
  };

  const there_and_back = async (name: string, serverOf: (image: string, dir: string) => Promise<DiskServer>, tcp = false, qcow2 = false) => {
    const { o, expected, log, image } = await run(name, serverOf, tcp, false, qcow2);
    assertClean(o, log);
    assertProbeCached(o);
    assert.equal(o.check.sum, expected[o.check.region], `region ${o.check.region}, read during the migration, is wrong on the destination`);
    downtimes.set(name, o.downtimes);
    return { ...o, log, image };
  };

  it('vblk serve on two sockets: there and back with fio verifying on two queues; the pages it filled during the migration arrive; its metrics show the migration', { timeout: 1_200_000 }, async (t) => {
    const o = await there_and_back('vblk serve', (image, dir) => vblkServer(image, dir));
    // vblk_dirty_log_active: on for the source's socket while QEMU copies memory, off before and after.
    assert.deepEqual(o.gauges, { before: [0, 0], during: [1, 0], after: [0, 0] });
    // And the log says so, for the source's socket each way (a.sock there, b.sock back).
    for (const socket of ['a.sock', 'b.sock']) {
      assert.match(o.log, new RegExp(`${socket}: dirty log on \\(\\d+ bytes\\): the frontend is live-migrating the guest`), o.log);
      assert.match(o.log, new RegExp(`${socket}: dirty log off`), o.log);
    }
    t.diagnostic(`downtime (ms): ${o.downtimes.join(', ')}`);
  });

  it('vblk serve on two sockets of a qcow2 image: there and back; qemu-img check finds the image clean after', { timeout: 1_200_000 }, async (t) => {
    const o = await there_and_back('vblk serve qcow2', (image, dir) => vblkServer(image, dir), false, true);
    const check = qemuImgCheck(o.image);
    assert.deepEqual([check.corruptions, check.leaks, check.checkErrors], [0, 0, 0], check.text);
    t.diagnostic(`downtime (ms): ${o.downtimes.join(', ')}`);
  });

  it('two hosts: a vblk serve each over one NBD export, migrating over TCP, there and back', { timeout: 1_200_000 }, async (t) => {
    const o = await there_and_back('vblk serve over NBD', nbdHostsServer, true);
    t.diagnostic(`downtime (ms): ${o.downtimes.join(', ')}`);
  });

  it('qemu-storage-daemon, the same run: the reference downtime', { timeout: 1_200_000 }, async (t) => {
    const o = await there_and_back('qemu-storage-daemon', qsdServer);
    t.diagnostic(`downtime (ms): ${o.downtimes.join(', ')}`);
  });

  it('the probe catches a backend that does not mark its data writes: the destination reads stale pages', { timeout: 1_200_000 }, async () => {
    const { o, expected } = await run('broken', (image, dir) => vblkServer(image, dir, true), false, true);
    assertProbeCached(o);
    assert.notEqual(o.check.sum, expected[o.check.region], 'with data pages unmarked the region still arrived intact: the probe proves nothing');
  });
});
