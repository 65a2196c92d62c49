/**
 * A catalogue of hostile vhost-user frontends and guests (issue 7, items 2 and 5), each
 * run over a real unix socket against `VhostUserServer` + `BlkDevice` in a child
 * process (test/support/serve-child.ts), so a crash fails the case instead of killing
 * the runner.
 *
 * After every case the server must: still be alive; have logged why the connection
 * ended (the case names the reason it expects); be back to its baseline of open fds
 * (/proc/<pid>/fd), with every fd the case handed over closed (peers of tracked
 * sockets see EOF); never have double-closed an fd; and serve a well-behaved frontend
 * (write a block, read it back) at once. qemu-storage-daemon 7.2 crashes, wedges or
 * leaks on many of these classes: unchecked region counts and ring indices, regions
 * past the end of their memfd, memory removed or shrunk under a running ring, fds on
 * messages that take none.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { ftruncateSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import * as native from '../src/node/native.js';
import type { UnixConnection } from '../src/node/unix-socket.js';
import { VIRTQ_DESC_F } from '../src/spec/split-ring.js';
import { VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_PROTOCOL_F, VHOST_VRING_F_LOG } from '../src/spec/vhost-user.js';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { VIRTIO_F } from '../src/spec/virtio.js';
import type { FrontendRequest } from '../src/transport/vhost-user/messages.js';
import { RunningGuest } from './support/hostile-guest.js';
import { FLAGS, FdFactory, GUEST_BASE, GuestRing, RawFrontend, REQ, SharedRegion, bit, payloadOf, rawMessage } from './support/raw-frontend.js';
import { ServerProcess, describeExit, sleep } from './support/server-process.js';
import { wellBehavedRoundTrip } from './support/well-behaved.js';

// ---------------------------------------------------------------------------------------
// The harness

/** What one case may use; everything it opens is closed by the harness afterwards. */
class Ctx {
  readonly conns: RawFrontend[] = [];
  readonly tracked: { what: string; peer: UnixConnection }[] = [];
  readonly guests: RunningGuest[] = [];
  readonly regions: SharedRegion[] = [];

  constructor(readonly socketPath: string, readonly fds: FdFactory, readonly server: ServerProcess) {}

  /** A connection the server accepts (and later logs as disconnected). */
  async connect(): Promise<RawFrontend> {
    const f = await RawFrontend.connect(this.socketPath);
    this.conns.push(f);
    return f;
  }

  /** The case's first connection, opened on first use. */
  async main(): Promise<RawFrontend> {
    return this.conns[0] ?? this.connect();
  }

  /** A socket fd to hand over; its peer must see EOF once the server let go of it. */
  track(what: string): number {
    const s = this.fds.socket();
    this.tracked.push({ what, peer: s.peer });
    return s.fd;
  }

  async guest(opts?: Parameters<typeof RunningGuest.start>[1]): Promise<RunningGuest> {
    const g = await RunningGuest.start(this.socketPath, opts);
    this.conns.push(g.f);
    this.guests.push(g);
    return g;
  }

  region(size: number, opts?: ConstructorParameters<typeof SharedRegion>[1]): SharedRegion {
    const r = new SharedRegion(size, opts);
    this.regions.push(r);
    return r;
  }

  /** Connections the server accepted that were not made through {@link connect}. */
  external = 0;

  /** Lines the server logged since the case began. */
  log(): string[] {
    return this.server.lines.slice(this.from);
  }

  from = 0;
}

interface Case {
  readonly name: string;
  /** The server must drop the connection, logging a reason that matches. */
  readonly drop?: RegExp;
  /** The case ends the connection itself; the server's logged reason must match (default: the frontend closed it). */
  readonly log?: RegExp;
  run(ctx: Ctx): Promise<void>;
}

const CLOSED_BY_FRONTEND = /^frontend closed the connection$/;

/** Sends one raw message on the case's connection. */
function sending(bytes: Uint8Array, fds: (ctx: Ctx) => number[] = () => []): (ctx: Ctx) => Promise<void> {
  return async (ctx) => {
    const f = await ctx.main();
    f.sendBytes(bytes, fds(ctx));
  };
}

/** The no-fd request shapes: name, a valid payload. */
const NO_FD_REQUESTS: [keyof typeof REQ, Uint8Array][] = [
  ['GET_FEATURES', new Uint8Array(0)],
  ['SET_FEATURES', payloadOf([8, bit(VIRTIO_F.VERSION_1)])],
  ['SET_OWNER', new Uint8Array(0)],
  ['RESET_OWNER', new Uint8Array(0)],
  ['SET_VRING_NUM', payloadOf([4, 0], [4, 16])],
  ['SET_VRING_ADDR', new Uint8Array(40)],
  ['SET_VRING_BASE', payloadOf([4, 0], [4, 0])],
  ['GET_VRING_BASE', payloadOf([4, 0], [4, 0])],
  ['GET_PROTOCOL_FEATURES', new Uint8Array(0)],
  ['SET_PROTOCOL_FEATURES', payloadOf([8, 0])],
  ['GET_QUEUE_NUM', new Uint8Array(0)],
  ['SET_VRING_ENABLE', payloadOf([4, 0], [4, 1])],
  ['GET_CONFIG', payloadOf([4, 0], [4, 4], [4, 0], [4, 0])],
  ['SET_CONFIG', payloadOf([4, 0], [4, 4], [4, 0], [4, 0])],
  ['GET_INFLIGHT_FD', payloadOf([8, 0], [8, 0], [2, 1], [2, 16], [4, 0])],
  ['RESET_DEVICE', new Uint8Array(0)],
  ['GET_MAX_MEM_SLOTS', new Uint8Array(0)],
  ['SET_STATUS', payloadOf([8, 0])],
  ['GET_STATUS', new Uint8Array(0)],
];

/** Requests that take fds: name, a valid payload, how many fds. */
const FD_REQUESTS: [keyof typeof REQ, Uint8Array, number][] = [
  ['SET_MEM_TABLE', payloadOf([4, 1], [4, 0], [8, 0], [8, 4096], [8, 0], [8, 0]), 1],
  ['SET_LOG_BASE', payloadOf([8, 4096], [8, 0]), 1],
  ['SET_LOG_FD', new Uint8Array(0), 1],
  ['SET_VRING_KICK', payloadOf([8, 0]), 1],
  ['SET_VRING_CALL', payloadOf([8, 0]), 1],
  ['SET_VRING_ERR', payloadOf([8, 0]), 1],
  ['SET_BACKEND_REQ_FD', new Uint8Array(0), 1],
  ['SET_INFLIGHT_FD', payloadOf([8, 4096], [8, 0], [2, 1], [2, 16], [4, 0]), 1],
  ['ADD_MEM_REG', payloadOf([8, 0], [8, 0], [8, 4096], [8, 0], [8, 0]), 1],
];

/** One memory table entry, raw. */
function regionBytes(gpa: number | bigint, size: number | bigint, uva: number | bigint, offset: number | bigint): [8, number | bigint][] {
  return [[8, gpa], [8, size], [8, uva], [8, offset]];
}

function memTable(regions: [8, number | bigint][][], n = regions.length): Uint8Array {
  return rawMessage(REQ.SET_MEM_TABLE, FLAGS, payloadOf([4, n], [4, 0], ...regions.flat()));
}

/** A memory table message for `size`-byte regions, one per fd given, back to back. */
function tableFor(fdCount: number, size = 1 << 20): Uint8Array {
  const regions = [];
  for (let i = 0; i < fdCount; i++) regions.push(regionBytes(0x4000_0000 + i * size, size, 0x7f00_0000_0000 + i * size, 0));
  return memTable(regions);
}

/** Handshake, then a memory table of one region of `fd`, without NEED_REPLY (so a refusal drops the connection). */
async function sendTable(ctx: Ctx, fd: number, size: number, mmapOffset = 0): Promise<void> {
  const f = await ctx.main();
  await f.handshake();
  f.send({ request: 'SET_MEM_TABLE', needReply: false, regions: [{ guestAddress: 0x4000_0000, size, userAddress: 0x7f00_0000_0000, mmapOffset, fd }] });
}

/** The sentence the server logs for a refused request it cannot NACK. */
const refused = (what: string): RegExp => new RegExp(`^cannot honour VHOST_USER_${what}: `);

// ---------------------------------------------------------------------------------------
// The catalogue

const CASES: Case[] = [];
const add = (c: Case): void => {
  CASES.push(c);
};

