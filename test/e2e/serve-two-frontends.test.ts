// One `vblk serve` on two sockets, a real Linux guest in QEMU on one and our own driver
// on the other, both connected at the same time: what the driver wrote the guest reads,
// what the guest wrote (O_DIRECT, so from the disk) the driver reads, both keep doing
// I/O together, and a live resize reaches the guest and the driver alike.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import type { ResizeEvent } from '../../src/blk/driver.js';
import { connect } from '../../src/node/connect.js';
import { GUEST_PEERS, ensureGuest, requirePeer, startGuest } from '../../scripts/guest/guest.js';
import { pattern } from '../support/pattern.js';
import { waitUntil } from '../support/wait.js';
import { runCli, scratchDir, startServe } from './serve-helpers.js';

const MiB = 1024 * 1024;
const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex');

function field(output: string, name: string): string {
  const m = new RegExp(`^${name}=(\\S*)`, 'm').exec(output);
  assert.ok(m, `guest never printed ${name}=`);
  return m[1];
}

describe('vblk serve on two sockets: a Linux guest on one, our driver on the other', { skip: requirePeer(...GUEST_PEERS) }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-two-frontends-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('each reads what the other wrote while both do I/O, and a resize reaches both', { timeout: 300_000 }, async () => {
    const image = join(scratch.dir, 'disk.img');
    const guestSocket = join(scratch.dir, 'guest.sock');
    const driverSocket = join(scratch.dir, 'driver.sock');
    const control = join(scratch.dir, 'control.sock');
    const serve = await startServe(image, guestSocket, ['--socket', driverSocket, '--size', '64M', '--queues', '1', '--control', control]);
    const disk = await connect(driverSocket);
    try {
      // The driver's data, in place before the guest boots: 64 KiB at 32 MiB.
      const fromDriver = pattern(64 * 1024, 1);
      await disk.driver.write((32 * MiB) / 512, [fromDriver]);
      const guest = await startGuest({
        vhostUserSockets: [{ path: guestSocket, numQueues: 1 }],
        timeoutMs: 240_000,
        script: `set -e
echo "DRIVER-MD5=$(dd if=/dev/vda bs=64k skip=512 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/g bs=64k count=16 2>/dev/null
dd if=/tmp/g of=/dev/vda bs=64k oflag=direct 2>/dev/null
echo "GUEST-MD5=$(md5sum /tmp/g | cut -d' ' -f1)"
echo WROTE
read -r go
before=$(cat /sys/block/vda/size)
i=0
while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "NEWSIZE=$(cat /sys/block/vda/size)"
`,
      });
      // Our driver keeps writing and checking its own region at 40 MiB while the guest boots and writes.
      let rounds = 0;
      let stop = false;
      const busy = (async () => {
        while (!stop) {
          const block = pattern(4096, 100 + rounds);
          const sector = (40 * MiB) / 512 + 8 * (rounds % 64);
          await disk.driver.write(sector, [block]);
          const back = new Uint8Array(4096);
          await disk.driver.read(sector, [back]);
          assert.deepEqual(back, block, `driver round ${rounds}`);
          rounds++;
        }
      })();
      try {
        await guest.waitFor('WROTE', 180_000);
      } finally {
        stop = true;
        await busy;
      }
      assert.match(serve.log(), new RegExp(`${guestSocket}: frontend 1 connected`));
      assert.doesNotMatch(serve.log(), /disconnected|waiting/, 'both frontends stayed connected, neither waited');
      const output = guest.output();
      assert.equal(field(output, 'DRIVER-MD5'), md5(fromDriver), 'the guest read what our driver wrote');
      const written = new Uint8Array(MiB);
      await disk.driver.read(0, [written]);
      assert.equal(md5(written), field(output, 'GUEST-MD5'), 'our driver read what the guest wrote');

      const resizes: ResizeEvent[] = [];
      disk.driver.on('resize', (e) => resizes.push(e));
      const resized = await runCli(['resize', '--control', control, '96M']);
      assert.equal(resized.code, 0, resized.stderr);
      guest.send('go');
      const r = await guest.done;
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-30).join('\n')}\n${serve.log()}`);
      assert.equal(Number(field(r.output, 'NEWSIZE')), (96 * MiB) / 512, 'the guest saw the resize');
      await waitUntil(() => resizes.length > 0, { what: 'our driver to see the resize' });
      assert.equal(disk.driver.sizeBytes, 96 * MiB);
      assert.ok(rounds > 0, 'the driver did I/O while the guest ran');
    } finally {
      await disk.close();
      assert.equal(await serve.stop(), 0, serve.log());
    }
  });
});
