// `vblk serve --filter` under a real guest: injected errors reach the guest on exactly the
// chosen sectors, and a copy-on-write overlay takes a filesystem's writes while the base
// image stays byte-identical.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_PEERS, ensureGuest, peerPath, requirePeer, runGuest } from '../../scripts/guest/guest.js';
import { scratchDir, startServe, type Served } from './serve-helpers.js';

const MiB = 1024 * 1024;
const sha256 = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex');

describe('vblk serve --filter with a Linux guest', { skip: requirePeer(...GUEST_PEERS, 'mkfs.ext4') }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-filters-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('error: the guest\'s reads fail on exactly the chosen sectors and nowhere else', { timeout: 300_000 }, async () => {
    const image = join(scratch.dir, 'errors.img');
    const socket = join(scratch.dir, 'errors.sock');
    // 4 KiB at 1 MiB + 40 KiB: block 266 of the first 2 MiB, in 4 KiB blocks.
    const first = (MiB + 40 * 1024) / 512;
    let serve: Served | undefined;
    try {
      serve = await startServe(image, socket, ['--size', '16M', '--queues', '1', '--filter', `error:ops=read,sectors=${first}-${first + 7}`]);
      const r = await runGuest({
        vhostUserSockets: [{ path: socket, numQueues: 1 }],
        timeoutMs: 240_000,
        script: `
i=0
while [ $i -lt 512 ]; do
  dd if=/dev/vda of=/dev/null bs=4k skip=$i count=1 iflag=direct 2>/dev/null || echo "READ-FAILED $i"
  i=$((i+1))
done
# Writes are not chosen: they succeed on those sectors too.
dd if=/dev/zero of=/dev/vda bs=4k seek=266 count=1 oflag=direct 2>/dev/null && echo WRITE-OK
echo SCANNED
`,
      });
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-30).join('\n')}`);
      assert.match(r.output, /SCANNED/);
      const failed = [...r.output.matchAll(/^READ-FAILED (\d+)$/gm)].map((m) => Number(m[1]));
      assert.deepEqual(failed, [266], `the guest's failed reads (4 KiB blocks):\n${serve.log()}`);
      assert.match(r.output, /WRITE-OK/);
      assert.match(serve.log(), /injected error/);
    } finally {
      await serve?.stop();
    }
  });

  it('stats, delay and throttle stacked: a guest writes and reads back its data through them', { timeout: 300_000 }, async () => {
    const image = join(scratch.dir, 'stacked.img');
    const socket = join(scratch.dir, 'stacked.sock');
    let serve: Served | undefined;
    try {
      serve = await startServe(image, socket, ['--size', '32M', '--queues', '1',
        '--filter', 'stats', '--filter', 'delay:read=1ms,write=2ms', '--filter', 'throttle:iops=3000,bps=16M']);
      const r = await runGuest({
        vhostUserSockets: [{ path: socket, numQueues: 1 }],
        timeoutMs: 240_000,
        script: `set -e
dd if=/dev/urandom of=/tmp/data bs=64k count=32 2>/dev/null
dd if=/tmp/data of=/dev/vda bs=64k oflag=direct 2>/dev/null
dd if=/dev/vda of=/tmp/back bs=64k count=32 iflag=direct 2>/dev/null
cmp /tmp/data /tmp/back
echo STACK-OK
`,
      });
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-30).join('\n')}\n${serve.log()}`);
      assert.match(r.output, /STACK-OK/);
      assert.match(serve.log(), /through stats → delay:read=1ms,write=2ms → throttle:iops=3000,bps=16M/);
    } finally {
      await serve?.stop();
    }
  });

  it('cow: a guest\'s filesystem over the overlay checks clean and the base stays byte-identical', { timeout: 300_000 }, async () => {
    const base = join(scratch.dir, 'base.img');
    const socket = join(scratch.dir, 'cow.sock');
    writeFileSync(base, '');
    truncateSync(base, 64 * MiB);
    execFileSync(peerPath('mkfs.ext4')!, ['-q', '-F', base]);
    const before = sha256(base);
    let serve: Served | undefined;
    try {
      serve = await startServe(base, socket, ['--queues', '1', '--filter', 'cow']);
      const r = await runGuest({
        vhostUserSockets: [{ path: socket, numQueues: 1 }],
        timeoutMs: 240_000,
        script: `set -e
mount /dev/vda /mnt
dd if=/dev/urandom of=/mnt/data bs=1M count=8 2>/dev/null
sha256sum /mnt/data > /tmp/sum
mkdir /mnt/dir && echo hello > /mnt/dir/file
umount /mnt
e2fsck -fn /dev/vda
mount /dev/vda /mnt
sha256sum -c /tmp/sum
cat /mnt/dir/file
umount /mnt
echo COW-OK
`,
      });
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-30).join('\n')}\n${serve.log()}`);
      assert.match(r.output, /COW-OK/);
      assert.match(r.output, /hello/);
    } finally {
      await serve?.stop();
    }
    assert.equal(sha256(base), before, 'the base image changed');
  });
});
