// `npm run demo`: the main job. Serves a fresh raw image with `vblk serve`, boots a
// minimal Linux guest in QEMU against it (vhost-user-blk-pci), and shows the guest using
// the disk: its size and serial, mkfs.ext4, files written and read back, fsck, fio —
// then reads the guest's file back out of the image on the host.
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ensureGuest, startGuest } from './guest/guest.js';
import { startServe } from '../test/e2e/serve-helpers.js';

const root = resolve(import.meta.dirname ?? '.', '../..');
const dir = join(root, '.cache', 'demo');
rmSync(dir, { recursive: true, force: true });
mkdirSync(dir, { recursive: true });
const image = join(dir, 'disk.img');
const socket = join(dir, 'vblk.sock');

const step = (s: string): void => console.log(`\n== ${s}`);

step('building the guest (kernel and initramfs from Debian packages; cached after the first run)');
await ensureGuest({ onProgress: (l) => console.log(`   ${l}`) });

step(`vblk serve ${image} --socket ${socket} --size 256M --queues 2 --serial vblk-demo`);
const serve = await startServe(image, socket, ['--size', '256M', '--queues', '2', '--serial', 'vblk-demo']);

step('booting Linux in QEMU (TCG) with -device vhost-user-blk-pci,num-queues=2; the guest says:');
const guest = await startGuest({
  vhostUserSockets: [{ path: socket, numQueues: 2 }],
  smp: 2,
  timeoutMs: 300_000,
  onOutput: (line) => {
    if (line.startsWith('+ ') || line.startsWith('guest: ')) console.log(`   ${line}`);
  },
  script: `set -e
say() { echo "guest: $*"; }
say "disk vda: $(cat /sys/block/vda/size) sectors, serial '$(cat /sys/block/vda/serial)', $(ls /sys/block/vda/mq | wc -l) queues"
say "mkfs.ext4 /dev/vda"; mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
echo "Hello from a Linux guest, stored by vblk." > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/random.bin bs=1M count=16 2>/dev/null
say "wrote /mnt/hello.txt and 16 MiB of random data, md5 $(md5sum /mnt/random.bin | cut -d' ' -f1)"
say "fio: 4 KiB random read/write with crc32c verification on both CPUs"
fio --name=demo --directory=/mnt --size=8M --rw=randrw --bs=4k --direct=1 --ioengine=psync \\
    --numjobs=2 --verify=crc32c --group_reporting --output-format=terse > /tmp/fio.out
say "fio: verified, $(cut -d';' -f 8 /tmp/fio.out) read IOPS and $(cut -d';' -f 49 /tmp/fio.out) write IOPS (TCG guest)"
umount /mnt
e2fsck -fn /dev/vda >/dev/null && say "e2fsck: clean"
`,
});
const r = await guest.done;
if (r.exitCode !== 0) {
  console.error(r.output.split('\n').slice(-30).join('\n'));
  console.error(`demo failed: the guest exited with ${r.exitCode} ${r.error ?? ''}`);
  await serve.stop();
  process.exit(1);
}

step('on the host, reading the file back out of the image with debugfs:');
console.log(`   ${execFileSync('debugfs', ['-R', 'cat /hello.txt', image], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim()}`);

step('vblk serve log:');
await serve.stop();
console.log(serve.log().trimEnd().split('\n').map((l) => `   ${l}`).join('\n'));
console.log(`\nDone: the guest booted in ${r.bootMs} ms and used the disk through vblk. Image: ${image}`);
