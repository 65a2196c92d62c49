// The read oracle: qcow2 images made by QEMU's own tools in every layout the format
// allows that matters to a reader (cluster sizes, compat levels, refcount widths, lazy
// refcounts, compression, subclusters, internal snapshots, backing chains), each read
// whole through a real `vblk serve` socket by our driver and compared byte for byte
// with what `qemu-img convert -O raw` makes of the same image.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeer } from '../../scripts/guest/guest.js';
import { assertDiskEqualsRaw, openDisk, QEMU_TOOLS, qemuImg, qemuIo, sha256File } from './qcow2-helpers.js';
import { scratchDir, startServe } from './serve-helpers.js';

const MiB = 1 << 20;
const SIZE = 64 * MiB;

/**
 * What every image holds, as qemu-io commands: random data over several clusters, writes
 * that cross a 64 KiB cluster boundary at unaligned offsets, single sectors (part of a
 * subcluster with extended L2 entries), zeroes written inside data, a discard inside
 * data, and the disk's last 4 KiB. `RANDOM` is a file of random bytes (qemu-io repeats it).
 */
function contents(random: string): string[] {
  return [
    `write -s ${random} 0 192k`,
    'write -P 0xa1 65024 1536',
    `write -P 0xa2 ${MiB} ${2 * MiB + 512}`,
    `write -P 0xa3 ${5 * MiB} 512`,
    `write -P 0xa4 ${5 * MiB + 8192 + 512} 4096`,
    `write -s ${random} ${8 * MiB} ${MiB}`,
    `write -z ${8 * MiB + 256 * 1024} 256k`,
    `write -P 0xa6 ${12 * MiB} ${MiB}`,
    `discard ${12 * MiB + 512 * 1024} 512k`,
    `write -P 0xa7 ${40 * MiB - 4096} 8192`,
    `write -P 0xa8 ${SIZE - 4096} 4096`,
  ];
}

interface ReadCase {
  readonly name: string;
  /** Builds the image (and anything under it) in `dir`; returns the path to serve. */
  build(dir: string, random: string): string;
  /** Serve it read-only; every case is, except where the case says why not. */
  readonly extraServeArgs?: readonly string[];
}

/** `qemu-img create -f qcow2 -o OPTS` with the common contents written by qemu-io. */
function created(name: string, options: string): ReadCase {
  return {
    name,
    build(dir, random) {
      const image = join(dir, 'disk.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', options, image, String(SIZE));
      qemuIo(image, 'qcow2', contents(random));
      return image;
    },
  };
}

/** The common contents in a raw image, converted with `qemu-img convert -c` and then partly overwritten. */
function compressed(name: string, compressionType: 'zlib' | 'zstd'): ReadCase {
  return {
    name,
    build(dir, random) {
      const raw = join(dir, 'source.raw');
      const image = join(dir, 'disk.qcow2');
      qemuImg('create', '-q', '-f', 'raw', raw, String(SIZE));
      qemuIo(raw, 'raw', contents(random));
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', `compression_type=${compressionType}`, raw, image);
      // QEMU itself rewrites part of a compressed cluster (it decompresses and reallocates it),
      // and writes one compressed cluster of its own.
      qemuIo(image, 'qcow2', [`write -P 0xb1 ${MiB + 1000} 3000`, `write -c -P 0xb2 ${20 * MiB} 64k`]);
      return image;
    },
  };
}

