// `vblk serve` on qcow2 images in front of a real Linux guest (QEMU's vhost-user-blk-pci
// and the guest's own virtio_blk driver), two disks in one VM:
// - vda: an empty qcow2 (64 KiB clusters, made by qemu-img) on two queues: fio with
//   crc32c verification on both queues for a stated time, mkfs.ext4, files, fstrim (the
//   qcow2 file's allocated blocks must drop), a live resize through the control socket,
//   a reboot, and the files again;
// - vdb: a qcow2 overlay of a raw base holding an ext4 filesystem made on the host: the
//   guest checks it, reads the base's file, writes its own, trims.
// Afterwards qemu-img check finds both images clean, the host reads the guest's files
// out of `qemu-img convert -O raw` of each image, and the base is byte for byte what it was.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_PEERS, requirePeer, startGuest, ensureGuest, type GuestResult } from '../../scripts/guest/guest.js';
import { allocatedBytes, QEMU_TOOLS, qemuImg, qemuImgCheck, sha256File } from './qcow2-helpers.js';
import { runCli, scratchDir, startServe, type Served } from './serve-helpers.js';

const MiB = 1 << 20;
/** How long fio runs its verified random writes on vda's two queues, in whole runs of 4 MiB per job. */
const FIO_SECONDS = 20;

function ok(r: GuestResult, served: Served[]): void {
  assert.equal(r.exitCode, 0, `guest failed (${r.error ?? 'no error'}):\n${r.output.split('\n').slice(-60).join('\n')}\n` +
    served.map((s) => `--- vblk serve log:\n${s.log()}`).join('\n'));
}

function field(output: string, name: string): string {
  const m = new RegExp(`^${name}=(.*)$`, 'm').exec(output);
  assert.ok(m, `guest never printed ${name}=`);
  return m[1].trim();
}

/** A file's bytes, read with debugfs out of the raw conversion of a (qcow2) image. */
function debugfsCat(image: string, path: string, scratch: string): Buffer {
  const raw = join(scratch, 'debugfs.raw');
  qemuImg('convert', '-O', 'raw', image, raw);
  return execFileSync('debugfs', ['-R', `cat ${path}`, raw], { stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 64 * MiB });
}

const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex');

