// The NBD backend when the server goes away, comes back, or misbehaves: requests in
// flight are resubmitted on reconnection and complete as if nothing happened; a server
// that stays away (or keeps breaking the protocol) fails them after the bounded time; a
// hostile reply drops the connection cleanly and never writes outside a request's
// buffers. Real servers (qemu-nbd SIGKILLed and restarted, nbdkit answering ESHUTDOWN)
// and a scripted one (test/support/fake-nbd-server.ts).
//
// Workloads run until the test has seen what it waits for (a count of completed
// requests, a log line, the connection state), never for a fixed time.
import { after, afterEach, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { unlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { requirePeer } from '../scripts/guest/guest.js';
import { openNbdBackend, type NbdBackendOptions, type NbdExportBackend } from '../src/node/nbd-backend.js';
import { FakeNbdServer } from './support/fake-nbd-server.js';
import { concat, dataChunk, errorChunk, simpleReply } from './support/nbd-wire.js';
import { startNbdkit, startQemuNbd } from './support/nbd-servers.js';
import { waitUntil, within } from './support/wait.js';
import { scratchDir } from './e2e/serve-helpers.js';

const MiB = 1024 * 1024;

const opened: NbdExportBackend[] = [];
async function open(options: NbdBackendOptions): Promise<NbdExportBackend> {
  const b = await openNbdBackend(options);
  opened.push(b);
  return b;
}
afterEach(async () => {
  await Promise.all(opened.splice(0).map((b) => b.close()));
});

interface Workload {
  /** Requests completed, and failed (with the first failure). */
  done: number;
  failed: number;
  firstError: unknown;
  stop(): Promise<void>;
}

/**
 * `workers` loops, each over its own `region` bytes of the disk: write random data at a
 * random place, read a random place back and check it against `model`. No two requests
 * in flight overlap, so the model is exact whatever order the server serves them in.
 */
function workload(b: NbdExportBackend, model: Uint8Array, workers: number, region: number): Workload {
  const w: Workload = { done: 0, failed: 0, firstError: null, stop: async () => {} };
  let stopping = false;
  const loops = Array.from({ length: workers }, async (_, k) => {
    const base = k * region;
    while (!stopping) {
      const n = 4096 * (1 + Math.floor(Math.random() * 8));
      const at = base + 4096 * Math.floor(Math.random() * ((region - n) / 4096));
      const data = randomFillSync(new Uint8Array(n));
      try {
        await b.write(at, [data]);
        model.set(data, at);
        const got = new Uint8Array(n);
        await b.read(at, [got]);
        assert.deepEqual(got, model.subarray(at, at + n));
        w.done += 2;
      } catch (e) {
        w.failed++;
        w.firstError ??= e;
      }
    }
  });
  w.stop = async () => {
    stopping = true;
    await Promise.all(loops);
  };
  return w;
}

describe('NBD backend: the server killed and restarted', { skip: requirePeer('qemu-nbd', 'qemu-img') }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(() => {
    scratch = scratchDir('vblk-nbd-resilience-');
  });
  after(() => scratch.cleanup());

  test('qemu-nbd SIGKILLed under a workload on two connections, then restarted: no request fails, the image ends as the model', { timeout: 120_000 }, async () => {
    const image = join(scratch.dir, 'disk.raw');
    const socket = join(scratch.dir, 'nbd.sock');
    const size = 16 * MiB;
    writeFileSync(image, new Uint8Array(size));
    let server = await startQemuNbd(image, socket, { shared: 2 });
    const logs: string[] = [];
    const b = await open({ uri: server.uri, connections: 2, log: (m) => logs.push(m) });
    assert.equal(b.connectionsUp, 2);
    const model = new Uint8Array(size);
    const w = workload(b, model, 8, size / 8);
    try {
      for (let round = 0; round < 2; round++) {
        const before = w.done;
        await waitUntil(() => w.done >= before + 200 || w.failed > 0, { what: '200 more requests', timeoutMs: 60_000 });
        await server.stop('SIGKILL');
        await waitUntil(() => b.connectionsUp === 0, { what: 'the backend to notice the server is gone' });
        const atKill = w.done;
        server = await startQemuNbd(image, socket, { shared: 2 });
        await waitUntil(() => b.connectionsUp === 2, { what: 'both connections back', timeoutMs: 30_000 });
        await waitUntil(() => w.done >= atKill + 200 || w.failed > 0, { what: 'requests to flow again', timeoutMs: 60_000 });
      }
    } finally {
      await w.stop();
    }
    assert.equal(w.failed, 0, `a request failed: ${String(w.firstError)}\n${logs.join('\n')}`);
    const log = logs.join('\n');
    assert.match(log, /connection \d lost/);
    assert.match(log, /is back after/);
    const resubmitted = [...log.matchAll(/resubmitting (\d+) requests/g)].reduce((n, m) => n + Number(m[1]), 0);
    assert.ok(resubmitted > 0, `nothing was in flight at the kills:\n${log}`);
    await b.close();
    await server.stop();
    const want = join(scratch.dir, 'want.raw');
    writeFileSync(want, model);
    execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', want, image]);
  });

  test('a server that never comes back: requests fail after the reconnect timeout, then at once; when one is back, requests work again', { timeout: 60_000 }, async () => {
    const image = join(scratch.dir, 'gone.raw');
    const socket = join(scratch.dir, 'gone.sock');
    writeFileSync(image, new Uint8Array(MiB));
    let server = await startQemuNbd(image, socket);
    const logs: string[] = [];
    const b = await open({ uri: server.uri, reconnectTimeoutMs: 1000, log: (m) => logs.push(m) });
    await b.write(0, [new Uint8Array(4096).fill(7)]);
    await server.stop('SIGKILL');
    await waitUntil(() => b.connectionsUp === 0, { what: 'the backend to notice the server is gone' });
    const t0 = performance.now();
    await assert.rejects(within(b.read(0, [new Uint8Array(4096)]), { what: 'the read to fail' }),
      (e: Error & { code?: string }) => e.code === 'SERVER_GONE');
    // A lower bound only: the read waited for the server at least as long as asked.
    assert.ok(performance.now() - t0 >= 900);
    await assert.rejects(b.flush(), (e: Error & { code?: string }) => e.code === 'SERVER_GONE');
    assert.match(logs.join('\n'), /no connection for 1 s: failing/);
    server = await startQemuNbd(image, socket);
    try {
      await waitUntil(() => b.connectionsUp === 1, { what: 'the backend to reconnect', timeoutMs: 30_000 });
      const got = new Uint8Array(4096);
      await b.read(0, [got]);
      assert.ok(got.every((x) => x === 7));
    } finally {
      await b.close();
      await server.stop();
    }
  });
});

describe('NBD backend: a server shutting down', { skip: requirePeer('nbdkit') }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(() => {
    scratch = scratchDir('vblk-nbd-shutdown-');
  });
  after(() => scratch.cleanup());

  test('NBD_ESHUTDOWN: a soft disconnect, reconnection, and the request retried until the server takes it', { timeout: 60_000 }, async () => {
    const trigger = join(scratch.dir, 'shutdown');
    writeFileSync(trigger, '');
    const server = await startNbdkit(['--filter=error', 'memory', String(MiB), 'error=ESHUTDOWN', 'error-pwrite-rate=100%', `error-pwrite-file=${trigger}`],
      join(scratch.dir, 'nbdkit.sock'));
    const logs: string[] = [];
    try {
      const b = await open({ uri: server.uri, log: (m) => logs.push(m) });
      const write = b.write(4096, [new Uint8Array(4096).fill(9)]);
      await waitUntil(() => logs.some((l) => /shutting down/.test(l)), { what: 'the ESHUTDOWN to be seen' });
      unlinkSync(trigger);
      await within(write, { what: 'the write to succeed once the server takes writes again', timeoutMs: 30_000 });
      const got = new Uint8Array(4096);
      await b.read(4096, [got]);
      assert.ok(got.every((x) => x === 9));
      await b.close();
    } finally {
      await server.stop();
    }
  });
});

