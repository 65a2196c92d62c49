// Our driver on the vhost-user frontend against a real `vblk serve` over a unix socket:
// the driver must read the limits the device advertises (config bytes 60-71 for secure
// erase) and split range requests so the device accepts every one of them.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openSocketDriver } from '../src/cli/socket-driver.js';
import { VIRTIO_BLK_F } from '../src/spec/virtio-blk.js';
import { pattern } from './support/pattern.js';
import { runCli, scratchDir, startServe } from './e2e/serve-helpers.js';

/** `vblk serve`'s default limit per range segment: just under 2 GiB, in 512-byte sectors. */
const SERVE_MAX_RANGE_SECTORS = 4194303;
const SERVE_MAX_RANGE_SEGMENTS = 256;
/** 2 GiB + 8 sectors: one segment more than the device takes, so the driver must split it. */
const BIG_RANGE = { sector: 0, sectors: 2 ** 31 / 512 + 8 };

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-serve-frontend-');
});
after(() => scratch.cleanup());

async function withServe(name: string, extra: string[], body: (socket: string) => Promise<void>): Promise<void> {
  const socket = join(scratch.dir, `${name}.sock`);
  const s = await startServe(join(scratch.dir, `${name}.img`), socket, ['--size', '3G', ...extra]);
  try {
    await body(socket);
  } finally {
    assert.equal(await s.stop(), 0, s.log());
  }
}

test('the driver reads the secure-erase limits vblk serve advertises over vhost-user', async () => {
  await withServe('limits', [], async (socket) => {
    const { driver, close } = await openSocketDriver(socket);
    try {
      assert.ok(driver.has(VIRTIO_BLK_F.SECURE_ERASE));
      assert.equal(driver.config.maxSecureEraseSectors, SERVE_MAX_RANGE_SECTORS);
      assert.equal(driver.config.maxSecureEraseSeg, SERVE_MAX_RANGE_SEGMENTS);
      assert.equal(driver.config.secureEraseSectorAlignment, 1);
    } finally {
      await close();
    }
  });
});

for (const op of ['secureErase', 'discard'] as const) {
  test(`a ${op} of 2 GiB + 8 sectors against vblk serve is split at the device's limits and succeeds`, async () => {
    await withServe(op, [], async (socket) => {
      const { driver, close } = await openSocketDriver(socket);
      try {
        // Data on both sides of the device's segment limit and of the range's end.
        const around = SERVE_MAX_RANGE_SECTORS - 7;
        const fill = pattern(32 * 512, 3);
        await driver.write(around, [fill]);
        await driver[op]([BIG_RANGE]);
        const back = new Uint8Array(fill.length);
        await driver.read(around, [back]);
        const erasedBytes = (BIG_RANGE.sectors - around) * 512;
        assert.deepEqual(back.subarray(0, erasedBytes), new Uint8Array(erasedBytes));
        assert.deepEqual(back.subarray(erasedBytes), fill.subarray(erasedBytes));
      } finally {
        await close();
      }
    });
  });
}

test('vblk info reports the secure-erase limits of vblk serve, in text and --json', async () => {
  await withServe('info', ['--block-size', '4096'], async (socket) => {
    const r = await runCli(['info', '--socket', socket, '--json']);
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(r.stdout.toString()) as Record<string, unknown>;
    // Limits in whole 4 KiB blocks, the alignment one block: what the device says.
    const limits = { max_sectors: SERVE_MAX_RANGE_SECTORS - (SERVE_MAX_RANGE_SECTORS % 8), max_segments: SERVE_MAX_RANGE_SEGMENTS, sector_alignment: 8 };
    assert.deepEqual(info.secure_erase, limits);
    assert.deepEqual(info.discard, limits);
    const text = await runCli(['info', '--socket', socket]);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout.toString(), /^ {2}secure erase: 4194296 sectors × 256 segments, alignment 8$/m);
  });
});
