// Live migration of a guest whose disk `vblk serve` serves: a Linux guest running fio
// --verify=crc32c on two queues moves from one QEMU to another and back (QMP `migrate`
// to a QEMU started with `-incoming unix:PATH`), with no I/O error and every verify
// passing. The same run against qemu-storage-daemon gives the downtime to compare with.
//
// The dirty log is put to the proof by a probe that only a correct log passes: once the
// migration (slowed down, and unable to converge until the host lets it) has sent all
// memory once, the guest reads three disk regions into its page cache, dropping the cache
// before each. Those page-cache pages are written by the backend alone (the guest CPU
// never touches them, so QEMU's own dirty tracking cannot see them), and each region's
// contents appear in guest memory for the first time then: after the switchover the guest
// checksums the last region *from the page cache* on the destination. A backend that did
// not mark the pages leaves the destination with the copies sent before the reads: the
// checksum is wrong — which the third case shows with a `vblk serve` whose data marks are
// patched out (test/support/serve-without-data-log.ts). (An earlier probe read regions in
// a cycle from the start; pages sent while they held the same region as at the end made
// a broken backend pass now and then.)
//
// Opt-in: runs only with VBLK_MIGRATION_E2E=1 (see OPT_IN below), and `vblk serve` is
// started with --experimental-migration, without which it offers no dirty log.
//
// The guest's workloads run until the host tells them to stop, never "until this much
// is done", and the migration waits on QEMU's own counters, not on the clock.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GUEST_PEERS, ensureGuest, requirePeer, startGuest, type Guest, type GuestImage, type GuestOptions } from '../../scripts/guest/guest.js';
import { waitUntil } from '../support/wait.js';
import { launchServe, scratchDir, startServe } from './serve-helpers.js';

const here = dirname(fileURLToPath(import.meta.url));
const BROKEN_SERVE = resolve(here, '../support/serve-without-data-log.js');

const MiB = 1024 * 1024;
const IMAGE_SIZE = 128 * MiB;
/** The probe's regions: 3 × 16 MiB from 64 MiB, each 4 KiB block different; fio stays below. */
const REGION_START_MIB = 64;
const REGION_MIB = 16;
const REGIONS = 3;
/** While the probe runs: slow enough that the first pass takes a while, and no switchover. */
const SLOW = { 'max-bandwidth': 16 * MiB, 'downtime-limit': 1 };
/** Then: converge (QEMU 7.2's default downtime limit, 300 ms). */
const FAST = { 'max-bandwidth': 1024 * MiB, 'downtime-limit': 300 };

/** Two sockets onto one image, served by vblk or by qemu-storage-daemon. */
interface DiskServer {
  readonly sockets: readonly [string, string];
  log(): string;
  stop(): Promise<void>;
}

async function vblkServer(image: string, dir: string, broken = false): Promise<DiskServer> {
  const sockets = [join(dir, 'a.sock'), join(dir, 'b.sock')] as const;
  // One `vblk serve` on both sockets: the image opened and locked once, a device per socket.
  const args = ['--socket', sockets[1], '--queues', '2', '--experimental-migration'];
  const served = broken
    ? await launchServe(process.execPath, [BROKEN_SERVE, 'serve', image, '--socket', sockets[0], ...args], sockets[0])
    : await startServe(image, sockets[0], args);
  return {
    sockets,
    log: () => served.log(),
    stop: async () => {
      await served.stop();
    },
  };
}

