// Self-test of the guest harness (scripts/guest), not of vblk: QEMU's own virtio-blk
// stands in for our device, so a failure here is the harness's, and every other e2e
// test can trust boot, disks, exit codes, reboots, console I/O and QMP.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { access, mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GUEST_PEERS, ensureGuest, peerPath, requirePeer, runGuest, startGuest, type GuestResult } from '../../scripts/guest/guest.js';

const DISK_MIB = 64;

describe('guest harness', { skip: requirePeer(...GUEST_PEERS) }, () => {
  let dir: string;
  let disk: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vblk-harness-'));
    disk = join(dir, 'disk.img');
    await ensureGuest();
  });
  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  /** A fresh sparse raw image, so no test depends on what another left on the disk. */
  async function freshDisk(): Promise<string> {
    const file = await open(disk, 'w');
    await file.truncate(DISK_MIB * 1024 * 1024);
    await file.close();
    return disk;
  }

  function ok(r: GuestResult): void {
    assert.equal(r.exitCode, 0, `guest failed (${r.error ?? 'no error'}):\n${r.output.split('\n').slice(-40).join('\n')}`);
  }

  it('boots, sees /dev/vda at its size, and ext4 and fio work on it', { timeout: 240_000 }, async (t) => {
    const r = await runGuest({
      drives: [{ path: await freshDisk() }],
      script: `set -e
echo "sectors=$(cat /sys/block/vda/size)"
# Raw I/O first, with fio checking every block it wrote.
fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=8 \\
    --rw=randwrite --bs=4k --size=4M --verify=crc32c --output-format=terse >/tmp/fio.out
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
dd if=/dev/urandom of=/mnt/data bs=64k count=32 2>/dev/null
echo "sha=$(sha256sum /mnt/data | cut -d' ' -f1)"
sync
umount /mnt
e2fsck -fn /dev/vda
`,
    });
    t.diagnostic(`boot to script: ${r.bootMs} ms`);
    ok(r);
    assert.equal(r.boots, 1);
    assert.equal(r.timedOut, false);
    assert.match(r.output, new RegExp(`^sectors=${(DISK_MIB * 1024 * 1024) / 512}$`, 'm'));
    // What the guest wrote reached the image: the host's e2fsprogs agree with the guest's.
    execFileSync(peerPath('e2fsck')!, ['-fn', disk], { stdio: 'pipe' });
    const guestSha = /^sha=([0-9a-f]{64})$/m.exec(r.output)?.[1];
    const hostData = execFileSync(peerPath('debugfs')!, ['-R', 'cat /data', disk], { stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 8 << 20 });
    assert.equal(hostData.length, 2 << 20);
    assert.equal(createHash('sha256').update(hostData).digest('hex'), guestSha);
  });

  it('propagates the exit status of the script', { timeout: 180_000 }, async () => {
    const r = await runGuest({ script: 'echo about to fail\nexit 3\n' });
    assert.equal(r.exitCode, 3);
    assert.equal(r.error, undefined);
    assert.match(r.output, /^about to fail$/m);
  });

  it('kills QEMU and reports a timeout when the script hangs', { timeout: 180_000 }, async () => {
    const guest = await startGuest({ script: 'sleep 600', timeoutMs: 8_000 });
    const r = await guest.done;
    assert.equal(r.timedOut, true);
    assert.equal(r.exitCode, null);
    assert.throws(() => process.kill(guest.pid, 0), { code: 'ESRCH' });
  });

  it('runs the next script after the guest reboots itself', { timeout: 180_000 }, async () => {
    const r = await runGuest({
      drives: [{ path: await freshDisk() }],
      script: [
        // Boot 1 leaves a mark on the disk (conv=fsync: flushed before the reset) and reboots.
        `[ "$VBLK_BOOT" = 1 ] || exit 10
echo first-boot-mark | dd of=/dev/vda conv=fsync 2>/dev/null
reboot -f`,
        `[ "$VBLK_BOOT" = 2 ] || exit 20
[ "$(head -c 16 /dev/vda)" = first-boot-mark ] || exit 21
echo second-boot-ok`,
      ],
    });
    ok(r);
    assert.equal(r.boots, 2);
    assert.match(r.output, /^second-boot-ok$/m);
  });

  it('lets a test talk to the running guest: console lines and QMP system_reset', { timeout: 180_000 }, async () => {
    const guest = await startGuest({
      script: [
        'echo READY\nread -r word\necho "got=$word"\nsleep 600',
        'exit 7',
      ],
    });
    try {
      await guest.waitFor('READY', 120_000);
      guest.send('hello');
      await guest.waitFor(/^got=hello$/);
      const status = (await guest.qmp('query-status')) as { status: string };
      assert.equal(status.status, 'running');
      await guest.qmp('system_reset');
      const r = await guest.done;
      assert.equal(r.exitCode, 7);
      assert.equal(r.boots, 2);
    } finally {
      await guest.kill();
    }
  });

  // The command line every vblk e2e test relies on (memfd-shared RAM, vhost-user-blk-pci,
  // reconnect, more than one vCPU), checked against a vhost-user device nobody here wrote.
  it('attaches a vhost-user-blk disk as vda, before the plain drives',
    { timeout: 180_000, skip: requirePeer('qemu-storage-daemon') }, async () => {
      const image = join(dir, 'vhost.img');
      const file = await open(image, 'w');
      await file.truncate(32 << 20);
      await file.close();
      const sock = join(dir, 'vhost.sock');
      const daemon = spawn('qemu-storage-daemon', [
        '--blockdev', `driver=file,node-name=f,filename=${image}`,
        '--blockdev', 'driver=raw,node-name=d,file=f',
        '--export', `type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=${sock},writable=on,num-queues=2`,
      ], { stdio: 'ignore' });
      try {
        for (let i = 0; await access(sock).then(() => false, () => true); i++) {
          assert.ok(i < 100, 'qemu-storage-daemon did not create its socket');
          await new Promise((r) => setTimeout(r, 50));
        }
        const r = await runGuest({
          smp: 2,
          reconnect: 1,
          vhostUserSockets: [{ path: sock, numQueues: 2 }],
          drives: [{ path: await freshDisk() }],
          script: `set -e
echo "vda=$(cat /sys/block/vda/size) queues=$(ls /sys/block/vda/mq | wc -l) vdb=$(cat /sys/block/vdb/size)"
echo through-vhost-user | dd of=/dev/vda conv=fsync 2>/dev/null
`,
        });
        ok(r);
        assert.match(r.output, new RegExp(`^vda=${(32 << 20) / 512} queues=2 vdb=${(DISK_MIB << 20) / 512}$`, 'm'));
        assert.equal((await readFile(image)).subarray(0, 18).toString(), 'through-vhost-user');
      } finally {
        daemon.kill();
      }
    });
});
