// The examples (examples/), used as a reader of the README would: through the package's
// public entry points. The HTTP range backend against a local range server (127.0.0.1
// only), in every way the server can misbehave; the snapshot RAM disk, through a flush
// and a restart. Both through the real device and driver (vblk/testing's loopback disk),
// and the custom backend through the backend compliance kit of vblk/testing.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { BackendError, ReadOnlyError } from 'vblk';
import * as testing from 'vblk/testing';
import makeRamDisk, { SnapshotRamDisk } from '../examples/custom-backend.js';
import ramDisk from '../examples/ram-disk.js';
import { CowFilter } from '../src/backends/filters/index.js';
import makeHttpBackend, { HttpRangeBackend, HttpRangeError } from '../examples/http-range-backend.js';
import { pattern } from './support/pattern.js';
import { startRangeServer, type RangeServer } from './support/range-server.js';

const MiB = 1024 * 1024;

/** Whether `op` fails (throwing or rejecting) with an error of `code`. */
async function failsWith(op: () => unknown, code: string): Promise<void> {
  await assert.rejects(async () => op(), (e: unknown) => (e as { code?: unknown }).code === code || assert.fail(`${String(e)}, not ${code}`));
}

describe('examples/http-range-backend.ts', () => {
  const image = pattern(4 * MiB, 19);
  let server: RangeServer;
  before(async () => {
    server = await startRangeServer(image);
  });
  after(() => server.close());

  const open = async (body: (b: HttpRangeBackend) => Promise<void>): Promise<void> => {
    server.misbehave = {};
    const b = await makeHttpBackend({ url: server.url });
    try {
      await body(b);
    } finally {
      b.close();
    }
  };

  test('sizes the image with HEAD and reads any range, scattered, with one range request', () => open(async (b) => {
    assert.equal(b.size, image.length);
    assert.deepEqual([b.readOnly, b.canFlush, b.canDiscard, b.canWriteZeroes], [true, false, false, false]);
    for (const [offset, pieces] of [[0, [512]], [MiB - 512, [100, 924, 4096]], [image.length - 8192, [8192]], [3 * MiB, [1 << 20]]] as const) {
      const buffers = pieces.map((n) => new Uint8Array(n).fill(0xee));
      const before = server.requests.length;
      await b.read(offset, buffers);
      const length = pieces.reduce((a, n) => a + n, 0);
      assert.deepEqual(Buffer.concat(buffers), Buffer.from(image.subarray(offset, offset + length)), `at ${offset}`);
      assert.deepEqual(server.requests.slice(before), [{ method: 'GET', range: `bytes=${offset}-${offset + length - 1}` }]);
    }
  }));

  test('without a useful HEAD, a one-byte range request gives the size', async () => {
    server.misbehave = { noHead: true };
    const b = await HttpRangeBackend.open(server.url);
    try {
      assert.equal(b.size, image.length);
      assert.deepEqual(server.requests.slice(-1), [{ method: 'GET', range: 'bytes=0-0' }]);
    } finally {
      b.close();
    }
  });

  test('a server without ranges, a size not of whole sectors, and bad options are refused at open, in one line', async () => {
    server.misbehave = { ignoreRanges: true };
    await failsWith(() => HttpRangeBackend.open(server.url), 'NO_RANGES');
    const odd = await startRangeServer(image.subarray(0, 1000));
    try {
      await failsWith(() => HttpRangeBackend.open(odd.url), 'BAD_SIZE');
    } finally {
      await odd.close();
    }
    await assert.rejects(async () => makeHttpBackend({}), /url=URL is required/);
    await assert.rejects(async () => makeHttpBackend({ url: server.url, 'timeout-ms': 'soon' }), /timeout-ms must be a positive whole number/);
    await assert.rejects(async () => makeHttpBackend({ url: 'file:///etc/passwd' }), /not an http: or https: URL/);
    const closed = await startRangeServer(image);
    const url = closed.url;
    await closed.close();
    await assert.rejects(async () => makeHttpBackend({ url }), /fetch failed/);
  });

  test('an error status, a wrong Content-Range or a short body fails that read; the next reads succeed', () => open(async (b) => {
    const buf = new Uint8Array(4096);
    server.misbehave = { failWith: 503 };
    await assert.rejects(async () => b.read(4096, [buf]), (e) => e instanceof HttpRangeError && e.code === 'HTTP_STATUS' && /HTTP 503 instead of 206/.test(e.message));
    server.misbehave = { wrongRange: true };
    await failsWith(() => b.read(4096, [buf]), 'BAD_RESPONSE');
    server.misbehave = { shortBody: true };
    await failsWith(() => b.read(4096, [buf]), 'SHORT_IO');
    server.misbehave = { ignoreRanges: true };
    await failsWith(() => b.read(4096, [buf]), 'HTTP_STATUS');
    server.misbehave = {};
    await b.read(4096, [buf]);
    assert.deepEqual(buf, image.subarray(4096, 8192));
  }));

  test('property: whatever Content-Range a server sends, a read returns the bytes asked for or fails with a typed error', () => open(async (b) => {
    const header = fc.oneof(
      fc.string({ unit: fc.constantFrom(...'bytes 0123456789-/*, ') }),
      fc.tuple(fc.nat(image.length + 1024), fc.nat(image.length + 1024), fc.nat(2 * image.length)).map(([s, e, t]) => `bytes ${s}-${e}/${t}`),
    ).map((h) => h.trim()).filter((h) => h.length > 0);
    await fc.assert(fc.asyncProperty(fc.nat(image.length / 512 - 8), fc.integer({ min: 1, max: 8 }), header, async (sector, count, contentRange) => {
      server.misbehave = { contentRange };
      const buf = new Uint8Array(count * 512);
      try {
        await b.read(sector * 512, [buf]);
      } catch (e) {
        assert.ok(e instanceof HttpRangeError || e instanceof BackendError, String(e));
        assert.ok(!e.message.includes('\n'));
        return;
      }
      assert.equal(contentRange, `bytes ${sector * 512}-${(sector + count) * 512 - 1}/${image.length}`, 'only the right header is accepted');
      assert.deepEqual(buf, image.subarray(sector * 512, (sector + count) * 512));
    }), { numRuns: 300 });
  }));

  test('it refuses writes, discards and write-zeroes, and ranges past the end; close fails reads in flight and later calls', () => open(async (b) => {
    await failsWith(() => b.write(), 'READ_ONLY');
    await failsWith(() => b.discard(), 'READ_ONLY');
    await failsWith(() => b.writeZeroes(), 'READ_ONLY');
    await failsWith(() => b.read(image.length, [new Uint8Array(512)]), 'OUT_OF_RANGE');
    await failsWith(() => b.read(image.length - 512, [new Uint8Array(1024)]), 'OUT_OF_RANGE');
    b.flush();
    server.misbehave = { hold: true };
    const inFlight = b.read(0, [new Uint8Array(512)]);
    b.close();
    await failsWith(() => inFlight, 'CLOSED');
    await failsWith(() => b.read(0, [new Uint8Array(512)]), 'CLOSED');
    await failsWith(() => b.flush(), 'CLOSED');
    await failsWith(() => b.write(), 'CLOSED');
  }));

  test('through the device and driver: a read-only disk whose sectors are the image\'s', () => open(async (b) => {
    const disk = await testing.openLoopbackDisk(b, { driver: { queues: 2 }, device: { numQueues: 2 } });
    try {
      assert.equal(disk.driver.readOnly, true);
      assert.equal(disk.driver.capacity, image.length / 512);
      const reads = [0, 1, 2047, 4000, 8191].map(async (sector) => {
        const buf = new Uint8Array(4096 > image.length - sector * 512 ? 512 : 4096);
        await disk.driver.read(sector, [buf]);
        assert.deepEqual(buf, image.subarray(sector * 512, sector * 512 + buf.length), `sector ${sector}`);
      });
      await Promise.all(reads);
      await assert.rejects(disk.driver.write(0, [new Uint8Array(512)]), ReadOnlyError);
    } finally {
      await disk.close();
    }
  }));
});