// Framing: what arrives before any request can be decoded.
add({ name: 'framing: truncated header, then EOF', log: /after 5 of 12 bytes/, run: sending(new Uint8Array(5)) });
add({ name: 'framing: one byte, then EOF', log: /after 1 of 12 bytes/, run: sending(new Uint8Array(1)) });
add({
  name: 'framing: header, then EOF before the payload', log: /mid-message/,
  run: sending(rawMessage(REQ.SET_FEATURES, FLAGS, new Uint8Array(0), 8)),
});
add({
  name: 'framing: header, then EOF mid-payload', log: /after 3 of 8 bytes/,
  run: sending(rawMessage(REQ.SET_FEATURES, FLAGS, new Uint8Array(3), 8)),
});
add({
  name: 'framing: SET_MEM_TABLE header with its fd, then EOF mid-payload', log: /after 10 of 40 bytes/,
  run: sending(rawMessage(REQ.SET_MEM_TABLE, FLAGS, new Uint8Array(10), 40), (ctx) => [ctx.track('region fd')]),
});
for (const size of [4097, 0x10000, 0x7fff_ffff, 0xffff_ffff]) {
  add({ name: `framing: size field ${size}`, drop: /OVERSIZED|at most 4096 accepted/, run: sending(rawMessage(REQ.GET_FEATURES, FLAGS, new Uint8Array(0), size)) });
}
add({
  name: 'framing: oversized SET_MEM_TABLE with fds', drop: /at most 4096 accepted/,
  run: sending(rawMessage(REQ.SET_MEM_TABLE, FLAGS, new Uint8Array(0), 100_000), (ctx) => [ctx.track('fd a'), ctx.track('fd b')]),
});
for (const flags of [0, 2, 3, 0x8, 0xa]) {
  add({ name: `framing: version bits in flags 0x${flags.toString(16)}`, drop: /protocol version/, run: sending(rawMessage(REQ.GET_FEATURES, flags)) });
}
for (const flags of [0x5, 0xd]) {
  add({ name: `framing: REPLY flag on a request (flags 0x${flags.toString(16)})`, drop: /REPLY set on a request/, run: sending(rawMessage(REQ.GET_FEATURES, flags)) });
}
for (const flags of [0x11, 0x101, 0x8000_0001]) {
  add({ name: `framing: reserved flag bits 0x${flags.toString(16)}`, drop: /reserved bits set/, run: sending(rawMessage(REQ.SET_OWNER, flags)) });
}
for (const request of [0, 41, 42, 1000, 0x7fff_ffff, 0xffff_ffff]) {
  add({
    name: `framing: unknown request ${request}`, drop: /not a front-end request the vhost-user spec defines/,
    run: sending(rawMessage(request, FLAGS, new Uint8Array(8)), (ctx) => [ctx.track('fd on an unknown request')]),
  });
}
for (const name of ['SEND_RARP', 'NET_SET_MTU', 'IOTLB_MSG', 'SET_VRING_ENDIAN', 'CREATE_CRYPTO_SESSION', 'POSTCOPY_ADVISE', 'POSTCOPY_END', 'GPU_SET_SOCKET', 'VRING_KICK'] as const) {
  add({
    name: `framing: spec request ${name} that vblk never invites`, drop: /not implemented by vblk/,
    run: sending(rawMessage(REQ[name], FLAGS, new Uint8Array(8)), (ctx) => [ctx.track(`fd on ${name}`)]),
  });
}
add({
  name: 'framing: fds attached to payload bytes instead of the header', drop: /fds attached inside a payload/,
  async run(ctx) {
    const f = await ctx.main();
    const m = rawMessage(REQ.SET_FEATURES, FLAGS, payloadOf([8, bit(VIRTIO_F.VERSION_1)]));
    f.sendBytes(m.subarray(0, 12));
    await sleep(20);
    f.sendBytes(m.subarray(12), [ctx.track('fd on the payload')]);
  },
});
add({
  name: 'framing: a valid request split into single bytes is served',
  async run(ctx) {
    const f = await ctx.main();
    const m = rawMessage(REQ.GET_QUEUE_NUM, FLAGS);
    for (let i = 0; i < m.length; i++) {
      f.sendBytes(m.subarray(i, i + 1));
      await sleep(1);
    }
    const r = await f.reply();
    assert.equal(r?.request, REQ.GET_QUEUE_NUM);
    assert.equal(new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true), 2n);
  },
});

// Sizes: every request one byte short and one byte long.
for (const [name, payload] of NO_FD_REQUESTS) {
  const sizes = [payload.length + 1, ...(payload.length > 0 ? [payload.length - 1] : [])];
  for (const size of sizes) {
    const p = new Uint8Array(size);
    p.set(payload.subarray(0, size));
    add({ name: `size: ${name} with ${size} payload bytes (valid: ${payload.length})`, drop: /payload of \d+ bytes/, run: sending(rawMessage(REQ[name], FLAGS, p)) });
  }
}
for (const [name, payload, fdCount] of FD_REQUESTS) {
  const sizes = [payload.length + 1, ...(payload.length > 0 ? [payload.length - 1] : [])];
  for (const size of sizes) {
    const p = new Uint8Array(size);
    p.set(payload.subarray(0, size));
    add({
      name: `size: ${name} with ${size} payload bytes (valid: ${payload.length}) and its fd`, drop: /payload of \d+ bytes/,
      run: sending(rawMessage(REQ[name], FLAGS, p), (ctx) => Array.from({ length: fdCount }, () => ctx.track(`${name} fd`))),
    });
  }
}
add({
  name: 'size: REM_MEM_REG one byte long', drop: /payload of 41 bytes/,
  run: sending(rawMessage(REQ.REM_MEM_REG, FLAGS, new Uint8Array(41))),
});
add({
  name: 'size: SET_CONFIG whose size field disagrees with its payload', drop: /payload of 20 bytes, expected 16/,
  run: sending(rawMessage(REQ.SET_CONFIG, FLAGS, payloadOf([4, 0], [4, 4], [4, 0], [4, 0], [4, 0]))),
});

// fds on messages that take none, and wrong fd counts.
for (const [name, payload] of NO_FD_REQUESTS) {
  add({
    name: `fds: one fd on ${name}`, drop: /1 fds attached, expected 0/,
    run: sending(rawMessage(REQ[name], FLAGS, payload), (ctx) => [ctx.track(`fd on ${name}`)]),
  });
}
add({
  name: 'fds: eight fds on GET_FEATURES', drop: /8 fds attached, expected 0/,
  run: sending(rawMessage(REQ.GET_FEATURES, FLAGS), (ctx) => Array.from({ length: 8 }, (_, i) => ctx.track(`fd ${i}`))),
});
add({
  name: 'fds: SET_VRING_KICK with the NOFD bit and an fd', drop: /1 fds attached, expected 0/,
  run: sending(rawMessage(REQ.SET_VRING_KICK, FLAGS, payloadOf([8, 0x100])), (ctx) => [ctx.track('kick fd')]),
});
for (const name of ['SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ERR'] as const) {
  add({ name: `fds: ${name} without the NOFD bit and no fd`, drop: /0 fds attached, expected 1/, run: sending(rawMessage(REQ[name], FLAGS, payloadOf([8, 0]))) });
  add({
    name: `fds: ${name} with two fds`, drop: /2 fds attached, expected 1/,
    run: sending(rawMessage(REQ[name], FLAGS, payloadOf([8, 0])), (ctx) => [ctx.track('fd a'), ctx.track('fd b')]),
  });
}
add({
  name: 'fds: REM_MEM_REG with two fds', drop: /2 fds attached, expected 0 to 1/,
  run: sending(rawMessage(REQ.REM_MEM_REG, FLAGS, new Uint8Array(40)), (ctx) => [ctx.track('fd a'), ctx.track('fd b')]),
});
add({
  name: 'fds: SET_MEM_TABLE of two regions with one fd', drop: /1 fds attached, expected 2/,
  run: sending(tableFor(2), (ctx) => [ctx.track('region fd')]),
});
add({
  name: 'fds: SET_MEM_TABLE of one region with three fds', drop: /3 fds attached, expected 1/,
  run: sending(tableFor(1), (ctx) => [ctx.track('fd a'), ctx.track('fd b'), ctx.track('fd c')]),
});
add({
  name: 'fds: nine fds on one message (sent by a helper that can)', log: /more than 8 fds on one message/,
  async run(ctx) {
    const fds = Array.from({ length: 9 }, (_, i) => ctx.track(`fd ${i}`));
    // Our addon sends at most 8 fds, as a frontend should; Python's socket module has no
    // such limit. Its connection is the case's only one.
    ctx.external++;
    const script = [
      'import os, socket, struct, sys',
      's = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])',
      'fds = list(range(3, 3 + int(sys.argv[2])))',
      's.sendmsg([struct.pack("<III", 1, 1, 0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<%di" % len(fds), *fds))])',
      's.settimeout(5)',
      'print("closed" if s.recv(100) == b"" else "answered")',
    ].join('\n');
    // The fds are close-on-exec here: hand them to the helper as its fds 3 to 11.
    const out = execFileSync('python3', ['-c', script, ctx.socketPath, String(fds.length)], { stdio: ['ignore', 'pipe', 'pipe', ...fds], timeout: 10_000, encoding: 'utf8' });
    assert.equal(out.trim(), 'closed');
  },
});

