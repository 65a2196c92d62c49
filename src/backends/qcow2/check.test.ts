import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { checkQcow2, type Qcow2CheckResult } from './check.js';
import { createQcow2 } from './create.js';
import { MemoryImageFile } from './memory-image-file.js';
import {
  MUTATIONS, Surgery, qemuCheck, qemuImg, qemuIo, qemuSkip, readImage, tempDir, writeImage, type TempDir,
} from '../../../test/support/qcow2-images.js';

/** The fields both report, in qemu-img's JSON names (absent there means 0). */
function summary(r: Qcow2CheckResult): Record<string, number> {
  return {
    corruptions: r.corruptions, leaks: r.leaks, 'check-errors': r.checkErrors, 'image-end-offset': r.imageEndOffset,
    'total-clusters': r.totalClusters, 'allocated-clusters': r.allocatedClusters,
    'fragmented-clusters': r.fragmentedClusters, 'compressed-clusters': r.compressedClusters,
  };
}

function qemuSummary(path: string): Record<string, number> {
  const q = qemuCheck(path);
  const keys = ['corruptions', 'leaks', 'check-errors', 'image-end-offset', 'total-clusters', 'allocated-clusters', 'fragmented-clusters', 'compressed-clusters'];
  return Object.fromEntries(keys.map((k) => [k, Number(q[k] ?? 0)]));
}

export async function agrees(path: string): Promise<Qcow2CheckResult> {
  const ours = await checkQcow2(readImage(path));
  assert.deepEqual(summary(ours), qemuSummary(path), ours.messages.slice(0, 20).join('\n'));
  return ours;
}

function build(dir: TempDir, name: string, size: string, options: string, ...io: string[]): string {
  const path = dir.file(name);
  qemuImg('create', '-q', '-f', 'qcow2', '-o', options, path, size);
  if (io.length) qemuIo(path, ...io);
  return path;
}

const writes = ['write -P 1 0 200k', 'write -P 2 1M 64k', 'write -P 3 5M 4k', 'write -z 8M 64k', 'write -P 4 100M 128k', 'discard 1M 64k'];

