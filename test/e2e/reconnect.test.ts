// A running guest survives `vblk serve` being killed and restarted under it: QEMU
// (chardev reconnect=1) reconnects, hands the new process the inflight buffer it kept
// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), and the requests the dead process had taken
// from the rings are resubmitted. The guest's fio verifies every block it wrote and
// the kernel logs no I/O error.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { GUEST_PEERS, ensureGuest, requirePeer, startGuest } from '../../scripts/guest/guest.js';
import { scratchDir, startServe, type Served } from './serve-helpers.js';

describe('vblk serve killed and restarted under a running guest', { skip: requirePeer(...GUEST_PEERS) }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-reconnect-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('the guest sees no I/O error and fio --verify=crc32c passes', { timeout: 300_000 }, async (t) => {
    const image = join(scratch.dir, 'disk.img');
    const socket = join(scratch.dir, 'vblk.sock');
    const args = ['--size', '128M', '--queues', '2'];
    let serve: Served = await startServe(image, socket, args);
    const logs: string[] = [];
    try {
      const guest = await startGuest({
        vhostUserSockets: [{ path: socket, numQueues: 2 }],
        smp: 2,
        reconnect: 1,
        timeoutMs: 240_000,
        script: `set -e
echo FIO-START
fio --name=r --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \\
    --size=48M --numjobs=2 --offset_increment=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \\
    --output-format=terse > /tmp/fio.out
echo FIO-DONE
if dmesg | grep -i -E 'I/O error|blk_update_request|virtio_blk.*error'; then echo IO-ERRORS-LOGGED; exit 1; fi
`,
      });
      await guest.waitFor('FIO-START', 120_000);
      const kills = 2;
      for (let k = 0; k < kills; k++) {
        // Let fio get requests in flight, then kill the backend under them.
        await new Promise((r) => setTimeout(r, 1500));
        serve.proc.kill('SIGKILL');
        await serve.exited;
        logs.push(serve.log());
        await new Promise((r) => setTimeout(r, 300));
        serve = await startServe(image, socket, args);
        await serve.waitForLog(/frontend 1 connected/, 30_000);
      }
      const r = await guest.done;
      logs.push(serve.log());
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-40).join('\n')}\n${logs.join('\n---\n')}`);
      assert.match(r.output, /FIO-DONE/);
      assert.doesNotMatch(r.output, /IO-ERRORS-LOGGED/);
      const resubmitted = logs.join('\n').match(/resubmitting (\d+) requests/g) ?? [];
      t.diagnostic(`kills: ${kills}; resubmissions logged: ${resubmitted.join(', ') || 'none'}`);
    } finally {
      await serve.stop();
    }
  });
});