// Memory tables.
add({ name: 'memory: SET_MEM_TABLE with 0 regions', drop: /a memory table without regions/, run: sending(memTable([])) });
add({
  name: 'memory: SET_MEM_TABLE with 9 regions and 8 fds', drop: /9 regions, at most 8/,
  run: sending(tableFor(9), (ctx) => Array.from({ length: 8 }, (_, i) => ctx.track(`region fd ${i}`))),
});
add({ name: 'memory: SET_MEM_TABLE claiming 0xffffffff regions', drop: /4294967295 regions, at most 8/, run: sending(memTable([], 0xffff_ffff)) });
add({
  name: 'memory: a region field above 2^53', drop: /is above 2\^53-1/,
  run: sending(memTable([regionBytes(0, 1n << 60n, 0, 0)]), (ctx) => [ctx.fds.memfd(4096, true)]),
});
add({
  name: 'memory: regions overlapping in guest addresses', drop: /overlap in guest-physical addresses/,
  run: sending(memTable([regionBytes(0x10000, 0x10000, 0x100000, 0), regionBytes(0x18000, 0x10000, 0x200000, 0)]), (ctx) => [ctx.fds.memfd(0x10000, true), ctx.fds.memfd(0x10000, true)]),
});
add({
  name: 'memory: regions overlapping in user addresses', drop: /overlap in frontend user addresses/,
  run: sending(memTable([regionBytes(0x10000, 0x10000, 0x100000, 0), regionBytes(0x40000, 0x10000, 0x10f000, 0)]), (ctx) => [ctx.fds.memfd(0x10000, true), ctx.fds.memfd(0x10000, true)]),
});
add({
  name: 'memory: a zero-sized region', drop: /is empty/,
  run: sending(memTable([regionBytes(0x10000, 0, 0x100000, 0)]), (ctx) => [ctx.fds.memfd(0x10000, true)]),
});
add({
  name: 'memory: a region reaching past 2^53 in guest space', drop: /reaches past 2\^53/,
  run: sending(memTable([regionBytes(2 ** 53 - 4096, 8192, 0x100000, 0)]), (ctx) => [ctx.fds.memfd(8192, true)]),
});
add({
  name: 'memory: a region larger than its memfd', drop: /reaches past the end of its 65536-byte fd/,
  run: (ctx) => sendTable(ctx, ctx.fds.memfd(0x10000, true), 0x20000),
});
add({
  name: 'memory: a region whose mmap_offset + size lies past the end of its memfd', drop: /reaches past the end of its 65536-byte fd/,
  run: (ctx) => sendTable(ctx, ctx.fds.memfd(0x10000, true), 0x8000, 0x9000),
});
add({
  name: 'memory: a region whose mmap_offset is far past the end of its memfd', drop: /reaches past the end/,
  run: (ctx) => sendTable(ctx, ctx.fds.memfd(0x10000, true), 0x1000, 2 ** 50),
});
add({
  name: 'memory: an unsealed memfd is refused (SIGBUS policy)', drop: /not sealed against shrinking \(seals 0x0\)/,
  run: (ctx) => sendTable(ctx, ctx.fds.memfd(0x10000, false), 0x10000),
});
add({
  name: 'memory: a regular file is refused (cannot carry seals)', drop: /cannot carry seals/,
  run: (ctx) => sendTable(ctx, ctx.fds.file(0x10000), 0x10000),
});
add({ name: 'memory: a pipe as region fd', drop: /cannot carry seals/, run: (ctx) => sendTable(ctx, ctx.fds.pipe(), 0x10000) });
add({ name: 'memory: a socket as region fd', drop: /cannot carry seals/, run: (ctx) => sendTable(ctx, ctx.track('region socket'), 0x10000) });
add({ name: 'memory: an eventfd as region fd', drop: /cannot carry seals/, run: (ctx) => sendTable(ctx, ctx.fds.eventfd(), 0x10000) });
add({
  name: 'memory: a refused table is NACKed with REPLY_ACK and the connection goes on',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    const bad = await f.acked({ request: 'SET_MEM_TABLE', needReply: true, regions: [{ guestAddress: 0, size: 0x20000, userAddress: 0, mmapOffset: 0, fd: ctx.fds.memfd(0x10000, true) }] });
    assert.equal(bad, false);
    const good = await f.acked({ request: 'SET_MEM_TABLE', needReply: true, regions: [{ guestAddress: 0, size: 0x10000, userAddress: 0, mmapOffset: 0, fd: ctx.fds.memfd(0x10000, true) }] });
    assert.equal(good, true);
    await ctx.server.waitFor('the refusal to be logged', () => ctx.log().some((l) => /VHOST_USER_SET_MEM_TABLE refused: .*reaches past the end/.test(l)));
  },
});
add({
  name: 'memory: the eighth of eight regions fails to map: the seven mapped are undone',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    const regions = Array.from({ length: 8 }, (_, i) => ({
      guestAddress: i * 0x10000, size: 0x10000, userAddress: i * 0x10000, mmapOffset: 0, fd: ctx.fds.memfd(0x10000, i < 7),
    }));
    assert.equal(await f.acked({ request: 'SET_MEM_TABLE', needReply: true, regions }), false);
    assert.equal(await f.acked({ request: 'SET_MEM_TABLE', needReply: true, regions: regions.slice(0, 7) }), true);
  },
});
add({
  name: 'memory: a table replaced (same layout) while rings run keeps them running',
  async run(ctx) {
    const g = await ctx.guest();
    assert.equal(await g.f.acked({ request: 'SET_MEM_TABLE', needReply: true, regions: [g.mem.region] }), true);
    const r = g.rings[1].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    g.kick(1);
    assert.ok(await g.waitUsed(1, 1));
    assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
  },
});
add({
  name: 'memory: a table that fails to map under running rings is NACKed and the rings go on with the old one',
  async run(ctx) {
    const g = await ctx.guest();
    const unsealed = ctx.region(1 << 20, { seal: false });
    assert.equal(await g.f.acked({ request: 'SET_MEM_TABLE', needReply: true, regions: [unsealed.region] }), false);
    const r = g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    g.kick(0);
    assert.ok(await g.waitUsed(0, 1), 'the ring stopped for the swap never restarted');
    assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
  },
});
add({
  name: 'memory: the region under a running ring removed (new table elsewhere)', drop: /^cannot honour VHOST_USER_SET_MEM_TABLE: ring \d addresses are outside every memory region/,
  async run(ctx) {
    const g = await ctx.guest();
    const other = ctx.region(1 << 20, { guestAddress: 0x1_0000_0000, userAddress: 0x6000_0000_0000 });
    g.f.send({ request: 'SET_MEM_TABLE', needReply: false, regions: [other.region] });
    g.kick(0);
  },
});
add({
  name: 'memory: a sealed memfd cannot be shrunk under a running ring (the frontend gets EPERM)',
  async run(ctx) {
    const g = await ctx.guest();
    assert.throws(() => ftruncateSync(g.mem.fd, 0), /EPERM/);
    g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    g.kick(0);
    assert.ok(await g.waitUsed(0, 1));
  },
});

