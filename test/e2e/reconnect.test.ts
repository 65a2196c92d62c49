// A running guest survives `vblk serve` being killed and restarted under it: QEMU
// (chardev reconnect=1) reconnects, hands the new process the inflight buffer it kept
// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), and the requests the dead process had taken
// from the rings are resubmitted. The guest's fio verifies every block it wrote and
// the kernel logs no I/O error.
//
// The guest's workload runs until the host tells it to stop, never "until this much is
// done": however fast or slow the machine, the kills land while fio runs.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import {
  VHOST_USER_INFLIGHT_DESC_STATE_SPLIT as DESC, VHOST_USER_INFLIGHT_QUEUE_REGION_SPLIT as HEAD, VHOST_USER_INFLIGHT_VERSION,
} from '../../src/spec/vhost-user.js';
import { inflightQueueBytes } from '../../src/virtqueue/inflight.js';
import { GUEST_PEERS, ensureGuest, requirePeer, startGuest, type Guest } from '../../scripts/guest/guest.js';
import { scratchDir, startServe, type Served } from './serve-helpers.js';

/**
 * Requests marked in flight in the inflight buffers QEMU (`pid`) keeps for `vblk serve`
 * (memfds it created as "vblk-inflight"): what a backend killed now would leave behind.
 */
function requestsInFlight(pid: number): number {
  let n = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed meanwhile
    }
    if (!target.startsWith('/memfd:vblk-inflight')) continue;
    const b = readFileSync(`/proc/${pid}/fd/${fd}`);
    // Queue logs one after another, each a header then one state per descriptor.
    for (let at = 0; at + HEAD.size <= b.length;) {
      if (b.readUInt16LE(at + HEAD.fields.version.offset) !== VHOST_USER_INFLIGHT_VERSION) break;
      const descs = b.readUInt16LE(at + HEAD.fields.descNum.offset);
      for (let i = 0; i < descs; i++) n += b[at + HEAD.size + i * DESC.size + DESC.fields.inflight.offset] !== 0 ? 1 : 0;
      at += inflightQueueBytes(descs);
    }
  }
  return n;
}

/**
 * SIGKILLs `vblk serve` at a moment it has requests in flight: stopped (SIGSTOP), its
 * inflight buffers hold still to be read; resumed and tried again a little later when
 * they show none. Returns how many there were, or 0 when no try found any.
 */
async function killInFlight(serve: Served, qemuPid: number): Promise<number> {
  for (let tries = 0; tries < 3000; tries++) {
    serve.proc.kill('SIGSTOP');
    const n = requestsInFlight(qemuPid);
    if (n > 0) return n;
    serve.proc.kill('SIGCONT');
    await new Promise((r) => setTimeout(r, 1 + (tries % 7)));
  }
  return 0;
}

/** A restarted `vblk serve` is connected once QEMU has started its rings again. */
async function restart(serve: Served, image: string, socket: string, args: string[]): Promise<{ next: Served; log: string }> {
  serve.proc.kill('SIGKILL');
  await serve.exited;
  const next = await startServe(image, socket, args);
  await next.waitForLog(/frontend 1 connected/, 120_000);
  return { next, log: serve.log() };
}

const resubmissions = (log: string): number =>
  [...log.matchAll(/resubmitting (\d+) requests/g)].reduce((n, m) => n + Number(m[1]), 0);

