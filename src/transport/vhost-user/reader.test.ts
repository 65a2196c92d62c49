import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { UsageError } from '../../errors.js';
import {
  decodeBackendReply,
  decodeBackendRequest,
  decodeFrontendReply,
  decodeFrontendRequest,
  decodeHeader,
  encodeBackendReply,
  encodeBackendRequest,
  encodeFrontendReply,
  encodeFrontendRequest,
} from './codec.js';
import {
  type BackendReply,
  type BackendRequest,
  type DecodeResult,
  type EncodedMessage,
  type FrontendRequest,
  type Header,
  replyFds,
  requestFds,
} from './messages.js';
import { MessageReader, type MessageDecoder } from './reader.js';

// ---------------------------------------------------------------------------------------
// Arbitraries: valid messages, with fds drawn from a counter so each fd is unique

/** A message whose fds are not chosen yet: the test numbers them. */
type Build<M> = (nextFd: () => number) => M;

/** fc.record, with ordinary objects (deepStrictEqual compares prototypes). */
function rec<T>(model: { [K in keyof T]: fc.Arbitrary<T[K]> }): fc.Arbitrary<T> {
  return fc.record(model, { noNullPrototype: true }) as fc.Arbitrary<T>;
}

const u32 = fc.nat(0xffff_ffff);
const u16 = fc.nat(0xffff);
const safe = fc.maxSafeNat();
const features = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const needReply = fc.boolean();
const region = rec({ guestAddress: safe, size: safe, userAddress: safe, mmapOffset: safe });
const configWindow = fc.nat(256).chain((size) => rec({ offset: fc.nat(256 - size), size: fc.constant(size), flags: u32 }));
const configData = fc.nat(256).chain((size) =>
  rec({ offset: fc.nat(256 - size), flags: u32, data: fc.uint8Array({ minLength: size, maxLength: size }) }));

const frontendRequest: fc.Arbitrary<Build<FrontendRequest>> = fc.oneof(
  rec({
    request: fc.constantFrom(...(['GET_FEATURES', 'SET_OWNER', 'RESET_OWNER', 'GET_PROTOCOL_FEATURES', 'GET_QUEUE_NUM', 'RESET_DEVICE', 'GET_MAX_MEM_SLOTS', 'GET_STATUS'] as const)),
    needReply,
  }).map((m): Build<FrontendRequest> => () => m),
  rec({ request: fc.constantFrom(...(['SET_FEATURES', 'SET_PROTOCOL_FEATURES'] as const)), needReply, features })
    .map((m): Build<FrontendRequest> => () => m),
  rec({ needReply, regions: fc.array(region, { minLength: 1, maxLength: 8 }) })
    .map((m): Build<FrontendRequest> => (fd) => ({ request: 'SET_MEM_TABLE', needReply: m.needReply, regions: m.regions.map((r) => ({ ...r, fd: fd() })) })),
  rec({ needReply, mmapSize: safe, mmapOffset: safe })
    .map((m): Build<FrontendRequest> => (fd) => ({ request: 'SET_LOG_BASE', ...m, fd: fd() })),
  rec({ request: fc.constantFrom(...(['SET_LOG_FD', 'SET_BACKEND_REQ_FD'] as const)), needReply })
    .map((m): Build<FrontendRequest> => (fd) => ({ ...m, fd: fd() })),
  rec({ request: fc.constantFrom(...(['SET_VRING_NUM', 'SET_VRING_BASE'] as const)), needReply, index: u32, num: u32 })
    .map((m): Build<FrontendRequest> => () => m),
  rec({ needReply, index: u32 }).map((m): Build<FrontendRequest> => () => ({ request: 'GET_VRING_BASE', ...m })),
  rec({ needReply, index: u32, flags: u32, desc: safe, used: safe, avail: safe, log: safe })
    .map((m): Build<FrontendRequest> => () => ({ request: 'SET_VRING_ADDR', ...m })),
  rec({ request: fc.constantFrom(...(['SET_VRING_KICK', 'SET_VRING_CALL', 'SET_VRING_ERR'] as const)), needReply, index: fc.nat(255), hasFd: fc.boolean() })
    .map((m): Build<FrontendRequest> => (fd) => ({ request: m.request, needReply: m.needReply, index: m.index, fd: m.hasFd ? fd() : null })),
  rec({ needReply, index: u32, enable: fc.boolean() }).map((m): Build<FrontendRequest> => () => ({ request: 'SET_VRING_ENABLE', ...m })),
  rec({ needReply, window: configWindow }).map((m): Build<FrontendRequest> => () => ({ request: 'GET_CONFIG', needReply: m.needReply, ...m.window })),
  rec({ needReply, config: configData }).map((m): Build<FrontendRequest> => () => ({ request: 'SET_CONFIG', needReply: m.needReply, ...m.config })),
  rec({ needReply, numQueues: u16, queueSize: u16 }).map((m): Build<FrontendRequest> => () => ({ request: 'GET_INFLIGHT_FD', ...m })),
  rec({ needReply, mmapSize: safe, mmapOffset: safe, numQueues: u16, queueSize: u16 })
    .map((m): Build<FrontendRequest> => (fd) => ({ request: 'SET_INFLIGHT_FD', ...m, fd: fd() })),
  rec({ needReply, region }).map((m): Build<FrontendRequest> => (fd) => ({ request: 'ADD_MEM_REG', needReply: m.needReply, region: { ...m.region, fd: fd() } })),
  rec({ needReply, region, hasFd: fc.boolean() })
    .map((m): Build<FrontendRequest> => (fd) => ({ request: 'REM_MEM_REG', needReply: m.needReply, region: m.region, fdToClose: m.hasFd ? fd() : null })),
  rec({ needReply, status: fc.nat(255) }).map((m): Build<FrontendRequest> => () => ({ request: 'SET_STATUS', ...m })),
);

