import { test } from 'node:test';
import assert from 'node:assert/strict';
import { UsageError } from '../../errors.js';
import {
  VHOST_USER,
  VHOST_USER_BACKEND,
  VHOST_USER_CONFIG,
  VHOST_USER_INFLIGHT,
  VHOST_USER_LOG,
  VHOST_USER_MEM_REG,
  VHOST_USER_MEMORY,
  VHOST_USER_MEMORY_REGION,
  VHOST_USER_U64,
  VHOST_USER_VRING_ADDR,
  VHOST_USER_VRING_STATE,
} from '../../spec/vhost-user.js';
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
  getConfigReply,
} from './codec.js';
import {
  type BackendReply,
  type DecodeResult,
  type EncodedMessage,
  type FrontendRequest,
  type FrontendRequestName,
  type FrontendRequestOf,
  type Header,
  type VhostUserErrorCode,
  VhostUserProtocolError,
  requestFds,
} from './messages.js';

// ---------------------------------------------------------------------------------------
// Helpers

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function fromHex(s: string): Uint8Array {
  const clean = s.replace(/\s+/g, '');
  return Uint8Array.from({ length: clean.length / 2 }, (_, i) => parseInt(clean.slice(2 * i, 2 * i + 2), 16));
}

/** A header as the socket layer would have it, for hand-built messages. */
function hdr(request: number, flags: number, size: number): Header {
  return { request, flags, size };
}

/** Splits an encoded message back into header and payload, as the socket layer reads it. */
function split(e: EncodedMessage): { header: Header; payload: Uint8Array } {
  const h = decodeHeader(e.bytes.subarray(0, 12));
  assert.ok(h.ok);
  return { header: h.value, payload: e.bytes.subarray(12) };
}

function reqRoundTrip(m: FrontendRequest): DecodeResult<FrontendRequest> {
  const e = encodeFrontendRequest(m);
  const { header, payload } = split(e);
  return decodeFrontendRequest(header, payload, e.fds);
}

function decodeRaw(request: number, payload: Uint8Array, fds: number[] = [], flags = 1): DecodeResult<FrontendRequest> {
  return decodeFrontendRequest(hdr(request, flags, payload.length), payload, fds);
}

function expectCode<T>(r: DecodeResult<T>, code: VhostUserErrorCode, fds?: readonly number[]): VhostUserProtocolError {
  assert.equal(r.ok, false, `expected ${code}, decoded ${JSON.stringify(r.ok ? r.value : null, (_, v) => (typeof v === 'bigint' ? v.toString() : v))}`);
  if (r.ok) throw new Error('unreachable');
  assert.equal(r.error.code, code, r.error.message);
  assert.ok(r.error instanceof VhostUserProtocolError);
  if (fds !== undefined) assert.deepEqual(r.fds, fds);
  return r.error;
}

function expectOk<T>(r: DecodeResult<T>): T {
  if (!r.ok) assert.fail(`${r.error.code}: ${r.error.message}`);
  return r.value;
}

/** A payload with u32 / u64 values written at the given offsets. */
function payloadOf(size: number, u32s: [number, number][] = [], u64s: [number, bigint][] = []): Uint8Array {
  const bytes = new Uint8Array(size);
  const view = new DataView(bytes.buffer);
  for (const [off, v] of u32s) view.setUint32(off, v, true);
  for (const [off, v] of u64s) view.setBigUint64(off, v, true);
  return bytes;
}

const region = { guestAddress: 0x1_0000_0000, size: 0x4000_0000, userAddress: 0x7f12_3400_0000, mmapOffset: 0x1000 };

/** One valid message of every request vblk implements, fds numbered from 10. */
const samples: FrontendRequest[] = [
  { request: 'GET_FEATURES', needReply: false },
  { request: 'SET_FEATURES', needReply: true, features: (1n << 63n) | (1n << 32n) | (1n << 30n) | 2n },
  { request: 'SET_OWNER', needReply: false },
  { request: 'RESET_OWNER', needReply: false },
  { request: 'SET_MEM_TABLE', needReply: true, regions: [{ ...region, fd: 10 }, { ...region, guestAddress: 0, fd: 11 }] },
  { request: 'SET_LOG_BASE', needReply: false, mmapSize: 0x2000, mmapOffset: 0, fd: 10 },
  { request: 'SET_LOG_FD', needReply: false, fd: 10 },
  { request: 'SET_VRING_NUM', needReply: false, index: 1, num: 256 },
  { request: 'SET_VRING_ADDR', needReply: false, index: 1, flags: 0, desc: 0x7f00_0000_1000, used: 0x7f00_0000_3040, avail: 0x7f00_0000_2000, log: 0 },
  { request: 'SET_VRING_BASE', needReply: false, index: 1, num: 0 },
  { request: 'GET_VRING_BASE', needReply: false, index: 1 },
  { request: 'SET_VRING_KICK', needReply: false, index: 1, fd: 10 },
  { request: 'SET_VRING_CALL', needReply: true, index: 255, fd: 10 },
  { request: 'SET_VRING_ERR', needReply: false, index: 0, fd: null },
  { request: 'GET_PROTOCOL_FEATURES', needReply: false },
  { request: 'SET_PROTOCOL_FEATURES', needReply: false, features: 0x8f2bn },
  { request: 'GET_QUEUE_NUM', needReply: false },
  { request: 'SET_VRING_ENABLE', needReply: true, index: 3, enable: true },
  { request: 'SET_BACKEND_REQ_FD', needReply: true, fd: 10 },
  { request: 'GET_CONFIG', needReply: false, offset: 0, size: 57, flags: 0 },
  { request: 'SET_CONFIG', needReply: false, offset: 32, flags: 0, data: Uint8Array.of(1) },
  { request: 'GET_INFLIGHT_FD', needReply: false, numQueues: 4, queueSize: 128 },
  { request: 'SET_INFLIGHT_FD', needReply: false, mmapSize: 0x4000, mmapOffset: 0, numQueues: 4, queueSize: 128, fd: 10 },
  { request: 'RESET_DEVICE', needReply: false },
  { request: 'GET_MAX_MEM_SLOTS', needReply: false },
  { request: 'ADD_MEM_REG', needReply: true, region: { ...region, fd: 10 } },
  { request: 'REM_MEM_REG', needReply: true, region, fdToClose: 10 },
  { request: 'SET_STATUS', needReply: false, status: 0x0f },
  { request: 'GET_STATUS', needReply: false },
];