describe('vblk serve killed and restarted under a running guest', { skip: requirePeer(...GUEST_PEERS) }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-reconnect-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('requests in flight at a kill are resubmitted: no I/O error, fio --verify=crc32c passes', { timeout: 600_000 }, async (t) => {
    const image = join(scratch.dir, 'disk.img');
    const socket = join(scratch.dir, 'vblk.sock');
    const args = ['--size', '128M', '--queues', '2'];
    let serve: Served = await startServe(image, socket, args);
    const logs: string[] = [];
    let guest: Guest | undefined;
    try {
      // Rounds of fio, each verifying what it wrote, until the host creates /tmp/stop.
      guest = await startGuest({
        vhostUserSockets: [{ path: socket, numQueues: 2 }],
        smp: 2,
        reconnect: 1,
        timeoutMs: 540_000,
        script: `set -e
(
  n=0
  while [ ! -e /tmp/stop ]; do
    n=$((n+1))
    echo "FIO-ROUND $n"
    fio --name=r --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \\
        --size=16M --numjobs=2 --offset_increment=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \\
        --output-format=terse > /tmp/fio.out || { echo "FIO-FAILED round $n"; cat /tmp/fio.out; exit 1; }
  done
  echo "FIO-ROUNDS=$n"
) &
fio_loop=$!
read -r line
touch /tmp/stop
wait $fio_loop
if dmesg | grep -i -E 'I/O error|blk_update_request|virtio_blk.*error'; then echo IO-ERRORS-LOGGED; exit 1; fi
echo FIO-DONE
`,
      });
      // Two kills, each at a moment the backend holds requests it took from the rings
      // (under TCG it finishes most of them long before the guest submits more).
      const kills = 2;
      const caught: number[] = [];
      for (let k = 0; k < kills; k++) {
        await guest.waitFor(/^FIO-ROUND \d+/, 300_000);
        caught.push(await killInFlight(serve, guest.pid));
        const { next, log } = await restart(serve, image, socket, args);
        logs.push(log);
        serve = next;
      }
      // One more round on the last backend, then stop.
      await guest.waitFor(/^FIO-ROUND \d+/, 300_000);
      guest.send('stop');
      const r = await guest.done;
      logs.push(serve.log());
      const all = logs.join('\n---\n');
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-40).join('\n')}\n${all}`);
      assert.match(r.output, /FIO-DONE/);
      assert.doesNotMatch(r.output, /IO-ERRORS-LOGGED|FIO-FAILED/);
      const resubmitted = resubmissions(all);
      t.diagnostic(`in flight at the kills: ${caught.join(', ')}; resubmitted: ${resubmitted}; ${/FIO-ROUNDS=\d+/.exec(r.output)?.[0] ?? ''}`);
      assert.ok(caught.every((n) => n > 0), `a kill found no request in flight (${caught.join(', ')})`);
      assert.ok(resubmitted > 0, `the restarted backends resubmitted nothing:\n${all}`);
    } finally {
      if (guest) await guest.kill();
      await serve.stop();
    }
  });

  it('a guest that chose write-through gets write-through after a backend restart and after a reboot', { timeout: 300_000 }, async () => {
    const image = join(scratch.dir, 'wt.img');
    const socket = join(scratch.dir, 'wt.sock');
    const args = ['--size', '64M', '--queues', '1'];
    let serve: Served = await startServe(image, socket, args);
    let guest: Guest | undefined;
    try {
      guest = await startGuest({
        vhostUserSockets: [{ path: socket, numQueues: 1 }],
        reconnect: 1,
        timeoutMs: 240_000,
        script: [`set -e
echo "BEFORE=$(cat /sys/block/vda/cache_type)"
echo "write through" > /sys/block/vda/cache_type
echo CHOSEN
read -r line
dd if=/dev/urandom of=/dev/vda bs=4k count=64 oflag=direct 2>/dev/null
echo "AFTER-RESTART=$(cat /sys/block/vda/cache_type)"
reboot -f
`, `set -e
dd if=/dev/urandom of=/dev/vda bs=4k count=64 oflag=direct 2>/dev/null
echo "AFTER-REBOOT=$(cat /sys/block/vda/cache_type)"
`],
      });
      await guest.waitFor('CHOSEN', 120_000);
      await serve.waitForLog(/cache mode: write-through/, 30_000);
      const { next } = await restart(serve, image, socket, args);
      serve = next;
      guest.send('go');
      const r = await guest.done;
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-40).join('\n')}\n${serve.log()}`);
      assert.match(r.output, /BEFORE=write back/);
      assert.match(r.output, /AFTER-RESTART=write through/);
      assert.match(r.output, /AFTER-REBOOT=write through/);
      // The restarted backend took write-through from the inflight buffer before serving
      // anything, and kept it through the reboot until QEMU went away.
      const log = serve.log();
      const connected = log.slice(0, log.indexOf('disconnected'));
      assert.match(connected, /cache mode: write-through/, log);
      assert.doesNotMatch(connected, /cache mode: write-back|config space is unknown/, log);
    } finally {
      if (guest) await guest.kill();
      await serve.stop();
    }
  });
});