type Exchange = { sent: FrontendRequest; reply: BackendReply };

const hasOwnReply = new Set(['GET_FEATURES', 'GET_PROTOCOL_FEATURES', 'GET_VRING_BASE', 'GET_QUEUE_NUM', 'GET_CONFIG', 'GET_INFLIGHT_FD', 'GET_MAX_MEM_SLOTS', 'GET_STATUS']);

/** A request a front-end sent and the back-end's valid reply to it. */
const exchange: fc.Arbitrary<Build<Exchange>> = fc.oneof(
  rec({ request: fc.constantFrom(...(['GET_FEATURES', 'GET_PROTOCOL_FEATURES'] as const)), features })
    .map((m): Build<Exchange> => () => ({ sent: { request: m.request, needReply: false }, reply: m })),
  rec({ index: u32, num: u32 })
    .map((m): Build<Exchange> => () => ({ sent: { request: 'GET_VRING_BASE', needReply: false, index: m.index }, reply: { request: 'GET_VRING_BASE', ...m } })),
  safe.map((queues): Build<Exchange> => () => ({ sent: { request: 'GET_QUEUE_NUM', needReply: false }, reply: { request: 'GET_QUEUE_NUM', queues } })),
  safe.map((slots): Build<Exchange> => () => ({ sent: { request: 'GET_MAX_MEM_SLOTS', needReply: false }, reply: { request: 'GET_MAX_MEM_SLOTS', slots } })),
  rec({ config: configData, refused: fc.boolean() }).map((m): Build<Exchange> => () => ({
    sent: { request: 'GET_CONFIG', needReply: false, offset: m.config.offset, size: m.config.data.length, flags: m.config.flags },
    reply: { request: 'GET_CONFIG', config: m.refused ? null : m.config },
  })),
  rec({ mmapSize: safe, mmapOffset: safe, numQueues: u16, queueSize: u16 }).map((m): Build<Exchange> => (fd) => ({
    sent: { request: 'GET_INFLIGHT_FD', needReply: false, numQueues: m.numQueues, queueSize: m.queueSize },
    reply: { request: 'GET_INFLIGHT_FD', ...m, fd: fd() },
  })),
  fc.nat(255).map((status): Build<Exchange> => () => ({ sent: { request: 'GET_STATUS', needReply: false }, reply: { request: 'GET_STATUS', status } })),
  rec({ req: frontendRequest, success: fc.boolean() }).filter((m) => !hasOwnReply.has(m.req(() => 0).request))
    .map((m): Build<Exchange> => () => {
      const sent = m.req(() => 0);
      return { sent, reply: { request: sent.request, success: m.success } as BackendReply };
    }),
);

function numbered<M>(builds: Build<M>[]): M[] {
  let next = 100;
  return builds.map((b) => b(() => next++));
}

// ---------------------------------------------------------------------------------------
// Streams

/** The encoded messages as one byte stream, and which fds ride on which offset. */
function stream(encoded: EncodedMessage[]): { bytes: Uint8Array; fdsAt: Map<number, readonly number[]> } {
  const bytes = new Uint8Array(encoded.reduce((n, e) => n + e.bytes.length, 0));
  const fdsAt = new Map<number, readonly number[]>();
  let at = 0;
  for (const e of encoded) {
    bytes.set(e.bytes, at);
    if (e.fds.length > 0) fdsAt.set(at, e.fds);
    at += e.bytes.length;
  }
  return { bytes, fdsAt };
}

