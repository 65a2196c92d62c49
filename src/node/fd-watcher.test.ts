import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import * as native from './native.js';
import { isNativeError } from './native.js';
import type { WatchHandle } from './native.js';
import { FdWatcher, READABLE, WRITABLE } from './fd-watcher.js';

/**
 * Lets the event loop turn for a while: enough, on any machine, for a callback that
 * should not come to show up wrongly — only for "nothing happened" checks. What should
 * happen is waited for ({@link until}): under load a timer can fire before the I/O
 * callback it was meant to wait for.
 */
const tick = (ms = 20) => new Promise((resolve) => setTimeout(resolve, ms));

/** Lets I/O callbacks run until `cond()` holds; fails naming `what` after a generous 10 s. */
async function until(cond: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

/** A child that does not exit by itself is killed after this long (a hang guard). */
const CHILD_TIMEOUT_MS = 30_000;

/** Runs an ES module snippet in a fresh node with FdWatcher and native imported. */
function runChild(body: string): { status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string } {
  const watcherUrl = new URL('./fd-watcher.js', import.meta.url).href;
  const nativeUrl = new URL('./native.js', import.meta.url).href;
  const code = `import { FdWatcher } from ${JSON.stringify(watcherUrl)};\n` +
    `import * as native from ${JSON.stringify(nativeUrl)};\n${body}`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], {
    encoding: 'utf8', timeout: CHILD_TIMEOUT_MS, cwd: fileURLToPath(new URL('.', import.meta.url)),
  });
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

test('the callback reports readability when data arrives, and not before', async () => {
  const [a, b] = native.socketpair();
  const seen: number[] = [];
  const w = new FdWatcher(b, 'r', (error, events) => {
    assert.equal(error, null);
    seen.push(events);
    native.recvmsg(b, new Uint8Array(16), 0); // drain: the watcher is level-triggered
  });
  await tick();
  assert.deepEqual(seen, []);
  native.sendmsg(a, new Uint8Array([1]));
  await until(() => seen.length > 0, 'the readable callback');
  await tick();
  assert.deepEqual(seen, [READABLE]);
  w.stop();
  native.close(a);
  native.close(b);
});

test('stop inside the callback: no further call even though the fd stays readable', async () => {
  const [a, b] = native.socketpair();
  let calls = 0;
  const w = new FdWatcher(b, 'r', () => {
    calls++;
    w.stop();
    w.stop(); // idempotent
  });
  native.sendmsg(a, new Uint8Array([1]));
  await until(() => calls > 0, 'the readable callback');
  await tick(50);
  assert.equal(calls, 1);
  assert.equal(w.isStopped, true);
  native.close(a);
  native.close(b);
});

test('setEvents switches between writable, readable and paused', async () => {
  const [a, b] = native.socketpair();
  const seen: number[] = [];
  const w = new FdWatcher(a, 'w', (_e, events) => {
    seen.push(events);
    w.setEvents('none');
  });
  await until(() => seen.length > 0, 'the writable callback');
  assert.deepEqual(seen, [WRITABLE]);
  native.sendmsg(b, new Uint8Array([1]));
  await tick();
  assert.deepEqual(seen, [WRITABLE]); // paused
  w.setEvents('r');
  await until(() => seen.length > 1, 'the readable callback');
  assert.deepEqual(seen, [WRITABLE, READABLE]);
  w.stop();
  assert.throws(() => w.setEvents('r'), (e: unknown) => isNativeError(e, 'WATCHER_STOPPED'));
  native.close(a);
  native.close(b);
});

test('microtasks queued by the callback run before the next callback', async () => {
  const [a, b] = native.socketpair();
  const order: string[] = [];
  const w = new FdWatcher(b, 'r', () => {
    order.push('callback');
    void Promise.resolve().then(() => order.push('microtask'));
    native.recvmsg(b, new Uint8Array(16), 0);
  });
  native.sendmsg(a, new Uint8Array([1]));
  await until(() => order.length >= 2, 'the first callback and its microtask');
  native.sendmsg(a, new Uint8Array([1]));
  await until(() => order.length >= 4, 'the second callback and its microtask');
  assert.deepEqual(order, ['callback', 'microtask', 'callback', 'microtask']);
  w.stop();
  native.close(a);
  native.close(b);
});

