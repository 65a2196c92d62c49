import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as native from './native.js';
import { isNativeError } from './native.js';
import { UnixConnection, UnixSocketServer } from './unix-socket.js';

const enc = (s: string) => new TextEncoder().encode(s);
const dec = (b: Uint8Array) => new TextDecoder().decode(b);

function withDir(body: (dir: string) => Promise<void> | void): () => Promise<void> {
  return async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-sock-'));
    try {
      await body(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
}

test('fds passed over a socketpair work on the other side (an eventfd and a memfd)', () => {
  const [a, b] = native.socketpair();
  const efd = native.eventfd();
  const mfd = native.memfdCreate('vblk-pass', native.PAGE_SIZE);
  const mine = native.mmap(mfd, native.PAGE_SIZE, 0, true);
  try {
    assert.equal(native.sendmsg(a, enc('fds!'), [efd, mfd]), 4);
    const into = new Uint8Array(4);
    const r = native.recvmsg(b, into, 8);
    assert.ok(r !== null);
    assert.equal(r.bytes, 4);
    assert.equal(r.truncatedFds, false);
    assert.equal(r.fds.length, 2);
    const [efd2, mfd2] = r.fds;
    assert.notEqual(efd2, efd);

    native.eventfdWrite(efd2, 5); // written through the received fd ...
    assert.equal(native.eventfdRead(efd), 5); // ... read through the original

    const theirs = native.mmap(mfd2, native.PAGE_SIZE, 0, true);
    new Uint8Array(theirs.buffer)[100] = 0x5a;
    assert.equal(new Uint8Array(mine.buffer)[100], 0x5a);
    native.munmap(theirs.buffer);
    r.fds.forEach((fd) => native.close(fd));
  } finally {
    native.munmap(mine.buffer);
    [a, b, efd, mfd].forEach((fd) => native.close(fd));
  }
});

test('a header-sized read takes neither the next message\'s bytes nor its fds', () => {
  const [a, b] = native.socketpair();
  const e1 = native.eventfd();
  const e2 = native.eventfd();
  try {
    // Two messages back to back, each a 12-byte header + 4-byte payload with one fd.
    native.sendmsg(a, enc('header-one..body'), [e1]);
    native.sendmsg(a, enc('header-two..BODY'), [e2]);

    const h1 = new Uint8Array(12);
    const r1 = native.recvmsg(b, h1, 8);
    assert.equal(r1?.bytes, 12);
    assert.equal(r1?.fds.length, 1);
    const p1 = new Uint8Array(4);
    const rp1 = native.recvmsg(b, p1, 8);
    assert.equal(dec(h1) + dec(p1), 'header-one..body');
    assert.deepEqual(rp1?.fds, []);

    const h2 = new Uint8Array(12);
    const r2 = native.recvmsg(b, h2, 8);
    assert.equal(dec(h2), 'header-two..');
    assert.equal(r2?.fds.length, 1);
    // The fd that came with the second header is the second eventfd.
    native.eventfdWrite(r2!.fds[0], 3);
    assert.equal(native.eventfdRead(e2), 3);
    assert.equal(native.eventfdRead(e1), 0);
    [...r1!.fds, ...r2!.fds].forEach((fd) => native.close(fd));
  } finally {
    [a, b, e1, e2].forEach((fd) => native.close(fd));
  }
});

test('recvmsg closes fds beyond maxFds and says so; null when nothing is there; 0 bytes at EOF', () => {
  const [a, b] = native.socketpair();
  const fds = [native.eventfd(), native.eventfd(), native.eventfd()];
  try {
    assert.equal(native.recvmsg(b, new Uint8Array(8), 0), null);
    native.sendmsg(a, enc('x'), fds);
    const r = native.recvmsg(b, new Uint8Array(8), 1);
    assert.equal(r?.bytes, 1);
    assert.equal(r?.fds.length, 1);
    assert.equal(r?.truncatedFds, true);
    native.close(r!.fds[0]);
    native.close(a);
    assert.deepEqual(native.recvmsg(b, new Uint8Array(8), 0), { bytes: 0, fds: [], truncatedFds: false });
  } finally {
    [b, ...fds].forEach((fd) => native.close(fd));
  }
});

test('sendmsg returns -1 when the socket buffer is full, and refuses more than 8 fds', () => {
  const [a, b] = native.socketpair();
  try {
    const chunk = new Uint8Array(65536);
    let n = 0;
    for (let i = 0; i < 10000 && n >= 0; i++) n = native.sendmsg(a, chunk);
    assert.equal(n, -1);
    assert.throws(() => native.sendmsg(a, chunk, new Array(9).fill(a)), (e: unknown) => isNativeError(e, 'ERR_OUT_OF_RANGE'));
  } finally {
    native.close(a);
    native.close(b);
  }
});

test('sendmsg to a closed peer throws EPIPE (no SIGPIPE)', () => {
  const [a, b] = native.socketpair();
  native.close(b);
  assert.throws(() => native.sendmsg(a, enc('x')), (e: unknown) => isNativeError(e, 'EPIPE'));
  native.close(a);
});

test('readExact assembles a header that arrives split, with the fds of its first byte', async () => {
  const [x, y] = UnixConnection.pair();
  const efd = native.eventfd();
  try {
    const header = x.readExact(12, 8);
    native.sendmsg(y.fd, enc('abcde'), [efd]);
    await new Promise((resolve) => setTimeout(resolve, 10));
    native.sendmsg(y.fd, enc('fghijkl'));
    const got = await header;
    assert.ok(got !== null);
    assert.equal(dec(got.data), 'abcdefghijkl');
    assert.equal(got.fds.length, 1);
    assert.equal(got.truncatedFds, false);
    got.fds.forEach((fd) => native.close(fd));
  } finally {
    x.close();
    y.close();
    native.close(efd);
  }
});

test('a message loop reads header then payload, message after message', async () => {
  const [x, y] = UnixConnection.pair();
  const sizes = [0, 1, 100, 70000, 5];
  for (const [i, size] of sizes.entries()) {
    const msg = new Uint8Array(4 + size).fill(i);
    new DataView(msg.buffer).setUint32(0, size, true);
    y.send(msg);
  }
  const seen: number[] = [];
  for (let i = 0; i < sizes.length; i++) {
    const header = await x.readExact(4);
    assert.ok(header !== null);
    const size = new DataView(header.data.buffer).getUint32(0, true);
    const payload = await x.readExact(size);
    assert.ok(payload !== null);
    assert.ok(payload.data.every((v) => v === i));
    seen.push(size);
  }
  assert.deepEqual(seen, sizes);
  await y.drain();
  y.close();
  assert.equal(await x.readExact(4), null); // clean end between messages
  assert.equal(await x.readExact(4), null);
  x.close();
});

test('readExact rejects with UNEXPECTED_EOF when the peer closes mid-message', async () => {
  const [x, y] = UnixConnection.pair();
  y.send(enc('only6b'));
  y.close();
  await assert.rejects(x.readExact(12), (e: unknown) => isNativeError(e, 'UNEXPECTED_EOF'));
  x.close();
});

test('a read with timeoutMs that the peer leaves unfinished rejects with READ_TIMEOUT and closes the connection, fds and all', async () => {
  const [x, y] = UnixConnection.pair();
  // The fd riding on the first bytes is one end of a socketpair: its peer sees EOF once x's copy is closed.
  const [passed, watch] = native.socketpair();
  y.send(enc('hdr'), [passed]);
  native.close(passed);
  await assert.rejects(x.readExact(12, 1, { timeoutMs: 50, idleUntilFirstByte: true }),
    (e: unknown) => isNativeError(e, 'READ_TIMEOUT') && /only 3 of 12 bytes arrived within 50 ms/.test(e.message));
  assert.equal(x.isClosed, true);
  assert.equal(await y.readExact(1), null);
  const watcher = new UnixConnection(watch);
  const eof = await watcher.readExact(1, 0, { timeoutMs: 10_000 }).catch(() => 'still open after 10 s');
  assert.equal(eof, null, 'the fd received with the unfinished read was not closed');
  watcher.close();
  // Without idleUntilFirstByte the clock runs from the call, first byte or not.
  const [p, q] = UnixConnection.pair();
  await assert.rejects(p.readExact(8, 0, { timeoutMs: 50 }), (e: unknown) => isNativeError(e, 'READ_TIMEOUT') && /only 0 of 8/.test(e.message));
  [y, q].forEach((c) => c.close());
});

test('with idleUntilFirstByte a read waits for its first byte without limit, and a timely message is read whole', async () => {
  const [x, y] = UnixConnection.pair();
  const read = x.readExact(12, 0, { timeoutMs: 50, idleUntilFirstByte: true });
  let settled = false;
  read.then(() => (settled = true), () => (settled = true));
  await new Promise((resolve) => setTimeout(resolve, 300)); // six times the timeout, idle
  assert.equal(settled, false, 'an idle read must not time out before its first byte');
  y.send(enc('twelve bytes'));
  assert.equal(dec((await read)!.data), 'twelve bytes');
  // The timer of a finished read never fires later: the connection still works.
  await new Promise((resolve) => setTimeout(resolve, 150));
  y.send(enc('more'));
  assert.equal(dec((await x.readExact(4, 0, { timeoutMs: 50 }))!.data), 'more');
  assert.throws(() => x.readExact(1, 0, { timeoutMs: 0 }), RangeError);
  [x, y].forEach((c) => c.close());
});

test('a pending read whose peer hangs up with our data unread rejects with ECONNRESET, not the poll\'s EBADF', async () => {
  const [x, y] = UnixConnection.pair();
  const read = x.readExact(12);
  x.send(enc('a reply y never reads'));
  await x.drain();
  y.close();
  await assert.rejects(read, (e: unknown) => isNativeError(e, 'ECONNRESET'));
  assert.equal(x.isClosed, true);
});

test('one read at a time; reads after close reject with CLOSED; close rejects the pending read', async () => {
  const [x, y] = UnixConnection.pair();
  const pending = x.readExact(4);
  assert.throws(() => x.readExact(4), (e: unknown) => isNativeError(e, 'READ_PENDING'));
  x.close();
  await assert.rejects(pending, (e: unknown) => isNativeError(e, 'CLOSED'));
  await assert.rejects(x.readExact(4), (e: unknown) => isNativeError(e, 'CLOSED'));
  assert.throws(() => x.send(enc('late')), (e: unknown) => isNativeError(e, 'CLOSED'));
  y.close();
});

test('send queues what the socket cannot take, keeps order, and passes fds of queued messages', async () => {
  const [x, y] = UnixConnection.pair();
  const big = new Uint8Array(4 * 1024 * 1024).fill(7);
  x.send(big); // far more than a socket buffer: most of it is queued
  const efd = native.eventfd();
  x.send(enc('tail'), [efd]);
  native.close(efd); // send took its own copy of the fd
  const drained = x.drain();
  const body = await y.readExact(big.length);
  assert.ok(body?.data.every((v) => v === 7));
  const tail = await y.readExact(4, 1);
  assert.equal(dec(tail!.data), 'tail');
  assert.equal(tail!.fds.length, 1);
  native.eventfdWrite(tail!.fds[0], 1);
  native.close(tail!.fds[0]);
  await drained;
  x.close();
  y.close();
});

test('a send to a vanished peer does not throw; drain and the next read report EPIPE', async () => {
  const [x, y] = UnixConnection.pair();
  y.close();
  x.send(enc('hello?'));
  assert.equal(x.isClosed, true);
  await assert.rejects(x.drain(), (e: unknown) => isNativeError(e, 'EPIPE'));
  await assert.rejects(x.readExact(1), (e: unknown) => isNativeError(e, 'EPIPE'));
  x.send(enc('ignored')); // the failure was reported; more sends are dropped silently
  x.close();
});

test('server accepts connections; client and server exchange messages with fds', withDir(async (dir) => {
  const path = join(dir, 'vhost.sock');
  const accepted: UnixConnection[] = [];
  let onAccept: () => void = () => {};
  const server = UnixSocketServer.listen(path, (conn) => {
    accepted.push(conn);
    onAccept();
  });
  try {
    const client = await UnixConnection.connect(path);
    if (accepted.length === 0) await new Promise<void>((resolve) => { onAccept = resolve; });
    const [conn] = accepted;
    const efd = native.eventfd();
    client.send(enc('ping'), [efd]);
    const got = await conn.readExact(4, 1);
    assert.equal(dec(got!.data), 'ping');
    native.eventfdWrite(got!.fds[0], 2);
    assert.equal(native.eventfdRead(efd), 2);
    native.close(got!.fds[0]);
    native.close(efd);
    conn.send(enc('pong'));
    assert.equal(dec((await client.readExact(4))!.data), 'pong');
    client.close();
    conn.close();
  } finally {
    server.close();
  }
  assert.equal(existsSync(path), false);
}));

test('a paused server leaves peers in the backlog, reports one waiting once, and accepts them in order on resume', withDir(async (dir) => {
  const path = join(dir, 'paused.sock');
  const accepted: UnixConnection[] = [];
  let waiting = 0;
  const server = UnixSocketServer.listen(path, (conn) => {
    accepted.push(conn);
    // One at a time: each accepted peer pauses the server before the next is accepted.
    server.pause(() => waiting++);
  });
  const until = (what: string, done: () => boolean): Promise<void> => new Promise((resolve, reject) => {
    const deadline = Date.now() + 10_000;
    const check = (): void => {
      if (done()) resolve();
      else if (Date.now() > deadline) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(check, 5);
    };
    check();
  });
  const clients: UnixConnection[] = [];
  try {
    clients.push(await UnixConnection.connect(path));
    await until('the first peer to be accepted', () => accepted.length === 1);
    for (const text of ['two!', 'tri!']) {
      const c = await UnixConnection.connect(path);
      c.send(enc(text));
      clients.push(c);
    }
    await until('a waiting peer to be reported', () => waiting === 1);
    // Nothing accepted while paused, and the report came once for both peers.
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(accepted.length, 1);
    assert.equal(waiting, 1);

    server.resume();
    await until('the second peer to be accepted', () => accepted.length === 2);
    assert.equal(dec((await accepted[1].readExact(4))!.data), 'two!', 'what a peer sent while waiting is kept');
    server.resume();
    await until('the third peer to be accepted', () => accepted.length === 3);
    assert.equal(dec((await accepted[2].readExact(4))!.data), 'tri!');
  } finally {
    server.close();
    [...clients, ...accepted].forEach((c) => c.close());
  }
}));

test('listen fails with EADDRINUSE on a live socket, even with removeStale', withDir((dir) => {
  const path = join(dir, 'live.sock');
  const server = UnixSocketServer.listen(path, (c) => c.close());
  try {
    assert.throws(() => UnixSocketServer.listen(path, (c) => c.close(), { removeStale: true }),
      (e: unknown) => isNativeError(e, 'EADDRINUSE'));
  } finally {
    server.close();
  }
}));

test('removeStale replaces a socket nobody listens on, never a regular file', withDir((dir) => {
  const stale = join(dir, 'stale.sock');
  native.close(native.listen(stale, 1)); // the file stays, nobody listens
  assert.throws(() => UnixSocketServer.listen(stale, (c) => c.close()), (e: unknown) => isNativeError(e, 'EADDRINUSE'));
  UnixSocketServer.listen(stale, (c) => c.close(), { removeStale: true }).close();

  const file = join(dir, 'not-a-socket');
  writeFileSync(file, 'precious');
  assert.throws(() => UnixSocketServer.listen(file, (c) => c.close(), { removeStale: true }),
    (e: unknown) => isNativeError(e, 'EADDRINUSE'));
  assert.equal(existsSync(file), true);
}));

test('connect reports ENOENT and ECONNREFUSED by code', withDir(async (dir) => {
  await assert.rejects(UnixConnection.connect(join(dir, 'nothing')), (e: unknown) => isNativeError(e, 'ENOENT'));
  const stale = join(dir, 'stale.sock');
  native.close(native.listen(stale, 1));
  await assert.rejects(UnixConnection.connect(stale), (e: unknown) => isNativeError(e, 'ECONNREFUSED'));
}));
