// A Linux guest on a disk that lives on an NBD server: QEMU's vhost-user-blk-pci talks to
// `vblk serve nbd+unix:///…`, which talks NBD to qemu-nbd or nbdkit. Checked where a
// user would look: in the guest (mkfs, fio verify, fsck, dmesg, errors from dd) and on the
// host (the image qemu-nbd serves, read with debugfs).
//
// Guest workloads run until the host tells them to stop, so the server kills land while
// fio runs however fast or slow the machine is.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_PEERS, ensureGuest, requirePeer, runGuest, startGuest, type Guest, type GuestResult } from '../../scripts/guest/guest.js';
import { startNbdkit, startQemuNbd, type NbdServer } from '../support/nbd-servers.js';
import { waitUntil } from '../support/wait.js';
import { scratchDir, startServe } from './serve-helpers.js';

const MiB = 1024 * 1024;

function ok(r: GuestResult, logs: string[]): void {
  assert.equal(r.exitCode, 0, `guest failed (${r.error ?? 'no error'}):\n${r.output.split('\n').slice(-60).join('\n')}\n${logs.join('\n---\n')}`);
}

function field(output: string, name: string): string {
  const m = new RegExp(`^${name}=(.*)$`, 'm').exec(output);
  assert.ok(m, `guest never printed ${name}=`);
  return m[1].trim();
}

