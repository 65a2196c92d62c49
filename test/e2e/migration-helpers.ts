// What the live-migration e2e test and the migration bench section share: the disk
// servers (one `vblk serve` on two sockets, qemu-storage-daemon with two exports, or two
// `vblk serve` over one NBD export as two hosts would run them), the guest, and a QMP
// `migrate` that waits on QEMU's own counters.
import { existsSync } from 'node:fs';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Guest, GuestImage, GuestOptions } from '../../scripts/guest/guest.js';
import { startQemuNbd } from '../support/nbd-servers.js';
import { waitUntil, within } from '../support/wait.js';
import { startQsd } from './qsd-helpers.js';
import { launchServe, startServe } from './serve-helpers.js';

const here = dirname(fileURLToPath(import.meta.url));
const BROKEN_SERVE = resolve(here, '../support/serve-without-data-log.js');

const MiB = 1024 * 1024;

/**
 * Guest RAM for a migrated guest: 256 MiB less 8 KiB. QEMU 7.2 loses guest-CPU stores
 * under TCG when it migrates RAM whose size is a multiple of 256 KiB (64 pages): its
 * dirty-bitmap sync then takes a word-at-a-time path that clears the migration bits
 * without making the TCG TLB trap the next store to those pages, so a page written again
 * after it was sent is never sent again. Fixed in QEMU 9.0 (commit 03bfc2188f, "physmem:
 * Fix migration dirty bitmap coherency with TCG memory access"). Any other size takes
 * the page-at-a-time path, which resets the TLB. Measured here with 256 MiB: the
 * destination's kernel crashed (slab, page-table and RCU-list corruption) in 3 of 4 runs
 * with either `vblk serve` or qemu-storage-daemon serving the disk.
 */
export const MIGRATION_GUEST_KIB = 256 * 1024 - 8;

/** The probe's regions: 3 × 16 MiB from 64 MiB, each 4 KiB block different; fio stays below. */
export const REGION_START_MIB = 64;
export const REGION_MIB = 16;
export const REGIONS = 3;
export const IMAGE_SIZE = 128 * MiB;

/** While the probe runs: slow enough that the first pass takes a while, and no switchover. */
export const SLOW = { 'max-bandwidth': 16 * MiB, 'downtime-limit': 1 };
/** Then, and for every migration without a probe: converge (QEMU 7.2's default downtime limit, 300 ms; 8 times its default bandwidth, 128 MiB/s). */
export const FAST = { 'max-bandwidth': 1024 * MiB, 'downtime-limit': 300 };

/** Two sockets onto one disk. */
export interface DiskServer {
  readonly sockets: readonly [string, string];
  /** Where its Prometheus metrics are, when it serves them. */
  readonly metricsUrl?: string;
  log(): string;
  stop(): Promise<void>;
}

/**
 * One `vblk serve` on both sockets: the image opened and locked once, a device per
 * socket, with metrics on a free port. With `broken`, one whose data pages are never
 * marked in the dirty log (test/support/serve-without-data-log.ts).
 */
export async function vblkServer(image: string, dir: string, broken = false): Promise<DiskServer> {
  const sockets = [join(dir, 'a.sock'), join(dir, 'b.sock')] as const;
  const args = ['--socket', sockets[1], '--queues', '2', '--metrics', '127.0.0.1:0'];
  const served = broken
    ? await launchServe(process.execPath, [BROKEN_SERVE, 'serve', image, '--socket', sockets[0], ...args], sockets[0])
    : await startServe(image, sockets[0], args);
  const metricsUrl = /metrics on (\S+)/.exec(await served.waitForLog(/metrics on \S+/))![1];
  return {
    sockets, metricsUrl, log: () => served.log(),
    stop: async () => {
      await served.stop();
    },
  };
}

/**
 * Migration across hosts, on one machine: the image behind one NBD server (qemu-nbd),
 * and a `vblk serve` of its own for each QEMU, as each host would run it. The two share
 * nothing but the export.
 */