// Vrings.
for (const num of [0, 3, 100, 512, 65536, 0xffff_ffff]) {
  add({ name: `vring: SET_VRING_NUM ${num}`, drop: /is not a power of two up to 256/, run: sending(rawMessage(REQ.SET_VRING_NUM, FLAGS, payloadOf([4, 0], [4, num]))) });
}
const badRingMessages: [string, (index: number, ctx: Ctx) => [Uint8Array, number[]]][] = [
  ['SET_VRING_NUM', (i) => [rawMessage(REQ.SET_VRING_NUM, FLAGS, payloadOf([4, i], [4, 16])), []]],
  ['SET_VRING_BASE', (i) => [rawMessage(REQ.SET_VRING_BASE, FLAGS, payloadOf([4, i], [4, 0])), []]],
  ['SET_VRING_ADDR', (i) => [rawMessage(REQ.SET_VRING_ADDR, FLAGS, payloadOf([4, i], [4, 0], [8, 0], [8, 0], [8, 0], [8, 0])), []]],
  ['GET_VRING_BASE', (i) => [rawMessage(REQ.GET_VRING_BASE, FLAGS, payloadOf([4, i], [4, 0])), []]],
  ['SET_VRING_ENABLE', (i) => [rawMessage(REQ.SET_VRING_ENABLE, FLAGS, payloadOf([4, i], [4, 1])), []]],
  ['SET_VRING_KICK', (i, ctx) => [rawMessage(REQ.SET_VRING_KICK, FLAGS, payloadOf([8, i])), [ctx.fds.eventfd()]]],
  ['SET_VRING_CALL', (i, ctx) => [rawMessage(REQ.SET_VRING_CALL, FLAGS, payloadOf([8, i])), [ctx.track('call fd')]]],
  ['SET_VRING_ERR', (i, ctx) => [rawMessage(REQ.SET_VRING_ERR, FLAGS, payloadOf([8, i])), [ctx.fds.eventfd()]]],
];
for (const [name, build] of badRingMessages) {
  const indexes = name.startsWith('SET_VRING_KICK') || name.startsWith('SET_VRING_CALL') || name.startsWith('SET_VRING_ERR') ? [2, 200, 255] : [2, 200, 0xffff_ffff];
  for (const index of indexes) {
    add({
      name: `vring: ring index ${index} on ${name}`, drop: new RegExp(`ring ${index} does not exist`),
      async run(ctx) {
        const [bytes, fds] = build(index, ctx);
        (await ctx.main()).sendBytes(bytes, fds);
      },
    });
  }
}
for (const name of ['SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ERR'] as const) {
  const kinds: [string, (ctx: Ctx) => number][] = [
    ['a pipe', (ctx) => ctx.fds.pipe()],
    ['a regular file', (ctx) => ctx.fds.file(4096)],
    ['a socket', (ctx) => ctx.track(`${name} socket`)],
    ['a memfd', (ctx) => ctx.fds.memfd(4096, true)],
  ];
  for (const [kind, make] of kinds) {
    add({ name: `vring: ${name} with ${kind}`, drop: /not an eventfd/, run: sending(rawMessage(REQ[name], FLAGS, payloadOf([8, 0])), (ctx) => [make(ctx)]) });
  }
}
add({
  name: 'vring: SET_VRING_KICK with bits beyond index and NOFD', drop: /sets bits other than index and NOFD/,
  run: sending(rawMessage(REQ.SET_VRING_KICK, FLAGS, payloadOf([8, 0x200])), (ctx) => [ctx.fds.eventfd()]),
});
add({ name: 'vring: SET_VRING_ENABLE 2', drop: /enable = 2, expected 0 or 1/, run: sending(rawMessage(REQ.SET_VRING_ENABLE, FLAGS, payloadOf([4, 0], [4, 2]))) });
add({
  name: 'order: SET_VRING_ENABLE and GET_VRING_BASE before anything else',
  async run(ctx) {
    const f = await ctx.main();
    f.send({ request: 'SET_VRING_ENABLE', needReply: false, index: 1, enable: true });
    const r = await f.call({ request: 'GET_VRING_BASE', needReply: false, index: 0 });
    assert.equal(r?.request, REQ.GET_VRING_BASE);
    assert.deepEqual([...r.payload], [0, 0, 0, 0, 0, 0, 0, 0]);
  },
});
add({
  name: 'order: a whole ring set up before SET_MEM_TABLE starts once memory arrives',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    const mem = ctx.region(1 << 20);
    const ring = new GuestRing(mem, 0, 16);
    const kick = ctx.fds.eventfd();
    for (const req of [
      { request: 'SET_VRING_NUM', needReply: true, index: 0, num: 16 },
      { request: 'SET_VRING_ADDR', needReply: true, index: 0, flags: 0, ...ring.userAddresses, log: 0 },
      { request: 'SET_VRING_KICK', needReply: true, index: 0, fd: kick },
      { request: 'SET_VRING_ENABLE', needReply: true, index: 0, enable: true },
    ] as FrontendRequest[]) assert.equal(await f.acked(req), true, req.request);
    const r = ring.blkRequest(VIRTIO_BLK_T.IN, 0, 512);
    native.eventfdWrite(kick, 1);
    assert.equal(await f.acked({ request: 'SET_MEM_TABLE', needReply: true, regions: [mem.region] }), true);
    const deadline = Date.now() + 10_000;
    while (ring.usedIdx !== 1 && Date.now() < deadline) await sleep(2);
    assert.equal(ring.usedIdx, 1, 'the ring never started');
    assert.equal(mem.bytes[r.status], VIRTIO_BLK_S.OK);
  },
});
add({
  name: 'order: GET_VRING_BASE on a ring never started, twice',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    f.send({ request: 'SET_VRING_BASE', needReply: false, index: 1, num: 7 });
    for (let i = 0; i < 2; i++) {
      const r = await f.call({ request: 'GET_VRING_BASE', needReply: false, index: 1 });
      assert.equal(r?.payload[4], 7);
    }
  },
});
add({
  name: 'order: GET_CONFIG before the CONFIG protocol feature', drop: refused('GET_CONFIG'),
  run: sending(rawMessage(REQ.GET_CONFIG, FLAGS, payloadOf([4, 0], [4, 4], [4, 0], [4, 0]))),
});
add({
  name: 'order: SET_VRING_KICK without PROTOCOL_FEATURES and no memory (starts nothing)',
  async run(ctx) {
    const f = await ctx.main();
    f.send({ request: 'SET_VRING_NUM', needReply: false, index: 0, num: 16 });
    f.send({ request: 'SET_VRING_KICK', needReply: false, index: 0, fd: ctx.fds.eventfd() });
    assert.equal((await f.call({ request: 'GET_QUEUE_NUM', needReply: false }))?.request, REQ.GET_QUEUE_NUM);
  },
});
const ringAddressCases: [string, RegExp, (ring: GuestRing, mem: SharedRegion) => { desc: number; avail: number; used: number }][] = [
  ['outside every region', /outside every memory region/, () => ({ desc: 0x1000, avail: 0x2000, used: 0x3000 })],
  ['with the used ring outside every region', /outside every memory region/, (r) => ({ ...r.userAddresses, used: 0x10 })],
  ['crossing the end of the region', /is not inside one memory region/, (r, m) => ({ ...r.userAddresses, desc: m.userAddress + m.size - 64 })],
  ['misaligned', /aligned/, (r) => ({ ...r.userAddresses, desc: r.userAddresses.desc + 8 })],
];
for (const [what, reason, addrs] of ringAddressCases) {
  add({
    name: `vring: ring addresses ${what}`, drop: reason,
    async run(ctx) {
      const f = await ctx.main();
      await f.handshake({ protocol: bit(VHOST_USER_PROTOCOL_F.CONFIG) });
      const mem = ctx.region(1 << 20);
      const ring = new GuestRing(mem, 0, 16);
      f.send({ request: 'SET_MEM_TABLE', needReply: false, regions: [mem.region] });
      f.send({ request: 'SET_VRING_NUM', needReply: false, index: 0, num: 16 });
      f.send({ request: 'SET_VRING_ADDR', needReply: false, index: 0, flags: 0, ...addrs(ring, mem), log: 0 });
      f.send({ request: 'SET_VRING_KICK', needReply: false, index: 0, fd: ctx.fds.eventfd() });
      f.send({ request: 'SET_VRING_ENABLE', needReply: false, index: 0, enable: true });
    },
  });
}
const busy: [string, FrontendRequest][] = [
  ['SET_VRING_NUM', { request: 'SET_VRING_NUM', needReply: true, index: 0, num: 32 }],
  ['SET_VRING_BASE', { request: 'SET_VRING_BASE', needReply: true, index: 0, num: 5 }],
  ['SET_VRING_ADDR', { request: 'SET_VRING_ADDR', needReply: true, index: 0, flags: 0, desc: 0, avail: 0, used: 0, log: 0 }],
  ['SET_FEATURES (EVENT_IDX on)', { request: 'SET_FEATURES', needReply: true, features: bit(VIRTIO_F.VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VIRTIO_F.RING_EVENT_IDX) }],
];
for (const [what, req] of busy) {
  add({
    name: `vring: ${what} on a running ring is NACKed and the ring keeps running`,
    async run(ctx) {
      const g = await ctx.guest();
      assert.equal(await g.f.acked(req), false);
      g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
      g.kick(0);
      assert.ok(await g.waitUsed(0, 1));
    },
  });
}
add({
  name: 'vring: a request kicked between SET_VRING_ENABLE 0 and 1 is not lost',
  async run(ctx) {
    const g = await ctx.guest();
    assert.equal(await g.f.acked({ request: 'SET_VRING_ENABLE', needReply: true, index: 0, enable: false }), true);
    g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    g.kick(0);
    assert.equal(await g.f.acked({ request: 'SET_VRING_ENABLE', needReply: true, index: 0, enable: true }), true);
    assert.ok(await g.waitUsed(0, 1));
  },
});
add({
  name: 'vring: GET_VRING_BASE stops a ring, which restarts after a new kick and enable',
  async run(ctx) {
    const g = await ctx.guest();
    g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    g.kick(0);
    assert.ok(await g.waitUsed(0, 1));
    const r = await g.f.call({ request: 'GET_VRING_BASE', needReply: false, index: 0 });
    assert.equal(r?.payload[4], 1);
    const kick = ctx.fds.eventfd();
    assert.equal(await g.f.acked({ request: 'SET_VRING_KICK', needReply: true, index: 0, fd: kick }), true);
    assert.equal(await g.f.acked({ request: 'SET_VRING_ENABLE', needReply: true, index: 0, enable: true }), true);
    g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 8, 4096);
    native.eventfdWrite(kick, 1);
    assert.ok(await g.waitUsed(0, 2));
  },
});
add({
  name: 'vring: RESET_OWNER and RESET_DEVICE under running rings',
  async run(ctx) {
    const g = await ctx.guest();
    g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    g.kick(0);
    assert.equal(await g.f.acked({ request: 'RESET_OWNER', needReply: true }), true);
    assert.equal(await g.f.acked({ request: 'RESET_DEVICE', needReply: true }), true);
    assert.equal((await g.f.call({ request: 'GET_FEATURES', needReply: false }))?.request, REQ.GET_FEATURES);
  },
});
add({
  name: 'vring: the same eventfd as kick, call and err of both rings',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    const e = ctx.fds.eventfd();
    for (let i = 0; i < 2; i++) {
      for (const request of ['SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ERR'] as const) {
        assert.equal(await f.acked({ request, needReply: true, index: i, fd: e }), true);
      }
    }
    native.eventfdWrite(e, 3);
  },
});