/** The payload struct each request's encoding must have, by size. */
const payloadSizes: Record<FrontendRequestName, number> = {
  GET_FEATURES: 0,
  SET_FEATURES: VHOST_USER_U64.size,
  SET_OWNER: 0,
  RESET_OWNER: 0,
  SET_MEM_TABLE: VHOST_USER_MEMORY.size + 2 * VHOST_USER_MEMORY_REGION.size,
  SET_LOG_BASE: VHOST_USER_LOG.size,
  SET_LOG_FD: 0,
  SET_VRING_NUM: VHOST_USER_VRING_STATE.size,
  SET_VRING_ADDR: VHOST_USER_VRING_ADDR.size,
  SET_VRING_BASE: VHOST_USER_VRING_STATE.size,
  GET_VRING_BASE: VHOST_USER_VRING_STATE.size,
  SET_VRING_KICK: VHOST_USER_U64.size,
  SET_VRING_CALL: VHOST_USER_U64.size,
  SET_VRING_ERR: VHOST_USER_U64.size,
  GET_PROTOCOL_FEATURES: 0,
  SET_PROTOCOL_FEATURES: VHOST_USER_U64.size,
  GET_QUEUE_NUM: 0,
  SET_VRING_ENABLE: VHOST_USER_VRING_STATE.size,
  SET_BACKEND_REQ_FD: 0,
  GET_CONFIG: VHOST_USER_CONFIG.size + 57,
  SET_CONFIG: VHOST_USER_CONFIG.size + 1,
  GET_INFLIGHT_FD: VHOST_USER_INFLIGHT.size,
  SET_INFLIGHT_FD: VHOST_USER_INFLIGHT.size,
  RESET_DEVICE: 0,
  GET_MAX_MEM_SLOTS: 0,
  ADD_MEM_REG: VHOST_USER_MEM_REG.size,
  REM_MEM_REG: VHOST_USER_MEM_REG.size,
  SET_STATUS: VHOST_USER_U64.size,
  GET_STATUS: 0,
};

test('the samples cover every implemented request once', () => {
  assert.deepEqual(samples.map((s) => s.request).sort(), Object.keys(payloadSizes).sort());
});

// ---------------------------------------------------------------------------------------
// Header

test('decodeHeader reads request, flags and size little-endian', () => {
  const h = expectOk(decodeHeader(fromHex('18000000 09000000 45000000')));
  assert.deepEqual(h, { request: 24, flags: 9, size: 69 });
});

test('decodeHeader refuses a version other than 1 with BAD_VERSION and no header', () => {
  for (const flags of [0, 2, 3, 0x4 | 0x2]) {
    const e = expectCode(decodeHeader(payloadOf(12, [[0, 1], [4, flags]])), 'BAD_VERSION', []);
    assert.equal(e.header, undefined);
  }
});

test('decodeHeader refuses a payload above 4096 bytes with OVERSIZED, accepts 4096', () => {
  expectCode(decodeHeader(payloadOf(12, [[0, 1], [4, 1], [8, 4097]])), 'OVERSIZED');
  expectCode(decodeHeader(payloadOf(12, [[0, 1], [4, 1], [8, 0xffff_ffff]])), 'OVERSIZED');
  assert.equal(expectOk(decodeHeader(payloadOf(12, [[0, 1], [4, 1], [8, 4096]]))).size, 4096);
});

test('decodeHeader throws UsageError when not given exactly 12 bytes', () => {
  assert.throws(() => decodeHeader(new Uint8Array(11)), UsageError);
});

test('a payload whose length disagrees with the header is a caller bug: UsageError', () => {
  assert.throws(() => decodeFrontendRequest(hdr(1, 1, 8), new Uint8Array(0), []), UsageError);
});

// ---------------------------------------------------------------------------------------
// Round trips and sizes