const CASES: readonly ReadCase[] = [
  created('cluster_size=4K', 'cluster_size=4096'),
  created('cluster_size=64K', 'cluster_size=65536'),
  created('cluster_size=2M', 'cluster_size=2M'),
  created('compat=0.10', 'compat=0.10'),
  created('compat=1.1, refcount_bits=1', 'compat=1.1,refcount_bits=1'),
  created('refcount_bits=16', 'refcount_bits=16'),
  created('refcount_bits=64', 'refcount_bits=64'),
  created('lazy_refcounts=on', 'lazy_refcounts=on'),
  created('extended_l2=on (subclusters)', 'extended_l2=on'),
  created('extended_l2=on, cluster_size=2M', 'extended_l2=on,cluster_size=2M'),
  compressed('convert -c (zlib)', 'zlib'),
  compressed('convert -c -o compression_type=zstd', 'zstd'),
  {
    name: 'lazy_refcounts=on, left dirty by a crash (qemu-io abort)',
    build(dir, random) {
      const image = join(dir, 'disk.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', image, String(SIZE));
      // qemu-io's `abort` ends it with abort(3) before it writes the refcounts back: the
      // image keeps its dirty bit and stale refcounts, which readers must not need.
      spawnAbort(image, [...contents(random), 'abort']);
      assert.match(qemuImg('info', image), /corrupt: false/);
      return image;
    },
  },
  {
    name: 'an internal snapshot, then more writes over it',
    build(dir, random) {
      const image = join(dir, 'disk.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', image, String(SIZE));
      qemuIo(image, 'qcow2', contents(random));
      qemuImg('snapshot', '-c', 'before', image);
      // Over shared clusters (refcount 2): whole, partial, zeroed and discarded.
      qemuIo(image, 'qcow2', [
        'write -P 0xc1 0 64k', 'write -P 0xc2 70000 5000', `write -z ${MiB} 64k`, `discard ${2 * MiB} 64k`, `write -P 0xc3 ${30 * MiB} 128k`,
      ]);
      assert.match(qemuImg('snapshot', '-l', image), /before/);
      return image;
    },
  },
  {
    name: 'a chain raw <- qcow2 <- qcow2 (relative backing names), data at every level',
    build(dir, random) {
      const base = join(dir, 'base.raw');
      const mid = join(dir, 'mid.qcow2');
      const top = join(dir, 'top.qcow2');
      qemuImg('create', '-q', '-f', 'raw', base, String(SIZE));
      qemuIo(base, 'raw', contents(random));
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', mid);
      // Partial clusters over the base's data, and zeroes over it.
      qemuIo(mid, 'qcow2', ['write -P 0x22 4096 8192', `write -P 0x22 ${MiB + 60000} 10000`, `write -z ${8 * MiB} 64k`, `write -P 0x22 ${50 * MiB} 64k`]);
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top);
      qemuIo(top, 'qcow2', ['write -P 0x33 6144 1024', `write -P 0x33 ${MiB + 65000} 2000`, `write -z ${12 * MiB} 64k`, `write -P 0x33 ${60 * MiB} 4096`]);
      return top;
    },
  },
];

/** Runs qemu-io with commands that end in `abort`: it dies of SIGABRT, as intended. */
function spawnAbort(image: string, commands: readonly string[]): void {
  const r = spawnSync('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image], { encoding: 'utf8' });
  assert.equal(r.signal, 'SIGABRT', `qemu-io was to abort: ${r.stderr}`);
}

describe('qcow2 images made by qemu-img and qemu-io read through vblk serve as qemu-img convert -O raw reads them', { skip: requirePeer(...QEMU_TOOLS) }, () => {
  let scratch: { dir: string; cleanup(): void };
  let random: string;
  before(() => {
    scratch = scratchDir('vblk-qcow2-read-');
    random = join(scratch.dir, 'random.bin');
    writeFileSync(random, randomFillSync(new Uint8Array(64 * 1024)));
  });
  after(() => scratch.cleanup());

  CASES.forEach((c, i) => {
    it(c.name, { timeout: 120_000 }, async (t) => {
      const dir = join(scratch.dir, `case-${i}`);
      mkdirSync(dir);
      const image = c.build(dir, random);
      const raw = join(dir, 'expected.raw');
      qemuImg('convert', '-O', 'raw', image, raw);
      const before = sha256File(image);
      const serve = await startServe(image, join(dir, 'vblk.sock'), ['--format', 'qcow2', '--read-only', ...(c.extraServeArgs ?? [])]);
      try {
        const disk = await openDisk(serve.socket);
        try {
          const digest = await assertDiskEqualsRaw(disk.driver, raw, c.name);
          assert.equal(digest, sha256File(raw));
          t.diagnostic(`sha256 ${digest.slice(0, 16)}… of ${SIZE / MiB} MiB, as qemu-img convert reads it`);
        } finally {
          await disk.close();
        }
      } finally {
        assert.equal(await serve.stop(), 0, `vblk serve did not exit cleanly:\n${serve.log()}`);
      }
      assert.equal(sha256File(image), before, 'serving the image read-only changed it');
      rmSync(raw);
    });
  });
});