// Features.
for (const [what, features] of [
  ['bit 63, never offered', bit(63) | bit(VIRTIO_F.VERSION_1)],
  ['bit 50, never offered', bit(50) | bit(VIRTIO_F.VERSION_1)],
  ['no VERSION_1', bit(VHOST_USER_F_PROTOCOL_FEATURES)],
  ['nothing at all', 0n],
] as const) {
  add({ name: `features: SET_FEATURES with ${what}`, drop: /frontend accepted features|VIRTIO_F_VERSION_1/, run: sending(rawMessage(REQ.SET_FEATURES, FLAGS, payloadOf([8, features]))) });
}
for (const b of [VHOST_USER_PROTOCOL_F.RARP, VHOST_USER_PROTOCOL_F.STATUS, VHOST_USER_PROTOCOL_F.CONFIGURE_MEM_SLOTS, 63]) {
  add({ name: `features: SET_PROTOCOL_FEATURES with bit ${b}, never offered`, drop: /protocol features .* that were not offered/, run: sending(rawMessage(REQ.SET_PROTOCOL_FEATURES, FLAGS, payloadOf([8, bit(b)]))) });
}
add({
  name: 'features: SET_FEATURES with unoffered bits is NACKed under REPLY_ACK',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    assert.equal(await f.acked({ request: 'SET_FEATURES', needReply: true, features: bit(62) | bit(VIRTIO_F.VERSION_1) }), false);
  },
});
const notNegotiated: [string, (ctx: Ctx) => [Uint8Array, number[]], RegExp][] = [
  ['SET_BACKEND_REQ_FD', (ctx) => [rawMessage(REQ.SET_BACKEND_REQ_FD, FLAGS), [ctx.track('backend channel')]], /without VHOST_USER_PROTOCOL_F_BACKEND_REQ/],
  ['GET_INFLIGHT_FD', () => [rawMessage(REQ.GET_INFLIGHT_FD, FLAGS, payloadOf([8, 0], [8, 0], [2, 2], [2, 256], [4, 0])), []], /needs (a )?protocol feature/],
  ['SET_INFLIGHT_FD', (ctx) => [rawMessage(REQ.SET_INFLIGHT_FD, FLAGS, payloadOf([8, 1 << 20], [8, 1 << 30], [2, 2], [2, 256], [4, 0])), [ctx.fds.memfd(4096, false)]], /needs (a )?protocol feature/],
  ['ADD_MEM_REG', (ctx) => [rawMessage(REQ.ADD_MEM_REG, FLAGS, payloadOf([8, 0], ...regionBytes(0, 4096, 0, 0))), [ctx.fds.memfd(4096, true)]], /needs (a )?protocol feature/],
  ['REM_MEM_REG', (ctx) => [rawMessage(REQ.REM_MEM_REG, FLAGS, payloadOf([8, 0], ...regionBytes(0, 4096, 0, 0))), [ctx.track('REM_MEM_REG fd')]], /needs (a )?protocol feature/],
  ['SET_LOG_BASE', (ctx) => [rawMessage(REQ.SET_LOG_BASE, FLAGS, payloadOf([8, 4096], [8, 0])), [ctx.fds.memfd(4096, true)]], /needs (a )?protocol feature/],
  ['SET_LOG_FD', (ctx) => [rawMessage(REQ.SET_LOG_FD, FLAGS), [ctx.track('log fd')]], /needs (a )?protocol feature/],
  ['SET_STATUS', () => [rawMessage(REQ.SET_STATUS, FLAGS, payloadOf([8, 0xf])), []], /needs (a )?protocol feature/],
  ['GET_STATUS', () => [rawMessage(REQ.GET_STATUS, FLAGS), []], /needs (a )?protocol feature/],
  ['GET_MAX_MEM_SLOTS', () => [rawMessage(REQ.GET_MAX_MEM_SLOTS, FLAGS), []], /needs (a )?protocol feature/],
];
for (const [name, build, reason] of notNegotiated) {
  add({
    name: `features: ${name} without its protocol feature`, drop: reason,
    async run(ctx) {
      const [bytes, fds] = build(ctx);
      (await ctx.main()).sendBytes(bytes, fds);
    },
  });
}
add({
  name: 'features: a regular file as the backend channel is kept and closed at disconnect',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake({ protocol: bit(VHOST_USER_PROTOCOL_F.REPLY_ACK) | bit(VHOST_USER_PROTOCOL_F.BACKEND_REQ) | bit(VHOST_USER_PROTOCOL_F.CONFIG) });
    assert.equal(await f.acked({ request: 'SET_BACKEND_REQ_FD', needReply: true, fd: ctx.fds.file(0) }), true);
    assert.equal(await f.acked({ request: 'SET_BACKEND_REQ_FD', needReply: true, fd: ctx.track('second backend channel') }), true);
  },
});

// The migration dirty log (VHOST_USER_PROTOCOL_F_LOG_SHMFD, VHOST_F_LOG_ALL): logs of bad
// sizes, past the end of their memfd, unsealed or unmappable, too small for guest memory;
// log flags without a log or pointing past it. Whatever the frontend says, the server
// writes nothing outside the log bytes it was given: each log here sits inside a larger
// memfd whose other bytes must stay zero.
const LOG_PROTOCOL = bit(VHOST_USER_PROTOCOL_F.LOG_SHMFD);
const LOG_ALL_FEATURES = bit(VIRTIO_F.VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);
/** Log bytes that cover the hostile guest's memory (1 MiB at GUEST_BASE), one bit per 4 KiB page. */
const LOG_BYTES = Math.ceil((GUEST_BASE + (1 << 20)) / 4096 / 8);
/** Where the log starts in its memfd: the bytes before it must stay untouched. */
const LOG_OFFSET = 4096;
const logAreas: [string, (ctx: Ctx) => number, number, number, RegExp][] = [
  ['no bytes', (ctx) => ctx.fds.memfd(LOG_OFFSET + LOG_BYTES, true), 0, 0, /log of 0 bytes/],
  ['more bytes than any guest needs', (ctx) => ctx.fds.memfd(4096, true), 2 ** 40, 0, /expected 1 to/],
  ['an area past the end of its memfd', (ctx) => ctx.fds.memfd(LOG_BYTES, true), LOG_BYTES, 4096, /reaches past the end/],
  ['an area far past the end of its memfd', (ctx) => ctx.fds.memfd(LOG_BYTES, true), LOG_BYTES, 2 ** 40, /reaches past the end/],
  ['an unsealed memfd', (ctx) => ctx.fds.memfd(LOG_BYTES, false), LOG_BYTES, 0, /not sealed against shrinking/],
  ['a pipe', (ctx) => ctx.fds.pipe(), LOG_BYTES, 0, /cannot carry seals/],
  ['a socket', (ctx) => ctx.track('log socket'), LOG_BYTES, 0, /cannot carry seals/],
  ['a log too small for guest memory', (ctx) => ctx.fds.memfd(LOG_BYTES, true), LOG_BYTES - 1, 0, /covers .* but guest memory reaches/],
];
for (const [what, make, mmapSize, mmapOffset, reason] of logAreas) {
  add({
    name: `log: SET_LOG_BASE with ${what}`, drop: refused('SET_LOG_BASE'),
    async run(ctx) {
      const g = await ctx.guest({ protocol: LOG_PROTOCOL });
      // QEMU sends no NEED_REPLY here (the reply is the log's own): a refusal ends the connection.
      g.f.send({ request: 'SET_LOG_BASE', needReply: false, fd: make(ctx), mmapSize, mmapOffset });
      await ctx.server.waitFor('the refusal to be logged', () => ctx.log().some((l) => reason.test(l)));
    },
  });
}
add({
  name: 'log: SET_LOG_FD with a pipe is refused', drop: refused('SET_LOG_FD'),
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake({ protocol: LOG_PROTOCOL });
    f.send({ request: 'SET_LOG_FD', needReply: false, fd: ctx.fds.pipe() });
  },
});
add({
  name: 'log: SET_LOG_FD with eventfds is acked, the replaced one and the last closed',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake({ protocol: LOG_PROTOCOL | bit(VHOST_USER_PROTOCOL_F.REPLY_ACK) });
    assert.equal(await f.acked({ request: 'SET_LOG_FD', needReply: true, fd: ctx.fds.eventfd() }), true);
    assert.equal(await f.acked({ request: 'SET_LOG_FD', needReply: true, fd: ctx.fds.eventfd() }), true);
  },
});

// A server told not to offer the log (protocolFeatures without LOG_SHMFD) offers nothing
// of it, and a frontend that uses it anyway is refused as not negotiated.
add({
  name: 'migration off: no LOG_SHMFD nor VHOST_F_LOG_ALL offered, and SET_LOG_BASE is refused as not negotiated',
  drop: /^cannot honour VHOST_USER_SET_LOG_BASE: .*needs protocol feature LOG_SHMFD/,
  async run(ctx) {
    const f = await ctx.main();
    const offered = await f.handshake({ protocol: bit(VHOST_USER_PROTOCOL_F.REPLY_ACK) });
    assert.equal(offered.protocol & LOG_PROTOCOL, 0n, 'GET_PROTOCOL_FEATURES offers LOG_SHMFD');
    assert.equal(offered.features & bit(VHOST_F_LOG_ALL), 0n, 'GET_FEATURES offers VHOST_F_LOG_ALL (bit 26)');
    assert.equal(await f.acked({ request: 'SET_FEATURES', needReply: true, features: LOG_ALL_FEATURES }), false, 'SET_FEATURES with LOG_ALL');
    // A well-formed log, sealed and large enough: refused only because it was not offered.
    f.send({ request: 'SET_LOG_BASE', needReply: false, fd: ctx.fds.memfd(LOG_OFFSET + LOG_BYTES, true), mmapSize: LOG_BYTES, mmapOffset: LOG_OFFSET });
  },
});
add({
  name: 'migration off: SET_LOG_FD is refused as not negotiated',
  drop: /^cannot honour VHOST_USER_SET_LOG_FD: .*needs protocol feature LOG_SHMFD/,
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake({ protocol: bit(VHOST_USER_PROTOCOL_F.REPLY_ACK) });
    f.send({ request: 'SET_LOG_FD', needReply: false, fd: ctx.fds.eventfd() });
  },
});

/**
 * A running guest with logging on: a log of LOG_BYTES inside a memfd with a page of
 * zeroes either side, LOG_ALL, and ring 0's log flag with `logAddress` (null: no flag).
 * One read request completes; returns the log's memfd bytes and the request.
 */
async function loggedRead(ctx: Ctx, logAddress: number | null, withLog = true): Promise<{ log: Uint8Array; g: RunningGuest; r: { status: number; data: number } }> {
  const g = await ctx.guest({ protocol: LOG_PROTOCOL });
  const logMem = ctx.region(LOG_OFFSET + LOG_BYTES + 4096);
  if (withLog) {
    const reply = await g.f.call({ request: 'SET_LOG_BASE', needReply: false, fd: logMem.fd, mmapSize: LOG_BYTES, mmapOffset: LOG_OFFSET });
    assert.equal(reply?.request, REQ.SET_LOG_BASE, 'SET_LOG_BASE is answered under LOG_SHMFD');
    assert.equal(reply?.payload.length, 8);
  }
  assert.equal(await g.f.acked({ request: 'SET_FEATURES', needReply: true, features: LOG_ALL_FEATURES }), true);
  const ring = g.rings[0];
  if (logAddress !== null) {
    assert.equal(await g.f.acked({ request: 'SET_VRING_ADDR', needReply: true, index: 0, flags: 1 << VHOST_VRING_F_LOG, ...ring.userAddresses, log: logAddress }), true);
  }
  const r = ring.blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
  g.kick(0);
  assert.ok(await g.waitUsed(0, 1), 'the read completes with logging on');
  assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
  return { log: logMem.bytes, g, r };
}

