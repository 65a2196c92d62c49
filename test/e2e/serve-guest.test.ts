// `vblk serve` in front of a real Linux guest: QEMU's vhost-user-blk-pci connects to it
// and the guest's own virtio_blk driver (the seed's descendant) uses the disk. Every
// check is made where a user would make it: inside the guest (sysfs, mkfs, fsck, fio) and
// on the host (the image's bytes, its allocated size).
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_PEERS, ensureGuest, requirePeer, runGuest, startGuest, type GuestResult } from '../../scripts/guest/guest.js';
import { runCli, scratchDir, startServe, type Served } from './serve-helpers.js';

const MiB = 1024 * 1024;
/** What the first sector of the read-only test image holds, every byte (writeAndGet). */
const FIRST_SECTOR_BYTE = 0x5a;

function ok(r: GuestResult, served: Served[] = []): void {
  assert.equal(r.exitCode, 0, `guest failed (${r.error ?? 'no error'}):\n${r.output.split('\n').slice(-60).join('\n')}\n` +
    served.map((s) => `--- vblk serve log:\n${s.log()}`).join('\n'));
}

/** Allocated bytes of a file (what du shows). */
function allocated(path: string): number {
  return statSync(path).blocks * 512;
}

function field(output: string, name: string): string {
  const m = new RegExp(`^${name}=(.*)$`, 'm').exec(output);
  assert.ok(m, `guest never printed ${name}=`);
  return m[1].trim();
}

/** A file's bytes, read out of an ext4 image on the host with debugfs. */
function debugfsCat(image: string, path: string): Buffer {
  return execFileSync('debugfs', ['-R', `cat ${path}`, image], { stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 64 * MiB });
}

