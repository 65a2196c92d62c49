import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createQcow2, Qcow2CreateError, type Qcow2CreateOptions } from './create.js';
import { MemoryImageFile } from './memory-image-file.js';
import { qemuCheck, qemuInfo, qemuSkip, tempDir, writeImage } from '../../../test/support/qcow2-images.js';

const TiB = 2 ** 40;

describe('createQcow2 makes images qemu-img accepts', { skip: qemuSkip }, () => {
  const cases: (Qcow2CreateOptions & { name: string })[] = [
    { name: 'default v3, 1 GiB', size: 2 ** 30 },
    { name: 'tiny, 512 B clusters', size: 512, clusterSize: 512 },
    { name: 'empty disk', size: 0 },
    { name: '1 TiB, 64 KiB clusters', size: TiB },
    { name: '1 TiB, 2 MiB clusters, 64-bit refcounts', size: TiB, clusterSize: 2 ** 21, refcountBits: 64 },
    { name: '64 MiB, 512 B clusters, 1-bit refcounts', size: 64 * 2 ** 20, clusterSize: 512, refcountBits: 1 },
    { name: '4 GiB, 512 B clusters, 64-bit refcounts (many refcount blocks)', size: 4 * 2 ** 30, clusterSize: 512, refcountBits: 64 },
    { name: '8 GiB, 4 KiB clusters, 2-bit refcounts', size: 8 * 2 ** 30, clusterSize: 4096, refcountBits: 2 },
    { name: '1 GiB, 4-bit refcounts', size: 2 ** 30, refcountBits: 4 },
    { name: '1 GiB, 8-bit refcounts', size: 2 ** 30, refcountBits: 8 },
    { name: '1 GiB, 32-bit refcounts', size: 2 ** 30, refcountBits: 32 },
    { name: 'v2 (compat 0.10), 10 GiB', size: 10 * 2 ** 30, version: 2 },
    { name: 'v2 with a backing file', size: 2 ** 30, version: 2, backingFile: 'base.qcow2', backingFormat: 'qcow2' },
    { name: 'v3 with a raw backing file, lazy refcounts', size: 2 ** 30, backingFile: 'base.raw', backingFormat: 'raw', lazyRefcounts: true },
    { name: 'no feature name table, 1 KiB clusters', size: 2 ** 20, clusterSize: 1024, featureNameTable: false },
    { name: '512 B clusters and a backing file: no room for the feature name table', size: 2 ** 20, clusterSize: 512, backingFile: 'base.qcow2', backingFormat: 'qcow2' },
  ];
  for (const options of cases) {
    test(options.name, async () => {
      const dir = tempDir();
      try {
        const file = new MemoryImageFile();
        await createQcow2(file, options);
        const clusterSize = options.clusterSize ?? 65536;
        const l1Bytes = Math.ceil(options.size / ((clusterSize / 8) * clusterSize)) * 8;
        assert.ok(file.size <= 8 * clusterSize + 2 * l1Bytes, `file of ${file.size} bytes`);
        if (options.backingFile) {
          const backing = new MemoryImageFile();
          if (options.backingFormat === 'qcow2') await createQcow2(backing, { size: options.size });
          writeImage(dir.file(options.backingFile), backing);
        }
        const path = dir.file('image.qcow2');
        writeImage(path, file);
        const check = qemuCheck(path);
        assert.equal(check['check-errors'] ?? 0, 0);
        assert.equal(check.corruptions ?? 0, 0);
        assert.equal(check.leaks ?? 0, 0);
        assert.equal(check["image-end-offset"], file.size);
        const info = qemuInfo(path);
        const specific = (info['format-specific'] as { data: Record<string, unknown> }).data;
        assert.equal(info.format, 'qcow2');
        assert.equal(info['virtual-size'], options.size);
        assert.equal(info['cluster-size'], options.clusterSize ?? 65536);
        assert.equal(specific.compat, options.version === 2 ? '0.10' : '1.1');
        assert.equal(specific['refcount-bits'], options.refcountBits ?? 16);
        if (options.version !== 2) assert.equal(specific['lazy-refcounts'], options.lazyRefcounts ?? false);
        assert.equal(info['backing-filename'], options.backingFile);
        assert.equal(info['backing-filename-format'], options.backingFormat);
      } finally {
        dir.remove();
      }
    });
  }
});

test('a 1 TiB image is a few clusters of metadata', async () => {
  const file = new MemoryImageFile();
  await createQcow2(file, { size: TiB });
  assert.equal(file.size, 4 * 65536);
});

test('createQcow2 refuses what qemu-img refuses, with a typed error', async () => {
  const bad: Qcow2CreateOptions[] = [
    { size: 1000 },
    { size: -512 },
    { size: 2 ** 30, clusterSize: 256 },
    { size: 2 ** 30, clusterSize: 3 * 65536 },
    { size: 2 ** 30, clusterSize: 4 * 2 ** 20 },
    { size: 2 ** 30, refcountBits: 128 },
    { size: 2 ** 30, refcountBits: 12 },
    { size: 2 ** 30, version: 2, refcountBits: 8 },
    { size: 2 ** 30, version: 2, lazyRefcounts: true },
    { size: TiB, clusterSize: 512 },
    { size: 2 ** 30, backingFormat: 'raw' },
    { size: 2 ** 30, backingFile: 'x'.repeat(1024) },
    { size: 2 ** 30, clusterSize: 512, backingFile: 'x'.repeat(400), backingFormat: 'raw' },
  ];
  for (const options of bad) {
    await assert.rejects(createQcow2(new MemoryImageFile(), options), (e: unknown) => e instanceof Qcow2CreateError && e.code === 'BAD_OPTION', JSON.stringify(options));
  }
});