for (const sample of samples) {
  test(`${sample.request} round-trips, with the ${payloadSizes[sample.request]}-byte payload and its fds`, () => {
    const e = encodeFrontendRequest(sample);
    assert.equal(e.bytes.length, 12 + payloadSizes[sample.request]);
    assert.deepEqual(e.fds, requestFds(sample));
    const { header } = split(e);
    assert.equal(header.request, VHOST_USER[sample.request]);
    assert.equal(header.flags, sample.needReply ? 0x9 : 0x1);
    assert.deepEqual(expectOk(reqRoundTrip(sample)), sample);
  });
}

test('golden bytes: SET_VRING_ADDR lays out desc, used, avail, log in that order', () => {
  const e = encodeFrontendRequest({ request: 'SET_VRING_ADDR', needReply: false, index: 1, flags: 1, desc: 0x1000, used: 0x2000, avail: 0x3000, log: 0x1_0000_0000 });
  assert.equal(hex(e.bytes), [
    '09000000', '01000000', '28000000',
    '01000000', '01000000',
    '0010000000000000', '0020000000000000', '0030000000000000', '0000000001000000',
  ].join(''));
});

test('golden bytes: SET_MEM_TABLE is nregions, padding, then 32-byte regions', () => {
  const e = encodeFrontendRequest({
    request: 'SET_MEM_TABLE', needReply: false,
    regions: [{ guestAddress: 0, size: 0x1000_0000, userAddress: 0x7f00_0000_0000, mmapOffset: 0x10, fd: 7 }],
  });
  assert.equal(hex(e.bytes), [
    '05000000', '01000000', '28000000',
    '01000000', '00000000',
    '0000000000000000', '0000001000000000', '00000000007f0000', '1000000000000000',
  ].join(''));
  assert.deepEqual(e.fds, [7]);
});

test('golden bytes: SET_VRING_KICK without fd sets bit 8 next to the index', () => {
  const e = encodeFrontendRequest({ request: 'SET_VRING_KICK', needReply: false, index: 3, fd: null });
  assert.equal(hex(e.bytes), '0c000000' + '01000000' + '08000000' + '0301000000000000');
  assert.deepEqual(e.fds, []);
});

test('golden bytes: GET_CONFIG is offset, size, flags and size zero bytes', () => {
  const e = encodeFrontendRequest({ request: 'GET_CONFIG', needReply: false, offset: 0, size: 4, flags: 0 });
  assert.equal(hex(e.bytes), '18000000' + '01000000' + '10000000' + '00000000' + '04000000' + '00000000' + '00000000');
});

test('golden bytes: the inflight description is two u64, two u16 and 4 bytes of padding', () => {
  const e = encodeBackendReply({ request: 'GET_INFLIGHT_FD', mmapSize: 0x1040, mmapOffset: 0, numQueues: 2, queueSize: 256, fd: 5 });
  assert.equal(hex(e.bytes), '1f000000' + '05000000' + '18000000' + '4010000000000000' + '0000000000000000' + '0200' + '0001' + '00000000');
  assert.deepEqual(e.fds, [5]);
});

test('golden bytes: a GET_FEATURES reply is flags 0x5 and the u64 little-endian', () => {
  const e = encodeBackendReply({ request: 'GET_FEATURES', features: (1n << 32n) | (1n << 30n) });
  assert.equal(hex(e.bytes), '01000000' + '05000000' + '08000000' + '0000004001000000');
});

test('golden bytes: REM_MEM_REG is 8 bytes of padding, then the region', () => {
  const e = encodeFrontendRequest({ request: 'REM_MEM_REG', needReply: false, region: { guestAddress: 1, size: 2, userAddress: 3, mmapOffset: 4 }, fdToClose: null });
  assert.equal(hex(e.bytes.subarray(12)), '0000000000000000' + '0100000000000000' + '0200000000000000' + '0300000000000000' + '0400000000000000');
});

// ---------------------------------------------------------------------------------------
// Requests: flags and request numbers

test('a request with REPLY set is refused: BAD_FLAGS, fds returned, header kept', () => {
  const e = expectCode(decodeRaw(VHOST_USER.SET_LOG_FD, new Uint8Array(0), [4], 0x5), 'BAD_FLAGS', [4]);
  assert.match(e.message, /VHOST_USER_SET_LOG_FD/);
  assert.deepEqual(e.header, hdr(VHOST_USER.SET_LOG_FD, 0x5, 0));
});

test('a request with reserved flag bits is refused: BAD_FLAGS', () => {
  expectCode(decodeRaw(VHOST_USER.GET_FEATURES, new Uint8Array(0), [], 0x11), 'BAD_FLAGS');
});

test('a request with a version other than 1 is refused: BAD_VERSION', () => {
  expectCode(decodeRaw(VHOST_USER.GET_FEATURES, new Uint8Array(0), [], 0x2), 'BAD_VERSION');
});

test('NEED_REPLY decodes to needReply', () => {
  const m = expectOk(decodeRaw(VHOST_USER.SET_OWNER, new Uint8Array(0), [], 0x9));
  assert.equal(m.needReply, true);
});