describe('examples/custom-backend.ts', () => {
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'vblk-example-ram-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('flushed writes outlive the backend; unflushed ones do not', async () => {
    const file = join(dir, 'ram.img');
    const first = makeRamDisk({ file, size: String(MiB) });
    await first.write(4096, [pattern(8192, 1)]);
    assert.equal(existsSync(file), false, 'nothing is saved before a flush');
    await first.flush();
    await first.write(0, [pattern(512, 2)]);
    first.close();
    assert.equal(readFileSync(file).length, MiB);
    const second = makeRamDisk({ file, size: '512' });
    assert.equal(second.size, MiB, 'an existing file sets the size');
    const back = new Uint8Array(8192 + 4096);
    await second.read(0, [back]);
    assert.deepEqual(back.subarray(0, 4096), new Uint8Array(4096), 'the unflushed write is gone');
    assert.deepEqual(back.subarray(4096), pattern(8192, 1));
    second.close();
    await failsWith(() => second.read(0, [back]), 'CLOSED');
  });

  test('sizes are checked; without a file it is a plain RAM disk', async () => {
    assert.throws(() => makeRamDisk({ size: '1000' }), (e) => e instanceof BackendError && e.code === 'BAD_SIZE');
    assert.throws(() => makeRamDisk({ size: 'big' }), (e) => e instanceof BackendError && e.code === 'BAD_SIZE');
    const ram = makeRamDisk({});
    assert.equal(ram.size, 64 * MiB);
    await ram.flush();
    await failsWith(() => ram.write(64 * MiB, [new Uint8Array(512)]), 'OUT_OF_RANGE');
  });

  test('through the device and driver: written, discarded, flushed, read back', async () => {
    const file = join(dir, 'loop.img');
    const ram = new SnapshotRamDisk(new Uint8Array(2 * MiB), file);
    const disk = await testing.openLoopbackDisk(ram);
    try {
      await disk.driver.write(8, [pattern(64 * 1024, 3)]);
      await disk.driver.discard([{ sector: 16, sectors: 8 }]);
      await disk.driver.flush();
      const saved = readFileSync(file);
      const expected = pattern(64 * 1024, 3);
      expected.fill(0, 8 * 512, 16 * 512);
      assert.deepEqual(saved.subarray(4096, 4096 + 64 * 1024), Buffer.from(expected));
    } finally {
      await disk.close();
      ram.close();
    }
  });
});

// The compliance kit of vblk/testing, as a backend's author runs it: on the RAM disk of the
// README, on the snapshot RAM disk, and on the read-only HTTP image behind a copy-on-write
// overlay (the kit writes; the image on the server is never written).
testing.backendComplianceSuite('examples/ram-disk.ts (compliance kit)', (size) => ({ backend: ramDisk({ size: String(size) }) }));
testing.backendComplianceSuite('examples/custom-backend.ts (compliance kit)', (size) => {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-example-kit-'));
  return { backend: makeRamDisk({ file: join(dir, 'ram.img'), size: String(size) }), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
});
testing.backendComplianceSuite('examples/http-range-backend.ts behind --filter cow (compliance kit)', async (size) => {
  // Zeroes, as the kit expects of a fresh disk: what matters is that reads come from the server.
  const server = await startRangeServer(new Uint8Array(size));
  const http = await makeHttpBackend({ url: server.url });
  return {
    backend: new CowFilter(http),
    cleanup: () => {
      assert.deepEqual(server.requests.filter((r) => r.method !== 'GET' && r.method !== 'HEAD'), [], 'only reads reach the server');
      void server.close();
    },
  };
});