/** qemu-storage-daemon with two vhost-user-blk exports of one node. */
async function qsdServer(image: string, dir: string): Promise<DiskServer> {
  const sockets = [join(dir, 'qa.sock'), join(dir, 'qb.sock')] as const;
  const exportOf = (id: string, s: string) =>
    `type=vhost-user-blk,id=${id},node-name=d,addr.type=unix,addr.path=${s},writable=on,num-queues=2`;
  const proc = spawn('qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=f,filename=${image}`, '--blockdev', 'driver=raw,node-name=d,file=f',
    '--export', exportOf('ea', sockets[0]), '--export', exportOf('eb', sockets[1]),
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stdout.on('data', (d: Buffer) => (log += d.toString()));
  proc.stderr.on('data', (d: Buffer) => (log += d.toString()));
  const exited = new Promise<void>((res) => proc.on('close', () => res()));
  const started = Date.now();
  while (!sockets.every((s) => existsSync(s))) {
    if (proc.exitCode !== null) throw new Error(`qemu-storage-daemon exited with ${proc.exitCode}: ${log}`);
    if (Date.now() - started > 30_000) throw new Error(`qemu-storage-daemon did not create its sockets: ${log}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    sockets, log: () => log,
    stop: async () => {
      if (proc.exitCode === null) proc.kill('SIGTERM');
      await exited;
    },
  };
}

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

/**
 * fio rounds on two queues (one job per vCPU), each verifying all it wrote, until told to
 * stop; the probe's reads when told; then, on whichever QEMU runs the guest by then, the
 * checksum of the region read last, from the page cache. fio's --invalidate=0: by default
 * each round starts with BLKFLSBUF, which empties the whole disk's page cache, and the
 * check would read the region from the disk again instead of the pages under test.
 */
const GUEST_SCRIPT = `set -e
(
  n=0
  while [ ! -e /tmp/stop ]; do
    n=$((n+1))
    echo "FIO-ROUND $n"
    fio --name=m --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite --bs=4k \\
        --size=8M --numjobs=2 --offset_increment=32M --cpus_allowed=0-1 --cpus_allowed_policy=split --invalidate=0 \\
        --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse > /tmp/fio.out \\
      || { echo "FIO-FAILED round $n"; cat /tmp/fio.out; exit 1; }
  done
  echo "FIO-ROUNDS=$n"
) &
fio_loop=$!
dmesg | grep -o 'mem auto-init: .*' || true
echo READY
read -r line
for r in $(seq 0 $((${REGIONS} - 1))); do
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/vda of=/dev/null bs=1M skip=$((${REGION_START_MIB} + r * ${REGION_MIB})) count=${REGION_MIB} 2>/dev/null
  echo $r > /tmp/last-region
done
echo READ-DONE
read -r line
r=$(cat /tmp/last-region)
sum=$(dd if=/dev/vda bs=1M skip=$((${REGION_START_MIB} + r * ${REGION_MIB})) count=${REGION_MIB} 2>/dev/null | sha256sum)
echo "CHECK region=$r sum=\${sum%% *}"
read -r line
touch /tmp/stop
wait $fio_loop
if dmesg | grep -i -E 'I/O error|blk_update_request|virtio_blk.*error'; then echo IO-ERRORS-LOGGED; exit 1; fi
echo FIO-DONE
`;

/** Where a long run is, on stderr as it happens (the test runner shows diagnostics only at the end). */
function note(line: string): void {
  process.stderr.write(`# migration: ${line}\n`);
}

interface MigrationInfo {
  status: string;
  downtime?: number;
  'total-time'?: number;
  'error-desc'?: string;
  ram?: { 'dirty-sync-count'?: number; transferred?: number };
}

async function queryMigrate(g: Guest): Promise<MigrationInfo> {
  return (await g.qmp('query-migrate')) as MigrationInfo;
}

async function pollMigration(g: Guest, until: (i: MigrationInfo) => boolean, what: string, timeoutMs: number): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await queryMigrate(g);
    if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''}`);
    if (until(info)) return info;
    if (Date.now() > deadline) throw new Error(`migration: ${what} not within ${timeoutMs / 1000} s: ${JSON.stringify(info)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Migrates the guest from `src` to `dst` (listening on `uri`). With `during`, the
 * migration is held slow and short of its switchover until `during` is done.
 */
async function migrate(src: Guest, uri: string, during?: () => Promise<void>): Promise<MigrationInfo> {
  // The destination listens once it has set up its devices (vhost-user handshake included).
  await waitUntil(() => existsSync(uri.slice('unix:'.length)), { what: `the destination to listen on ${uri}`, timeoutMs: 120_000 });
  await src.qmp('migrate-set-parameters', during ? SLOW : FAST);
  await src.qmp('migrate', { uri });
  note(`migrating to ${uri}`);
  if (during) {
    // dirty-sync-count 2: the first pass over all memory is done, and every page the
    // probe fills from now on was sent before, with other contents.
    await pollMigration(src, (i) => (i.ram?.['dirty-sync-count'] ?? 0) >= 2, 'the first pass', 300_000);
    note('first pass done');
    await during();
    note('probe read');
    await src.qmp('migrate-set-parameters', FAST);
  }
  return pollMigration(src, (i) => i.status === 'completed', 'completion', 300_000);
}

interface Outcome {
  /** query-migrate's downtime, ms: there, and back (absent when the run stopped at the check). */
  downtimes: number[];
  check: { region: number; sum: string };
  expected: string[];
  output: string;
  exitCode: number | null;
}

/**
 * Boots the guest on QEMU A (socket 0), migrates it to B (socket 1) with the probe
 * running, checks, migrates it back to a fresh A, and lets it finish — or, with
 * `checkOnly`, ends at the check.
 */
async function scenario(image: GuestImage, dir: string, server: DiskServer, expected: string[], checkOnly = false): Promise<Outcome> {
  // One image for every QEMU of the run: source and destination must boot the same kernel
  // and initramfs. init_on_alloc=0: Debian's kernel zeroes every page it allocates, and
  // that CPU write would make QEMU send each page-cache page again whatever the backend
  // logs, hiding a missing mark from the probe.
  const base: Omit<GuestOptions, 'vhostUserSockets'> = { script: GUEST_SCRIPT, smp: 2, timeoutMs: 900_000, image, kernelArgs: ['init_on_alloc=0'] };
  const on = (s: string) => [{ path: s, numQueues: 2 }];
  const guests: Guest[] = [];
  try {
    const a = await startGuest({ ...base, vhostUserSockets: on(server.sockets[0]) });
    guests.push(a);
    await a.waitFor('READY', 180_000);
    await a.waitFor(/^FIO-ROUND 1/, 180_000);

    const toB = `unix:${join(dir, 'mig-b.sock')}`;
    const b = await startGuest({ ...base, vhostUserSockets: on(server.sockets[1]), extraArgs: ['-incoming', toB] });
    guests.push(b);
    const first = await migrate(a, toB, async () => {
      a.send('read');
      await a.waitFor('READ-DONE', 300_000);
    });
    await a.qmp('quit');
    b.send('check');
    const line = await b.waitFor(/^CHECK region=\d sum=[0-9a-f]+/, 120_000).catch((e: unknown) => {
      // The waitFor error shows the console's last lines; a guest that crashed on the
      // destination says what broke in its first ones.
      const out = b.output();
      const crash = out.search(/BUG:|Oops|general protection|Kernel panic|WARNING:/);
      throw new Error(`${(e as Error).message}${crash >= 0 ? `\n--- from the first crash line ---\n${out.slice(crash).split('\n').slice(0, 40).join('\n')}` : ''}`);
    });
    const m = /region=(\d) sum=([0-9a-f]+)/.exec(line)!;
    const check = { region: Number(m[1]), sum: m[2] };
    note(`there: ${first.downtime} ms downtime; ${line}`);
    if (checkOnly) {
      return { downtimes: [first.downtime ?? NaN], check, expected, output: guests.map((g) => g.output()).join('\n=== next QEMU ===\n'), exitCode: null };
    }

    // And back, to a new QEMU on the first socket.
    const toA = `unix:${join(dir, 'mig-a.sock')}`;
    const a2 = await startGuest({ ...base, vhostUserSockets: on(server.sockets[0]), extraArgs: ['-incoming', toA] });
    guests.push(a2);
    await b.waitFor(/^FIO-ROUND \d+/, 300_000);
    const second = await migrate(b, toA);
    note(`back: ${second.downtime} ms downtime`);
    await b.qmp('quit');
    await a2.waitFor(/^FIO-ROUND \d+/, 300_000);
    a2.send('stop');
    const r = await a2.done;
    const output = guests.map((g) => g.output()).join('\n=== next QEMU ===\n');
    return { downtimes: [first.downtime ?? NaN, second.downtime ?? NaN], check, expected, output, exitCode: r.exitCode };
  } finally {
    for (const g of guests) await g.kill();
  }
}

/**
 * The whole suite is an opt-in (VBLK_MIGRATION_E2E=1), also under CI=true: migration is
 * behind `vblk serve --experimental-migration` because of known destination-guest crashes
 * (README, "Live migration"), and these runs take many minutes each. The
 * qemu-storage-daemon case is skipped with them: it tests nothing of vblk, only gives the
 * downtime and the crash-free reference to set beside the vblk case.
 */
const OPT_IN = process.env.VBLK_MIGRATION_E2E === '1'
  ? false
  : 'set VBLK_MIGRATION_E2E=1 to run: migration is experimental (vblk serve --experimental-migration); the destination guest crashed in 2 of 6 runs, under investigation';

describe('live migration of a guest served over vhost-user', { skip: OPT_IN || requirePeer(...GUEST_PEERS, 'qemu-storage-daemon') }, () => {
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
    const v = downtimes.get('vblk');
    const q = downtimes.get('qsd');
    if (v && q) {
      console.log(`migration downtime (ms), there and back: vblk serve ${v.join(', ')}; qemu-storage-daemon ${q.join(', ')}`);
    }
    scratch.cleanup();
  });

  const run = async (name: string, serverOf: (image: string, dir: string) => Promise<DiskServer>, checkOnly = false): Promise<{ o: Outcome; log: string }> => {
    const dir = join(scratch.dir, name);
    mkdirSync(dir);
    const image = join(dir, 'disk.img');
    const expected = makeImage(image);
    const server = await serverOf(image, dir);
    try {
      return { o: await scenario(guestImage, dir, server, expected, checkOnly), log: server.log() };
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

  it('vblk serve: there and back with fio verifying on two queues; the pages it filled during the migration arrive', { timeout: 1_200_000 }, async (t) => {
    const { o, log } = await run('vblk', (image, dir) => vblkServer(image, dir));
    assertClean(o, log);
    assert.equal(o.check.sum, o.expected[o.check.region], `region ${o.check.region} read during the migration is wrong on the destination`);
    downtimes.set('vblk', o.downtimes);
    t.diagnostic(`downtime (ms): ${o.downtimes.join(', ')}`);
  });

  it('qemu-storage-daemon, the same run: the reference downtime', { timeout: 1_200_000 }, async (t) => {
    const { o, log } = await run('qsd', qsdServer);
    assertClean(o, log);
    assert.equal(o.check.sum, o.expected[o.check.region]);
    downtimes.set('qsd', o.downtimes);
    t.diagnostic(`downtime (ms): ${o.downtimes.join(', ')}`);
  });

  // A todo, not a test yet: two runs since fio stopped emptying the page cache
  // (--invalidate=0), and both failed as they should — but by crashing the guest on the
  // destination, which the correct backend did too in 2 of 6 runs (README, known issue),
  // so the crash does not tell the two apart. Before, fio's BLKFLSBUF made the check read
  // the disk again, and the broken backend passed in 3 of 4 runs.
  it('the probe catches a backend that does not log its data writes: stale pages or a crashed guest on the destination', {
    timeout: 1_200_000, todo: 'a crashed destination does not yet tell a broken log from the open crash issue',
  }, async () => {
    let o: Outcome;
    try {
      o = (await run('broken', (image, dir) => vblkServer(image, dir, true), true)).o;
    } catch (e) {
      // The destination's guest died on what it found in memory: caught, too.
      assert.match((e as Error).message, /CHECK region/);
      return;
    }
    const autoInit = /mem auto-init: .*/.exec(o.output)?.[0] ?? 'no mem auto-init line';
    assert.notEqual(o.check.sum, o.expected[o.check.region], `with data pages unmarked the region still arrived intact: the probe proves nothing (${autoInit})`);
  });
});