test('an unknown request number is UNKNOWN_REQUEST, with its header and fds, whatever its payload', () => {
  for (const request of [0, 41, 1000, 0xffff_ffff]) {
    const e = expectCode(decodeRaw(request, new Uint8Array(17), [3, 4], 0x9), 'UNKNOWN_REQUEST', [3, 4]);
    assert.deepEqual(e.header, hdr(request, 0x9, 17));
    assert.match(e.message, new RegExp(`request ${request}`));
  }
});

test('a spec request vblk does not implement is UNSUPPORTED_REQUEST, named', () => {
  const e = expectCode(decodeRaw(VHOST_USER.SEND_RARP, new Uint8Array(8), [5]), 'UNSUPPORTED_REQUEST', [5]);
  assert.match(e.message, /VHOST_USER_SEND_RARP/);
  expectCode(decodeRaw(VHOST_USER.VRING_KICK, new Uint8Array(8)), 'UNSUPPORTED_REQUEST');
});

// ---------------------------------------------------------------------------------------
// Requests: sizes and fds, for every request

for (const sample of samples) {
  test(`${sample.request}: one byte more or less is BAD_SIZE, fds returned`, () => {
    const e = encodeFrontendRequest(sample);
    const payload = e.bytes.subarray(12);
    const longer = new Uint8Array(payload.length + 1);
    longer.set(payload);
    expectCode(decodeRaw(VHOST_USER[sample.request], longer, [...e.fds], e.bytes[4]), 'BAD_SIZE', e.fds);
    if (payload.length > 0) {
      expectCode(decodeRaw(VHOST_USER[sample.request], payload.subarray(0, payload.length - 1), [...e.fds], e.bytes[4]), 'BAD_SIZE', e.fds);
    }
  });

  test(`${sample.request}: an extra fd${sample.request === 'REM_MEM_REG' ? '' : ' or a missing one'} is BAD_FD_COUNT`, () => {
    const e = encodeFrontendRequest(sample);
    const { header, payload } = split(e);
    expectCode(decodeFrontendRequest(header, payload, [...e.fds, 99]), 'BAD_FD_COUNT', [...e.fds, 99]);
    if (e.fds.length > 0 && sample.request !== 'REM_MEM_REG') {
      expectCode(decodeFrontendRequest(header, payload, e.fds.slice(1)), 'BAD_FD_COUNT', e.fds.slice(1));
    }
  });
}

test('REM_MEM_REG accepts no fd, or one fd that it hands back to be closed', () => {
  const none = expectOk(reqRoundTrip({ request: 'REM_MEM_REG', needReply: false, region, fdToClose: null }));
  assert.equal((none as FrontendRequestOf<'REM_MEM_REG'>).fdToClose, null);
  const one = expectOk(reqRoundTrip({ request: 'REM_MEM_REG', needReply: false, region, fdToClose: 8 }));
  assert.equal((one as FrontendRequestOf<'REM_MEM_REG'>).fdToClose, 8);
});

test('SET_VRING_CALL with NOFD and an fd, or without NOFD and no fd, is BAD_FD_COUNT', () => {
  expectCode(decodeRaw(VHOST_USER.SET_VRING_CALL, payloadOf(8, [[0, 0x100]]), [6]), 'BAD_FD_COUNT', [6]);
  expectCode(decodeRaw(VHOST_USER.SET_VRING_CALL, payloadOf(8, [[0, 0x001]]), []), 'BAD_FD_COUNT', []);
});

test('a vring file u64 with bits beyond index and NOFD is BAD_VALUE', () => {
  expectCode(decodeRaw(VHOST_USER.SET_VRING_KICK, payloadOf(8, [[0, 0x200]]), [6]), 'BAD_VALUE', [6]);
  expectCode(decodeRaw(VHOST_USER.SET_VRING_KICK, payloadOf(8, [[4, 1]]), [6]), 'BAD_VALUE', [6]);
});

test('SET_VRING_ENABLE with a value other than 0 or 1 is BAD_VALUE', () => {
  expectCode(decodeRaw(VHOST_USER.SET_VRING_ENABLE, payloadOf(8, [[0, 0], [4, 2]])), 'BAD_VALUE');
  const off = expectOk(decodeRaw(VHOST_USER.SET_VRING_ENABLE, payloadOf(8, [[0, 2], [4, 0]])));
  assert.deepEqual(off, { request: 'SET_VRING_ENABLE', needReply: false, index: 2, enable: false });
});

// ---------------------------------------------------------------------------------------
// Requests: memory tables

function memTable(n: number, regionsInPayload = n): Uint8Array {
  const bytes = new Uint8Array(VHOST_USER_MEMORY.size + regionsInPayload * VHOST_USER_MEMORY_REGION.size);
  new DataView(bytes.buffer).setUint32(0, n, true);
  return bytes;
}

test('SET_MEM_TABLE with 8 regions and 8 fds decodes, each region with its fd in order', () => {
  const fds = [20, 21, 22, 23, 24, 25, 26, 27];
  const m = expectOk(decodeRaw(VHOST_USER.SET_MEM_TABLE, memTable(8), fds)) as FrontendRequestOf<'SET_MEM_TABLE'>;
  assert.deepEqual(m.regions.map((r) => r.fd), fds);
});