describe('vblk serve on qcow2 images with a Linux guest in QEMU', { skip: requirePeer(...GUEST_PEERS, ...QEMU_TOOLS, 'debugfs', 'mke2fs') }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-qcow2-guest-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it(`an empty qcow2 and an overlay of a populated base: fio verify for ${FIO_SECONDS} s on two queues, ext4, fstrim, live resize, reboot; qemu-img check clean`, { timeout: 900_000 }, async (t) => {
    const dir = scratch.dir;
    const empty = join(dir, 'empty.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', empty, '128M');
    // The base: an ext4 filesystem made on the host with one file in it.
    const content = join(dir, 'content');
    mkdirSync(content);
    const baseFile = randomFillSync(new Uint8Array(3 * MiB + 123));
    writeFileSync(join(content, 'from-base.bin'), baseFile);
    const base = join(dir, 'base.raw');
    execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', content, base, '64M']);
    const baseHash = sha256File(base);
    const overlay = join(dir, 'overlay.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', overlay);

    const control = join(dir, 'control.sock');
    const a = await startServe(empty, join(dir, 'a.sock'), ['--format', 'qcow2', '--queues', '2', '--control', control, '--serial', 'qcow2-empty']);
    const b = await startServe(overlay, join(dir, 'b.sock'), ['--format', 'qcow2', '--queues', '1']);
    const served = [a, b];
    let output = '';
    try {
      const boot1 = `set -e
echo "SIZE=$(cat /sys/block/vda/size)"
echo "MQ=$(ls /sys/block/vda/mq | wc -l)"
# Verified random writes from both CPUs (so both queues), run after run for ${FIO_SECONDS} s.
end=$(( $(date +%s) + ${FIO_SECONDS} ))
runs=0
while :; do
  fio --name=q --filename=/dev/vda --direct=1 --ioengine=psync --rw=randwrite --bs=4k --size=4M \\
      --offset_increment=32M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \\
      --verify=crc32c --do_verify=1 --randseed=$runs --output-format=terse > /tmp/fio.out
  runs=$((runs + 1))
  [ "$(date +%s)" -lt "$end" ] || break
done
echo "FIO-RUNS=$runs"
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
echo "hello from the guest" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/random.bin bs=64k count=64 2>/dev/null
echo "MD5=$(md5sum /mnt/random.bin | cut -d' ' -f1)"
dd if=/dev/urandom of=/mnt/big.bin bs=1M count=40 2>/dev/null
sync
# The overlay: the host's filesystem and file, then the guest's own.
e2fsck -fn /dev/vdb
mkdir /b
mount -t ext4 /dev/vdb /b
echo "BASE-MD5=$(md5sum /b/from-base.bin | cut -d' ' -f1)"
dd if=/dev/urandom of=/b/guest.bin bs=64k count=32 2>/dev/null
echo "GUEST-MD5=$(md5sum /b/guest.bin | cut -d' ' -f1)"
dd if=/dev/urandom of=/b/scratch.bin bs=1M count=8 2>/dev/null
sync
rm /b/scratch.bin
fstrim /b
umount /b
e2fsck -fn /dev/vdb
echo TRIM-READY
read -r go
rm /mnt/big.bin
sync
fstrim -v /mnt
# The qcow2 driver releases freed clusters once the metadata that dropped them is durable,
# at the next flush: an fsync of the device sends one.
dd if=/dev/null of=/dev/vda conv=notrunc,fsync 2>/dev/null
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
e2fsck -fn /dev/vda
mount -t ext4 /dev/vda /mnt
echo "BOOT2-HELLO=$(cat /mnt/hello.txt)"
echo "BOOT2-MD5=$(md5sum /mnt/random.bin | cut -d' ' -f1)"
umount /mnt
`;
      const guest = await startGuest({
        vhostUserSockets: [{ path: a.socket, numQueues: 2 }, { path: b.socket, numQueues: 1 }], smp: 2, script: [boot1, boot2], timeoutMs: 780_000,
      });
      await guest.waitFor('TRIM-READY', 600_000);
      const beforeTrim = allocatedBytes(empty);
      guest.send('go');
      await guest.waitFor('TRIM-DONE', 120_000);
      const afterTrim = allocatedBytes(empty);
      guest.send('go');
      await guest.waitFor('RESIZE-READY', 60_000);
      const resized = await runCli(['resize', '--control', control, '192M']);
      assert.equal(resized.code, 0, `vblk resize failed: ${resized.stderr}`);
      guest.send('go');
      const r = await guest.done;
      ok(r, served);
      output = r.output;
      t.diagnostic(`boot to script ${r.bootMs} ms; fio runs in ${FIO_SECONDS} s: ${field(r.output, 'FIO-RUNS')}; ` +
        `empty.qcow2 allocated before fstrim ${beforeTrim} bytes, after ${afterTrim}`);

      assert.equal(Number(field(r.output, 'SIZE')), 128 * MiB / 512);
      assert.equal(Number(field(r.output, 'MQ')), 2, 'two hardware queues');
      assert.ok(Number(field(r.output, 'FIO-RUNS')) >= 1);
      assert.ok(beforeTrim - afterTrim >= 30 * MiB, `fstrim freed only ${beforeTrim - afterTrim} bytes of the qcow2 file`);
      assert.equal(Number(field(r.output, 'NEWSIZE')), 192 * MiB / 512, 'the guest saw the resize without a reboot');
      assert.equal(r.boots, 2, 'the guest rebooted');
      assert.equal(Number(field(r.output, 'BOOT2-SIZE')), 192 * MiB / 512);
      assert.equal(field(r.output, 'BOOT2-HELLO'), 'hello from the guest');
      assert.equal(field(r.output, 'BOOT2-MD5'), field(r.output, 'MD5'));
      assert.equal(field(r.output, 'BASE-MD5'), md5(baseFile), 'the guest read the base\'s file through the overlay');
    } finally {
      for (const s of served) assert.equal(await s.stop(), 0, `vblk serve did not exit cleanly:\n${s.log()}`);
    }
    for (const image of [empty, overlay]) {
      const check = qemuImgCheck(image);
      assert.deepEqual({ corruptions: check.corruptions, leaks: check.leaks, checkErrors: check.checkErrors }, { corruptions: 0, leaks: 0, checkErrors: 0 }, `${image}: ${check.text}`);
    }
    assert.match(qemuImg('info', empty), /virtual size: 192 MiB/);
    assert.equal(sha256File(base), baseHash, 'the base changed under its overlay');
    // The host reads what the guest wrote, out of each image as QEMU reads it.
    assert.equal(debugfsCat(empty, '/hello.txt', dir).toString(), 'hello from the guest\n');
    assert.equal(md5(debugfsCat(overlay, '/from-base.bin', dir)), md5(baseFile));
    assert.equal(md5(debugfsCat(overlay, '/guest.bin', dir)), field(output, 'GUEST-MD5'));
  });
});