export async function nbdHostsServer(image: string, dir: string): Promise<DiskServer> {
  // Each `vblk serve` opens one NBD connection per queue (up to 4): room for both.
  const nbd = await startQemuNbd(image, join(dir, 'nbd.sock'), { shared: 4 });
  const sockets = [join(dir, 'host-a.sock'), join(dir, 'host-b.sock')] as const;
  const served: Awaited<ReturnType<typeof startServe>>[] = [];
  try {
    for (const s of sockets) served.push(await startServe(nbd.uri, s, ['--queues', '2']));
  } catch (e) {
    for (const s of served) await s.stop();
    await nbd.stop();
    throw e;
  }
  return {
    sockets,
    log: () => served.map((s, i) => `--- vblk serve on host ${'ab'[i]} ---\n${s.log()}`).join('\n'),
    stop: async () => {
      for (const s of served) await s.stop();
      await nbd.stop();
    },
  };
}

/** qemu-storage-daemon with two vhost-user-blk exports of one node. */
export async function qsdServer(image: string, dir: string): Promise<DiskServer> {
  const sockets = [join(dir, 'qa.sock'), join(dir, 'qb.sock')] as const;
  const q = await startQsd(image, sockets[0], join(dir, 'qsd-qmp.sock'), { numQueues: 2, moreSockets: [sockets[1]] });
  return { sockets, log: q.log, stop: q.stop };
}

/**
 * The guest: fio rounds on two queues (one job per vCPU), each verifying all it wrote,
 * until told to stop; the probe's reads when told; then, on whichever QEMU runs the guest
 * by then, the checksum of the region read last, from the page cache. fio's
 * --invalidate=0: by default each round starts with BLKFLSBUF, which empties the whole
 * disk's page cache, and the check would read the region from the disk again instead of
 * the pages under test. For the same reason the script holds /dev/vda open throughout
 * (fd 3): Linux empties a block device's page cache when its last opener closes it, as
 * `dd` does after each read whenever fio is between rounds. The CHECK line says how much
 * of the disk was in the page cache before it (Buffers: the region read last, and
 * whatever else the block device holds), so a test can see that the check read pages.
 */
export const GUEST_SCRIPT = `set -e
exec 3</dev/vda
# Before the loop starts: the first FIO-ROUND line would otherwise race it on the other vCPU.
echo READY
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
read -r line
for r in $(seq 0 $((${REGIONS} - 1))); do
  echo 3 > /proc/sys/vm/drop_caches
  dd if=/dev/vda of=/dev/null bs=1M skip=$((${REGION_START_MIB} + r * ${REGION_MIB})) count=${REGION_MIB} 2>/dev/null
  echo $r > /tmp/last-region
done
echo READ-DONE
read -r line
r=$(cat /tmp/last-region)
cached=$(awk '/^Buffers:/{print $2}' /proc/meminfo)
sum=$(dd if=/dev/vda bs=1M skip=$((${REGION_START_MIB} + r * ${REGION_MIB})) count=${REGION_MIB} 2>/dev/null | sha256sum)
echo "CHECK region=$r sum=\${sum%% *} cached-kib=$cached"
read -r line
touch /tmp/stop
wait $fio_loop
if dmesg | grep -i -E 'I/O error|blk_update_request|virtio_blk.*error'; then echo IO-ERRORS-LOGGED; exit 1; fi
echo FIO-DONE
`;

/**
 * What every QEMU of a run boots with. init_on_alloc=0: Debian's kernel zeroes every page
 * it allocates, and that CPU write would make QEMU send each page-cache page again
 * whatever the backend logs, hiding a missing mark from the probe.
 */
export function migrationGuest(image: GuestImage): Omit<GuestOptions, 'vhostUserSockets'> {
  return { script: GUEST_SCRIPT, smp: 2, memoryKiB: MIGRATION_GUEST_KIB, timeoutMs: 900_000, image, kernelArgs: ['init_on_alloc=0'] };
}

/** Where a long run is, on stderr as it happens (the test runner shows diagnostics only at the end). */
export function note(line: string): void {
  process.stderr.write(`# migration: ${line}\n`);
}