test('SET_MEM_TABLE with 9 regions is TOO_MANY_REGIONS', () => {
  const fds = [1, 2, 3, 4, 5, 6, 7, 8, 9];
  expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, memTable(9), fds), 'TOO_MANY_REGIONS', fds);
  expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, memTable(0xffff_ffff, 1), [1]), 'TOO_MANY_REGIONS', [1]);
});

test('SET_MEM_TABLE with no region is NO_REGIONS', () => {
  expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, memTable(0), []), 'NO_REGIONS');
});

test('SET_MEM_TABLE whose region count disagrees with its size is BAD_SIZE', () => {
  expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, memTable(2, 1), [1, 2]), 'BAD_SIZE');
  expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, memTable(1, 2), [1]), 'BAD_SIZE');
  expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, new Uint8Array(4), []), 'BAD_SIZE');
});

test('SET_MEM_TABLE with fewer or more fds than regions is BAD_FD_COUNT', () => {
  expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, memTable(3), [1, 2]), 'BAD_FD_COUNT', [1, 2]);
  expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, memTable(1), [1, 2]), 'BAD_FD_COUNT', [1, 2]);
});

// ---------------------------------------------------------------------------------------
// Requests: u64 values that must be numbers

const TWO_53 = 1n << 53n;

test('a region address of 2^53 is VALUE_TOO_LARGE naming the region and field; 2^53-1 decodes', () => {
  const bytes = memTable(2);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(VHOST_USER_MEMORY.size + VHOST_USER_MEMORY_REGION.size + 16, TWO_53, true);
  const e = expectCode(decodeRaw(VHOST_USER.SET_MEM_TABLE, bytes, [1, 2]), 'VALUE_TOO_LARGE', [1, 2]);
  assert.match(e.message, /VHOST_USER_SET_MEM_TABLE: region 1 userAddress = 0x20000000000000/);
  view.setBigUint64(VHOST_USER_MEMORY.size + VHOST_USER_MEMORY_REGION.size + 16, TWO_53 - 1n, true);
  const m = expectOk(decodeRaw(VHOST_USER.SET_MEM_TABLE, bytes, [1, 2])) as FrontendRequestOf<'SET_MEM_TABLE'>;
  assert.equal(m.regions[1].userAddress, Number.MAX_SAFE_INTEGER);
});

test('each SET_VRING_ADDR ring address above 2^53-1 is VALUE_TOO_LARGE, named', () => {
  for (const field of ['desc', 'used', 'avail', 'log'] as const) {
    const payload = payloadOf(40, [], [[VHOST_USER_VRING_ADDR.fields[field].offset, 0xffff_ffff_ffff_ffffn]]);
    const e = expectCode(decodeRaw(VHOST_USER.SET_VRING_ADDR, payload), 'VALUE_TOO_LARGE');
    assert.match(e.message, new RegExp(`${field} = 0xffffffffffffffff`));
  }
});

test('SET_LOG_BASE, SET_INFLIGHT_FD, ADD_MEM_REG and REM_MEM_REG check their u64s too', () => {
  expectCode(decodeRaw(VHOST_USER.SET_LOG_BASE, payloadOf(16, [], [[0, TWO_53]]), [1]), 'VALUE_TOO_LARGE', [1]);
  expectCode(decodeRaw(VHOST_USER.SET_INFLIGHT_FD, payloadOf(24, [], [[8, TWO_53]]), [1]), 'VALUE_TOO_LARGE', [1]);
  expectCode(decodeRaw(VHOST_USER.ADD_MEM_REG, payloadOf(40, [], [[16, TWO_53]]), [1]), 'VALUE_TOO_LARGE', [1]);
  expectCode(decodeRaw(VHOST_USER.REM_MEM_REG, payloadOf(40, [], [[8, TWO_53]]), [1]), 'VALUE_TOO_LARGE', [1]);
});

test('the padding of a single-region message is ignored', () => {
  const m = expectOk(decodeRaw(VHOST_USER.ADD_MEM_REG, payloadOf(40, [], [[0, 0xffff_ffff_ffff_ffffn]]), [1]));
  assert.equal(m.request, 'ADD_MEM_REG');
});

test('SET_STATUS above 0xff is VALUE_TOO_LARGE', () => {
  expectCode(decodeRaw(VHOST_USER.SET_STATUS, payloadOf(8, [[0, 0x100]])), 'VALUE_TOO_LARGE');
  expectCode(decodeRaw(VHOST_USER.SET_STATUS, payloadOf(8, [[4, 1]])), 'VALUE_TOO_LARGE');
});

// ---------------------------------------------------------------------------------------
// Requests: config space

function configPayload(offset: number, size: number, dataBytes = size): Uint8Array {
  return payloadOf(VHOST_USER_CONFIG.size + dataBytes, [[0, offset], [4, size]]);
}

test('GET_CONFIG as QEMU 7.2 sends it (offset 0, size 57) decodes', () => {
  const m = expectOk(decodeRaw(VHOST_USER.GET_CONFIG, configPayload(0, 57)));
  assert.deepEqual(m, { request: 'GET_CONFIG', needReply: false, offset: 0, size: 57, flags: 0 });
});

