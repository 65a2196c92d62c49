// The copy-on-write filter over a real image file opened read-only, its overlay in a
// scratch file, driven by the driver through the loopback: the guest sees its writes,
// and the image file is byte-identical afterwards.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { applyFilters, parseFilterSpec } from '../src/backends/filters/registry.js';
import { openFileBackend } from '../src/node/file-backend.js';
import { openLoopbackDisk } from '../src/testing/loopback.js';
import { pattern } from './support/pattern.js';

const SIZE = 4 << 20;
const SECTOR = 512;

test('a read-only image under cow:file= serves writes, discards and zeroes, and stays byte-identical', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-cow-'));
  try {
    const image = join(dir, 'base.img');
    const original = pattern(SIZE, 11);
    writeFileSync(image, original);
    const base = openFileBackend(image, { readOnly: true, io: 'async' });
    const backend = applyFilters(base, [parseFilterSpec(`cow:block=64K,file=${join(dir, 'overlay.img')}`)], {
      openOverlayFile: (path, size) => openFileBackend(path, { size, io: 'async' }),
    });
    const disk = await openLoopbackDisk(backend);
    const model = original.slice();
    try {
      const d = disk.driver;
      assert.equal(d.readOnly, false);
      let seed = 1;
      const next = (n: number): number => {
        seed = (seed * 1103515245 + 12345) >>> 0;
        return seed % n;
      };
      for (let round = 0; round < 20; round++) {
        const ops: Promise<void>[] = [];
        // Each round's requests touch distinct 256 KiB slices, several at once.
        for (let slice = 0; slice < SIZE / (256 * 1024); slice++) {
          const sector = slice * 512 + next(400);
          const sectors = 1 + next(100);
          const kind = next(4);
          if (kind === 0) {
            const data = pattern(sectors * SECTOR, round * 100 + slice);
            model.set(data, sector * SECTOR);
            ops.push(d.write(sector, [data]));
          } else if (kind === 1) {
            model.fill(0, sector * SECTOR, (sector + sectors) * SECTOR);
            ops.push(d.discard([{ sector, sectors }]));
          } else if (kind === 2) {
            model.fill(0, sector * SECTOR, (sector + sectors) * SECTOR);
            ops.push(d.writeZeroes([{ sector, sectors }]));
          }
        }
        await Promise.all(ops);
      }
      await d.flush();
      const back = new Uint8Array(SIZE);
      for (let at = 0; at < SIZE; at += 1 << 20) await d.read(at / SECTOR, [back.subarray(at, at + (1 << 20))]);
      assert.deepEqual(back, model);
    } finally {
      await disk.close();
      await backend.close();
    }
    assert.deepEqual(new Uint8Array(readFileSync(image)), original, 'the image is byte-identical');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