describe('vblk serve on an NBD export, with a Linux guest', { skip: requirePeer(...GUEST_PEERS, 'qemu-nbd', 'nbdkit', 'debugfs') }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-nbd-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('mkfs, files, fio verify on two queues over two NBD connections, fsck clean; the image holds the files', { timeout: 420_000 }, async () => {
    const image = join(scratch.dir, 'disk.raw');
    truncateSync(writeEmpty(image), 128 * MiB);
    const nbd = await startQemuNbd(image, join(scratch.dir, 'nbd.sock'), { shared: 2 });
    const serve = await startServe(nbd.uri, join(scratch.dir, 'vblk.sock'), ['--queues', '2', '--nbd-connections', '2']);
    try {
      assert.match(serve.log(), /134217728 bytes, 2 connections, flags flush, fua, trim, zeroes/);
      const r = await runGuest({
        vhostUserSockets: [{ path: serve.socket, numQueues: 2 }],
        smp: 2,
        timeoutMs: 360_000,
        script: `set -e
echo "SIZE=$(cat /sys/block/vda/size)"
echo "PBS=$(cat /sys/block/vda/queue/physical_block_size)"
fio --name=q --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite --bs=4k --size=8M \\
    --offset_increment=32M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \\
    --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse > /tmp/fio.out
echo FIO-OK
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
echo "over nbd" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/random.bin bs=64k count=64 2>/dev/null
echo "MD5=$(md5sum /mnt/random.bin | cut -d' ' -f1)"
umount /mnt
e2fsck -fn /dev/vda
echo FSCK-OK
if dmesg | grep -i -E 'I/O error|blk_update_request'; then echo IO-ERRORS-LOGGED; exit 1; fi
`,
      });
      ok(r, [serve.log(), nbd.log()]);
      assert.equal(Number(field(r.output, 'SIZE')), 128 * MiB / 512);
      assert.equal(field(r.output, 'PBS'), '4096', "qemu-nbd's preferred block is the physical block");
      assert.match(r.output, /FIO-OK/);
      assert.match(r.output, /FSCK-OK/);
      assert.equal(await serve.stop(), 0);
      await nbd.stop();
      // The host reads the image qemu-nbd wrote, with a tool of its own.
      assert.equal(execFileSync('debugfs', ['-R', 'cat /hello.txt', image], { stdio: ['ignore', 'pipe', 'ignore'] }).toString(), 'over nbd\n');
      const md5 = execFileSync('sh', ['-c', `debugfs -R 'cat /random.bin' ${image} 2>/dev/null | md5sum | cut -d' ' -f1`]).toString().trim();
      assert.equal(md5, field(r.output, 'MD5'));
    } finally {
      await serve.stop();
      await nbd.stop();
    }
  });

  it('qemu-nbd SIGKILLed and restarted twice under fio verify: no I/O error in the guest, verify passes', { timeout: 600_000 }, async (t) => {
    const image = join(scratch.dir, 'kill.raw');
    truncateSync(writeEmpty(image), 128 * MiB);
    const socket = join(scratch.dir, 'kill.sock');
    let nbd: NbdServer = await startQemuNbd(image, socket, { shared: 2 });
    const serve = await startServe(nbd.uri, join(scratch.dir, 'kill-vblk.sock'), ['--queues', '2', '--nbd-connections', '2', '--metrics', '127.0.0.1:0']);
    const metrics = /metrics on (\S+)/.exec(await serve.waitForLog(/metrics on /))?.[1] as string;
    let guest: Guest | undefined;
    const caught: number[] = [];
    try {
      guest = await startGuest({
        vhostUserSockets: [{ path: serve.socket, numQueues: 2 }],
        smp: 2,
        timeoutMs: 540_000,
        script: fioUntilStopped(),
      });
      for (let k = 0; k < 2; k++) {
        await guest.waitFor(/^FIO-ROUND \d+/, 300_000);
        const lost = countMatches(serve.log(), /connection \d lost/);
        const back = countMatches(serve.log(), /is back after/);
        // Stopped, the server answers nothing: the guest's next requests stay in flight
        // in vblk serve, and the kill finds them there.
        nbd.proc.kill('SIGSTOP');
        let inFlight = 0;
        await waitUntilAsync(async () => (inFlight = await requestsInFlight(metrics)) > 0, 'requests in flight with the server stopped');
        caught.push(inFlight);
        await nbd.stop('SIGKILL');
        // While the server is away the guest's requests wait in vblk serve.
        await waitUntil(() => countMatches(serve.log(), /connection \d lost/) >= lost + 2, { what: 'vblk serve to lose both connections', timeoutMs: 30_000 });
        nbd = await startQemuNbd(image, socket, { shared: 2 });
        await waitUntil(() => countMatches(serve.log(), /is back after/) >= back + 2, { what: 'vblk serve to reconnect both', timeoutMs: 60_000 });
      }
      await guest.waitFor(/^FIO-ROUND \d+/, 300_000);
      guest.send('stop');
      const r = await guest.done;
      ok(r, [serve.log(), nbd.log()]);
      assert.match(r.output, /FIO-DONE/);
      assert.doesNotMatch(r.output, /IO-ERRORS-LOGGED|FIO-FAILED/);
      const log = serve.log();
      const resubmitted = [...log.matchAll(/resubmitting (\d+) requests/g)].reduce((n, m) => n + Number(m[1]), 0);
      t.diagnostic(`${/FIO-ROUNDS=\d+/.exec(r.output)?.[0] ?? ''}; in flight at the kills: ${caught.join(', ')}; resubmitted: ${resubmitted}`);
      assert.ok(resubmitted > 0, `nothing was resubmitted:\n${log}`);
      assert.doesNotMatch(log, /I\/O error/);
    } finally {
      if (guest) await guest.kill();
      await serve.stop();
      await nbd.stop();
    }
  });

  it('a server that does not come back: the guest\'s requests fail with I/O errors after the bounded time; vblk serve keeps running and recovers', { timeout: 300_000 }, async () => {
    const image = join(scratch.dir, 'gone.raw');
    truncateSync(writeEmpty(image), 32 * MiB);
    const socket = join(scratch.dir, 'gone.sock');
    let nbd: NbdServer = await startQemuNbd(image, socket);
    const serve = await startServe(nbd.uri, join(scratch.dir, 'gone-vblk.sock'), ['--queues', '1', '--nbd-reconnect-timeout', '3']);
    let guest: Guest | undefined;
    try {
      guest = await startGuest({
        vhostUserSockets: [{ path: serve.socket, numQueues: 1 }],
        timeoutMs: 240_000,
        script: `
dd if=/dev/urandom of=/tmp/block bs=4k count=1 2>/dev/null
dd if=/tmp/block of=/dev/vda bs=4k count=1 seek=100 oflag=direct 2>/dev/null || exit 2
echo SERVER-NEEDED-NO-MORE
read -r go
if dd if=/dev/vda of=/dev/null bs=4k count=1 skip=200 iflag=direct 2>/dev/null; then echo READ-SUCCEEDED; else echo READ-FAILED; fi
echo FAILED-SEEN
read -r go
dd if=/dev/vda of=/tmp/back bs=4k count=1 skip=100 iflag=direct 2>/dev/null || exit 3
cmp /tmp/block /tmp/back || exit 4
echo RECOVERED
`,
      });
      await guest.waitFor('SERVER-NEEDED-NO-MORE', 120_000);
      await nbd.stop('SIGKILL');
      guest.send('go');
      await guest.waitFor('FAILED-SEEN', 120_000);
      assert.equal(serve.proc.exitCode, null, 'vblk serve is still running');
      nbd = await startQemuNbd(image, socket);
      await serve.waitForLog(/is back after/, 60_000);
      guest.send('go');
      const r = await guest.done;
      ok(r, [serve.log(), nbd.log()]);
      assert.match(r.output, /READ-FAILED/);
      assert.match(r.output, /RECOVERED/);
      assert.match(serve.log(), /no connection for 3 s: failing/);
    } finally {
      if (guest) await guest.kill();
      await serve.stop();
      await nbd.stop();
    }
  });

  it('nbdkit delay and error filters: the delay shows in the guest\'s latency, injected read errors fail those reads only', { timeout: 300_000 }, async () => {
    const trigger = join(scratch.dir, 'inject');
    const delayed = await startNbdkit(['--filter=delay', 'memory', '64M', 'delay-read=100ms'], join(scratch.dir, 'delay.sock'));
    const failing = await startNbdkit(['--filter=error', 'memory', '64M', 'error-pread-rate=100%', `error-pread-file=${trigger}`], join(scratch.dir, 'error.sock'));
    const d = await startServe(delayed.uri, join(scratch.dir, 'delay-vblk.sock'), ['--queues', '1']);
    const e = await startServe(failing.uri, join(scratch.dir, 'error-vblk.sock'), ['--queues', '1']);
    let guest: Guest | undefined;
    try {
      guest = await startGuest({
        vhostUserSockets: [{ path: d.socket, numQueues: 1 }, { path: e.socket, numQueues: 1 }],
        timeoutMs: 240_000,
        script: `
fio --name=lat --filename=/dev/vda --direct=1 --ioengine=psync --rw=randread --bs=4k --number_ios=10 --size=8M \\
    --output-format=json > /tmp/lat.json || exit 2
echo "CLAT-MIN-NS=$(grep -A3 '"clat_ns"' /tmp/lat.json | grep '"min"' | head -1 | tr -dc 0-9)"
dd if=/dev/urandom of=/tmp/block bs=4k count=1 2>/dev/null
dd if=/tmp/block of=/dev/vdb bs=4k count=1 seek=256 oflag=direct 2>/dev/null || exit 3
echo ERRORS-PLEASE
read -r go
if dd if=/dev/vdb of=/dev/null bs=4k count=1 skip=256 iflag=direct 2>/dev/null; then echo READ-SUCCEEDED; else echo READ-FAILED; fi
if dd if=/tmp/block of=/dev/vdb bs=4k count=1 seek=512 oflag=direct 2>/dev/null; then echo WRITE-OK; else echo WRITE-FAILED; fi
echo NO-ERRORS-PLEASE
read -r go
dd if=/dev/vdb of=/tmp/back bs=4k count=1 skip=256 iflag=direct 2>/dev/null || exit 4
cmp /tmp/block /tmp/back || exit 5
dd if=/dev/vdb of=/tmp/back bs=4k count=1 skip=512 iflag=direct 2>/dev/null || exit 6
cmp /tmp/block /tmp/back || exit 7
echo ALL-GOOD
`,
      });
      await guest.waitFor('ERRORS-PLEASE', 180_000);
      writeFileSync(trigger, '');
      guest.send('go');
      await guest.waitFor('NO-ERRORS-PLEASE', 60_000);
      unlinkSync(trigger);
      guest.send('go');
      const r = await guest.done;
      ok(r, [d.log(), e.log()]);
      // A lower bound only: each read waited for the server's 100 ms at least.
      assert.ok(Number(field(r.output, 'CLAT-MIN-NS')) >= 100e6, `clat min ${field(r.output, 'CLAT-MIN-NS')} ns`);
      assert.match(r.output, /READ-FAILED/);
      assert.match(r.output, /WRITE-OK/);
      assert.match(r.output, /ALL-GOOD/);
      assert.match(e.log(), /I\/O error \(read at sector \d+\): .*EIO/);
      assert.doesNotMatch(e.log(), /lost/, 'an error reply is not a lost connection');
    } finally {
      if (guest) await guest.kill();
      if (existsSync(trigger)) unlinkSync(trigger);
      await d.stop();
      await e.stop();
      await delayed.stop();
      await failing.stop();
    }
  });
});