test('config messages may address all 256 bytes and no more: BAD_CONFIG_RANGE', () => {
  for (const request of [VHOST_USER.GET_CONFIG, VHOST_USER.SET_CONFIG]) {
    expectOk(decodeRaw(request, configPayload(0, 256)));
    expectOk(decodeRaw(request, configPayload(255, 1)));
    expectCode(decodeRaw(request, configPayload(0, 257)), 'BAD_CONFIG_RANGE');
    expectCode(decodeRaw(request, configPayload(250, 8)), 'BAD_CONFIG_RANGE');
    expectCode(decodeRaw(request, configPayload(0xffff_ffff, 1)), 'BAD_CONFIG_RANGE');
  }
});

test('a config size that disagrees with the payload is BAD_SIZE', () => {
  expectCode(decodeRaw(VHOST_USER.SET_CONFIG, configPayload(0, 8, 7)), 'BAD_SIZE');
  expectCode(decodeRaw(VHOST_USER.GET_CONFIG, configPayload(0, 8, 9)), 'BAD_SIZE');
  expectCode(decodeRaw(VHOST_USER.GET_CONFIG, configPayload(0, 0xffff_fff0, 4)), 'BAD_SIZE');
  expectCode(decodeRaw(VHOST_USER.GET_CONFIG, new Uint8Array(11)), 'BAD_SIZE');
});

test('SET_CONFIG data is a copy, not a view of the caller\'s buffer', () => {
  const payload = configPayload(8, 2);
  payload.set([0xaa, 0xbb], 12);
  const m = expectOk(decodeRaw(VHOST_USER.SET_CONFIG, payload)) as FrontendRequestOf<'SET_CONFIG'>;
  payload.fill(0);
  assert.deepEqual([...m.data], [0xaa, 0xbb]);
});

// ---------------------------------------------------------------------------------------
// Back-end replies

const replyCases: [FrontendRequest, BackendReply][] = [
  [{ request: 'GET_FEATURES', needReply: false }, { request: 'GET_FEATURES', features: 0x1_7500_7e46n }],
  [{ request: 'GET_PROTOCOL_FEATURES', needReply: false }, { request: 'GET_PROTOCOL_FEATURES', features: 0x8f2bn }],
  [{ request: 'GET_VRING_BASE', needReply: false, index: 2 }, { request: 'GET_VRING_BASE', index: 2, num: 0xffff }],
  [{ request: 'GET_QUEUE_NUM', needReply: false }, { request: 'GET_QUEUE_NUM', queues: 4 }],
  [{ request: 'GET_MAX_MEM_SLOTS', needReply: false }, { request: 'GET_MAX_MEM_SLOTS', slots: 509 }],
  [{ request: 'GET_CONFIG', needReply: false, offset: 4, size: 3, flags: 0 }, { request: 'GET_CONFIG', config: { offset: 4, flags: 0, data: Uint8Array.of(1, 2, 3) } }],
  [{ request: 'GET_CONFIG', needReply: false, offset: 0, size: 60, flags: 0 }, { request: 'GET_CONFIG', config: null }],
  [{ request: 'GET_INFLIGHT_FD', needReply: false, numQueues: 1, queueSize: 128 }, { request: 'GET_INFLIGHT_FD', mmapSize: 4096, mmapOffset: 0, numQueues: 1, queueSize: 128, fd: 12 }],
  [{ request: 'GET_STATUS', needReply: false }, { request: 'GET_STATUS', status: 0x0f }],
  [{ request: 'SET_MEM_TABLE', needReply: true, regions: [{ ...region, fd: 3 }] }, { request: 'SET_MEM_TABLE', success: true }],
  [{ request: 'SET_VRING_ENABLE', needReply: true, index: 0, enable: true }, { request: 'SET_VRING_ENABLE', success: false }],
  [{ request: 'SET_LOG_BASE', needReply: false, mmapSize: 1, mmapOffset: 0, fd: 3 }, { request: 'SET_LOG_BASE', success: true }],
];

for (const [sent, reply] of replyCases) {
  test(`reply to ${sent.request}${'config' in reply && reply.config === null ? ' (refused)' : ''} round-trips with flags exactly 0x5`, () => {
    const e = encodeBackendReply(reply);
    const { header, payload } = split(e);
    assert.equal(header.flags, 0x5);
    assert.equal(header.request, VHOST_USER[sent.request]);
    assert.deepEqual(expectOk(decodeBackendReply(header, payload, e.fds, sent)), reply);
  });
}

test('reply sizes: u64 replies 8 bytes, vring state 8, inflight 24, config exactly the window', () => {
  const size = (r: BackendReply) => encodeBackendReply(r).bytes.length - 12;
  assert.equal(size({ request: 'GET_FEATURES', features: 1n }), 8);
  assert.equal(size({ request: 'GET_QUEUE_NUM', queues: 1 }), 8);
  assert.equal(size({ request: 'SET_OWNER', success: true }), 8);
  assert.equal(size({ request: 'GET_VRING_BASE', index: 0, num: 0 }), 8);
  assert.equal(size({ request: 'GET_INFLIGHT_FD', mmapSize: 0, mmapOffset: 0, numQueues: 1, queueSize: 1, fd: 1 }), 24);
  assert.equal(size({ request: 'GET_CONFIG', config: { offset: 0, flags: 0, data: new Uint8Array(57) } }), 12 + 57);
  assert.equal(size({ request: 'GET_CONFIG', config: null }), 0);
});