const pageBit = (log: Uint8Array, gpa: number): boolean => {
  const page = Math.floor(gpa / 4096);
  return (log[LOG_OFFSET + (page >> 3)] & (1 << (page & 7))) !== 0;
};
const untouchedAround = (log: Uint8Array): void => {
  assert.ok(log.subarray(0, LOG_OFFSET).every((b) => b === 0), 'bytes before the log were written');
  assert.ok(log.subarray(LOG_OFFSET + LOG_BYTES).every((b) => b === 0), 'bytes after the log were written');
};

add({
  name: 'log: with LOG_ALL and the ring log flag, a read marks its data page, its status page and the used ring at the log address',
  async run(ctx) {
    // The used ring logged at an address of its own choosing (the spec allows any the log covers).
    const usedLog = GUEST_BASE + 200 * 4096;
    const { log, g, r } = await loggedRead(ctx, usedLog);
    const ring = g.rings[0];
    assert.ok(pageBit(log, ring.gpa(r.data)), 'data page');
    assert.ok(pageBit(log, ring.gpa(r.status)), 'status page');
    assert.ok(pageBit(log, usedLog), 'used ring, at its log address');
    untouchedAround(log);
  },
});
add({
  name: 'log: a ring log address past the end of the log marks nothing outside it',
  async run(ctx) {
    const { log, g, r } = await loggedRead(ctx, 2 ** 52);
    assert.ok(pageBit(log, g.rings[0].gpa(r.data)));
    untouchedAround(log);
  },
});
add({
  name: 'log: the log flag and LOG_ALL without a log: requests still complete',
  async run(ctx) {
    await loggedRead(ctx, GUEST_BASE, false);
  },
});
add({
  name: 'log: SET_VRING_ADDR that moves a running ring is NACKed and the ring keeps running',
  async run(ctx) {
    const g = await ctx.guest({ protocol: LOG_PROTOCOL });
    const a = g.rings[0].userAddresses;
    assert.equal(await g.f.acked({ request: 'SET_VRING_ADDR', needReply: true, index: 0, flags: 0, ...a, used: a.used + 4096, log: 0 }), false);
    assert.equal(await g.f.acked({ request: 'SET_VRING_ADDR', needReply: true, index: 0, flags: 2, ...a, log: 0 }), false, 'an unknown flag');
    const r = g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    g.kick(0);
    assert.ok(await g.waitUsed(0, 1));
    assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
  },
});

// Inflight buffers (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): shapes, areas past the end of
// their memfd, unsealed or unmappable fds, and logs whose contents a hostile frontend
// (or a dead backend) wrote.
const INFLIGHT_PROTOCOL = bit(VHOST_USER_PROTOCOL_F.REPLY_ACK) | bit(VHOST_USER_PROTOCOL_F.CONFIG) | bit(VHOST_USER_PROTOCOL_F.MQ) | bit(VHOST_USER_PROTOCOL_F.INFLIGHT_SHMFD);
/** One queue's log for a 16-entry ring: 16-byte head and 16 descriptor states, rounded to 64. */
const INFLIGHT_QUEUE_BYTES = 320;
for (const [numQueues, queueSize] of [[0, 16], [3, 16], [1, 0], [1, 3], [1, 512], [0xffff, 0xffff]]) {
  add({
    name: `inflight: GET_INFLIGHT_FD for ${numQueues} queues of ${queueSize}`, drop: refused('GET_INFLIGHT_FD'),
    async run(ctx) {
      const f = await ctx.main();
      await f.handshake({ protocol: INFLIGHT_PROTOCOL });
      f.send({ request: 'GET_INFLIGHT_FD', needReply: false, numQueues, queueSize });
    },
  });
}
add({
  name: 'inflight: GET_INFLIGHT_FD hands out a memfd sealed against shrinking',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake({ protocol: INFLIGHT_PROTOCOL });
    const r = await f.call({ request: 'GET_INFLIGHT_FD', needReply: false, numQueues: 2, queueSize: 16 });
    assert.equal(r?.fds.length, 1);
    try {
      assert.ok((native.getSeals(r.fds[0]) & native.F_SEAL_SHRINK) !== 0);
      assert.ok(native.fstatSize(r.fds[0]) >= 2 * INFLIGHT_QUEUE_BYTES);
    } finally {
      r.fds.forEach((fd) => native.close(fd));
    }
  },
});
const inflightAreas: [string, (ctx: Ctx) => number, number, number, RegExp][] = [
  ['an area past the end of its memfd', (ctx) => ctx.fds.memfd(4096, true), 4096, 4096, /reaches past the end/],
  ['an area far past the end of its memfd', (ctx) => ctx.fds.memfd(4096, true), 2 ** 40, 0, /reaches past the end/],
  ['an unsealed memfd', (ctx) => ctx.fds.memfd(4096, false), 4096, 0, /not sealed against shrinking/],
  ['a pipe', (ctx) => ctx.fds.pipe(), 4096, 0, /cannot carry seals/],
  ['a socket', (ctx) => ctx.track('inflight socket'), 4096, 0, /cannot carry seals/],
  ['an area too small for its queues', (ctx) => ctx.fds.memfd(4096, true), 100, 0, /smaller than/],
];
for (const [what, make, mmapSize, mmapOffset, reason] of inflightAreas) {
  add({
    name: `inflight: SET_INFLIGHT_FD with ${what}`, drop: reason,
    async run(ctx) {
      const f = await ctx.main();
      await f.handshake({ protocol: INFLIGHT_PROTOCOL });
      f.send({ request: 'SET_INFLIGHT_FD', needReply: false, fd: make(ctx), mmapSize, mmapOffset, numQueues: 2, queueSize: 16 });
    },
  });
}
add({
  name: 'inflight: GET_INFLIGHT_FD under running rings is refused, its new buffer not leaked',
  drop: /^cannot honour VHOST_USER_GET_INFLIGHT_FD: the inflight buffer cannot change while rings run/,
  async run(ctx) {
    const g = await ctx.guest({ inflight: { fd: ctx.fds.memfd(4096, true), mmapSize: 4096, numQueues: 2, queueSize: 16 } });
    // A GET_ has no ack to fail: the server can only drop the connection.
    g.f.send({ request: 'GET_INFLIGHT_FD', needReply: true, numQueues: 2, queueSize: 16 });
  },
});
add({
  name: 'inflight: SET_INFLIGHT_FD under running rings is NACKed and they keep running',
  async run(ctx) {
    const g = await ctx.guest({ inflight: { fd: ctx.fds.memfd(4096, true), mmapSize: 4096, numQueues: 2, queueSize: 16 } });
    assert.equal(await g.f.acked({ request: 'SET_INFLIGHT_FD', needReply: true, fd: ctx.fds.memfd(4096, true), mmapSize: 4096, mmapOffset: 0, numQueues: 2, queueSize: 16 }), false);
    const r = g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    g.kick(0);
    assert.ok(await g.waitUsed(0, 1));
    assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
  },
});
/** Fills a two-queue inflight log as a hostile frontend would: `write(view, queueBase)` per queue. */
function hostileLog(ctx: Ctx, write: (v: DataView, q: number) => void): { fd: number; mmapSize: number; numQueues: number; queueSize: number } {
  const fd = ctx.fds.memfd(4096, true);
  const r = ctx.region(4096, { fd: native.dup(fd) });
  for (const q of [0, INFLIGHT_QUEUE_BYTES]) write(r.view, q);
  return { fd, mmapSize: 4096, numQueues: 2, queueSize: 16 };
}
const hostileLogs: [string, (v: DataView, q: number) => void][] = [
  ['every descriptor in flight, with equal counters', (v, q) => {
    v.setUint16(q + 8, 1, true);
    v.setUint16(q + 10, 16, true);
    for (let i = 0; i < 16; i++) {
      v.setUint8(q + 16 + 16 * i, 1);
      v.setBigUint64(q + 16 + 16 * i + 8, 7n, true);
    }
  }],
  ['random states, next fields and counters near 2^64', (v, q) => {
    v.setUint16(q + 8, 1, true);
    v.setUint16(q + 10, 16, true);
    v.setUint16(q + 12, 0xffff, true);
    v.setUint16(q + 14, 0, true);
    for (let i = 0; i < 16; i++) {
      v.setUint8(q + 16 + 16 * i, (i * 37) & 0xff);
      v.setUint16(q + 16 + 16 * i + 6, (i * 4099) & 0xffff, true);
      v.setBigUint64(q + 16 + 16 * i + 8, (1n << 64n) - 1n - BigInt(i), true);
    }
  }],
  ['a log a thousand completions behind the ring', (v, q) => {
    v.setUint16(q + 8, 1, true);
    v.setUint16(q + 10, 16, true);
    v.setUint16(q + 14, 64536, true);
    v.setUint8(q + 16, 1);
  }],
  ['a log of another version', (v, q) => {
    v.setUint16(q + 8, 2, true);
    v.setUint16(q + 10, 16, true);
    v.setUint8(q + 16, 1);
  }],
  ['a log for another queue size', (v, q) => {
    v.setUint16(q + 8, 1, true);
    v.setUint16(q + 10, 0xffff, true);
    v.setUint8(q + 16, 1);
  }],
];
for (const [what, write] of hostileLogs) {
  add({
    name: `inflight: a hostile log (${what}) is never trusted past the ring's checks`,
    async run(ctx) {
      const g = await ctx.guest({ inflight: hostileLog(ctx, write) });
      // Whatever the log said, each ring either serves or is stopped and says why.
      for (const i of [0, 1]) {
        g.rings[i].blkRequest(VIRTIO_BLK_T.IN, 0, 512);
        g.kick(i);
      }
      const settled = (i: number): boolean => g.rings[i].usedIdx !== 0 || ctx.log().some((l) => l.startsWith(`ring ${i} stopped`));
      await ctx.server.waitFor('each ring to serve or stop', () => settled(0) && settled(1))
        .catch(() => assert.fail(`a ring neither served nor stopped:\n${ctx.log().join('\n')}`));
    },
  });
}