export interface MigrationInfo {
  status: string;
  downtime?: number;
  'total-time'?: number;
  'error-desc'?: string;
  ram?: { 'dirty-sync-count'?: number; transferred?: number };
}

async function pollMigration(g: Guest, until: (i: MigrationInfo) => boolean, what: string, timeoutMs: number): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = (await g.qmp('query-migrate')) as MigrationInfo;
    if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`migration ${info.status}: ${info['error-desc'] ?? ''}`);
    if (until(info)) return info;
    if (Date.now() > deadline) throw new Error(`migration: ${what} not within ${timeoutMs / 1000} s: ${JSON.stringify(info)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Runs `during` while the migration stays short of its switchover. Should QEMU switch over
 * anyway (a dirty-page sync finding fewer pages than the 1 ms limit lets through), the
 * source is paused and `during` could never finish: that fails at once, saying so.
 */
async function duringUnconverged(src: Guest, during: () => Promise<void>): Promise<void> {
  let probing = true;
  const work = during();
  const watch = (async () => {
    while (probing) {
      const info = (await src.qmp('query-migrate')) as MigrationInfo;
      if (info.status !== 'active') throw new Error(`the migration went ${info.status} before the probe was done (the guest dirtied too little memory to hold it back)`);
      await new Promise((r) => setTimeout(r, 200));
    }
  })();
  try {
    await Promise.race([work, watch]);
  } catch (e) {
    work.catch(() => {}); // its guest is killed by the caller's cleanup; that ending is not news
    throw e;
  } finally {
    probing = false;
  }
  await watch;
}

/**
 * Where `dst` listens: `uri` itself, or for `tcp:HOST:0` (QEMU binds a free port, with no
 * window in which another process could take it) the port QEMU bound, from its query-migrate.
 */
async function listeningUri(dst: Guest, uri: string): Promise<string> {
  if (!/^tcp:.*:0$/.test(uri)) return uri;
  const info = (await dst.qmp('query-migrate')) as { 'socket-address'?: { type: string; host?: string; port?: string }[] };
  const a = info['socket-address']?.find((x) => x.type === 'inet');
  if (a?.port === undefined) throw new Error(`the destination listens on ${uri} but query-migrate names no port: ${JSON.stringify(info)}`);
  return `tcp:${a.host}:${a.port}`;
}

/**
 * Migrates the guest from `src` to `dst`, which listens on `uri` (its `-incoming`:
 * `unix:PATH`, `tcp:HOST:PORT` or `tcp:HOST:0`). With `during`, the migration is held slow and short
 * of its switchover until `during` is done.
 */
export async function migrate(src: Guest, dst: Guest, uri: string, during?: () => Promise<void>): Promise<MigrationInfo> {
  // QEMU sets up its devices (the vhost-user handshake included) and starts listening for
  // the migration before its main loop runs, and its monitor answers only from there.
  await waitUntil(() => existsSync(dst.qmpSocket), { what: `the destination's QMP socket ${dst.qmpSocket}`, timeoutMs: 120_000 });
  await within(dst.qmp('query-status'), { what: 'the destination QEMU to set up its vhost-user disk and answer QMP', timeoutMs: 120_000 });
  const to = await listeningUri(dst, uri);
  await src.qmp('migrate-set-parameters', during ? SLOW : FAST);
  await src.qmp('migrate', { uri: to });
  note(`migrating to ${to}`);
  if (during) {
    // dirty-sync-count 2: the first pass over all memory is done, and every page the
    // probe fills from now on was sent before, with other contents.
    await pollMigration(src, (i) => (i.ram?.['dirty-sync-count'] ?? 0) >= 2, 'the first pass', 300_000);
    note('first pass done');
    await duringUnconverged(src, during);
    note('probe read');
    await src.qmp('migrate-set-parameters', FAST);
  }
  // QEMU 7.2 says `completed` a moment before it works out the times (the migration thread
  // sets the state, then takes the lock to compute them): a poll in between reads 0 for both.
  return pollMigration(src, (i) => i.status === 'completed' && (i['total-time'] ?? 0) > 0, 'completion with its times', 300_000);
}