describe('checkQcow2 agrees with qemu-img check', { skip: qemuSkip }, () => {
  test('clean images of several geometries after qemu-io writes', async () => {
    const dir = tempDir();
    try {
      for (const options of ['cluster_size=65536', 'cluster_size=512', 'cluster_size=4096,refcount_bits=1', 'cluster_size=2M,refcount_bits=64', 'compat=0.10', 'refcount_bits=8,lazy_refcounts=on']) {
        const path = build(dir, 'a.qcow2', '256M', options, ...writes);
        const r = await agrees(path);
        assert.equal(r.corruptions + r.leaks, 0, options);
      }
    } finally {
      dir.remove();
    }
  });

  test('extended L2 entries: subclusters, and broken subcluster bitmaps', async (t) => {
    const dir = tempDir();
    try {
      const path = build(dir, 'x.qcow2', '1G', 'extended_l2=on,cluster_size=65536', 'write -P 1 0 4k', 'write -P 2 68k 8k', 'write -z 200k 8k',
        'write -c -P 3 1M 64k', 'write -P 4 600M 64k', 'discard 68k 4k');
      const r = await agrees(path);
      assert.equal(r.corruptions + r.leaks, 0);
      const bitmap = (s: Surgery, index: number, zero: number, alloc: number): void => {
        const b = new Uint8Array(8);
        new DataView(b.buffer).setUint32(0, zero);
        new DataView(b.buffer).setUint32(4, alloc);
        s.file.write(s.l2Table(0) + index * 16 + 8, [b]);
      };
      const cases: [string, (s: Surgery) => void][] = [
        ['a subcluster both allocated and zero', (s) => bitmap(s, 0, 1, 1)],
        ['an unallocated cluster with allocated subclusters', (s) => bitmap(s, 5, 0, 3)],
        ['a compressed cluster with a bitmap', (s) => bitmap(s, 16, 0, 1)],
      ];
      for (const [name, mutate] of cases) {
        const file = readImage(path);
        mutate(new Surgery(file));
        const mutated = dir.file('mutated.qcow2');
        writeImage(mutated, file);
        await t.test(name, async () => {
          const ours = await agrees(mutated);
          assert.ok(ours.corruptions > 0);
        });
      }
    } finally {
      dir.remove();
    }
  });

  test('persistent dirty bitmaps hold clusters', async () => {
    const dir = tempDir();
    try {
      const path = build(dir, 'b.qcow2', '1G', 'cluster_size=65536');
      qemuImg('bitmap', '--add', path, 'b0');
      qemuImg('bitmap', '--add', '-g', '512', path, 'b1');
      qemuIo(path, 'write -P 1 0 1M', 'write -P 2 500M 64k');
      const r = await agrees(path);
      assert.equal(r.corruptions + r.leaks, 0);
    } finally {
      dir.remove();
    }
  });

  test('a sparse 1 TiB image written at both ends', async () => {
    const dir = tempDir();
    try {
      const path = build(dir, 't.qcow2', '1T', 'cluster_size=65536', 'write -P 1 0 64k', `write -P 2 ${2 ** 40 - 65536} 64k`);
      const r = await agrees(path);
      assert.equal(r.allocatedClusters, 2);
      assert.equal(r.totalClusters, 2 ** 24);
    } finally {
      dir.remove();
    }
  });

  test('internal snapshots share clusters, and COPIED follows', async () => {
    const dir = tempDir();
    try {
      const path = build(dir, 's.qcow2', '64M', 'cluster_size=4096', ...writes.slice(0, 3));
      qemuImg('snapshot', '-c', 'one', path);
      qemuIo(path, 'write -P 9 0 8k', 'write -P 8 20M 4k');
      qemuImg('snapshot', '-c', 'two', path);
      qemuIo(path, 'write -P 7 4k 4k');
      const r = await agrees(path);
      assert.equal(r.corruptions + r.leaks, 0);
    } finally {
      dir.remove();
    }
  });

  test('compressed clusters', async () => {
    const dir = tempDir();
    try {
      const path = build(dir, 'c.qcow2', '64M', 'cluster_size=65536', 'write -c -P 5 0 64k', 'write -c -P 6 128k 64k', 'write -P 7 1M 64k', 'write -c -P 0 2M 64k');
      const r = await agrees(path);
      assert.ok(r.compressedClusters >= 2);
    } finally {
      dir.remove();
    }
  });

  test('leaks, refcounts of 0, references into the header, past the end, misaligned', async (t) => {
    const dir = tempDir();
    try {
      const base = build(dir, 'base.qcow2', '4G', 'cluster_size=65536', 'write -P 1 0 128k', 'write -P 2 1M 64k');
      for (const [name, mutate] of MUTATIONS) {
        const file = readImage(base);
        mutate(new Surgery(file));
        const path = dir.file('mutated.qcow2');
        writeImage(path, file);
        await t.test(name, async () => {
          await agrees(path);
        });
      }
    } finally {
      dir.remove();
    }
  });

  test('a lazy_refcounts image left dirty by a crash', async () => {
    const dir = tempDir();
    try {
      const path = build(dir, 'd.qcow2', '64M', 'lazy_refcounts=on');
      spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 3 0 1M', '-c', 'write -P 4 10M 256k', '-c', 'abort', path]);
      const r = await agrees(path);
      assert.equal(r.dirty, true);
      assert.ok(r.leaks + r.corruptions > 0, 'the crash left refcounts behind');
    } finally {
      dir.remove();
    }
  });
});

test('create then check is clean and reads only metadata of a 1 TiB image', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 2 ** 40 });
  const r = await checkQcow2(file);
  assert.deepEqual(summary(r), {
    corruptions: 0, leaks: 0, 'check-errors': 0, 'image-end-offset': file.size, 'total-clusters': 2 ** 24,
    'allocated-clusters': 0, 'fragmented-clusters': 0, 'compressed-clusters': 0,
  });
});

test('progress runs from 0 to 1 without going back', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: 2 ** 30, clusterSize: 512 });
  const seen: number[] = [];
  await checkQcow2(file, { onProgress: (f) => seen.push(f) });
  assert.equal(seen[0], 0);
  assert.equal(seen.at(-1), 1);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] >= seen[i - 1], `${seen[i - 1]} then ${seen[i]}`);
});