// Config space.
for (const [offset, size] of [[255, 2], [0, 257], [200, 100], [0xffff_ffff, 1], [0x8000_0000, 0x8000_0000]]) {
  add({
    name: `config: GET_CONFIG of ${size} bytes at offset ${offset}`, drop: /reach past the 256-byte config space|payload of/,
    async run(ctx) {
      const f = await ctx.main();
      await f.handshake();
      f.sendBytes(rawMessage(REQ.GET_CONFIG, FLAGS, payloadOf([4, offset], [4, size], [4, 0], ...Array.from({ length: size <= 256 ? size : 0 }, (): [1, number] => [1, 0]))));
    },
  });
}
add({
  name: 'config: SET_CONFIG past the config space', drop: /reach past the 256-byte config space/,
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    f.sendBytes(rawMessage(REQ.SET_CONFIG, FLAGS, payloadOf([4, 250], [4, 10], [4, 0], [8, 0], [2, 0])));
  },
});
add({
  name: 'config: GET_CONFIG of 0 bytes, and SET_CONFIG over read-only fields, are harmless',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    const empty = await f.call({ request: 'GET_CONFIG', needReply: false, offset: 0, size: 0, flags: 0 });
    assert.equal(empty?.payload.length, 12);
    const before = await f.call({ request: 'GET_CONFIG', needReply: false, offset: 0, size: 60, flags: 0 });
    f.send({ request: 'SET_CONFIG', needReply: false, offset: 0, flags: 0, data: new Uint8Array(60).fill(0xff) });
    const later = await f.call({ request: 'GET_CONFIG', needReply: false, offset: 0, size: 60, flags: 0 });
    assert.deepEqual(later?.payload.subarray(12, 32), before?.payload.subarray(12, 32), 'capacity and limits must not change');
  },
});

// Connections.
add({ name: 'connection: connect and close at once', run: async (ctx) => void (await ctx.main()) });
add({
  name: 'connection: a second frontend while one is connected waits, is logged, and is served once the first has gone',
  async run(ctx) {
    const f = await ctx.main();
    await f.handshake();
    const second = await ctx.connect();
    second.send({ request: 'GET_FEATURES', needReply: false });
    await ctx.server.waitFor('the waiting frontend to be logged', () => ctx.log().some((l) => /^a frontend is waiting to connect/.test(l)));
    assert.equal((await f.call({ request: 'GET_QUEUE_NUM', needReply: false }))?.request, REQ.GET_QUEUE_NUM);
    f.close();
    assert.equal((await second.reply(20_000))?.request, REQ.GET_FEATURES, 'the waiting frontend was not served once the first had gone');
  },
});
add({
  name: 'connection: vanishes with requests in flight on running rings',
  async run(ctx) {
    const g = await ctx.guest();
    for (let i = 0; i < 4; i++) g.rings[0].blkRequest(VIRTIO_BLK_T.OUT, i * 8, 4096, new Uint8Array(4096).fill(i));
    g.kick(0);
    g.f.close();
  },
});
add({
  name: 'connection: 20000 requests without reading a reply, then gone', log: /./,
  async run(ctx) {
    const f = await ctx.main();
    const m = rawMessage(REQ.GET_FEATURES, FLAGS);
    const burst = new Uint8Array(m.length * 20_000);
    for (let i = 0; i < 20_000; i++) burst.set(m, i * m.length);
    f.sendBytes(burst);
    await f.conn.drain();
  },
});

// A hostile guest on a running ring: ring 0 breaks, ring 1 keeps serving, the break is
// logged once and signalled on ring 0's err eventfd.
const chains: [string, (r: GuestRing) => void][] = [
  ['the avail index jumps by 1000', (r) => r.setAvailIdx(1000)],
  ['the avail index jumps by 17 (one more than the ring holds)', (r) => r.setAvailIdx(17)],
  ['the avail index goes backwards', (r) => {
    r.blkRequest(VIRTIO_BLK_T.IN, 0, 512);
    r.setAvailIdx(0xffff);
  }],
  ['a head index out of range', (r) => {
    r.mem.view.setUint16(r.avail + 4, 200, true);
    r.setAvailIdx(1);
  }],
  ['a descriptor looping to itself', (r) => {
    r.writeDesc(0, r.gpa(r.dataOffset), 16, VIRTQ_DESC_F.NEXT, 0);
    r.mem.view.setUint16(r.avail + 4, 0, true);
    r.setAvailIdx(1);
  }],
  ['a three-descriptor loop', (r) => {
    r.writeDesc(0, r.gpa(r.dataOffset), 16, VIRTQ_DESC_F.NEXT, 1);
    r.writeDesc(1, r.gpa(r.dataOffset + 512), 512, VIRTQ_DESC_F.NEXT | VIRTQ_DESC_F.WRITE, 2);
    r.writeDesc(2, r.gpa(r.dataOffset + 1024), 1, VIRTQ_DESC_F.NEXT | VIRTQ_DESC_F.WRITE, 0);
    r.mem.view.setUint16(r.avail + 4, 0, true);
    r.setAvailIdx(1);
  }],
  ['a next index out of range', (r) => {
    r.writeDesc(0, r.gpa(r.dataOffset), 16, VIRTQ_DESC_F.NEXT, 200);
    r.mem.view.setUint16(r.avail + 4, 0, true);
    r.setAvailIdx(1);
  }],
  ['a descriptor pointing outside memory', (r) => {
    r.writeDesc(0, 0xdead_0000_0000, 16, VIRTQ_DESC_F.NEXT, 1);
    r.writeDesc(1, r.gpa(r.dataOffset), 1, VIRTQ_DESC_F.WRITE);
    r.mem.view.setUint16(r.avail + 4, 0, true);
    r.setAvailIdx(1);
  }],
  ['a descriptor straddling the end of memory', (r) => {
    r.writeDesc(0, r.gpa(r.dataOffset), 16, VIRTQ_DESC_F.NEXT, 1);
    r.writeDesc(1, r.gpa(r.mem.size - 256), 4096, VIRTQ_DESC_F.NEXT | VIRTQ_DESC_F.WRITE, 2);
    r.writeDesc(2, r.gpa(r.dataOffset + 64), 1, VIRTQ_DESC_F.WRITE);
    r.mem.view.setUint16(r.avail + 4, 0, true);
    r.setAvailIdx(1);
  }],
  ['a 4 GiB descriptor', (r) => {
    r.writeDesc(0, r.gpa(r.dataOffset), 16, VIRTQ_DESC_F.NEXT, 1);
    r.writeDesc(1, r.gpa(r.dataOffset + 4096), 0xffff_ffff, VIRTQ_DESC_F.NEXT | VIRTQ_DESC_F.WRITE, 2);
    r.writeDesc(2, r.gpa(r.dataOffset + 64), 1, VIRTQ_DESC_F.WRITE);
    r.mem.view.setUint16(r.avail + 4, 0, true);
    r.setAvailIdx(1);
  }],
  ['a device-readable descriptor after a writable one', (r) => {
    r.writeDesc(0, r.gpa(r.dataOffset + 64), 1, VIRTQ_DESC_F.NEXT | VIRTQ_DESC_F.WRITE, 1);
    r.writeDesc(1, r.gpa(r.dataOffset), 16, 0);
    r.mem.view.setUint16(r.avail + 4, 0, true);
    r.setAvailIdx(1);
  }],
  ['an indirect descriptor without VIRTIO_F_INDIRECT_DESC', (r) => {
    r.writeDesc(0, r.gpa(r.dataOffset), 32, VIRTQ_DESC_F.INDIRECT);
    r.mem.view.setUint16(r.avail + 4, 0, true);
    r.setAvailIdx(1);
  }],
];
for (const [what, breakRing] of chains) {
  add({
    name: `guest: ${what}`,
    async run(ctx) {
      const g = await ctx.guest();
      breakRing(g.rings[0]);
      for (let i = 0; i < 3; i++) {
        g.kick(0);
        await sleep(5);
      }
      await ctx.server.waitFor('the broken ring to be logged', () => ctx.log().some((l) => l.startsWith('ring 0 stopped')));
      const ok = g.rings[1].blkRequest(VIRTIO_BLK_T.OUT, 64, 4096, new Uint8Array(4096).fill(0x5a));
      g.kick(1);
      assert.ok(await g.waitUsed(1, 1), 'ring 1 stopped serving');
      assert.equal(g.mem.bytes[ok.status], VIRTIO_BLK_S.OK);
      g.kick(0);
      await sleep(10);
      assert.equal(ctx.log().filter((l) => l.startsWith('ring 0 stopped')).length, 1, 'the break must be logged once');
      assert.ok(g.errCount(0) > 0, 'the err eventfd was not signalled');
      assert.ok(ctx.log().every((l) => !l.startsWith('ring 1 stopped')));
    },
  });
}
const badRequests: [string, (r: GuestRing) => { status: number }, number[]][] = [
  ['an unknown request type', (r) => r.blkRequest(99, 0, 512), [VIRTIO_BLK_S.UNSUPP]],
  ['a read past the end of the disk', (r) => r.blkRequest(VIRTIO_BLK_T.IN, 2 ** 40, 4096), [VIRTIO_BLK_S.IOERR]],
  ['a read of a partial sector', (r) => r.blkRequest(VIRTIO_BLK_T.IN, 0, 100), [VIRTIO_BLK_S.IOERR]],
  ['GET_ID into 4 bytes', (r) => r.blkRequest(VIRTIO_BLK_T.GET_ID, 0, 4), [VIRTIO_BLK_S.OK, VIRTIO_BLK_S.IOERR]],
];
for (const [what, build, statuses] of badRequests) {
  add({
    name: `guest: ${what} fails that request only`,
    async run(ctx) {
      const g = await ctx.guest();
      const r = build(g.rings[0]);
      g.kick(0);
      assert.ok(await g.waitUsed(0, 1));
      assert.ok(statuses.includes(g.mem.bytes[r.status]), `status ${g.mem.bytes[r.status]}`);
      const next = g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 512);
      g.kick(0);
      assert.ok(await g.waitUsed(0, 2));
      assert.equal(g.mem.bytes[next.status], VIRTIO_BLK_S.OK);
      assert.ok(ctx.log().every((l) => !/ring \d stopped/.test(l)));
    },
  });
}

