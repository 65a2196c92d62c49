import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { checkQcow2, type Qcow2CheckResult } from './check.js';
import { createQcow2 } from './create.js';
import { INCOMPAT } from './header.js';
import { MemoryImageFile } from './memory-image-file.js';
import { repairQcow2 } from './repair.js';
import {
  MUTATIONS, Surgery, qemuCheck, qemuImg, qemuIo, qemuSkip, readImage, sameContents, tempDir, writeImage,
} from '../../../test/support/qcow2-images.js';

/** Damage a rebuild cannot undo: entries that point where no refcount makes them right (qemu-img cannot either). */
const UNREPAIRABLE = new Set(['a misaligned L2 entry', 'a misaligned L2 table', 'reserved bits in an L1 entry', 'reserved bits in an L2 entry']);

function qemuCounts(path: string): { corruptions: number; leaks: number; checkErrors: number } {
  const q = qemuCheck(path);
  return { corruptions: Number(q.corruptions ?? 0), leaks: Number(q.leaks ?? 0), checkErrors: Number(q['check-errors'] ?? 0) };
}

function counts(r: Qcow2CheckResult): { corruptions: number; leaks: number; checkErrors: number } {
  return { corruptions: r.corruptions, leaks: r.leaks, checkErrors: r.checkErrors };
}

/** Repairs the image at `path` in memory, writes it to `out`, and checks that qemu-img agrees with what the repair reports. */
async function repairAndCompare(path: string, out: string, readable = true): Promise<Qcow2CheckResult> {
  const file = readImage(path);
  const result = await repairQcow2(file);
  writeImage(out, file);
  assert.deepEqual(counts(result.after), qemuCounts(out), result.after.messages.join('\n'));
  if (readable) assert.ok(sameContents(path, out), 'the guest sees the same data');
  assert.deepEqual(counts(await checkQcow2(readImage(out))), counts(result.after), 'a second check agrees');
  return result.after;
}

describe('repairQcow2 leaves images qemu-img check finds clean', { skip: qemuSkip }, () => {
  test('each hand-made damage is repaired or reported', async (t) => {
    const dir = tempDir();
    try {
      const base = dir.file('base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '4G');
      qemuIo(base, 'write -P 1 0 128k', 'write -P 2 1M 64k');
      for (const [name, mutate] of MUTATIONS) {
        await t.test(name, async () => {
          const file = readImage(base);
          mutate(new Surgery(file));
          const mutated = dir.file('mutated.qcow2');
          writeImage(mutated, file);
          const before = qemuCounts(mutated);
          assert.ok(before.corruptions + before.leaks + before.checkErrors > 0, 'the damage shows');
          // qemu-img refuses to read through what cannot be repaired: no comparison of contents then.
          const after = await repairAndCompare(mutated, dir.file('repaired.qcow2'), !UNREPAIRABLE.has(name));
          if (UNREPAIRABLE.has(name)) assert.ok(after.corruptions > 0 && after.corruptions <= before.corruptions);
          else assert.equal(after.corruptions, 0);
          assert.equal(after.leaks, 0);
        });
      }
    } finally {
      dir.remove();
    }
  });

  test('an image with extended L2 entries and refcounts of 0 and 5', async () => {
    const dir = tempDir();
    try {
      const path = dir.file('x.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', path, '1G');
      qemuIo(path, 'write -P 1 0 4k', 'write -P 2 68k 8k', 'write -z 200k 8k', 'write -P 4 600M 64k');
      const file = readImage(path);
      const s = new Surgery(file);
      s.setStoredRefcount(s.u64(s.l2Table(0)) / s.clusterSize, 0);
      s.setStoredRefcount(s.u64(s.l2Table(0) + 16) / s.clusterSize, 5);
      const mutated = dir.file('mutated.qcow2');
      writeImage(mutated, file);
      assert.ok(qemuCounts(mutated).corruptions > 0);
      const after = await repairAndCompare(mutated, dir.file('repaired.qcow2'));
      assert.deepEqual(counts(after), { corruptions: 0, leaks: 0, checkErrors: 0 });
    } finally {
      dir.remove();
    }
  });

  test('a leaky image with persistent dirty bitmaps keeps them', async () => {
    const dir = tempDir();
    try {
      const path = dir.file('b.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', path, '1G');
      qemuImg('bitmap', '--add', '-g', '512', path, 'b1');
      qemuIo(path, 'write -P 1 0 1M', 'write -P 2 500M 64k');
      const file = readImage(path);
      const s = new Surgery(file);
      file.truncate(file.size + s.clusterSize);
      s.setStoredRefcount(Math.ceil(file.size / s.clusterSize) - 1, 1);
      const mutated = dir.file('mutated.qcow2');
      writeImage(mutated, file);
      assert.equal(qemuCounts(mutated).leaks, 1);
      const out = dir.file('repaired.qcow2');
      const after = await repairAndCompare(mutated, out);
      assert.deepEqual(counts(after), { corruptions: 0, leaks: 0, checkErrors: 0 });
      assert.match(qemuImg('info', out), /name: b1/);
    } finally {
      dir.remove();
    }
  });

  test('a lazy_refcounts image left dirty by a crash, with snapshots', async () => {
    const dir = tempDir();
    try {
      const path = dir.file('d.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', path, '64M');
      qemuIo(path, 'write -P 1 0 64k');
      qemuImg('snapshot', '-c', 'one', path);
      spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 3 0 1M', '-c', 'write -P 4 10M 256k', '-c', 'write -c -P 5 20M 4k', '-c', 'abort', path]);
      const before = await checkQcow2(readImage(path));
      assert.equal(before.dirty, true);
      assert.ok(before.leaks + before.corruptions > 0);
      const out = dir.file('repaired.qcow2');
      const after = await repairAndCompare(path, out);
      assert.deepEqual(counts(after), { corruptions: 0, leaks: 0, checkErrors: 0 });
      const header = readImage(out).bytes();
      assert.equal(new DataView(header.buffer).getUint32(76) & INCOMPAT.DIRTY, 0, 'the dirty bit is cleared');
      qemuImg('snapshot', '-a', 'one', out);
      qemuIo(out, 'read -P 1 0 64k');
    } finally {
      dir.remove();
    }
  });
});

test('a clean image is left alone', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 2 ** 30 });
  const bytes = file.bytes();
  const result = await repairQcow2(file);
  assert.equal(result.rebuilt, false);
  assert.deepEqual(file.bytes(), bytes);
});

test('a read-only file is refused with READ_ONLY', async () => {
  const image = new MemoryImageFile();
  await createQcow2(image, { size: 2 ** 20 });
  await assert.rejects(repairQcow2(new MemoryImageFile(image.bytes(), { readOnly: true })), { code: 'READ_ONLY' });
});

test('every write before the header switch lands past the old end of the file', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 2 ** 30, clusterSize: 4096 });
  const oldSize = file.size;
  const s = new Surgery(file);
  s.setStoredRefcount(0, 3); // a leak
  const writes: [number, number][] = [];
  file.onOperation = (op, offset, length) => { if (op === 'write') writes.push([offset, length]); };
  const result = await repairQcow2(file);
  assert.equal(result.leaksFixed, 1);
  const header = writes.findIndex(([offset]) => offset < 4096);
  assert.ok(header > 0);
  for (const [offset] of writes.slice(0, header)) assert.ok(offset >= oldSize, `write at ${offset} before the header switch`);
  assert.deepEqual(writes[header], [48, 12]);
});
