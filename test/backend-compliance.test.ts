// One compliance suite for every BlockBackend (STYLE.md, principle 11): the memory
// backend, the file backend (synchronous and thread-pool I/O) and the NBD backend (in
// front of qemu-nbd with raw and qcow2 images, and nbdkit's memory plugin) must pass the
// same read / write / discard / write-zeroes / flush / resize / read-only / close tests,
// and a model-based property against a plain byte array. Resizing is tested where the
// backend can resize (NBD cannot: its resize extension is experimental).
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import type { BlockBackend } from '../src/backends/backend.js';
import { MEMORY_CHUNK_SIZE, MemoryBackend } from '../src/backends/memory-backend.js';
import { openFileBackend, type FileIoMode } from '../src/node/file-backend.js';
import { openNbdBackend } from '../src/node/nbd-backend.js';
import { requirePeer } from '../scripts/guest/guest.js';
import { startNbdkit, startQemuNbd, type NbdServer } from './support/nbd-servers.js';
import { execFileSync } from 'node:child_process';

interface Made {
  readonly backend: BlockBackend;
  /** The same storage reopened read-only (after `backend` is closed), or a read-only twin. */
  readOnly(): Promise<BlockBackend>;
  cleanup(): void;
}

interface Factory {
  readonly name: string;
  make(size: number): Made | Promise<Made>;
  /** A reason to skip (a missing peer), or false. */
  readonly skip?: string | false;
  /** Whether the backend implements resize (default true). */
  readonly resizable?: boolean;
  /**
   * Whether a discarded range reads as zeroes (default true). NBD's trim promises nothing
   * ("a client MUST NOT make any assumptions about the contents of the export affected"):
   * a qcow2 export keeps the data of clusters a trim covers only in part.
   */
  readonly discardZeroes?: boolean;
}

function fileFactory(io: FileIoMode): Factory {
  return {
    name: `file backend (${io})`,
    make(size) {
      const dir = mkdtempSync(join(tmpdir(), 'vblk-compliance-'));
      const path = join(dir, 'disk.img');
      const backend = openFileBackend(path, { size, io });
      return {
        backend,
        async readOnly() {
          await backend.close();
          return openFileBackend(path, { readOnly: true, io });
        },
        cleanup: () => rmSync(dir, { recursive: true, force: true }),
      };
    },
  };
}

const memoryFactory: Factory = {
  name: 'memory backend',
  make(size) {
    const backend = new MemoryBackend({ size });
    return {
      backend,
      async readOnly() {
        return new MemoryBackend({ size, readOnly: true });
      },
      cleanup: () => undefined,
    };
  },
};

const SIZE = 4 * MEMORY_CHUNK_SIZE;

function pattern(length: number, seed: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; i++) b[i] = (i * 131 + seed * 7 + 1) & 0xff;
  return b;
}

async function readBytes(b: BlockBackend, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length).fill(0xee);
  await b.read(offset, [out]);
  return out;
}

/** Whether `op` fails, by throwing or by rejecting. */
async function fails(op: () => unknown, code?: string): Promise<boolean> {
  try {
    await op();
    return false;
  } catch (e) {
    return code === undefined || (e as { code?: string }).code === code;
  }
}

/** The NBD backend in front of a server `start` runs on a fresh image of `size` bytes. */
function nbdFactory(name: string, skip: string | false, start: (dir: string, size: number) => Promise<NbdServer>): Factory {
  return {
    name, skip, resizable: false, discardZeroes: false,
    async make(size) {
      const dir = mkdtempSync(join(tmpdir(), 'vblk-compliance-nbd-'));
      const server = await start(dir, size);
      const backend = await openNbdBackend({ uri: server.uri });
      return {
        backend,
        async readOnly() {
          await backend.close();
          return openNbdBackend({ uri: server.uri, readOnly: true });
        },
        cleanup: () => {
          void server.stop().then(() => rmSync(dir, { recursive: true, force: true }));
        },
      };
    },
  };
}

const qemuNbd = requirePeer('qemu-nbd', 'qemu-img');
const nbdFactories: Factory[] = [
  nbdFactory('NBD backend, qemu-nbd raw', qemuNbd, (dir, size) => {
    const image = join(dir, 'disk.img');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, String(size)]);
    return startQemuNbd(image, join(dir, 'nbd.sock'));
  }),
  nbdFactory('NBD backend, qemu-nbd qcow2', qemuNbd, (dir, size) => {
    const image = join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
    return startQemuNbd(image, join(dir, 'nbd.sock'), { format: 'qcow2' });
  }),
  nbdFactory('NBD backend, nbdkit memory', requirePeer('nbdkit'), (dir, size) => startNbdkit(['memory', String(size)], join(dir, 'nbd.sock'))),
];