test('REPLY_ACK is the u64 0 for success and 1 for failure; any non-zero decodes as failure', () => {
  assert.equal(hex(encodeBackendReply({ request: 'SET_FEATURES', success: true }).bytes.subarray(12)), '0000000000000000');
  assert.equal(hex(encodeBackendReply({ request: 'SET_FEATURES', success: false }).bytes.subarray(12)), '0100000000000000');
  const sent: FrontendRequest = { request: 'SET_OWNER', needReply: true };
  const r = expectOk(decodeBackendReply(hdr(VHOST_USER.SET_OWNER, 5, 8), payloadOf(8, [[4, 0x8000_0000]]), [], sent));
  assert.deepEqual(r, { request: 'SET_OWNER', success: false });
});

test('getConfigReply answers exactly the requested window, zero-padded past the device config', () => {
  const space = Uint8Array.from({ length: 40 }, (_, i) => i + 1);
  const reply = getConfigReply({ request: 'GET_CONFIG', needReply: false, offset: 0, size: 57, flags: 0 }, space);
  assert.ok(reply.request === 'GET_CONFIG' && reply.config !== null);
  assert.equal(reply.config.data.length, 57);
  assert.deepEqual([...reply.config.data.subarray(0, 40)], [...space]);
  assert.ok(reply.config.data.subarray(40).every((b) => b === 0));
  const tail = getConfigReply({ request: 'GET_CONFIG', needReply: false, offset: 36, size: 8, flags: 0 }, space);
  assert.ok(tail.request === 'GET_CONFIG' && tail.config !== null);
  assert.deepEqual([...tail.config.data], [37, 38, 39, 40, 0, 0, 0, 0]);
  assert.equal(encodeBackendReply(reply).bytes.length, 12 + 12 + 57);
});

const getFeatures: FrontendRequest = { request: 'GET_FEATURES', needReply: false };

test('a reply with NEED_REPLY copied (0xd), or without REPLY, is BAD_FLAGS', () => {
  expectCode(decodeBackendReply(hdr(1, 0xd, 8), new Uint8Array(8), [], getFeatures), 'BAD_FLAGS');
  expectCode(decodeBackendReply(hdr(1, 0x1, 8), new Uint8Array(8), [], getFeatures), 'BAD_FLAGS');
  expectCode(decodeBackendReply(hdr(1, 0x2, 8), new Uint8Array(8), [], getFeatures), 'BAD_VERSION');
});

test('a reply to another request than the one awaited is WRONG_REPLY', () => {
  const e = expectCode(decodeBackendReply(hdr(VHOST_USER.GET_PROTOCOL_FEATURES, 5, 8), new Uint8Array(8), [4], getFeatures), 'WRONG_REPLY', [4]);
  assert.match(e.message, /reply to VHOST_USER_GET_FEATURES/);
});

test('a GET_VRING_BASE reply about another ring is WRONG_REPLY', () => {
  const sent: FrontendRequest = { request: 'GET_VRING_BASE', needReply: false, index: 1 };
  expectCode(decodeBackendReply(hdr(11, 5, 8), payloadOf(8, [[0, 2]]), [], sent), 'WRONG_REPLY');
});

test('a GET_CONFIG reply of another window is WRONG_REPLY, of another size BAD_SIZE', () => {
  const sent: FrontendRequest = { request: 'GET_CONFIG', needReply: false, offset: 0, size: 60, flags: 0 };
  expectCode(decodeBackendReply(hdr(24, 5, 12 + 20), configPayload(0, 20), [], sent), 'WRONG_REPLY');
  expectCode(decodeBackendReply(hdr(24, 5, 12 + 60), configPayload(4, 60), [], sent), 'WRONG_REPLY');
  expectCode(decodeBackendReply(hdr(24, 5, 12 + 59), configPayload(0, 60, 59), [], sent), 'BAD_SIZE');
});

test('reply sizes and fds are exact', () => {
  expectCode(decodeBackendReply(hdr(1, 5, 4), new Uint8Array(4), [], getFeatures), 'BAD_SIZE');
  expectCode(decodeBackendReply(hdr(1, 5, 8), new Uint8Array(8), [9], getFeatures), 'BAD_FD_COUNT', [9]);
  const inflight: FrontendRequest = { request: 'GET_INFLIGHT_FD', needReply: false, numQueues: 1, queueSize: 8 };
  expectCode(decodeBackendReply(hdr(31, 5, 24), new Uint8Array(24), [], inflight), 'BAD_FD_COUNT', []);
  const ack: FrontendRequest = { request: 'SET_VRING_NUM', needReply: true, index: 0, num: 8 };
  expectCode(decodeBackendReply(hdr(8, 5, 0), new Uint8Array(0), [], ack), 'BAD_SIZE');
});

