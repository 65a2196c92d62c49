// serve() with several sockets, from a program: one backend behind a device per socket.
// What only the library can show: a `serial` backend still sees one operation at a
// time when two frontends drive it at once, close() flushes the shared backend once,
// and resize() grows every device.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import type { BackendResult } from '../src/backends/backend.js';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { connect } from '../src/node/connect.js';
import { serve } from '../src/node/serve.js';
import { pattern } from './support/pattern.js';
import { scratchDir } from './e2e/serve-helpers.js';

const MiB = 1 << 20;

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-serve-sockets-lib-');
});
after(() => scratch.cleanup());

/** A memory backend that counts flushes and, when `serial`, records how many operations overlapped. */
class Watched extends MemoryBackend {
  flushes = 0;
  inFlight = 0;
  mostInFlight = 0;
  constructor(readonly concurrency: 'serial' | 'parallel') {
    super({ size: 4 * MiB });
  }

  /** Runs `body` a turn of the event loop later, so that operations could overlap if nothing kept them apart. */
  private later(body: () => void): Promise<void> {
    this.mostInFlight = Math.max(this.mostInFlight, ++this.inFlight);
    return new Promise((resolve) => setImmediate(() => {
      this.inFlight--;
      body();
      resolve();
    }));
  }
  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.later(() => super.read(offset, buffers));
  }
  override write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.later(() => super.write(offset, buffers));
  }
  override flush(): BackendResult {
    this.flushes++;
    return this.later(() => super.flush());
  }
}

function sockets(name: string): string[] {
  return [join(scratch.dir, `${name}-a.sock`), join(scratch.dir, `${name}-b.sock`)];
}

test('a serial backend served on two sockets never sees two operations at once, though both frontends write together', async () => {
  const backend = new Watched('serial');
  const served = await serve({ backend, socketPath: sockets('serial') });
  const disks = await Promise.all(served.sockets.map((s) => connect(s.socketPath)));
  try {
    await Promise.all(disks.flatMap((d, i) => Array.from({ length: 16 }, (_, k) => d.driver.write((2 * k + i) * 8, [pattern(4096, 2 * k + i)]))));
    const back = new Uint8Array(4096);
    await disks[1].driver.read(0, [back]);
    assert.deepEqual(back, pattern(4096, 0));
    assert.equal(backend.mostInFlight, 1);
  } finally {
    await Promise.all(disks.map((d) => d.close()));
    await served.close();
  }
});

test('a parallel backend is shared as it is: both devices call it directly', async () => {
  const backend = new Watched('parallel');
  const served = await serve({ backend, socketPath: sockets('parallel') });
  try {
    assert.equal(served.sockets.length, 2);
    assert.equal(served.device, served.sockets[0].device);
    assert.equal(served.server, served.sockets[0].server);
    for (const s of served.sockets) assert.equal(s.device.backend, backend);
    assert.notEqual(served.sockets[0].device, served.sockets[1].device);
  } finally {
    await served.close();
  }
});

test('close() stops both sockets and flushes the shared backend once', async () => {
  const backend = new Watched('parallel');
  const served = await serve({ backend, socketPath: sockets('flush') });
  const disks = await Promise.all(served.sockets.map((s) => connect(s.socketPath)));
  await Promise.all(disks.map((d, i) => d.driver.write(i * 8, [pattern(4096, i)])));
  await Promise.all(disks.map((d) => d.close()));
  const before = backend.flushes;
  await served.close();
  assert.equal(backend.flushes - before, 1);
  await assert.rejects(connect(served.sockets[1].socketPath), /cannot connect/);
});

test('resize() grows the backend once and every device takes up the new capacity', async () => {
  const backend = new Watched('parallel');
  const served = await serve({ backend, socketPath: sockets('resize') });
  try {
    await served.resize(6 * MiB);
    assert.equal(backend.size, 6 * MiB);
    assert.deepEqual(served.sockets.map((s) => s.device.capacity), [6 * MiB / 512, 6 * MiB / 512]);
    await assert.rejects(served.resize(MiB), /no smaller/);
  } finally {
    await served.close();
  }
});

test('no socket, or one socket given twice, is refused before anything listens', async () => {
  const backend = new Watched('parallel');
  await assert.rejects(serve({ backend, socketPath: [] }), /at least one socket/);
  const [a] = sockets('twice');
  await assert.rejects(serve({ backend, socketPath: [a, a] }), new RegExp(`socket ${a} is given twice`));
});