test('a second watcher on the same fd fails with EEXIST', () => {
  const e = native.eventfd();
  const w = new FdWatcher(e, 'r', () => {});
  assert.throws(() => new FdWatcher(e, 'r', () => {}), (err: unknown) => isNativeError(err, 'EEXIST'));
  w.stop();
  new FdWatcher(e, 'r', () => {}).stop(); // free again once stopped
  native.close(e);
});

test('watching an fd that is not open fails with EBADF', () => {
  assert.throws(() => new FdWatcher(987654, 'r', () => {}), (err: unknown) => isNativeError(err, 'EBADF'));
});

test('a stopped watcher does not keep the process alive; an active one does', () => {
  const stopped = runChild(`
    const e = native.eventfd();
    const w = new FdWatcher(e, 'r', () => {});
    w.stop();
  `);
  assert.equal(stopped.status, 0, stopped.stderr);

  const active = runChild(`
    const e = native.eventfd();
    const w = new FdWatcher(e, 'r', () => { native.eventfdRead(e); w.stop(); console.log('woken'); });
    setTimeout(() => native.eventfdWrite(e), 200).unref();
  `);
  assert.equal(active.status, 0, active.stderr);
  assert.equal(active.stdout.trim(), 'woken'); // the process stayed alive for it
});

test('an unref\'d watcher lets the process exit', () => {
  const r = runChild(`
    const e = native.eventfd();
    new FdWatcher(e, 'r', () => {}, { ref: false });
    const w2 = new FdWatcher(native.eventfd(), 'r', () => {});
    w2.unref();
  `);
  assert.equal(r.status, 0, r.signal ? `still running after ${CHILD_TIMEOUT_MS} ms: the unref'd watchers kept it alive (${r.signal})` : r.stderr);
});

test('an exception thrown by a callback is an uncaught exception', () => {
  const r = runChild(`
    const e = native.eventfd(1);
    new FdWatcher(e, 'r', () => { throw new Error('boom from callback'); });
  `);
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /boom from callback/);

  const handled = runChild(`
    process.on('uncaughtException', (err) => { console.log('caught', err.message); w.stop(); });
    const e = native.eventfd(1);
    const w = new FdWatcher(e, 'r', () => { throw new Error('boom'); });
  `);
  assert.equal(handled.status, 0, handled.stderr);
  assert.equal(handled.stdout.trim(), 'caught boom');
});

test('a worker that ends with an active watcher and a live mapping shuts down cleanly', async () => {
  const watcherUrl = new URL('./fd-watcher.js', import.meta.url).href;
  const nativeUrl = new URL('./native.js', import.meta.url).href;
  // CommonJS eval code: import() loads the ES modules inside the worker.
  const code = `
    const { parentPort } = require('node:worker_threads');
    Promise.all([import(${JSON.stringify(watcherUrl)}), import(${JSON.stringify(nativeUrl)})]).then(([{ FdWatcher }, native]) => {
      const e = native.eventfd();
      new FdWatcher(e, 'r', () => { native.eventfdRead(e); parentPort.postMessage('woken'); });
      const fd = native.memfdCreate('vblk-worker', native.PAGE_SIZE);
      new Uint8Array(native.mmap(fd, native.PAGE_SIZE, 0, true).buffer)[0] = 1;
      native.eventfdWrite(e);
    });
  `;
  const before = native.mappingCount();
  for (let i = 0; i < 5; i++) {
    const worker = new Worker(code, { eval: true });
    assert.equal(await new Promise((resolve) => worker.once('message', resolve)), 'woken');
    await worker.terminate();
  }
  // The workers' environments released their watchers and unmapped their memory.
  assert.equal(native.mappingCount(), before);
});

test('watcher functions refuse values that are not watcher handles', () => {
  const fake = {} as unknown as WatchHandle;
  assert.throws(() => native.watchStop(fake), (e: unknown) => isNativeError(e, 'ERR_INVALID_ARG_TYPE'));
  assert.throws(() => native.watchSetEvents(fake, 1), (e: unknown) => isNativeError(e, 'ERR_INVALID_ARG_TYPE'));
});
