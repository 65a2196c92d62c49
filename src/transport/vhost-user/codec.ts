/**
 * The vhost-user codec, sans-IO: bytes and fds in, typed messages out, and back.
 *
 * Reading follows the socket discipline of VHOST-USER-NOTES.md: the socket layer reads
 * exactly the 12 header bytes (collecting the fds that ride on them), hands them to
 * {@link decodeHeader}, then reads exactly `header.size` payload bytes and hands header,
 * payload and fds to the decoder for the direction at hand. {@link MessageReader} in
 * `reader.ts` does the same over an arbitrary split byte stream.
 *
 * Every rule is checked before any field is used (rust-vmm vhost's order: version, flags,
 * request, exact size, fd count, then values). Decoders never throw on peer input: they
 * return a {@link DecodeFailure} carrying every fd that came in, so nothing leaks. They do
 * throw {@link UsageError} when the caller breaks the contract (a header that is not 12
 * bytes, a payload that is not `header.size` bytes). Encoders throw {@link UsageError}
 * for messages the decoder would refuse.
 */
import { UsageError } from '../../errors.js';
import {
  VHOST_USER,
  VHOST_USER_BACKEND,
  VHOST_USER_CONFIG,
  VHOST_USER_HEADER,
  VHOST_USER_HEADER_SIZE,
  VHOST_USER_INFLIGHT,
  VHOST_USER_LOG,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_USER_MAX_MEM_REGIONS,
  VHOST_USER_MAX_PAYLOAD_SIZE,
  VHOST_USER_MEM_REG,
  VHOST_USER_MEMORY,
  VHOST_USER_MEMORY_REGION,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_U64,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
  VHOST_USER_VRING_ADDR,
  VHOST_USER_VRING_IDX_MASK,
  VHOST_USER_VRING_NOFD_MASK,
  VHOST_USER_VRING_STATE,
  type VhostUserBackendRequestName,
  type VhostUserRequestName,
  type WireField,
} from '../../spec/vhost-user.js';
import {
  type BackendReply,
  type BackendRequest,
  type DecodeFailure,
  type DecodeResult,
  type EncodedMessage,
  type FrontendReply,
  type FrontendRequest,
  type FrontendRequestOf,
  type Header,
  type MappedMemoryRegion,
  type MemoryRegionDescription,
  type VhostUserErrorCode,
  VhostUserProtocolError,
  replyFds,
  requestFds,
} from './messages.js';
import {
  checkUint,
  getSafeU64,
  getU16,
  getU32,
  getU64Bits,
  isU64Zero,
  setSafeU64,
  setU16,
  setU32,
  setU64Bits,
  viewOf,
} from './wire.js';

const H = VHOST_USER_HEADER.fields;
const U64 = VHOST_USER_U64.fields.u64;
const STATE = VHOST_USER_VRING_STATE.fields;
const ADDR = VHOST_USER_VRING_ADDR.fields;
const MEMORY = VHOST_USER_MEMORY.fields;
const CONFIG = VHOST_USER_CONFIG.fields;
const INFLIGHT = VHOST_USER_INFLIGHT.fields;

/** Every flag bit the spec defines; the rest are reserved. */
const KNOWN_FLAGS = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK;
/** A reply's flags, exactly: QEMU refuses anything else, NEED_REPLY copied included. */
const REPLY_FLAGS = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK;
/** A vring file u64 may set only the index bits and the NOFD bit. */
const VRING_FILE_BITS = BigInt(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK);
/** Virtio device status is one byte (VIRTIO 1.2, 2.1), sent in a u64. */
const STATUS_MAX = 0xff;

function invert<K extends string>(table: Readonly<Record<K, number>>): ReadonlyMap<number, K> {
  return new Map(Object.entries<number>(table).map(([name, n]) => [n, name as K]));
}

const FRONTEND_REQUEST_NAMES = invert(VHOST_USER);
const BACKEND_REQUEST_NAMES = invert(VHOST_USER_BACKEND);

function ok<T>(value: T): DecodeResult<T> {
  return { ok: true, value };
}

function hexU64(view: DataView, base: number, field: WireField<8>): string {
  const lo = view.getUint32(base + field.offset, true);
  const hi = view.getUint32(base + field.offset + 4, true);
  return `0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')}`;
}

/** One message being decoded: where it came from, and the checks every decoder uses. */
class Input {
  readonly view: DataView;

  constructor(
    /** The spec name of the message, for error messages. */
    readonly name: string,
    readonly header: Header,
    readonly payload: Uint8Array,
    readonly fds: readonly number[],
  ) {
    if (payload.length !== header.size) {
      throw new UsageError('BAD_ARGUMENT', `${name}: header says ${header.size} payload bytes, ${payload.length} given`);
    }
    this.view = viewOf(payload);
  }

