// `vblk serve` on a qcow2 overlay over a raw base, driven by vblk's own vhost-user
// frontend (`vblk read`, `vblk write`, `vblk resize`): the startup line names the format
// and the chain, reads fall through to the base, writes land in the overlay only, a
// resize grows the virtual disk, and the image is clean afterwards (qemu-img check when
// installed). Guest and qemu-img-driven tests of qcow2 live in test/e2e/.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeer } from '../scripts/guest/guest.js';
import { imageInfo } from '../src/cli/image-info.js';
import { runCli, scratchDir, startServe } from './e2e/serve-helpers.js';

const qemuSkip = requirePeer('qemu-img');

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-serve-qcow2-');
});
after(() => scratch.cleanup());

async function cli(...args: string[]): Promise<Buffer> {
  const r = await runCli(args);
  assert.equal(r.code, 0, `vblk ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

test('serve an overlay: format and chain logged, reads from the base, writes to the overlay, resize, clean after', async () => {
  const base = join(scratch.dir, 'base.raw');
  const baseBytes = new Uint8Array(1 << 20).map((_, i) => (i * 7 + 3) & 0xff);
  writeFileSync(base, baseBytes);
  const overlay = join(scratch.dir, 'overlay.qcow2');
  await cli('image', 'create', '--backing', 'base.raw', '--backing-format', 'raw', overlay);
  const sock = join(scratch.dir, 'o.sock');
  const control = join(scratch.dir, 'o.ctl');
  const served = await startServe(overlay, sock, ['--control', control]);
  try {
    assert.match(served.log(), new RegExp(`serving .*overlay\\.qcow2 \\(qcow2, backing ${base.replace(/[.]/g, '\\.')} \\(raw\\), 1048576 bytes\\) on `));
    assert.deepEqual(new Uint8Array(await cli('read', '--socket', sock, '--offset', '4096', '--length', '8192')), baseBytes.subarray(4096, 12288));
    const data = join(scratch.dir, 'data');
    writeFileSync(data, new Uint8Array(65536).fill(0xa5));
    await cli('write', '--socket', sock, '--offset', '65536', '--input', data);
    const back = new Uint8Array(await cli('read', '--socket', sock, '--offset', '0', '--length', String(3 * 65536)));
    assert.deepEqual(back.subarray(0, 65536), baseBytes.subarray(0, 65536));
    assert.deepEqual(back.subarray(65536, 131072), new Uint8Array(65536).fill(0xa5));
    assert.deepEqual(back.subarray(131072), baseBytes.subarray(131072, 196608));
    await cli('resize', '--control', control, '2M');
    const past = new Uint8Array(await cli('read', '--socket', sock, '--offset', String((1 << 20) + 4096), '--length', '4096'));
    assert.deepEqual(past, new Uint8Array(4096));
  } finally {
    assert.equal(await served.stop(), 0);
  }
  assert.deepEqual(new Uint8Array(readFileSync(base)), baseBytes, 'the base is never written');
  assert.equal(imageInfo(overlay).virtualSize, 2 << 20);
  if (!qemuSkip) {
    const check = spawnSync('qemu-img', ['check', overlay], { encoding: 'utf8' });
    assert.equal(check.status, 0, check.stdout + check.stderr);
  }
});

test('serve --read-only a qcow2 image leaves the file byte for byte unchanged', { skip: qemuSkip }, async () => {
  const image = join(scratch.dir, 'ro.qcow2');
  await cli('image', 'create', image, '1M');
  spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', image]);
  const before = readFileSync(image);
  const sock = join(scratch.dir, 'ro.sock');
  const served = await startServe(image, sock, ['--read-only', '--format', 'qcow2']);
  try {
    assert.match(served.log(), /\(qcow2, 1048576 bytes, read-only\)/);
    assert.deepEqual(new Uint8Array(await cli('read', '--socket', sock, '--offset', '0', '--length', '512')), new Uint8Array(512).fill(0x5a));
    const data = join(scratch.dir, 'ro-data');
    writeFileSync(data, new Uint8Array(512).fill(1));
    const r = await runCli(['write', '--socket', sock, '--offset', '0', '--input', data]);
    assert.notEqual(r.code, 0, 'a write to a read-only disk fails');
  } finally {
    assert.equal(await served.stop(), 0);
  }
  assert.deepEqual(readFileSync(image), before);
});

test('serve --format raw serves a raw image holding the qcow2 magic as raw; probing it is refused with one line', async () => {
  const image = join(scratch.dir, 'magic.raw');
  const bytes = new Uint8Array(1 << 20);
  bytes.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
  writeFileSync(image, bytes);
  const probed = await runCli(['serve', image, '--socket', join(scratch.dir, 'm1.sock')]);
  assert.equal(probed.code, 1);
  assert.match(probed.stderr, /^vblk serve: .*magic\.raw: .*\n$/);
  const sock = join(scratch.dir, 'm2.sock');
  const served = await startServe(image, sock, ['--format', 'raw']);
  try {
    assert.match(served.log(), /\(raw, 1048576 bytes\)/);
    assert.deepEqual(new Uint8Array(await cli('read', '--socket', sock, '--offset', '0', '--length', '512')), bytes.subarray(0, 512));
  } finally {
    assert.equal(await served.stop(), 0);
  }
});