describe('vblk serve with a Linux guest in QEMU', { skip: requirePeer(...GUEST_PEERS, 'debugfs') }, () => {
  let scratch: { dir: string; cleanup(): void };

  before(async () => {
    scratch = scratchDir('vblk-serve-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('serves a guest through mkfs, files, fio on two queues, fstrim, live resize, a reboot and a second QEMU', { timeout: 600_000 }, async (t) => {
    const image = join(scratch.dir, 'disk.img');
    const socket = join(scratch.dir, 'vblk.sock');
    const control = join(scratch.dir, 'control.sock');
    const serve = await startServe(image, socket, ['--size', '128M', '--serial', 'vblk-e2e-serial', '--queues', '2', '--control', control]);
    try {
      const boot1 = `set -e
echo "SIZE=$(cat /sys/block/vda/size)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
echo "MQ=$(ls /sys/block/vda/mq | wc -l)"
# Both CPUs, so both queues (blk-mq maps one per CPU), each verifying what it wrote.
fio --name=q --filename=/dev/vda --direct=1 --ioengine=psync --rw=randwrite --bs=4k --size=8M \\
    --offset_increment=16M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \\
    --verify=crc32c --do_verify=1 --output-format=terse > /tmp/fio.out
echo FIO-OK
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
echo "hello from the guest" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/random.bin bs=64k count=64 2>/dev/null
echo "MD5=$(md5sum /mnt/random.bin | cut -d' ' -f1)"
dd if=/dev/urandom of=/mnt/big.bin bs=1M count=24 2>/dev/null
sync
echo TRIM-READY
read -r go
rm /mnt/big.bin
sync
fstrim -v /mnt
echo TRIM-DONE
read -r go
echo RESIZE-READY
read -r go
before=$(cat /sys/block/vda/size)
i=0
while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
echo "NEWSIZE=$(cat /sys/block/vda/size)"
umount /mnt
e2fsck -fn /dev/vda
reboot -f
`;
      const boot2 = `set -e
echo "BOOT2-SIZE=$(cat /sys/block/vda/size)"
mount -t ext4 /dev/vda /mnt
echo "BOOT2-HELLO=$(cat /mnt/hello.txt)"
echo "BOOT2-MD5=$(md5sum /mnt/random.bin | cut -d' ' -f1)"
umount /mnt
`;
      const guest = await startGuest({ vhostUserSockets: [{ path: socket, numQueues: 2 }], smp: 2, script: [boot1, boot2], timeoutMs: 420_000 });
      await guest.waitFor('TRIM-READY', 300_000);
      const beforeTrim = allocated(image);
      guest.send('go');
      await guest.waitFor('TRIM-DONE', 120_000);
      const afterTrim = allocated(image);
      guest.send('go');
      await guest.waitFor('RESIZE-READY', 60_000);
      const resized = await runCli(['resize', '--control', control, '192M']);
      assert.equal(resized.code, 0, `vblk resize failed: ${resized.stderr}`);
      guest.send('go');
      const r = await guest.done;
      ok(r, [serve]);
      t.diagnostic(`boot to script: ${r.bootMs} ms; allocated before trim ${beforeTrim}, after ${afterTrim}`);

      assert.equal(Number(field(r.output, 'SIZE')), 128 * MiB / 512, 'capacity in 512-byte sectors');
      assert.equal(field(r.output, 'SERIAL'), 'vblk-e2e-serial');
      assert.equal(Number(field(r.output, 'MQ')), 2, 'two hardware queues');
      assert.match(r.output, /FIO-OK/);
      assert.ok(beforeTrim - afterTrim >= 20 * MiB, `fstrim freed only ${beforeTrim - afterTrim} bytes of the image`);
      assert.equal(Number(field(r.output, 'NEWSIZE')), 192 * MiB / 512, 'the guest saw the resize without a reboot');
      assert.equal(statSync(image).size, 192 * MiB);
      assert.equal(r.boots, 2, 'the guest rebooted');
      assert.equal(field(r.output, 'BOOT2-HELLO'), 'hello from the guest');
      const md5 = field(r.output, 'MD5');
      assert.equal(field(r.output, 'BOOT2-MD5'), md5);

      // The host reads the same bytes out of the image.
      assert.equal(debugfsCat(image, '/hello.txt').toString(), 'hello from the guest\n');
      assert.equal(createHash('md5').update(debugfsCat(image, '/random.bin')).digest('hex'), md5);

      // QEMU is gone; a new QEMU connects to the same vblk serve process.
      const again = await runGuest({
        vhostUserSockets: [{ path: socket, numQueues: 1 }],
        script: `set -e
echo "AGAIN-SIZE=$(cat /sys/block/vda/size)"
e2fsck -fn /dev/vda
mount -t ext4 /dev/vda /mnt
echo "AGAIN-MD5=$(md5sum /mnt/random.bin | cut -d' ' -f1)"
echo "second qemu" > /mnt/second.txt
umount /mnt
`,
        timeoutMs: 120_000,
      });
      ok(again, [serve]);
      assert.equal(Number(field(again.output, 'AGAIN-SIZE')), 192 * MiB / 512);
      assert.equal(field(again.output, 'AGAIN-MD5'), md5);
      assert.equal(debugfsCat(image, '/second.txt').toString(), 'second qemu\n');
      assert.match(serve.log(), /frontend 2 connected/);
    } finally {
      assert.equal(await serve.stop(), 0, `vblk serve did not exit cleanly:\n${serve.log()}`);
    }
  });

  // The 4096-byte-block device reads through a mapping of its image (--io mmap): fio's
  // verify reads and e2fsck see through it what the guest wrote with pwritev.
  it('read-only and 4096-byte-block (--io mmap) devices look right to the guest', { timeout: 240_000 }, async () => {
    const roImage = join(scratch.dir, 'ro.img');
    const bigBlock = join(scratch.dir, '4k.img');
    truncateSync(writeAndGet(roImage), 32 * MiB);
    const roHash = createHash('sha256').update(readFileSync(roImage)).digest('hex');
    const ro = await startServe(roImage, join(scratch.dir, 'ro.sock'), ['--read-only']);
    const bb = await startServe(bigBlock, join(scratch.dir, '4k.sock'), ['--size', '32M', '--block-size', '4096', '--io', 'mmap']);
    try {
      const r = await runGuest({
        vhostUserSockets: [{ path: ro.socket, numQueues: 1 }, { path: bb.socket, numQueues: 1 }],
        script: `set -e
echo "RO=$(cat /sys/block/vda/ro)"
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; then echo RO-WRITE-SUCCEEDED; fi
echo "RO-HEAD=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "LBS=$(cat /sys/block/vdb/queue/logical_block_size)"
echo "PBS=$(cat /sys/block/vdb/queue/physical_block_size)"
fio --name=bb --filename=/dev/vdb --direct=1 --ioengine=psync --rw=randwrite --bs=4k --size=4M \\
    --verify=crc32c --output-format=terse > /tmp/fio.out
mkfs.ext4 -q -F -b 4096 /dev/vdb
mount -t ext4 /dev/vdb /mnt
echo four-k > /mnt/f
umount /mnt
e2fsck -fn /dev/vdb
`,
        timeoutMs: 180_000,
      });
      ok(r, [ro, bb]);
      assert.equal(field(r.output, 'RO'), '1');
      assert.doesNotMatch(r.output, /RO-WRITE-SUCCEEDED/);
      // The guest read the image's first sector through the read-only device: the 0x5a
      // sector writeAndGet put there.
      assert.equal(field(r.output, 'RO-HEAD'), createHash('md5').update(Buffer.alloc(512, FIRST_SECTOR_BYTE)).digest('hex'));
      assert.equal(field(r.output, 'LBS'), '4096');
      // blk_size × 2^physical_block_exp, and vblk serve advertises an exponent of 0.
      assert.equal(field(r.output, 'PBS'), '4096');
      assert.equal(createHash('sha256').update(readFileSync(roImage)).digest('hex'), roHash, 'the read-only image is unchanged');
      assert.equal(debugfsCat(bigBlock, '/f').toString(), 'four-k\n');
    } finally {
      await ro.stop();
      await bb.stop();
    }
  });
});

/** Writes a recognisable first sector and returns the path. */
function writeAndGet(path: string): string {
  const head = Buffer.alloc(512, FIRST_SECTOR_BYTE);
  writeFileSync(path, head);
  return path;
}
