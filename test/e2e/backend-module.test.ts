// `vblk serve --backend MODULE` in front of a real Linux guest: the two examples, loaded
// as a user would load them (the compiled modules, options as --backend-opt), used by the
// guest's own virtio_blk driver. The HTTP image is read through a local range server;
// the snapshot RAM disk is written, flushed by the guest, and read back after vblk serve
// restarts from its snapshot.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GUEST_PEERS, ensureGuest, requirePeer, runGuest, type GuestResult } from '../../scripts/guest/guest.js';
import { pattern } from '../support/pattern.js';
import { startRangeServer } from '../support/range-server.js';
import { runCli, scratchDir, startServeBackend, type Served } from './serve-helpers.js';

const MiB = 1024 * 1024;
const EXAMPLES = resolve(dirname(fileURLToPath(import.meta.url)), '../../examples');

function ok(r: GuestResult, served: Served): void {
  assert.equal(r.exitCode, 0, `guest failed (${r.error ?? 'no error'}):\n${r.output.split('\n').slice(-40).join('\n')}\n--- vblk serve log:\n${served.log()}`);
}

function field(output: string, name: string): string {
  const m = new RegExp(`^${name}=(.*)$`, 'm').exec(output);
  assert.ok(m, `guest never printed ${name}=`);
  return m[1].trim();
}

const sha256 = (bytes: Uint8Array): string => createHash('sha256').update(bytes).digest('hex');

describe('vblk serve --backend with a Linux guest in QEMU', { skip: requirePeer(...GUEST_PEERS) }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-backend-module-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('the guest reads an HTTP image through examples/http-range-backend.js, and cannot write it', { timeout: 300_000 }, async () => {
    const image = pattern(8 * MiB, 5);
    const server = await startRangeServer(image);
    const socket = join(scratch.dir, 'http.sock');
    const served = await startServeBackend(join(EXAMPLES, 'http-range-backend.js'), socket, ['--backend-opt', `url=${server.url}`, '--queues', '1']);
    try {
      const r = await runGuest({
        vhostUserSockets: [{ path: socket, numQueues: 1 }],
        script: `set -e
echo "SIZE=$(cat /sys/block/vda/size)"
echo "RO=$(cat /sys/block/vda/ro)"
echo "SHA=$(sha256sum /dev/vda | cut -d' ' -f1)"
echo "TAIL=$(dd if=/dev/vda bs=4096 skip=2047 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
if dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; then echo WRITE-ACCEPTED; exit 3; fi
echo WRITE-REFUSED`,
      });
      ok(r, served);
      assert.equal(field(r.output, 'SIZE'), String(image.length / 512));
      assert.equal(field(r.output, 'RO'), '1');
      assert.equal(field(r.output, 'SHA'), sha256(image));
      assert.equal(field(r.output, 'TAIL'), sha256(image.subarray(image.length - 4096)));
      assert.match(r.output, /WRITE-REFUSED/);
      const gets = server.requests.filter((q) => q.method === 'GET');
      assert.ok(gets.length > 0 && gets.every((q) => q.range !== undefined && /^bytes=\d+-\d+$/.test(q.range)), 'every GET a range request');
    } finally {
      assert.equal(await served.stop(), 0, served.log());
      await server.close();
    }
  });

  it('the guest writes examples/custom-backend.js, flushes, and its bytes are in the snapshot and back after a restart', { timeout: 300_000 }, async () => {
    const snapshot = join(scratch.dir, 'ram.img');
    const socket = join(scratch.dir, 'ram.sock');
    const ramDisk = join(EXAMPLES, 'custom-backend.js');
    const first = await startServeBackend(ramDisk, socket, ['--backend-opt', `file=${snapshot}`, '--backend-opt', `size=${32 * MiB}`, '--queues', '1']);
    let wrote: string;
    try {
      const r = await runGuest({
        vhostUserSockets: [{ path: socket, numQueues: 1 }],
        script: `set -e
echo "SIZE=$(cat /sys/block/vda/size)"
dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
echo "WROTE=$(sha256sum /tmp/p | cut -d' ' -f1)"
dd if=/tmp/p of=/dev/vda bs=1M seek=1 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
echo "READ=$(dd if=/dev/vda bs=1M skip=1 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"`,
      });
      ok(r, first);
      assert.equal(field(r.output, 'SIZE'), String(32 * MiB / 512));
      wrote = field(r.output, 'WROTE');
      assert.equal(field(r.output, 'READ'), wrote, 'the guest read back what it wrote');
      // The guest's fsync was a FLUSH, and the backend's flush saved the snapshot.
      assert.equal(sha256(readFileSync(snapshot).subarray(MiB, 5 * MiB)), wrote);
    } finally {
      assert.equal(await first.stop(), 0, first.log());
    }
    const second = await startServeBackend(ramDisk, socket, ['--backend-opt', `file=${snapshot}`]);
    try {
      const read = await runCli(['read', '--socket', socket, '--offset', '1M', '--length', '4M']);
      assert.equal(read.code, 0, read.stderr);
      assert.equal(sha256(read.stdout), wrote);
    } finally {
      assert.equal(await second.stop(), 0, second.log());
    }
  });
});