/**
 * Pushes `bytes` cut at `cuts` (and at every offset carrying fds, where the sender's
 * sendmsg put them: on the first byte of the chunk), draining the reader after each push.
 * `apart` sends fds with an empty chunk just before their bytes instead.
 */
function feed<T>(reader: MessageReader<T>, bytes: Uint8Array, fdsAt: Map<number, readonly number[]>, cuts: number[], apart: boolean): DecodeResult<T>[] {
  const points = [...new Set([0, ...cuts.map((c) => c % (bytes.length + 1)), ...fdsAt.keys(), bytes.length])].sort((a, b) => a - b);
  const out: DecodeResult<T>[] = [];
  // The last point is the end of the stream: an empty chunk, which may still carry fds.
  for (let i = 0; i < points.length; i++) {
    const fds = fdsAt.get(points[i]) ?? [];
    const chunk = bytes.subarray(points[i], points[i + 1] ?? bytes.length);
    if (apart && fds.length > 0) {
      reader.push(new Uint8Array(0), fds);
      reader.push(chunk);
    } else {
      reader.push(chunk, fds);
    }
    for (let r = reader.next(); r !== undefined; r = reader.next()) out.push(r);
  }
  return out;
}

function values<T>(results: DecodeResult<T>[]): T[] {
  return results.map((r) => {
    if (!r.ok) assert.fail(`${r.error.code}: ${r.error.message}`);
    return r.value;
  });
}

test('property: every valid front-end request round-trips through encode and decode', () => {
  fc.assert(fc.property(frontendRequest, (build) => {
    const [m] = numbered([build]);
    const e = encodeFrontendRequest(m);
    const h = decodeHeader(e.bytes.subarray(0, 12));
    assert.ok(h.ok);
    const r = decodeFrontendRequest(h.value, e.bytes.subarray(12), e.fds);
    assert.deepEqual(values([r]), [m]);
  }), { numRuns: 2000 });
});

test('property: every valid back-end reply round-trips, decoded against the request it answers', () => {
  fc.assert(fc.property(exchange, (build) => {
    const [{ sent, reply }] = numbered([build]);
    const e = encodeBackendReply(reply);
    assert.equal(e.bytes[4], 0x5);
    const h = decodeHeader(e.bytes.subarray(0, 12));
    assert.ok(h.ok);
    assert.deepEqual(values([decodeBackendReply(h.value, e.bytes.subarray(12), e.fds, sent)]), [reply]);
  }), { numRuns: 1000 });
});

test('property: a request stream split anywhere yields the same messages, each with its own fds', () => {
  fc.assert(fc.property(fc.array(frontendRequest, { minLength: 1, maxLength: 24 }), fc.array(fc.nat(), { maxLength: 40 }), fc.boolean(), (builds, cuts, apart) => {
    const messages = numbered(builds);
    const { bytes, fdsAt } = stream(messages.map(encodeFrontendRequest));
    const reader = new MessageReader(decodeFrontendRequest);
    assert.deepEqual(values(feed(reader, bytes, fdsAt, cuts, apart)), messages);
    assert.deepEqual(reader.dispose(), []);
  }), { numRuns: 500 });
});

test('property: a request stream pushed one byte at a time yields the same messages', () => {
  fc.assert(fc.property(fc.array(frontendRequest, { minLength: 1, maxLength: 8 }), (builds) => {
    const messages = numbered(builds);
    const { bytes, fdsAt } = stream(messages.map(encodeFrontendRequest));
    const everyByte = Array.from({ length: bytes.length }, (_, i) => i);
    const reader = new MessageReader(decodeFrontendRequest);
    assert.deepEqual(values(feed(reader, bytes, fdsAt, everyByte, false)), messages);
    assert.deepEqual(reader.dispose(), []);
  }), { numRuns: 200 });
});

test('property: a reply stream split anywhere decodes against the queue of requests sent', () => {
  fc.assert(fc.property(fc.array(exchange, { minLength: 1, maxLength: 16 }), fc.array(fc.nat(), { maxLength: 30 }), (builds, cuts) => {
    const exchanges = numbered(builds);
    const pending = exchanges.map((x) => x.sent);
    const reader = new MessageReader((h: Header, p: Uint8Array, fds: readonly number[]) => decodeBackendReply(h, p, fds, pending.shift()!));
    const { bytes, fdsAt } = stream(exchanges.map((x) => encodeBackendReply(x.reply)));
    assert.deepEqual(values(feed(reader, bytes, fdsAt, cuts, false)), exchanges.map((x) => x.reply));
  }), { numRuns: 300 });
});