describe('NBD backend against a hostile server', () => {
  let scratch: { dir: string; cleanup(): void };
  before(() => {
    scratch = scratchDir('vblk-nbd-hostile-');
  });
  after(() => scratch.cleanup());

  /** The first connection answers each request with `bad`; later ones answer correctly. */
  async function recovers(name: string, bad: (cookie: bigint, offset: number, length: number) => Uint8Array, stallTimeoutMs?: number): Promise<void> {
    const fake = await FakeNbdServer.listen(join(scratch.dir, `${name}.sock`), { size: MiB });
    fake.disk.fill(0x5a, 0, 8192);
    fake.answer = (req, conn) => (conn.index === 1 && req.type === 0 ? bad(req.cookie, req.offset, req.length) : conn.correct(req));
    const logs: string[] = [];
    try {
      const b = await open({ uri: fake.uri, log: (m) => logs.push(m), stallTimeoutMs });
      const memory = new Uint8Array(3 * 4096).fill(0xcc);
      await within(b.read(4096, [memory.subarray(4096, 8192)]), { what: `the read to survive ${name}`, timeoutMs: 20_000 });
      assert.ok(memory.subarray(4096, 8192).every((x) => x === 0x5a), `${name}: the data`);
      assert.ok(memory.subarray(0, 4096).every((x) => x === 0xcc) && memory.subarray(8192).every((x) => x === 0xcc), `${name}: nothing outside the buffer`);
      assert.equal(fake.connections.length, 2, `${name}: one reconnection`);
      assert.match(logs.join('\n'), /connection 1 lost/);
    } finally {
      await fake.close();
    }
  }

  test('an unknown cookie, a chunk outside the request, an oversized chunk, a truncated reply: the connection is dropped, the request resubmitted on a new one', { timeout: 60_000 }, async () => {
    await recovers('unknown-cookie', (c) => simpleReply(c + 1n, 0));
    await recovers('outside', (c, off) => dataChunk(c, off + 4096, new Uint8Array(4096), true));
    await recovers('before', (c, off) => dataChunk(c, off - 4096, new Uint8Array(8192), true));
    await recovers('oversized', (c, off, len) => dataChunk(c, off, new Uint8Array(len + 512), true));
    await recovers('garbage', () => new Uint8Array(64).fill(0x77));
    // Half a reply, then silence with the connection open: only the stall check ends it.
    await recovers('truncated', (c, off) => dataChunk(c, off, new Uint8Array(4096), true).subarray(0, 30), 400);
  });

  test('a server that breaks the protocol on every connection: the request fails after the reconnect timeout, the backend keeps going', { timeout: 60_000 }, async () => {
    const fake = await FakeNbdServer.listen(join(scratch.dir, 'always.sock'), { size: MiB });
    fake.answer = (req, conn) => (req.type === 0 ? concat(simpleReply(req.cookie + 7n, 0)) : conn.correct(req));
    try {
      const b = await open({ uri: fake.uri, reconnectTimeoutMs: 800, log: () => {} });
      await assert.rejects(within(b.read(0, [new Uint8Array(512)]), { what: 'the read to fail', timeoutMs: 20_000 }),
        (e: Error & { code?: string }) => e.code === 'SERVER_GONE');
      assert.ok(fake.connections.length >= 2, 'it kept reconnecting');
      // Once a connection is back, writes (which the server answers correctly) work.
      await waitUntil(() => b.connectionsUp === 1, { what: 'a connection back' });
      await within(b.write(0, [new Uint8Array(512).fill(1)]), { what: 'a write' });
      assert.equal(fake.disk[0], 1);
    } finally {
      await fake.close();
    }
  });

  test('a request split at the maximum payload settles only once every piece has: a failed piece does not release buffers others still fill', { timeout: 30_000 }, async () => {
    const fake = await FakeNbdServer.listen(join(scratch.dir, 'split.sock'), { size: MiB, blockSizes: [512, 4096, 8192] });
    fake.disk.fill(0x33, 0, 32768);
    const held: (() => void)[] = [];
    fake.answer = (req, conn) => {
      if (req.type !== 0) return conn.correct(req);
      // The first piece fails at once; the others are answered only when the test says.
      if (req.offset === 0) return errorChunk(req.cookie, 5, 'injected');
      held.push(() => conn.send(conn.correct(req)));
      return null;
    };
    try {
      const b = await open({ uri: fake.uri });
      const buf = new Uint8Array(32768);
      let settled = false;
      const read = b.read(0, [buf]).finally(() => {
        settled = true;
      });
      await waitUntil(() => held.length === 3, { what: 'the three other pieces to reach the server' });
      // Give a premature settle every chance to show.
      for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
      assert.equal(settled, false, 'settled while pieces were in flight');
      for (const h of held) h();
      await assert.rejects(within(read, { what: 'the split read' }), (e: Error & { code?: string }) => e.code === 'SERVER_ERROR' && /injected/.test(e.message));
      assert.ok(buf.subarray(8192).every((x) => x === 0x33), 'the other pieces landed before the request settled');
    } finally {
      await fake.close();
    }
  });

  test('a server that accepts and never speaks: opening fails after the connect timeout, saying so', async () => {
    const socket = join(scratch.dir, 'mute.sock');
    const mute = createServer(() => {});
    await new Promise<void>((resolve) => mute.listen(socket, resolve));
    try {
      await assert.rejects(openNbdBackend({ uri: `nbd+unix:///?socket=${socket}`, connectTimeoutMs: 300 }),
        (e: Error & { code?: string }) => e.code === 'CONNECT_FAILED' && /no NBD handshake within/.test(e.message));
    } finally {
      mute.close();
    }
  });

  test('close() sends NBD_CMD_DISC on every connection, after the requests in flight, and fails later calls', async () => {
    const fake = await FakeNbdServer.listen(join(scratch.dir, 'disc.sock'), { size: MiB });
    try {
      const b = await openNbdBackend({ uri: fake.uri, connections: 3 });
      assert.equal(b.connectionsUp, 3);
      await b.write(0, [new Uint8Array(512).fill(3)]);
      await b.close();
      await waitUntil(() => fake.disconnects === 3, { what: 'three NBD_CMD_DISC' });
      assert.equal(fake.disk[0], 3);
      assert.throws(() => b.read(0, [new Uint8Array(512)]), { code: 'CLOSED' });
    } finally {
      await fake.close();
    }
  });

  test('a handshake that goes wrong on reconnection is retried; an export that shrank is refused', { timeout: 60_000 }, async () => {
    const socket = join(scratch.dir, 'shrink.sock');
    let fake = await FakeNbdServer.listen(socket, { size: 2 * MiB });
    const logs: string[] = [];
    try {
      const b = await open({ uri: fake.uri, log: (m) => logs.push(m), reconnectTimeoutMs: 30_000 });
      await fake.close();
      fake = await FakeNbdServer.listen(socket, { size: MiB });
      await waitUntil(() => logs.some((l) => /shrank from 2097152 to 1048576/.test(l)), { what: 'the shrunk export to be refused', timeoutMs: 20_000 });
      assert.equal(b.connectionsUp, 0);
      await fake.close();
      fake = await FakeNbdServer.listen(socket, { size: 2 * MiB });
      await waitUntil(() => b.connectionsUp === 1, { what: 'the right export to be taken', timeoutMs: 20_000 });
    } finally {
      await fake.close();
    }
  });
});
