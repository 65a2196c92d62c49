// `vblk serve` and `vblk resize` refuse bad input with one line on stderr and a non-zero
// exit: what a user who mistyped something sees.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli, scratchDir, startServe } from './e2e/serve-helpers.js';
import { FakeNbdServer } from './support/fake-nbd-server.js';

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-cli-serve-');
});
after(() => scratch.cleanup());

async function fails(args: string[], pattern: RegExp): Promise<void> {
  const r = await runCli(args);
  assert.notEqual(r.code, 0, `expected a failure from vblk ${args.join(' ')}`);
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line, got:\n${r.stderr}`);
  assert.match(lines[0], pattern);
}

test('a missing image is refused unless --size creates it', async () => {
  const sock = join(scratch.dir, 'a.sock');
  await fails(['serve', join(scratch.dir, 'missing.img'), '--socket', sock], /^vblk serve: .*missing\.img/);
});

test('an image too small or not a multiple of 512 is refused', async () => {
  const small = join(scratch.dir, 'small.img');
  writeFileSync(small, Buffer.alloc(100));
  await fails(['serve', small, '--socket', join(scratch.dir, 'b.sock')], /^vblk serve: .*small\.img/);
  const odd = join(scratch.dir, 'odd.img');
  writeFileSync(odd, Buffer.alloc(1000));
  await fails(['serve', odd, '--socket', join(scratch.dir, 'c.sock')], /^vblk serve: .*512/);
});

test('a socket path already served by a live process is refused', async () => {
  // Two images: one image twice is refused by its lock before the socket is tried.
  const [image, other] = ['busy.img', 'busy-other.img'].map((name) => join(scratch.dir, name));
  for (const file of [image, other]) {
    writeFileSync(file, '');
    truncateSync(file, 1 << 20);
  }
  const sock = join(scratch.dir, 'busy.sock');
  const first = await startServe(image, sock);
  try {
    await fails(['serve', other, '--socket', sock], /^vblk serve: .*(address already in use|EADDRINUSE)/i);
  } finally {
    assert.equal(await first.stop(), 0);
  }
});

test('bad options say what to fix', async () => {
  const image = join(scratch.dir, 'opt.img');
  await fails(['serve', image], /^vblk serve: --socket PATH is required/);
  await fails(['serve', image, '--socket', 'x', '--queues', 'many'], /^vblk serve: --queues/);
  await fails(['serve', image, '--socket', 'x', '--queue-size', '100'], /^vblk serve: --queue-size must be a power of two/);
  await fails(['serve', image, '--socket', 'x', '--block-size', '1024'], /^vblk serve: --block-size/);
  await fails(['serve', image, '--socket', 'x', '--serial', 'x'.repeat(21)], /^vblk serve: --serial is at most 20 bytes/);
  await fails(['serve', image, '--socket', 'x', '--bogus'], /^vblk serve: .*--bogus/);
  await fails(['serve', image, '--socket', 'x', '--message-timeout', '0'], /^vblk serve: --message-timeout must be a positive number/);
  await fails(['serve', image, '--socket', 'x', '--message-timeout', '9999999'], /^vblk serve: --message-timeout is at most 2147483 seconds/);
  await fails(['resize', '--control', join(scratch.dir, 'none.ctl'), '1G'], /^vblk resize: .*control socket/);
  await fails(['resize', '--control', 'x', 'ten'], /^vblk resize: SIZE/);
});

test('serve --size creates a sparse image of that size and the socket is mode 0600', async () => {
  const image = join(scratch.dir, 'new.img');
  const sock = join(scratch.dir, 'new.sock');
  const s = await startServe(image, sock, ['--size', '1G']);
  try {
    assert.equal(statSync(image).size, 1 << 30);
    assert.ok(statSync(image).blocks * 512 < 1 << 20, 'sparse');
    assert.equal(statSync(sock).mode & 0o777, 0o600);
  } finally {
    assert.equal(await s.stop(), 0);
  }
  assert.match(s.log(), /SIGTERM: stopping/);
});

test('a final flush that fails at SIGTERM says so in one line, and the exit status is 1', async () => {
  const image = join(scratch.dir, 'flushfail.img');
  writeFileSync(image, new Uint8Array(1 << 20));
  const sock = join(scratch.dir, 'flushfail.sock');
  const s = await startServe(image, sock, ['--filter', 'error:ops=flush']);
  assert.equal(await s.stop(), 1);
  assert.match(s.log(), /SIGTERM: stopping\nvblk serve: the final flush failed, so data the guest wrote may not be on stable storage: .+\n$/);
  assert.doesNotMatch(s.log(), /stopped/);
});

test('NBD sources: a bad URI, an unreachable server, --size, and a block size below the export\'s minimum say what is wrong', async () => {
  const sock = join(scratch.dir, 'nbd.sock');
  await fails(['serve', 'nbd://host/e?bogus=1', '--socket', sock], /^vblk serve: not a usable NBD URI \(unknown query parameter 'bogus'/);
  await fails(['serve', 'nbd+unix:///e', '--socket', sock], /^vblk serve: not a usable NBD URI \(nbd\+unix:\/\/ needs \?socket=PATH\)/);
  const absent = join(scratch.dir, 'absent.nbd');
  await fails(['serve', `nbd+unix:///e?socket=${absent}`, '--socket', sock], /^vblk serve: cannot use nbd\+unix:\/\/\/e\?socket=.*absent\.nbd: connect ENOENT/);
  const fake = await FakeNbdServer.listen(join(scratch.dir, 'fake.nbd'), { size: 1 << 20, blockSizes: [4096, 4096, 1 << 20] });
  try {
    await fails(['serve', fake.uri, '--socket', sock, '--size', '1M'], /^vblk serve: --size is for image files/);
    await fails(['serve', fake.uri, '--socket', sock, '--block-size', '512'], /^vblk serve: a 512-byte block is below the export's 4096-byte minimum block/);
  } finally {
    await fake.close();
  }
});

test('an NBD export with a 4096-byte minimum block is served as a 4096-byte-block disk', async () => {
  const fake = await FakeNbdServer.listen(join(scratch.dir, 'fake4k.nbd'), { size: 1 << 20, blockSizes: [4096, 65536, 1 << 20] });
  const s = await startServe(fake.uri, join(scratch.dir, 'fake4k.sock'));
  try {
    const r = await runCli(['info', '--socket', s.socket]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout.toString(), /logical block size 4096, physical block size 65536/);
    assert.match(r.stdout.toString(), /io_min 65536/);
    // The fake advertises multi-conn: --queues (16) caps at 4 connections.
    assert.match(s.log(), /1048576 bytes, 4 connections, flags flush, fua, trim, zeroes, blocks 4096\/65536\/1048576/);
  } finally {
    assert.equal(await s.stop(), 0);
    await fake.close();
  }
});
