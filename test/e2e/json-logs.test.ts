// `vblk serve --log-format json` through what an operator's log shipper sees: a guest's
// I/O, a live resize and a backend restart under the guest. Every line of both
// processes is one JSON object with the stable keys.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { GUEST_PEERS, ensureGuest, requirePeer, startGuest, type Guest } from '../../scripts/guest/guest.js';
import { runCli, scratchDir, startServe, type Served } from './serve-helpers.js';

const MiB = 1024 * 1024;

describe('vblk serve --log-format json with a Linux guest', { skip: requirePeer(...GUEST_PEERS) }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-json-logs-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('every line of a run with a resize and a restart parses as JSON with time, level, msg and socket', { timeout: 300_000 }, async () => {
    const image = join(scratch.dir, 'disk.img');
    const socket = join(scratch.dir, 'vblk.sock');
    const control = join(scratch.dir, 'control.sock');
    const args = ['--size', '64M', '--queues', '1', '--control', control, '--log-format', 'json'];
    // startServe waits for the "serving … on" line, which is inside the JSON's msg.
    let serve: Served = await startServe(image, socket, args);
    const logs: string[] = [];
    let guest: Guest | undefined;
    try {
      guest = await startGuest({
        vhostUserSockets: [{ path: socket, numQueues: 1 }],
        reconnect: 1,
        timeoutMs: 240_000,
        script: `set -e
dd if=/dev/urandom of=/dev/vda bs=4k count=256 oflag=direct 2>/dev/null
echo WROTE
read -r line
# The resize reaches the guest as a config interrupt: wait for it, a bounded while.
for i in $(seq 300); do [ "$(cat /sys/block/vda/size)" = ${(96 * MiB) / 512} ] && break; sleep 0.1; done
echo "SIZE=$(cat /sys/block/vda/size)"
echo RESIZED
read -r line
dd if=/dev/vda of=/dev/null bs=4k count=256 iflag=direct 2>/dev/null
echo READ-BACK
`,
      });
      await guest.waitFor('WROTE', 120_000);
      const resized = await runCli(['resize', '--control', control, '96M']);
      assert.equal(resized.code, 0, resized.stderr);
      guest.send('resized');
      await guest.waitFor('RESIZED', 60_000);
      serve.proc.kill('SIGKILL');
      await serve.exited;
      logs.push(serve.log());
      serve = await startServe(image, socket, args);
      await serve.waitForLog(/frontend 1 connected/, 120_000);
      guest.send('go');
      const r = await guest.done;
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-30).join('\n')}`);
      assert.match(r.output, new RegExp(`SIZE=${(96 * MiB) / 512}`));
      await serve.stop();
      logs.push(serve.log());

      const lines = logs.join('').split('\n').filter((l) => l !== '');
      const parsed = lines.map((l) => {
        let v: unknown;
        assert.doesNotThrow(() => (v = JSON.parse(l)), `not JSON: ${l}`);
        return v as Record<string, unknown>;
      });
      for (const p of parsed) {
        assert.equal(typeof p.time, 'string', JSON.stringify(p));
        assert.ok(!Number.isNaN(Date.parse(p.time as string)), JSON.stringify(p));
        assert.ok(['info', 'warn', 'error'].includes(p.level as string), JSON.stringify(p));
        assert.equal(typeof p.msg, 'string', JSON.stringify(p));
        assert.equal(p.socket, socket, JSON.stringify(p));
      }
      const msgs = parsed.map((p) => p.msg as string);
      assert.ok(msgs.some((m) => /^resized to/.test(m)), msgs.join('\n'));
      assert.ok(parsed.some((p) => p.frontend === 1 && /connected/.test(p.msg as string)), 'connection lines carry the frontend');
      assert.ok(msgs.filter((m) => /^serving /.test(m)).length === 2, 'both processes logged in JSON');
    } finally {
      if (guest) await guest.kill();
      await serve.stop();
    }
  });
});