function writeEmpty(path: string): string {
  writeFileSync(path, new Uint8Array(0));
  return path;
}

/** vblk serve's requests in flight, summed over its queues, from its metrics. */
async function requestsInFlight(url: string): Promise<number> {
  const text = await (await fetch(url)).text();
  return [...text.matchAll(/^vblk_inflight_requests\{[^}]*\} (\d+)$/gm)].reduce((n, m) => n + Number(m[1]), 0);
}

/** waitUntil for a condition that needs I/O to check: polled every 50 ms, bounded at 60 s. */
async function waitUntilAsync(cond: () => Promise<boolean>, what: string): Promise<void> {
  const deadline = performance.now() + 60_000;
  while (!(await cond())) {
    if (performance.now() > deadline) throw new Error(`timed out after 60 s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function countMatches(s: string, re: RegExp): number {
  return [...s.matchAll(new RegExp(re.source, 'g'))].length;
}

/** Rounds of fio, each verifying what it wrote, on two queues, until the host sends a line. */
function fioUntilStopped(): string {
  return `set -e
(
  n=0
  while [ ! -e /tmp/stop ]; do
    n=$((n+1))
    echo "FIO-ROUND $n"
    fio --name=r --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \\
        --size=16M --numjobs=2 --offset_increment=64M --cpus_allowed=0-1 --cpus_allowed_policy=split \\
        --verify=crc32c --do_verify=1 --verify_fatal=1 \\
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
`;
}
