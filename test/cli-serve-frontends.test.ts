// How `vblk serve` — the real CLI in a child process — takes frontends one after another:
// one that connects right after another hung up is served, never turned away; one that
// connects while another is connected waits and is served next.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { REQ, RawFrontend } from './support/raw-frontend.js';
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