  fail(code: VhostUserErrorCode, detail: string): DecodeFailure {
    return { ok: false, error: new VhostUserProtocolError(code, `${this.name}: ${detail}`, this.header), fds: this.fds };
  }

  /** BAD_SIZE unless the payload is exactly `size` bytes. */
  expectSize(size: number): DecodeFailure | undefined {
    const got = this.payload.length;
    return got === size ? undefined : this.fail('BAD_SIZE', `payload of ${got} bytes, expected ${size}`);
  }

  /** BAD_FD_COUNT unless `min` to `max` fds came with the message. */
  expectFds(min: number, max = min): DecodeFailure | undefined {
    const got = this.fds.length;
    if (got >= min && got <= max) return undefined;
    const want = min === max ? `${min}` : `${min} to ${max}`;
    return this.fail('BAD_FD_COUNT', `${got} fds attached, expected ${want}`);
  }

  /** Request flags: version 1, no REPLY (that would be a reply), no reserved bits. */
  checkRequestFlags(): DecodeFailure | undefined {
    const flags = this.header.flags;
    if ((flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
      return this.fail('BAD_VERSION', `protocol version ${flags & VHOST_USER_VERSION_MASK}, expected ${VHOST_USER_VERSION}`);
    }
    if ((flags & VHOST_USER_REPLY_MASK) !== 0) return this.fail('BAD_FLAGS', `flags 0x${flags.toString(16)}: REPLY set on a request`);
    if ((flags & ~KNOWN_FLAGS) !== 0) return this.fail('BAD_FLAGS', `flags 0x${flags.toString(16)}: reserved bits set`);
    return undefined;
  }

  /** Reply header: exactly version|REPLY, and the request number of what we asked. */
  checkReplyHeader(expected: number): DecodeFailure | undefined {
    const flags = this.header.flags;
    if ((flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
      return this.fail('BAD_VERSION', `protocol version ${flags & VHOST_USER_VERSION_MASK}, expected ${VHOST_USER_VERSION}`);
    }
    if (flags !== REPLY_FLAGS) return this.fail('BAD_FLAGS', `reply flags 0x${flags.toString(16)}, expected exactly 0x${REPLY_FLAGS.toString(16)}`);
    if (this.header.request !== expected) return this.fail('WRONG_REPLY', `got a reply to request ${this.header.request}`);
    return undefined;
  }

  /**
   * The u64 fields of `fields` (at `base`) as numbers, or VALUE_TOO_LARGE naming the
   * first one above 2^53-1.
   */
  safeU64s<K extends string>(base: number, fields: Readonly<Record<K, WireField<8>>>, what = ''): DecodeResult<Record<K, number>> {
    const out = {} as Record<K, number>;
    for (const key of Object.keys(fields) as K[]) {
      const value = getSafeU64(this.view, base, fields[key]);
      if (value === undefined) {
        return this.fail('VALUE_TOO_LARGE', `${what}${key} = ${hexU64(this.view, base, fields[key])} is above 2^53-1`);
      }
      out[key] = value;
    }
    return ok(out);
  }

  /** A u64 that must be a small number (status): VALUE_TOO_LARGE above `max`. */
  smallU64(what: string, max: number): DecodeResult<number> {
    const value = getSafeU64(this.view, 0, U64);
    if (value === undefined || value > max) {
      return this.fail('VALUE_TOO_LARGE', `${what} = ${hexU64(this.view, 0, U64)} is above ${max}`);
    }
    return ok(value);
  }

  /** The config head of GET_CONFIG / SET_CONFIG, checked against the payload and the 256-byte space. */
  configHead(): DecodeResult<{ offset: number; size: number; flags: number }> {
    if (this.payload.length < VHOST_USER_CONFIG.size) {
      return this.fail('BAD_SIZE', `payload of ${this.payload.length} bytes is shorter than the ${VHOST_USER_CONFIG.size}-byte config head`);
    }
    const offset = getU32(this.view, 0, CONFIG.offset);
    const size = getU32(this.view, 0, CONFIG.size);
    const flags = getU32(this.view, 0, CONFIG.flags);
    const bad = this.expectSize(VHOST_USER_CONFIG.size + size) ?? this.expectFds(0);
    if (bad) return bad;
    // Both are u32, so the sum is exact.
    if (offset + size > VHOST_USER_MAX_CONFIG_SIZE) {
      return this.fail('BAD_CONFIG_RANGE', `${size} bytes at offset ${offset} reach past the ${VHOST_USER_MAX_CONFIG_SIZE}-byte config space`);
    }
    return ok({ offset, size, flags });
  }

  region(base: number, what: string): DecodeResult<MemoryRegionDescription> {
    return this.safeU64s(base, VHOST_USER_MEMORY_REGION.fields, what);
  }
}

// ---------------------------------------------------------------------------------------
// Header

/**
 * Decodes a 12-byte header. Fails with BAD_VERSION or OVERSIZED; either way the stream
 * is no longer framed and the connection must be closed (with the fds that came with
 * these bytes, which the caller holds). Direction-specific flag checks come later, in
 * the message decoders.
 */
export function decodeHeader(bytes: Uint8Array): DecodeResult<Header> {
  if (bytes.length !== VHOST_USER_HEADER_SIZE) {
    throw new UsageError('BAD_ARGUMENT', `a vhost-user header is ${VHOST_USER_HEADER_SIZE} bytes, ${bytes.length} given`);
  }
  const view = viewOf(bytes);
  const header: Header = {
    request: getU32(view, 0, H.request),
    flags: getU32(view, 0, H.flags),
    size: getU32(view, 0, H.size),
  };
  const fail = (code: VhostUserErrorCode, detail: string): DecodeFailure => ({
    ok: false,
    error: new VhostUserProtocolError(code, `vhost-user message (request ${header.request}): ${detail}`),
    fds: [],
  });
  const version = header.flags & VHOST_USER_VERSION_MASK;
  if (version !== VHOST_USER_VERSION) return fail('BAD_VERSION', `protocol version ${version}, expected ${VHOST_USER_VERSION}`);
  if (header.size > VHOST_USER_MAX_PAYLOAD_SIZE) {
    return fail('OVERSIZED', `payload of ${header.size} bytes, at most ${VHOST_USER_MAX_PAYLOAD_SIZE} accepted`);
  }
  return ok(header);
}

// ---------------------------------------------------------------------------------------
// Front-end → back-end requests (the back-end decodes, the front-end encodes)

/**
 * Decodes a request a back-end received. The fds are those that arrived with the
 * message's bytes; on success they are inside the message (see {@link requestFds}), on
 * failure in the result. UNKNOWN_REQUEST and UNSUPPORTED_REQUEST leave the stream framed:
 * the back-end may NACK (`error.header` has NEED_REPLY) or close.
 */
export function decodeFrontendRequest(header: Header, payload: Uint8Array, fds: readonly number[]): DecodeResult<FrontendRequest> {
  const name = FRONTEND_REQUEST_NAMES.get(header.request);
  const input = new Input(name === undefined ? `request ${header.request}` : `VHOST_USER_${name}`, header, payload, fds);
  const bad = input.checkRequestFlags();
  if (bad) return bad;
  if (name === undefined) return input.fail('UNKNOWN_REQUEST', 'not a front-end request the vhost-user spec defines');
  return decodeFrontendPayload(input, name, (header.flags & VHOST_USER_NEED_REPLY_MASK) !== 0);
}

function decodeFrontendPayload(input: Input, name: VhostUserRequestName, needReply: boolean): DecodeResult<FrontendRequest> {
  const { view, fds } = input;
  switch (name) {
    case 'GET_FEATURES':
    case 'SET_OWNER':
    case 'RESET_OWNER':
    case 'GET_PROTOCOL_FEATURES':
    case 'GET_QUEUE_NUM':
    case 'RESET_DEVICE':
    case 'GET_MAX_MEM_SLOTS':
    case 'GET_STATUS':
      return input.expectSize(0) ?? input.expectFds(0) ?? ok({ request: name, needReply });

    case 'SET_FEATURES':
    case 'SET_PROTOCOL_FEATURES':
      return input.expectSize(VHOST_USER_U64.size) ?? input.expectFds(0) ??
        ok({ request: name, needReply, features: getU64Bits(view, 0, U64) });

    case 'SET_MEM_TABLE':
      return decodeMemTable(input, needReply);

    case 'SET_LOG_BASE': {
      const bad = input.expectSize(VHOST_USER_LOG.size) ?? input.expectFds(1);
      if (bad) return bad;
      const log = input.safeU64s(0, VHOST_USER_LOG.fields);
      return log.ok ? ok({ request: name, needReply, ...log.value, fd: fds[0] }) : log;
    }

    case 'SET_LOG_FD':
    case 'SET_BACKEND_REQ_FD':
      return input.expectSize(0) ?? input.expectFds(1) ?? ok({ request: name, needReply, fd: fds[0] });

    case 'SET_VRING_NUM':
    case 'SET_VRING_BASE':
      return input.expectSize(VHOST_USER_VRING_STATE.size) ?? input.expectFds(0) ??
        ok({ request: name, needReply, index: getU32(view, 0, STATE.index), num: getU32(view, 0, STATE.num) });

    case 'GET_VRING_BASE':
      return input.expectSize(VHOST_USER_VRING_STATE.size) ?? input.expectFds(0) ??
        ok({ request: name, needReply, index: getU32(view, 0, STATE.index) });

    case 'SET_VRING_ENABLE': {
      const bad = input.expectSize(VHOST_USER_VRING_STATE.size) ?? input.expectFds(0);
      if (bad) return bad;
      const num = getU32(view, 0, STATE.num);
      if (num > 1) return input.fail('BAD_VALUE', `enable = ${num}, expected 0 or 1`);
      return ok({ request: name, needReply, index: getU32(view, 0, STATE.index), enable: num === 1 });
    }

    case 'SET_VRING_ADDR': {
      const bad = input.expectSize(VHOST_USER_VRING_ADDR.size) ?? input.expectFds(0);
      if (bad) return bad;
      const rings = input.safeU64s(0, { desc: ADDR.desc, used: ADDR.used, avail: ADDR.avail, log: ADDR.log });
      if (!rings.ok) return rings;
      return ok({ request: name, needReply, index: getU32(view, 0, ADDR.index), flags: getU32(view, 0, ADDR.flags), ...rings.value });
    }

    case 'SET_VRING_KICK':
    case 'SET_VRING_CALL':
    case 'SET_VRING_ERR': {
      const badSize = input.expectSize(VHOST_USER_U64.size);
      if (badSize) return badSize;
      // "Bits (0-7) of the payload contain the vring index. Bit 8 is the invalid FD flag."
      const value = getU64Bits(view, 0, U64);
      if ((value & ~VRING_FILE_BITS) !== 0n) return input.fail('BAD_VALUE', `0x${value.toString(16)} sets bits other than index and NOFD`);
      const noFd = (value & BigInt(VHOST_USER_VRING_NOFD_MASK)) !== 0n;
      return input.expectFds(noFd ? 0 : 1) ??
        ok({ request: name, needReply, index: Number(value & BigInt(VHOST_USER_VRING_IDX_MASK)), fd: noFd ? null : fds[0] });
    }

    case 'GET_CONFIG': {
      const head = input.configHead();
      return head.ok ? ok({ request: name, needReply, ...head.value }) : head;
    }

    case 'SET_CONFIG': {
      const head = input.configHead();
      if (!head.ok) return head;
      // A copy: the caller may reuse its payload buffer for the next message.
      const data = input.payload.slice(VHOST_USER_CONFIG.size);
      return ok({ request: name, needReply, offset: head.value.offset, flags: head.value.flags, data });
    }

    case 'GET_INFLIGHT_FD':
      // The front-end sends mmap_size and mmap_offset as 0; only the queue geometry counts.
      return input.expectSize(VHOST_USER_INFLIGHT.size) ?? input.expectFds(0) ??
        ok({ request: name, needReply, numQueues: getU16(view, 0, INFLIGHT.numQueues), queueSize: getU16(view, 0, INFLIGHT.queueSize) });

    case 'SET_INFLIGHT_FD': {
      const bad = input.expectSize(VHOST_USER_INFLIGHT.size) ?? input.expectFds(1);
      if (bad) return bad;
      const area = input.safeU64s(0, { mmapSize: INFLIGHT.mmapSize, mmapOffset: INFLIGHT.mmapOffset });
      if (!area.ok) return area;
      return ok({
        request: name, needReply, ...area.value, fd: fds[0],
        numQueues: getU16(view, 0, INFLIGHT.numQueues), queueSize: getU16(view, 0, INFLIGHT.queueSize),
      });
    }

    case 'ADD_MEM_REG': {
      const bad = input.expectSize(VHOST_USER_MEM_REG.size) ?? input.expectFds(1);
      if (bad) return bad;
      const region = input.region(VHOST_USER_MEM_REG.fields.region.offset, 'region ');
      return region.ok ? ok({ request: name, needReply, region: { ...region.value, fd: fds[0] } }) : region;
    }

    case 'REM_MEM_REG': {
      // "No file descriptors SHOULD be passed … the back-end MAY accept messages with one
      // file descriptor … MUST close it": QEMU 7.2 sends one.
      const bad = input.expectSize(VHOST_USER_MEM_REG.size) ?? input.expectFds(0, 1);
      if (bad) return bad;
      const region = input.region(VHOST_USER_MEM_REG.fields.region.offset, 'region ');
      return region.ok ? ok({ request: name, needReply, region: region.value, fdToClose: fds.length === 1 ? fds[0] : null }) : region;
    }

    case 'SET_STATUS': {
      const bad = input.expectSize(VHOST_USER_U64.size) ?? input.expectFds(0);
      if (bad) return bad;
      const status = input.smallU64('status', STATUS_MAX);
      return status.ok ? ok({ request: name, needReply, status: status.value }) : status;
    }

    default:
      return input.fail('UNSUPPORTED_REQUEST', 'not implemented by vblk, whose features never invite it');
  }
}

function decodeMemTable(input: Input, needReply: boolean): DecodeResult<FrontendRequest> {
  const length = input.payload.length;
  if (length < VHOST_USER_MEMORY.size) {
    return input.fail('BAD_SIZE', `payload of ${length} bytes is shorter than the ${VHOST_USER_MEMORY.size}-byte table head`);
  }
  const n = getU32(input.view, 0, MEMORY.nregions);
  if (n === 0) return input.fail('NO_REGIONS', 'a memory table without regions');
  if (n > VHOST_USER_MAX_MEM_REGIONS) return input.fail('TOO_MANY_REGIONS', `${n} regions, at most ${VHOST_USER_MAX_MEM_REGIONS}`);
  // "The size and ordering of the fds matches the number and ordering of memory regions."
  const bad = input.expectSize(VHOST_USER_MEMORY.size + n * VHOST_USER_MEMORY_REGION.size) ?? input.expectFds(n);
  if (bad) return bad;
  const regions: MappedMemoryRegion[] = [];
  for (let i = 0; i < n; i++) {
    const region = input.region(VHOST_USER_MEMORY.size + i * VHOST_USER_MEMORY_REGION.size, `region ${i} `);
    if (!region.ok) return region;
    regions.push({ ...region.value, fd: input.fds[i] });
  }
  return ok({ request: 'SET_MEM_TABLE', needReply, regions });
}

/** Builds header + payload in one buffer, for one sendmsg with `fds` on its first byte. */
function encodeMessage(request: number, flags: number, payloadSize: number, fds: readonly number[], fill?: (view: DataView) => void): EncodedMessage {
  // fds are C ints. At most VHOST_USER_MAX_FDS of them: only SET_MEM_TABLE carries more
  // than one, and it is limited to as many regions.
  for (const fd of fds) checkUint('fd', fd, 0x7fff_ffff);
  const bytes = new Uint8Array(VHOST_USER_HEADER_SIZE + payloadSize);
  const header = viewOf(bytes);
  setU32(header, 0, H.request, request, 'request');
  setU32(header, 0, H.flags, flags, 'flags');
  setU32(header, 0, H.size, payloadSize, 'size');
  fill?.(viewOf(bytes.subarray(VHOST_USER_HEADER_SIZE)));
  return { bytes, fds };
}

function setRegion(view: DataView, base: number, region: MemoryRegionDescription, what: string): void {
  const R = VHOST_USER_MEMORY_REGION.fields;
  setSafeU64(view, base, R.guestAddress, region.guestAddress, `${what}.guestAddress`);
  setSafeU64(view, base, R.size, region.size, `${what}.size`);
  setSafeU64(view, base, R.userAddress, region.userAddress, `${what}.userAddress`);
  setSafeU64(view, base, R.mmapOffset, region.mmapOffset, `${what}.mmapOffset`);
}

function checkConfigRange(offset: number, size: number): void {
  checkUint('config size', size, VHOST_USER_MAX_CONFIG_SIZE);
  checkUint('config offset', offset, VHOST_USER_MAX_CONFIG_SIZE - size);
}

function setConfigHead(view: DataView, offset: number, size: number, flags: number): void {
  checkConfigRange(offset, size);
  setU32(view, 0, CONFIG.offset, offset, 'config offset');
  setU32(view, 0, CONFIG.size, size, 'config size');
  setU32(view, 0, CONFIG.flags, flags, 'config flags');
}

function setState(view: DataView, index: number, num: number): void {
  setU32(view, 0, STATE.index, index, 'vring index');
  setU32(view, 0, STATE.num, num, 'vring num');
}

function setInflight(view: DataView, d: { mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number }): void {
  setSafeU64(view, 0, INFLIGHT.mmapSize, d.mmapSize, 'mmapSize');
  setSafeU64(view, 0, INFLIGHT.mmapOffset, d.mmapOffset, 'mmapOffset');
  setU16(view, 0, INFLIGHT.numQueues, d.numQueues, 'numQueues');
  setU16(view, 0, INFLIGHT.queueSize, d.queueSize, 'queueSize');
}

/**
 * Encodes a front-end request, with NEED_REPLY when `req.needReply` (only meaningful once
 * REPLY_ACK is negotiated). Throws {@link UsageError} for a message the peer must refuse.
 */
export function encodeFrontendRequest(req: FrontendRequest): EncodedMessage {
  const number = VHOST_USER[req.request];
  const flags = VHOST_USER_VERSION | (req.needReply ? VHOST_USER_NEED_REPLY_MASK : 0);
  const fds = requestFds(req);
  switch (req.request) {
    case 'GET_FEATURES':
    case 'SET_OWNER':
    case 'RESET_OWNER':
    case 'GET_PROTOCOL_FEATURES':
    case 'GET_QUEUE_NUM':
    case 'RESET_DEVICE':
    case 'GET_MAX_MEM_SLOTS':
    case 'GET_STATUS':
    case 'SET_LOG_FD':
    case 'SET_BACKEND_REQ_FD':
      return encodeMessage(number, flags, 0, fds);

    case 'SET_FEATURES':
    case 'SET_PROTOCOL_FEATURES':
      return encodeMessage(number, flags, VHOST_USER_U64.size, fds, (v) => setU64Bits(v, 0, U64, req.features, 'features'));

    case 'SET_MEM_TABLE': {
      const n = req.regions.length;
      if (n < 1 || n > VHOST_USER_MAX_MEM_REGIONS) {
        throw new UsageError('BAD_ARGUMENT', `a memory table has 1 to ${VHOST_USER_MAX_MEM_REGIONS} regions, got ${n}`);
      }
      return encodeMessage(number, flags, VHOST_USER_MEMORY.size + n * VHOST_USER_MEMORY_REGION.size, fds, (v) => {
        setU32(v, 0, MEMORY.nregions, n, 'nregions');
        req.regions.forEach((r, i) => setRegion(v, VHOST_USER_MEMORY.size + i * VHOST_USER_MEMORY_REGION.size, r, `regions[${i}]`));
      });
    }

    case 'SET_LOG_BASE':
      return encodeMessage(number, flags, VHOST_USER_LOG.size, fds, (v) => {
        setSafeU64(v, 0, VHOST_USER_LOG.fields.mmapSize, req.mmapSize, 'mmapSize');
        setSafeU64(v, 0, VHOST_USER_LOG.fields.mmapOffset, req.mmapOffset, 'mmapOffset');
      });

    case 'SET_VRING_NUM':
    case 'SET_VRING_BASE':
      return encodeMessage(number, flags, VHOST_USER_VRING_STATE.size, fds, (v) => setState(v, req.index, req.num));

    case 'GET_VRING_BASE':
      return encodeMessage(number, flags, VHOST_USER_VRING_STATE.size, fds, (v) => setState(v, req.index, 0));

    case 'SET_VRING_ENABLE':
      return encodeMessage(number, flags, VHOST_USER_VRING_STATE.size, fds, (v) => setState(v, req.index, req.enable ? 1 : 0));

    case 'SET_VRING_ADDR':
      return encodeMessage(number, flags, VHOST_USER_VRING_ADDR.size, fds, (v) => {
        setU32(v, 0, ADDR.index, req.index, 'index');
        setU32(v, 0, ADDR.flags, req.flags, 'flags');
        setSafeU64(v, 0, ADDR.desc, req.desc, 'desc');
        setSafeU64(v, 0, ADDR.used, req.used, 'used');
        setSafeU64(v, 0, ADDR.avail, req.avail, 'avail');
        setSafeU64(v, 0, ADDR.log, req.log, 'log');
      });

    case 'SET_VRING_KICK':
    case 'SET_VRING_CALL':
    case 'SET_VRING_ERR':
      checkUint('vring index', req.index, VHOST_USER_VRING_IDX_MASK);
      return encodeMessage(number, flags, VHOST_USER_U64.size, fds, (v) =>
        setSafeU64(v, 0, U64, req.index | (req.fd === null ? VHOST_USER_VRING_NOFD_MASK : 0), 'vring file'));

    case 'GET_CONFIG':
      // The front-end sends the head and `size` zero bytes; the reply fills them.
      return encodeMessage(number, flags, VHOST_USER_CONFIG.size + req.size, fds, (v) => setConfigHead(v, req.offset, req.size, req.flags));

    case 'SET_CONFIG':
      return encodeMessage(number, flags, VHOST_USER_CONFIG.size + req.data.length, fds, (v) => {
        setConfigHead(v, req.offset, req.data.length, req.flags);
        new Uint8Array(v.buffer, v.byteOffset + VHOST_USER_CONFIG.size, req.data.length).set(req.data);
      });

    case 'GET_INFLIGHT_FD':
      return encodeMessage(number, flags, VHOST_USER_INFLIGHT.size, fds, (v) =>
        setInflight(v, { mmapSize: 0, mmapOffset: 0, numQueues: req.numQueues, queueSize: req.queueSize }));

    case 'SET_INFLIGHT_FD':
      return encodeMessage(number, flags, VHOST_USER_INFLIGHT.size, fds, (v) => setInflight(v, req));

    case 'ADD_MEM_REG':
    case 'REM_MEM_REG':
      return encodeMessage(number, flags, VHOST_USER_MEM_REG.size, fds, (v) =>
        setRegion(v, VHOST_USER_MEM_REG.fields.region.offset, req.region, 'region'));

    case 'SET_STATUS':
      checkUint('status', req.status, STATUS_MAX);
      return encodeMessage(number, flags, VHOST_USER_U64.size, fds, (v) => setSafeU64(v, 0, U64, req.status, 'status'));
  }
}

// ---------------------------------------------------------------------------------------
// Back-end → front-end replies (the back-end encodes, the front-end decodes)

/**
 * Encodes a back-end reply: flags exactly version|REPLY (never a copied NEED_REPLY),
 * the request number repeated, the exact payload the request's reply takes. A REPLY_ACK
 * is the u64 0 for success, 1 for failure.
 */
export function encodeBackendReply(reply: BackendReply): EncodedMessage {
  const number = VHOST_USER[reply.request];
  const fds = replyFds(reply);
  switch (reply.request) {
    case 'GET_FEATURES':
    case 'GET_PROTOCOL_FEATURES':
      return encodeMessage(number, REPLY_FLAGS, VHOST_USER_U64.size, fds, (v) => setU64Bits(v, 0, U64, reply.features, 'features'));
    case 'GET_VRING_BASE':
      return encodeMessage(number, REPLY_FLAGS, VHOST_USER_VRING_STATE.size, fds, (v) => setState(v, reply.index, reply.num));
    case 'GET_QUEUE_NUM':
      return encodeMessage(number, REPLY_FLAGS, VHOST_USER_U64.size, fds, (v) => setSafeU64(v, 0, U64, reply.queues, 'queues'));
    case 'GET_MAX_MEM_SLOTS':
      return encodeMessage(number, REPLY_FLAGS, VHOST_USER_U64.size, fds, (v) => setSafeU64(v, 0, U64, reply.slots, 'slots'));
    case 'GET_CONFIG': {
      const config = reply.config;
      // "vhost-user back-end uses zero length of payload to indicate an error".
      if (config === null) return encodeMessage(number, REPLY_FLAGS, 0, fds);
      return encodeMessage(number, REPLY_FLAGS, VHOST_USER_CONFIG.size + config.data.length, fds, (v) => {
        setConfigHead(v, config.offset, config.data.length, config.flags);
        new Uint8Array(v.buffer, v.byteOffset + VHOST_USER_CONFIG.size, config.data.length).set(config.data);
      });
    }
    case 'GET_INFLIGHT_FD':
      return encodeMessage(number, REPLY_FLAGS, VHOST_USER_INFLIGHT.size, fds, (v) => setInflight(v, reply));
    case 'GET_STATUS':
      checkUint('status', reply.status, STATUS_MAX);
      return encodeMessage(number, REPLY_FLAGS, VHOST_USER_U64.size, fds, (v) => setSafeU64(v, 0, U64, reply.status, 'status'));
    default:
      return encodeMessage(number, REPLY_FLAGS, VHOST_USER_U64.size, fds, (v) => setSafeU64(v, 0, U64, reply.success ? 0 : 1, 'ack'));
  }
}

/**
 * The reply to a GET_CONFIG: exactly the requested window of `space`, zero-padded where
 * `space` is shorter (QEMU 7.2 asks for more than virtio-blk's config, and refuses a
 * reply of any other size). `req` was checked by the decoder to lie within 256 bytes.
 */
export function getConfigReply(req: FrontendRequestOf<'GET_CONFIG'>, space: Uint8Array): BackendReply {
  const data = new Uint8Array(req.size);
  data.set(space.subarray(req.offset, req.offset + req.size));
  return { request: 'GET_CONFIG', config: { offset: req.offset, flags: req.flags, data } };
}

/**
 * Decodes the reply to `sent`, a request the front-end sent and awaits an answer to:
 * its own reply if it has one, else a REPLY_ACK (the front-end asks for one only with
 * NEED_REPLY, and for SET_LOG_BASE under LOG_SHMFD). A GET_VRING_BASE reply must name
 * the same ring, a GET_CONFIG reply the same window, or be empty (the back-end refused).
 */
export function decodeBackendReply(header: Header, payload: Uint8Array, fds: readonly number[], sent: FrontendRequest): DecodeResult<BackendReply> {
  const input = new Input(`reply to VHOST_USER_${sent.request}`, header, payload, fds);
  const bad = input.checkReplyHeader(VHOST_USER[sent.request]);
  if (bad) return bad;
  const { view } = input;
  switch (sent.request) {
    case 'GET_FEATURES':
    case 'GET_PROTOCOL_FEATURES':
      return input.expectSize(VHOST_USER_U64.size) ?? input.expectFds(0) ??
        ok({ request: sent.request, features: getU64Bits(view, 0, U64) });

    case 'GET_VRING_BASE': {
      const bad = input.expectSize(VHOST_USER_VRING_STATE.size) ?? input.expectFds(0);
      if (bad) return bad;
      const index = getU32(view, 0, STATE.index);
      if (index !== sent.index) return input.fail('WRONG_REPLY', `reply for ring ${index}, asked about ring ${sent.index}`);
      return ok({ request: sent.request, index, num: getU32(view, 0, STATE.num) });
    }

    case 'GET_QUEUE_NUM': {
      const bad = input.expectSize(VHOST_USER_U64.size) ?? input.expectFds(0);
      if (bad) return bad;
      const r = input.safeU64s(0, { queues: U64 });
      return r.ok ? ok({ request: sent.request, queues: r.value.queues }) : r;
    }

    case 'GET_MAX_MEM_SLOTS': {
      const bad = input.expectSize(VHOST_USER_U64.size) ?? input.expectFds(0);
      if (bad) return bad;
      const r = input.safeU64s(0, { slots: U64 });
      return r.ok ? ok({ request: sent.request, slots: r.value.slots }) : r;
    }

    case 'GET_CONFIG': {
      if (payload.length === 0) return input.expectFds(0) ?? ok({ request: sent.request, config: null });
      const head = input.configHead();
      if (!head.ok) return head;
      const { offset, size, flags } = head.value;
      if (offset !== sent.offset || size !== sent.size) {
        return input.fail('WRONG_REPLY', `${size} bytes at offset ${offset}, asked for ${sent.size} at ${sent.offset}`);
      }
      return ok({ request: sent.request, config: { offset, flags, data: payload.slice(VHOST_USER_CONFIG.size) } });
    }

    case 'GET_INFLIGHT_FD': {
      const bad = input.expectSize(VHOST_USER_INFLIGHT.size) ?? input.expectFds(1);
      if (bad) return bad;
      const area = input.safeU64s(0, { mmapSize: INFLIGHT.mmapSize, mmapOffset: INFLIGHT.mmapOffset });
      if (!area.ok) return area;
      return ok({
        request: sent.request, ...area.value, fd: fds[0],
        numQueues: getU16(view, 0, INFLIGHT.numQueues), queueSize: getU16(view, 0, INFLIGHT.queueSize),
      });
    }

    case 'GET_STATUS': {
      const bad = input.expectSize(VHOST_USER_U64.size) ?? input.expectFds(0);
      if (bad) return bad;
      const status = input.smallU64('status', STATUS_MAX);
      return status.ok ? ok({ request: sent.request, status: status.value }) : status;
    }

    default:
      return input.expectSize(VHOST_USER_U64.size) ?? input.expectFds(0) ??
        ok({ request: sent.request, success: isU64Zero(view, 0, U64) });
  }
}

// ---------------------------------------------------------------------------------------
// The back-end channel (VHOST_USER_SET_BACKEND_REQ_FD's socket)

/** Encodes a back-end request; NEED_REPLY only when REPLY_ACK was negotiated. */
export function encodeBackendRequest(req: BackendRequest): EncodedMessage {
  const flags = VHOST_USER_VERSION | (req.needReply ? VHOST_USER_NEED_REPLY_MASK : 0);
  // CONFIG_CHANGE_MSG: "request payload: N/A".
  return encodeMessage(VHOST_USER_BACKEND[req.request], flags, 0, []);
}

/** Decodes a request a front-end received on the back-end channel. */
export function decodeBackendRequest(header: Header, payload: Uint8Array, fds: readonly number[]): DecodeResult<BackendRequest> {
  const name: VhostUserBackendRequestName | undefined = BACKEND_REQUEST_NAMES.get(header.request);
  const input = new Input(name === undefined ? `back-end request ${header.request}` : `VHOST_USER_BACKEND_${name}`, header, payload, fds);
  const bad = input.checkRequestFlags();
  if (bad) return bad;
  if (name === undefined) return input.fail('UNKNOWN_REQUEST', 'not a back-end request the vhost-user spec defines');
  if (name !== 'CONFIG_CHANGE_MSG') return input.fail('UNSUPPORTED_REQUEST', 'not implemented by vblk, whose features never invite it');
  return input.expectSize(0) ?? input.expectFds(0) ??
    ok({ request: name, needReply: (header.flags & VHOST_USER_NEED_REPLY_MASK) !== 0 });
}

/** Encodes the front-end's REPLY_ACK to a back-end request that set NEED_REPLY. */
export function encodeFrontendReply(reply: FrontendReply): EncodedMessage {
  return encodeMessage(VHOST_USER_BACKEND[reply.request], REPLY_FLAGS, VHOST_USER_U64.size, [], (v) =>
    setSafeU64(v, 0, U64, reply.success ? 0 : 1, 'ack'));
}

/** Decodes the front-end's REPLY_ACK to `sent`, a back-end request that set NEED_REPLY. */
export function decodeFrontendReply(header: Header, payload: Uint8Array, fds: readonly number[], sent: BackendRequest): DecodeResult<FrontendReply> {
  const input = new Input(`reply to VHOST_USER_BACKEND_${sent.request}`, header, payload, fds);
  return input.checkReplyHeader(VHOST_USER_BACKEND[sent.request]) ?? input.expectSize(VHOST_USER_U64.size) ?? input.expectFds(0) ??
    ok({ request: sent.request, success: isU64Zero(input.view, 0, U64) });
}