for (const factory of [memoryFactory, fileFactory('sync'), fileFactory('async'), fileFactory('auto'), fileFactory('mmap'), ...nbdFactories]) {
  describe(factory.name, { skip: factory.skip ?? false }, () => {
    const withBackend = (body: (m: Made) => Promise<void>) => async () => {
      const m = await factory.make(SIZE);
      try {
        await body(m);
      } finally {
        await m.backend.close();
        m.cleanup();
      }
    };

    test('reports its size and capabilities', withBackend(async ({ backend }) => {
      assert.equal(backend.size, SIZE);
      assert.equal(backend.readOnly, false);
      assert.ok(backend.canFlush && backend.canDiscard && backend.canWriteZeroes);
    }));

    test('a fresh disk reads as zeroes', withBackend(async ({ backend }) => {
      const a = new Uint8Array(512).fill(1);
      const b = new Uint8Array(MEMORY_CHUNK_SIZE).fill(1);
      await backend.read(MEMORY_CHUNK_SIZE - 512, [a, b]);
      assert.deepEqual(a, new Uint8Array(512));
      assert.deepEqual(b, new Uint8Array(MEMORY_CHUNK_SIZE));
    }));

    test('scatter/gather writes read back, across chunk boundaries', withBackend(async ({ backend }) => {
      const data = pattern(3 * 4096, 1);
      const at = MEMORY_CHUNK_SIZE - 4096;
      await backend.write(at, [data.subarray(0, 100), data.subarray(100, 5000), data.subarray(5000)]);
      const x = new Uint8Array(7000);
      const y = new Uint8Array(3 * 4096 - 7000);
      await backend.read(at, [x, y]);
      assert.deepEqual(x, data.subarray(0, 7000));
      assert.deepEqual(y, data.subarray(7000));
      assert.deepEqual(await readBytes(backend, at - 512, 512), new Uint8Array(512), 'neighbours untouched');
    }));

    test('the last sector can be written and read; nothing past the end', withBackend(async ({ backend }) => {
      await backend.write(SIZE - 512, [pattern(512, 2)]);
      assert.deepEqual(await readBytes(backend, SIZE - 512, 512), pattern(512, 2));
      assert.ok(await fails(() => backend.write(SIZE - 512, [new Uint8Array(1024)]), 'OUT_OF_RANGE'));
      assert.ok(await fails(() => backend.read(SIZE, [new Uint8Array(512)]), 'OUT_OF_RANGE'));
      assert.ok(await fails(() => backend.discard(SIZE - 512, 1024), 'OUT_OF_RANGE'));
      assert.ok(await fails(() => backend.writeZeroes(-512, 1024, false), 'OUT_OF_RANGE'));
      assert.equal(backend.size, SIZE);
    }));

    test('discard makes the range read as zeroes (where the backend promises it) and leaves its neighbours', withBackend(async ({ backend }) => {
      await backend.write(0, [pattern(SIZE, 3)]);
      await backend.discard(512, MEMORY_CHUNK_SIZE * 2);
      if (factory.discardZeroes !== false) {
        assert.deepEqual(await readBytes(backend, 512, MEMORY_CHUNK_SIZE * 2), new Uint8Array(MEMORY_CHUNK_SIZE * 2));
      }
      assert.deepEqual(await readBytes(backend, 0, 512), pattern(SIZE, 3).subarray(0, 512));
      const after = 512 + MEMORY_CHUNK_SIZE * 2;
      assert.deepEqual(await readBytes(backend, after, 512), pattern(SIZE, 3).subarray(after, after + 512));
    }));

    for (const unmap of [false, true]) {
      test(`write-zeroes (unmap ${unmap}) makes the range read as zeroes`, withBackend(async ({ backend }) => {
        await backend.write(0, [pattern(SIZE, 4)]);
        await backend.writeZeroes(MEMORY_CHUNK_SIZE, MEMORY_CHUNK_SIZE + 1024, unmap);
        assert.deepEqual(await readBytes(backend, MEMORY_CHUNK_SIZE, MEMORY_CHUNK_SIZE + 1024), new Uint8Array(MEMORY_CHUNK_SIZE + 1024));
        const end = 2 * MEMORY_CHUNK_SIZE + 1024;
        assert.deepEqual(await readBytes(backend, end, 512), pattern(SIZE, 4).subarray(end, end + 512));
        assert.deepEqual(await readBytes(backend, MEMORY_CHUNK_SIZE - 512, 512), pattern(SIZE, 4).subarray(MEMORY_CHUNK_SIZE - 512, MEMORY_CHUNK_SIZE));
      }));
    }

    test('flush completes', withBackend(async ({ backend }) => {
      await backend.write(0, [pattern(4096, 5)]);
      await backend.flush();
    }));

    test('resize grows the disk; the new part reads as zeroes; shrinking is refused', { skip: factory.resizable === false && 'this backend cannot resize' }, withBackend(async ({ backend }) => {
      assert.ok(backend.resize);
      await backend.resize(SIZE * 2);
      assert.equal(backend.size, SIZE * 2);
      assert.deepEqual(await readBytes(backend, SIZE * 2 - 4096, 4096), new Uint8Array(4096));
      await backend.write(SIZE * 2 - 512, [pattern(512, 6)]);
      assert.deepEqual(await readBytes(backend, SIZE * 2 - 512, 512), pattern(512, 6));
      assert.ok(await fails(() => backend.resize?.(SIZE), 'BAD_SIZE'));
      assert.ok(await fails(() => backend.resize?.(SIZE * 2 + 100), 'BAD_SIZE'));
      assert.equal(backend.size, SIZE * 2);
    }));

    test('a read-only backend reads but refuses writes, discards and write-zeroes', withBackend(async (m) => {
      await m.backend.write(0, [pattern(512, 7)]);
      await m.backend.flush();
      const ro = await m.readOnly();
      try {
        assert.equal(ro.readOnly, true);
        assert.ok(await fails(() => ro.write(0, [new Uint8Array(512)]), 'READ_ONLY'));
        assert.ok(await fails(() => ro.discard(0, 512), 'READ_ONLY'));
        assert.ok(await fails(() => ro.writeZeroes(0, 512, true), 'READ_ONLY'));
        if (ro !== m.backend && !(ro instanceof MemoryBackend)) {
          assert.deepEqual(await readBytes(ro, 0, 512), pattern(512, 7));
        }
      } finally {
        await ro.close();
      }
    }));

    test('after close every call fails', async () => {
      const m = await factory.make(SIZE);
      try {
        await m.backend.close();
        assert.ok(await fails(() => m.backend.read(0, [new Uint8Array(512)]), 'CLOSED'));
        assert.ok(await fails(() => m.backend.write(0, [new Uint8Array(512)]), 'CLOSED'));
        assert.ok(await fails(() => m.backend.flush(), 'CLOSED'));
      } finally {
        m.cleanup();
      }
    });

    test('property: any sequence of operations matches a plain byte-array model', withBackend(async ({ backend }) => {
      const model = new Uint8Array(SIZE);
      /** 1 where the model knows the content: all but what a discard left undefined. */
      const known = new Uint8Array(SIZE).fill(1);
      const matches = async (offset: number, length: number): Promise<void> => {
        const got = await readBytes(backend, offset, length);
        for (let i = 0; i < length; i++) if (known[offset + i] === 0) got[i] = model[offset + i];
        assert.deepEqual(got, model.subarray(offset, offset + length));
      };
      const sectors = SIZE / 512;
      const range = fc.tuple(fc.integer({ min: 0, max: sectors - 1 }), fc.integer({ min: 1, max: 300 }))
        .map(([s, n]) => [s * 512, Math.min(n, sectors - s) * 512] as const);
      const op = fc.oneof(
        fc.tuple(fc.constant('write' as const), range, fc.integer({ min: 0, max: 255 }), fc.integer({ min: 1, max: 4 })),
        fc.tuple(fc.constant('discard' as const), range),
        fc.tuple(fc.constant('zero' as const), range, fc.boolean()),
        fc.tuple(fc.constant('read' as const), range),
      );
      await fc.assert(fc.asyncProperty(fc.array(op, { maxLength: 12 }), async (ops) => {
        for (const o of ops) {
          const [offset, length] = o[1];
          if (o[0] === 'write') {
            const data = pattern(length, o[2]);
            // Split into up to o[3] pieces at sector-free positions: backends take any split.
            const step = Math.ceil(length / o[3]);
            const pieces: Uint8Array[] = [];
            for (let at = 0; at < length; at += step) pieces.push(data.subarray(at, Math.min(length, at + step)));
            await backend.write(offset, pieces);
            model.set(data, offset);
            known.fill(1, offset, offset + length);
          } else if (o[0] === 'discard') {
            await backend.discard(offset, length);
            model.fill(0, offset, offset + length);
            if (factory.discardZeroes === false) known.fill(0, offset, offset + length);
          } else if (o[0] === 'zero') {
            await backend.writeZeroes(offset, length, o[2]);
            model.fill(0, offset, offset + length);
            known.fill(1, offset, offset + length);
          } else {
            await matches(offset, length);
          }
        }
        await matches(0, SIZE);
      }), { numRuns: 40 });
    }));
  });
}
