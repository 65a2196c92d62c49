// `vblk serve --backend MODULE`: a user's module is loaded, checked and served; a module
// that cannot be served stops `vblk serve` with one line; a backend that fails a request
// fails only that request (IOERR, a log line) and the server goes on serving.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { IoError } from '../src/blk/driver-errors.js';
import { connect } from '../src/node/connect.js';
import { runCli, scratchDir, startServeBackend } from './e2e/serve-helpers.js';

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-cli-serve-backend-');
});
after(() => scratch.cleanup());

/**
 * A RAM disk in plain JavaScript whose every sector reads as its number, that fails in
 * every way a backend can at chosen sectors: a synchronous throw, a rejection, a throw of
 * something that cannot even be printed, and a `readvSync`-style byte count for "done".
 */
const FLAKY = `
const SECTOR = 512;
export default function (options) {
  const size = Number(options.sectors) * SECTOR;
  const stored = new Map();
  return {
    size, readOnly: false, canFlush: true, canDiscard: false, canWriteZeroes: false,
    read(offset, buffers) {
      const sector = offset / SECTOR;
      if (sector === 8) throw new Error('sector 8 is unreadable');
      if (sector === 16) return Promise.reject(new Error('sector 16 went away'));
      if (sector === 24) throw Object.create(null);
      let at = offset;
      for (const b of buffers) {
        for (let i = 0; i < b.length; i++, at++) b[i] = stored.get(at) ?? (Math.floor(at / SECTOR) & 0xff);
      }
      return at - offset;
    },
    async write(offset, buffers) {
      if (offset / SECTOR === 40) throw new RangeError('sector 40 is write-protected');
      let at = offset;
      for (const b of buffers) for (const byte of b) stored.set(at++, byte);
    },
    flush() {}, discard() {}, writeZeroes() {}, close() {},
  };
}
`;

async function fails(args: string[], code: number, pattern: RegExp): Promise<void> {
  const r = await runCli(args);
  assert.equal(r.code, code, r.stderr);
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line, got:\n${r.stderr}`);
  assert.match(lines[0], pattern);
}

test('a failing request is IOERR and a log line naming it; the next requests are served', async () => {
  const flaky = join(scratch.dir, 'flaky.mjs');
  writeFileSync(flaky, FLAKY);
  const socket = join(scratch.dir, 'flaky.sock');
  const served = await startServeBackend(flaky, socket, ['--backend-opt', 'sectors=2048', '--queues', '1']);
  try {
    assert.match(served.log(), /serving backend module .*flaky\.mjs \(1048576 bytes\) on /);
    const disk = await connect(socket);
    try {
      const { driver } = disk;
      const read = async (sector: number): Promise<Uint8Array> => {
        const b = new Uint8Array(512);
        await driver.read(sector, [b]);
        return b;
      };
      for (const sector of [8, 16, 24]) await assert.rejects(read(sector), IoError, `sector ${sector}`);
      await assert.rejects(driver.write(40, [new Uint8Array(512)]), IoError);
      assert.deepEqual(await read(7), new Uint8Array(512).fill(7));
      await driver.write(9, [new Uint8Array(512).fill(0xab)]);
      assert.deepEqual(await read(9), new Uint8Array(512).fill(0xab));
      await driver.flush();
    } finally {
      await disk.close();
    }
    await served.waitForLog(/I\/O error \(read at sector 8\): sector 8 is unreadable$/);
    await served.waitForLog(/I\/O error \(read at sector 16\): sector 16 went away$/);
    await served.waitForLog(/I\/O error \(read at sector 24\): an error that cannot be printed$/);
    await served.waitForLog(/I\/O error \(write at sector 40\): sector 40 is write-protected$/);
  } finally {
    assert.equal(await served.stop(), 0, served.log());
  }
});

test('a module that cannot be served stops vblk serve with one line', async () => {
  const sock = join(scratch.dir, 'x.sock');
  const noFactory = join(scratch.dir, 'no-factory.mjs');
  writeFileSync(noFactory, 'export const backend = {};\n');
  const throwing = join(scratch.dir, 'throwing.mjs');
  writeFileSync(throwing, "export default (o) => { throw new Error(`url is required, got ${JSON.stringify(o)}`); };\n");
  await fails(['serve', '--backend', join(scratch.dir, 'missing.mjs'), '--socket', sock], 1, /^vblk serve: backend module .*missing\.mjs: no such file/);
  await fails(['serve', '--backend', noFactory, '--socket', sock], 1, /^vblk serve: backend module .*: its default export must be a function/);
  await fails(['serve', '--backend', throwing, '--socket', sock, '--backend-opt', 'a=1'], 1,
    /^vblk serve: backend module .*: its factory failed: url is required, got \{"a":"1"\}$/);
});

test('--backend and its options are checked before anything is loaded', async () => {
  const sock = join(scratch.dir, 'y.sock');
  const image = join(scratch.dir, 'disk.img');
  await fails(['serve', image, '--backend', './m.js', '--socket', sock], 2, /^vblk serve: give a SOURCE or --backend MODULE, not both$/);
  await fails(['serve', '--socket', sock], 2, /^vblk serve: expected one SOURCE \(an image or an NBD URI\) or --backend MODULE, got 0 arguments$/);
  await fails(['serve', image, '--socket', sock, '--backend-opt', 'a=1'], 2, /^vblk serve: --backend-opt needs --backend MODULE$/);
  await fails(['serve', '--backend', './m.js', '--socket', sock, '--size', '1M'], 2, /^vblk serve: --size creates or grows an image/);
  await fails(['serve', '--backend', './m.js', '--socket', sock, '--backend-opt', 'size'], 2, /^vblk serve: --backend-opt must be KEY=VALUE/);
});