test('property: the back-end channel round-trips CONFIG_CHANGE_MSG and its acks', () => {
  fc.assert(fc.property(fc.array(fc.boolean(), { minLength: 1, maxLength: 10 }), fc.array(fc.nat(), { maxLength: 10 }), (flags, cuts) => {
    const requests: BackendRequest[] = flags.map((b) => ({ request: 'CONFIG_CHANGE_MSG', needReply: b }));
    const { bytes, fdsAt } = stream(requests.map(encodeBackendRequest));
    assert.deepEqual(values(feed(new MessageReader(decodeBackendRequest), bytes, fdsAt, cuts, false)), requests);
    const acks = flags.map((success) => ({ request: 'CONFIG_CHANGE_MSG' as const, success }));
    const sent: BackendRequest = { request: 'CONFIG_CHANGE_MSG', needReply: true };
    const replies = stream(acks.map(encodeFrontendReply));
    const reader = new MessageReader((h: Header, p: Uint8Array, fds: readonly number[]) => decodeFrontendReply(h, p, fds, sent));
    assert.deepEqual(values(feed(reader, replies.bytes, replies.fdsAt, cuts, false)), acks);
  }), { numRuns: 200 });
});

// ---------------------------------------------------------------------------------------
// Hostile input: never a throw, never a lost fd

/** The fds a decoded value of each direction owns. */
const decoders: [string, MessageDecoder<unknown>, (value: unknown) => number[]][] = [
  ['front-end requests', decodeFrontendRequest, (v) => requestFds(v as FrontendRequest)],
  ['back-end requests', decodeBackendRequest, () => []],
  ['back-end replies', (h, p, fds) => decodeBackendReply(h, p, fds, { request: 'GET_INFLIGHT_FD', needReply: false, numQueues: 1, queueSize: 1 }), (v) => replyFds(v as BackendReply)],
  ['back-end replies (acks)', (h, p, fds) => decodeBackendReply(h, p, fds, { request: 'SET_MEM_TABLE', needReply: true, regions: [] }), () => []],
  ['front-end replies', (h, p, fds) => decodeFrontendReply(h, p, fds, { request: 'CONFIG_CHANGE_MSG', needReply: true }), () => []],
];

/** Chunks with fds, each fd unique. */
const chunks = fc.array(rec({ bytes: fc.uint8Array({ maxLength: 64 }), fdCount: fc.nat(10) }), { maxLength: 20 });

/** Pushes everything, drains, disposes; returns every fd handed in and every fd handed out. */
function fdsInAndOut(decode: MessageDecoder<unknown>, owned: (v: unknown) => number[], input: { bytes: Uint8Array; fdCount: number }[]): [number[], number[]] {
  const reader = new MessageReader(decode);
  const handedIn: number[] = [];
  const handedOut: number[] = [];
  let next = 3;
  for (const { bytes, fdCount } of input) {
    const fds = Array.from({ length: fdCount }, () => next++);
    handedIn.push(...fds);
    reader.push(bytes, fds);
    for (let r = reader.next(); r !== undefined; r = reader.next()) handedOut.push(...(r.ok ? owned(r.value) : r.fds));
  }
  handedOut.push(...reader.dispose());
  return [handedIn, handedOut.sort((a, b) => a - b)];
}

for (const [name, decode, owned] of decoders) {
  test(`property: random bytes and fds as ${name}: no throw, every fd comes back exactly once`, () => {
    fc.assert(fc.property(chunks, (input) => {
      const [handedIn, handedOut] = fdsInAndOut(decode, owned, input);
      assert.deepEqual(handedOut, handedIn);
    }), { numRuns: 500 });
  });
}

/** A valid header (version 1, request 0-45, any size up to 300) so decoding gets past framing. */
const plausibleHeader = rec({
  request: fc.oneof(fc.nat(45), u32),
  flags: fc.oneof(fc.constantFrom(1, 5, 9, 0xd), u32),
  size: fc.oneof(fc.constantFrom(0, 8, 12, 16, 24, 40, 72, 264, 268), fc.nat(300)),
});

test('property: decoders given a framed message of random content never throw and return its fds', () => {
  fc.assert(fc.property(plausibleHeader, fc.uint8Array({ minLength: 300, maxLength: 300 }), fc.nat(10), (h, noise, fdCount) => {
    const header = { ...h, flags: (h.flags & ~3) | 1 };
    const payload = noise.subarray(0, header.size);
    const fds = Array.from({ length: fdCount }, (_, i) => 100 + i);
    for (const [, decode, owned] of decoders) {
      const r = decode(header, payload, fds);
      assert.deepEqual((r.ok ? owned(r.value) : [...r.fds]).sort((a, b) => a - b), fds);
    }
  }), { numRuns: 3000 });
});