test('reply values: queue counts above 2^53-1 and status above 0xff are VALUE_TOO_LARGE', () => {
  const queueNum: FrontendRequest = { request: 'GET_QUEUE_NUM', needReply: false };
  expectCode(decodeBackendReply(hdr(17, 5, 8), payloadOf(8, [], [[0, TWO_53]]), [], queueNum), 'VALUE_TOO_LARGE');
  const status: FrontendRequest = { request: 'GET_STATUS', needReply: false };
  expectCode(decodeBackendReply(hdr(40, 5, 8), payloadOf(8, [[0, 0x100]]), [], status), 'VALUE_TOO_LARGE');
});

// ---------------------------------------------------------------------------------------
// The back-end channel

test('CONFIG_CHANGE_MSG is request 2 with no payload, NEED_REPLY only when asked', () => {
  assert.equal(hex(encodeBackendRequest({ request: 'CONFIG_CHANGE_MSG', needReply: false }).bytes), '02000000' + '01000000' + '00000000');
  assert.equal(hex(encodeBackendRequest({ request: 'CONFIG_CHANGE_MSG', needReply: true }).bytes), '02000000' + '09000000' + '00000000');
  for (const needReply of [false, true]) {
    const e = encodeBackendRequest({ request: 'CONFIG_CHANGE_MSG', needReply });
    const { header, payload } = split(e);
    assert.deepEqual(expectOk(decodeBackendRequest(header, payload, e.fds)), { request: 'CONFIG_CHANGE_MSG', needReply });
  }
});

test('back-end requests are checked like front-end ones', () => {
  expectCode(decodeBackendRequest(hdr(2, 1, 8), new Uint8Array(8), []), 'BAD_SIZE');
  expectCode(decodeBackendRequest(hdr(2, 1, 0), new Uint8Array(0), [3]), 'BAD_FD_COUNT', [3]);
  expectCode(decodeBackendRequest(hdr(2, 5, 0), new Uint8Array(0), []), 'BAD_FLAGS');
  expectCode(decodeBackendRequest(hdr(99, 1, 0), new Uint8Array(0), []), 'UNKNOWN_REQUEST');
  const e = expectCode(decodeBackendRequest(hdr(VHOST_USER_BACKEND.IOTLB_MSG, 1, 0), new Uint8Array(0), [4]), 'UNSUPPORTED_REQUEST', [4]);
  assert.match(e.message, /VHOST_USER_BACKEND_IOTLB_MSG/);
});

test('the front-end\'s REPLY_ACK on the back-end channel round-trips, flags 0x5', () => {
  const sent = { request: 'CONFIG_CHANGE_MSG', needReply: true } as const;
  for (const success of [true, false]) {
    const e = encodeFrontendReply({ request: 'CONFIG_CHANGE_MSG', success });
    const { header, payload } = split(e);
    assert.equal(header.flags, 5);
    assert.deepEqual(expectOk(decodeFrontendReply(header, payload, e.fds, sent)), { request: 'CONFIG_CHANGE_MSG', success });
  }
  expectCode(decodeFrontendReply(hdr(2, 0xd, 8), new Uint8Array(8), [], sent), 'BAD_FLAGS');
  expectCode(decodeFrontendReply(hdr(1, 5, 8), new Uint8Array(8), [], sent), 'WRONG_REPLY');
  expectCode(decodeFrontendReply(hdr(2, 5, 0), new Uint8Array(0), [], sent), 'BAD_SIZE');
});

// ---------------------------------------------------------------------------------------
// Encoders refuse what the decoders would

test('encoders throw UsageError for messages a peer must refuse', () => {
  const bad: FrontendRequest[] = [
    { request: 'SET_MEM_TABLE', needReply: false, regions: [] },
    { request: 'SET_MEM_TABLE', needReply: false, regions: Array.from({ length: 9 }, (_, i) => ({ ...region, fd: i })) },
    { request: 'SET_VRING_KICK', needReply: false, index: 256, fd: 3 },
    { request: 'SET_VRING_ADDR', needReply: false, index: 0, flags: 0, desc: 2 ** 53, used: 0, avail: 0, log: 0 },
    { request: 'SET_VRING_NUM', needReply: false, index: 0, num: -1 },
    { request: 'SET_VRING_NUM', needReply: false, index: 0, num: 1.5 },
    { request: 'SET_FEATURES', needReply: false, features: 1n << 64n },
    { request: 'SET_FEATURES', needReply: false, features: -1n },
    { request: 'GET_CONFIG', needReply: false, offset: 250, size: 8, flags: 0 },
    { request: 'SET_CONFIG', needReply: false, offset: 0, flags: 0, data: new Uint8Array(257) },
    { request: 'SET_STATUS', needReply: false, status: 256 },
    { request: 'SET_LOG_FD', needReply: false, fd: -1 },
    { request: 'GET_INFLIGHT_FD', needReply: false, numQueues: 0x10000, queueSize: 1 },
  ];
  for (const m of bad) assert.throws(() => encodeFrontendRequest(m), UsageError, m.request);
  assert.throws(() => encodeBackendReply({ request: 'GET_STATUS', status: 0x100 }), UsageError);
  assert.throws(() => encodeBackendReply({ request: 'GET_QUEUE_NUM', queues: Number.MAX_SAFE_INTEGER + 1 }), UsageError);
});