// ---------------------------------------------------------------------------------------
// Running the catalogue

/**
 * Runs `cases` against one serve child started with `serverArgs`: after each, the server
 * must be alive, leak no fd and no mapping, and serve a well-behaved frontend.
 */
function catalogue(title: string, cases: readonly Case[], serverArgs: readonly string[]): void {
  describe(title, () => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-hostile-'));
    const socketPath = join(dir, 'vhost.sock');
    const fds = new FdFactory();
    let server: ServerProcess;
    let baseline = 0;
    let sector = 0;

    before(async () => {
      server = await ServerProcess.start(socketPath, serverArgs);
      // Warm up whatever Node opens lazily, then take the fd baseline.
      for (let i = 0; i < 2; i++) await wellBehavedRoundTrip(socketPath);
      await server.waitFor('warm-up disconnects', () => server.disconnected === 2);
      await sleep(50);
      baseline = server.fdCount();
    });

    after(async () => {
      fds.cleanup();
      const exit = await server.stop();
      rmSync(dir, { recursive: true, force: true });
      assert.deepEqual(exit, { code: 0, signal: null }, `the server did not stop cleanly:\n${server.log()}`);
    });

    for (const c of cases) {
      test(c.name, async () => {
        assert.equal(server.exit, null, 'the server died in an earlier case');
        // A case that failed half-way may have left a connection for the server to end.
        await server.waitFor('earlier connections to end', () => server.connected === server.disconnected);
        const ctx = new Ctx(socketPath, fds, server);
        ctx.from = server.lines.length;
        try {
          await c.run(ctx);
          if (c.drop) assert.equal(await (await ctx.main()).serverCloses(), true, `the server kept the connection open; log:\n${ctx.log().join('\n')}`);
        } finally {
          for (const conn of ctx.conns) conn.close();
          for (const g of ctx.guests) g.release();
          for (const r of ctx.regions) r.release();
          fds.closeAll();
        }
        const accepted = ctx.conns.length + ctx.external;
        await server.waitFor('the case connection to end', () => server.disconnects(ctx.from).length >= accepted);
        const ended = server.disconnects(ctx.from);
        if (accepted > 0) {
          const want = c.drop ?? c.log ?? CLOSED_BY_FRONTEND;
          assert.match(ended[0].reason, want, `log:\n${ctx.log().join('\n')}`);
        }
        assert.equal(server.exit, null);
        for (const t of ctx.tracked) {
          const eof = await Promise.race([t.peer.readExact(1).then((r) => r === null, () => true), sleep(10_000).then(() => false)]);
          t.peer.close();
          assert.ok(eof, `the server kept ${t.what} open`);
        }
        const open = await server.settleFds(baseline);
        // Fewer than the baseline: it was taken while a session still closed its fds.
        if (open < baseline) baseline = open;
        if (open > baseline) {
          // Report this case's leak once; later cases start from what is open now.
          const was = baseline;
          baseline = open;
          assert.fail(`fd leak: ${open} open, baseline ${was}:\n${server.fdTargets().join('\n')}`);
        }
        // The session unmaps after its requests complete and the device resets: allow for that.
        await server.waitFor('shared memory to be unmapped', () => server.memfdMappings().length === 0).catch(() => {});
        const maps = server.memfdMappings();
        assert.deepEqual(maps, [], `memory the frontend shared is still mapped:\n${maps.join('\n')}`);

        const before = server.disconnects(ctx.from).length;
        sector = (sector + 8) % 2048;
        await wellBehavedRoundTrip(socketPath, sector);
        await server.waitFor('the well-behaved frontend to end', () => server.disconnects(ctx.from).length > before);
        assert.match(server.disconnects(ctx.from)[before].reason, CLOSED_BY_FRONTEND);
        // Checked last, when every line of the case has long been read.
        assert.ok(ctx.log().every((l) => !/^closing fd \d+/.test(l)), `an fd was closed twice:\n${ctx.log().join('\n')}`);

        const afterGood = await server.settleFds(baseline);
        if (afterGood < baseline) baseline = afterGood;
        if (afterGood > baseline) {
          const was = baseline;
          baseline = afterGood;
          assert.fail(`fd leak after the well-behaved frontend: ${afterGood} open, baseline ${was}:\n${server.fdTargets().join('\n')}`);
        }
      });
    }
  });
}

// The 'migration off' cases need a server that does not offer the log; every other case,
// the dirty-log ones included, runs against the default server.
const isNoLogCase = (c: Case): boolean => c.name.startsWith('migration off: ');
catalogue('vhost-user: hostile frontends and guests against one server', CASES.filter((c) => !isNoLogCase(c)), []);
catalogue('vhost-user: frontends using the dirty log of a server that does not offer it', CASES.filter(isNoLogCase), ['--no-dirty-log']);

describe('vhost-user: SIGBUS policy and socket mode', () => {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-hostile-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  test('the socket is created with mode 0600 by default', async () => {
    const path = join(dir, 'default.sock');
    const s = await ServerProcess.start(path);
    try {
      assert.equal(statSync(path).mode & 0o777, 0o600);
    } finally {
      await s.stop();
    }
  });

  test('socketMode sets another mode', async () => {
    const path = join(dir, 'mode.sock');
    const s = await ServerProcess.start(path, ['--socket-mode', '660']);
    try {
      assert.equal(statSync(path).mode & 0o777, 0o660);
    } finally {
      await s.stop();
    }
  });

  test('with allowUnsealedMemory an unsealed memfd is mapped, and shrinking it under a running ring kills the server with SIGBUS (the documented risk)', async () => {
    const path = join(dir, 'unsealed.sock');
    const s = await ServerProcess.start(path, ['--allow-unsealed-memory']);
    const g = await RunningGuest.start(path, { seal: false });
    try {
      const r = g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 512);
      g.kick(0);
      assert.ok(await g.waitUsed(0, 1));
      assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
      ftruncateSync(g.mem.fd, 0);
      // Our own mapping is past EOF now too: touch nothing, just kick.
      g.kick(0);
      await s.waitFor('the server to die', () => false, 5000).catch(() => {});
      assert.equal(s.exit ? describeExit(s.exit) : 'alive', 'killed by SIGBUS');
    } finally {
      // Unmapping touches no page, so our own mapping past the end is safe to drop.
      g.release();
      await s.stop();
    }
  });

  test('with allowUnsealedMemory, file-backed guest memory (memory-backend-file) is served, and a pipe is still refused', async () => {
    const path = join(dir, 'file-memory.sock');
    const s = await ServerProcess.start(path, ['--allow-unsealed-memory']);
    const fds = new FdFactory();
    try {
      const g = await RunningGuest.start(path, { memoryFd: native.dup(fds.file(1 << 20)) });
      try {
        const r = g.rings[0].blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
        g.kick(0);
        assert.ok(await g.waitUsed(0, 1));
        assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
      } finally {
        g.release();
      }
      const f = await RawFrontend.connect(path);
      await f.handshake();
      assert.equal(await f.acked({ request: 'SET_MEM_TABLE', needReply: true, regions: [{ guestAddress: 0, size: 4096, userAddress: 0, mmapOffset: 0, fd: fds.pipe() }] }), false);
      f.close();
      await s.waitFor('both frontends to end', () => s.disconnected === 2);
      await wellBehavedRoundTrip(path);
    } finally {
      fds.cleanup();
      assert.deepEqual(await s.stop(), { code: 0, signal: null });
    }
  });

  test('a frontend that connects while the previous session still completes its requests is served, not refused', async () => {
    const path = join(dir, 'slow.sock');
    const s = await ServerProcess.start(path, ['--slow-io', '300']);
    try {
      const g = await RunningGuest.start(path);
      g.rings[0].blkRequest(VIRTIO_BLK_T.OUT, 0, 4096, new Uint8Array(4096).fill(7));
      g.kick(0);
      await sleep(50);
      g.release();
      await s.waitFor('the hostile frontend to be gone', () => s.disconnected === 1);
      await wellBehavedRoundTrip(path, 8);
      assert.ok(s.lines.every((l) => !/refusing/.test(l)), s.log());
    } finally {
      assert.deepEqual(await s.stop(), { code: 0, signal: null });
    }
  });

  test('the default server refuses that same unsealed memfd, so the shrink cannot hurt it', async () => {
    const path = join(dir, 'sealed.sock');
    const s = await ServerProcess.start(path);
    try {
      await assert.rejects(RunningGuest.start(path, { seal: false }), /SET_MEM_TABLE was refused/);
      await s.waitFor('the refusal', () => s.lines.some((l) => /not sealed against shrinking/.test(l)));
      await wellBehavedRoundTrip(path);
      assert.equal(s.exit, null);
    } finally {
      assert.deepEqual(await s.stop(), { code: 0, signal: null });
    }
  });
});