test('property: valid streams with corrupted bytes and stray fds: no throw, every fd comes back', () => {
  const mutation = rec({ at: fc.nat(), value: fc.nat(255) });
  fc.assert(fc.property(fc.array(frontendRequest, { minLength: 1, maxLength: 8 }), fc.array(mutation, { minLength: 1, maxLength: 4 }), fc.array(fc.nat(), { maxLength: 20 }), fc.array(fc.nat(), { maxLength: 4 }), (builds, mutations, cuts, strays) => {
    const messages = numbered(builds);
    const { bytes, fdsAt } = stream(messages.map(encodeFrontendRequest));
    for (const { at, value } of mutations) bytes[at % bytes.length] = value;
    const all = new Map(fdsAt);
    strays.forEach((s, i) => {
      const at = s % (bytes.length + 1);
      all.set(at, [...(all.get(at) ?? []), 10_000 + i]);
    });
    const handedIn = [...all.values()].flat().sort((a, b) => a - b);
    const reader = new MessageReader(decodeFrontendRequest);
    const results = feed(reader, bytes, all, cuts, false);
    const handedOut = [...results.flatMap((r) => (r.ok ? requestFds(r.value) : r.fds)), ...reader.dispose()].sort((a, b) => a - b);
    assert.deepEqual(handedOut, handedIn);
  }), { numRuns: 1000 });
});

// ---------------------------------------------------------------------------------------
// Reader behaviour

test('a broken header hands back every fd held, then the reader yields nothing', () => {
  const reader = new MessageReader(decodeFrontendRequest);
  const good = encodeFrontendRequest({ request: 'SET_LOG_FD', needReply: false, fd: 1 });
  const bad = Uint8Array.of(1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0);
  reader.push(bad, [7]);
  reader.push(good.bytes, [8]);
  const r = reader.next();
  assert.ok(r !== undefined && !r.ok);
  assert.equal(r.error.code, 'BAD_VERSION');
  assert.deepEqual(r.fds, [7, 8]);
  assert.equal(reader.next(), undefined);
  reader.push(good.bytes, [9]);
  assert.equal(reader.next(), undefined);
  assert.deepEqual(reader.dispose(), [9]);
});

test('an oversized header breaks the stream without waiting for its payload', () => {
  const reader = new MessageReader(decodeFrontendRequest);
  reader.push(Uint8Array.of(1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0));
  const r = reader.next();
  assert.ok(r !== undefined && !r.ok);
  assert.equal(r.error.code, 'OVERSIZED');
});

test('a per-message error leaves the stream framed: the next message decodes', () => {
  const reader = new MessageReader(decodeFrontendRequest);
  reader.push(Uint8Array.of(99, 0, 0, 0, 9, 0, 0, 0, 3, 0, 0, 0, 0xaa, 0xbb, 0xcc), [5]);
  reader.push(encodeFrontendRequest({ request: 'GET_FEATURES', needReply: false }).bytes);
  const unknown = reader.next();
  assert.ok(unknown !== undefined && !unknown.ok);
  assert.equal(unknown.error.code, 'UNKNOWN_REQUEST');
  assert.deepEqual(unknown.error.header, { request: 99, flags: 9, size: 3 });
  assert.deepEqual(unknown.fds, [5]);
  assert.deepEqual(reader.next(), { ok: true, value: { request: 'GET_FEATURES', needReply: false } });
});

test('a message cut short by a disconnect gives its fds to dispose()', () => {
  const reader = new MessageReader(decodeFrontendRequest);
  const e = encodeFrontendRequest({ request: 'SET_VRING_CALL', needReply: false, index: 0, fd: 4 });
  reader.push(e.bytes.subarray(0, 13), e.fds);
  assert.equal(reader.next(), undefined);
  assert.deepEqual(reader.dispose(), [4]);
  assert.throws(() => reader.push(e.bytes), UsageError);
});

test('the reader copies pushed bytes, so the caller may reuse its buffer', () => {
  const reader = new MessageReader(decodeFrontendRequest);
  const buffer = encodeFrontendRequest({ request: 'SET_VRING_NUM', needReply: false, index: 1, num: 256 }).bytes.slice();
  reader.push(buffer.subarray(0, 10));
  buffer.fill(0xff, 0, 10);
  reader.push(Uint8Array.of(0, 0), []);
  reader.push(buffer.subarray(12));
  const r = reader.next();
  assert.ok(r !== undefined && r.ok);
  assert.equal(r.value.request, 'SET_VRING_NUM');
});
