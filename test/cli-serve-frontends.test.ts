// How `vblk serve` — the real CLI in a child process — takes frontends one after another:
// one that connects right after another hung up is served, never turned away; one that
// connects while another is connected waits and is served next; one that stops in the
// middle of a message is dropped after --message-timeout, so it cannot hold the server;
// one that resets the connection is logged as hanging up.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FdWatcher } from '../src/node/fd-watcher.js';
import * as native from '../src/node/native.js';
import { connectVhostUser } from '../src/node/vhost-user-client.js';
import { FLAGS, REQ, RawFrontend, rawMessage } from './support/raw-frontend.js';
import { sleep } from './support/server-process.js';
import { scratchDir, startServe, type Served } from './e2e/serve-helpers.js';

let scratch: { dir: string; cleanup(): void };
let image: string;
before(() => {
  scratch = scratchDir('vblk-serve-frontends-');
  image = join(scratch.dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, 1 << 20);
});
after(() => scratch.cleanup());

/** Runs `body` against a fresh `vblk serve`, which must then stop cleanly. */
async function withServe(name: string, body: (s: Served) => Promise<void>, extra: string[] = []): Promise<void> {
  const s = await startServe(image, join(scratch.dir, `${name}.sock`), extra);
  try {
    await body(s);
  } finally {
    assert.equal(await s.stop(), 0, s.log());
  }
}

test('60 frontends back to back, each closed before the next connects, all get their GET_FEATURES reply', async () => {
  await withServe('b2b', async (s) => {
    for (let i = 1; i <= 60; i++) {
      const f = await RawFrontend.connect(s.socket);
      const reply = await f.call({ request: 'GET_FEATURES', needReply: false }, 20_000);
      f.close();
      assert.equal(reply?.request, REQ.GET_FEATURES, `frontend ${i} got no reply; log:\n${s.log()}`);
    }
    await s.waitForLog(/frontend 60 disconnected/);
    assert.doesNotMatch(s.log(), /refusing|waiting/, 'a frontend that connected after the previous one hung up was held or refused');
  });
});

test('a frontend that connects while another is connected is logged as waiting and served once the other hangs up', async () => {
  await withServe('second', async (s) => {
    const first = await RawFrontend.connect(s.socket);
    assert.equal((await first.call({ request: 'GET_FEATURES', needReply: false }, 20_000))?.request, REQ.GET_FEATURES);
    const second = await RawFrontend.connect(s.socket);
    second.send({ request: 'GET_FEATURES', needReply: false });
    await s.waitForLog(/^vblk serve: a frontend is waiting to connect: it is served once frontend 1 has gone$/);
    // The first is still served meanwhile.
    assert.equal((await first.call({ request: 'GET_FEATURES', needReply: false }, 20_000))?.request, REQ.GET_FEATURES);
    first.close();
    assert.equal((await second.reply(20_000))?.request, REQ.GET_FEATURES, `the waiting frontend was not served; log:\n${s.log()}`);
    second.close();
    await s.waitForLog(/frontend 2 disconnected: frontend closed the connection$/);
  });
});

for (const [what, bytes, reason] of [
  ['5 bytes of a 12-byte header', new Uint8Array(5), /frontend 1 disconnected: frontend stopped mid-message: only 5 of 12 bytes arrived within 500 ms$/],
  ['a header promising an 8-byte payload, and no payload', rawMessage(REQ.SET_FEATURES, FLAGS, new Uint8Array(0), 8), /frontend 1 disconnected: frontend stopped mid-message: only 0 of 8 bytes arrived within 500 ms$/],
] as const) {
  test(`a frontend that sends ${what} and then nothing is dropped after --message-timeout, and the next one is served`, async () => {
    await withServe('stalled', async (s) => {
      const stalled = await RawFrontend.connect(s.socket);
      stalled.sendBytes(bytes);
      const next = await RawFrontend.connect(s.socket);
      next.send({ request: 'GET_FEATURES', needReply: false });
      assert.equal((await next.reply(20_000))?.request, REQ.GET_FEATURES, `the next frontend was not served; log:\n${s.log()}`);
      await s.waitForLog(reason);
      assert.equal(await stalled.serverCloses(), true);
      stalled.close();
      next.close();
    }, ['--message-timeout', '0.5']);
  });
}

test('a frontend idle between messages for longer than --message-timeout keeps its connection', async () => {
  await withServe('idle', async (s) => {
    const f = await RawFrontend.connect(s.socket);
    assert.equal((await f.call({ request: 'GET_FEATURES', needReply: false }, 20_000))?.request, REQ.GET_FEATURES);
    await sleep(1000); // ten times the bound, between messages
    assert.equal((await f.call({ request: 'GET_FEATURES', needReply: false }, 20_000))?.request, REQ.GET_FEATURES, s.log());
    f.close();
    await s.waitForLog(/frontend 1 disconnected: frontend closed the connection$/);
  }, ['--message-timeout', '0.1']);
});

test('a frontend that hangs up with a reply unread (a reset connection) is logged as hanging up, not as a poll EBADF', async () => {
  await withServe('reset', async (s) => {
    const fd = native.connect(s.socket);
    native.sendmsg(fd, rawMessage(REQ.GET_FEATURES, FLAGS));
    // Wait until the reply is here, and close without reading it: the server's socket
    // then reports ECONNRESET (AF_UNIX's reset) on its next read.
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no GET_FEATURES reply in 20 s; log:\n${s.log()}`)), 20_000);
      const watcher = new FdWatcher(fd, 'r', () => {
        watcher.stop();
        clearTimeout(timer);
        resolve();
      });
    });
    native.close(fd);
    const line = await s.waitForLog(/frontend 1 disconnected: /);
    assert.match(line, /frontend 1 disconnected: frontend hung up, leaving a reply unread \(connection reset\)$/);
    // And the server goes on serving.
    const f = await RawFrontend.connect(s.socket);
    assert.equal((await f.call({ request: 'GET_FEATURES', needReply: false }, 20_000))?.request, REQ.GET_FEATURES);
    f.close();
  });
});

test('our frontend, kept waiting by a serve busy with another frontend, gives up saying the device may be busy', async () => {
  await withServe('busy', async (s) => {
    const holder = await RawFrontend.connect(s.socket);
    assert.equal((await holder.call({ request: 'GET_FEATURES', needReply: false }, 20_000))?.request, REQ.GET_FEATURES);
    await assert.rejects(connectVhostUser(s.socket, { replyTimeoutMs: 300 }),
      /no reply to VHOST_USER_\w+ within 300 ms: is this a vhost-user device, and is it free\? \(a backend serves one frontend at a time/);
    holder.close();
  });
});
