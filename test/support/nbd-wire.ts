// The server side of the NBD wire, for tests: encoders of what a server sends (greeting,
// option replies, export info, simple replies, structured chunks) and a decoder of what
// a client sends (options, requests). Written from doc/proto.md, independently of the
// client's own parsers, so a test that feeds these bytes to the client checks the client
// against the document, not against itself.

const MAGIC_NBD = [0x4e42444d, 0x41474943];
const MAGIC_OPTS = [0x49484156, 0x454f5054];
const MAGIC_REP = [0x0003e889, 0x045565a9];

function u64(v: DataView, at: number, value: number | bigint): void {
  v.setBigUint64(at, BigInt(value));
}

function bytes(n: number): { b: Uint8Array; v: DataView } {
  const b = new Uint8Array(n);
  return { b, v: new DataView(b.buffer) };
}

export function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** NBDMAGIC, IHAVEOPT, handshake flags (default FIXED_NEWSTYLE | NO_ZEROES). */
export function greeting(flags = 3): Uint8Array {
  const { b, v } = bytes(18);
  v.setUint32(0, MAGIC_NBD[0]);
  v.setUint32(4, MAGIC_NBD[1]);
  v.setUint32(8, MAGIC_OPTS[0]);
  v.setUint32(12, MAGIC_OPTS[1]);
  v.setUint16(16, flags);
  return b;
}

/** An option reply. */
export function optionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const { b, v } = bytes(20 + data.length);
  v.setUint32(0, MAGIC_REP[0]);
  v.setUint32(4, MAGIC_REP[1]);
  v.setUint32(8, option);
  v.setUint32(12, type);
  v.setUint32(16, data.length);
  b.set(data, 20);
  return b;
}

export const OPT = { EXPORT_NAME: 1, ABORT: 2, STARTTLS: 5, GO: 7, STRUCTURED_REPLY: 8 } as const;
export const REP = { ACK: 1, INFO: 3, ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_TLS_REQD: 0x80000005, ERR_UNKNOWN: 0x80000006, ERR_SHUTDOWN: 0x80000007 } as const;
/** Transmission flags of an ordinary writable export. */
export const FLAGS = { HAS_FLAGS: 1, READ_ONLY: 2, SEND_FLUSH: 4, SEND_FUA: 8, ROTATIONAL: 16, SEND_TRIM: 32, SEND_WRITE_ZEROES: 64, CAN_MULTI_CONN: 256 } as const;
export const ALL_FLAGS = FLAGS.HAS_FLAGS | FLAGS.SEND_FLUSH | FLAGS.SEND_FUA | FLAGS.SEND_TRIM | FLAGS.SEND_WRITE_ZEROES | FLAGS.CAN_MULTI_CONN;

/** NBD_REP_INFO's NBD_INFO_EXPORT payload. */
export function infoExport(size: number | bigint, flags: number): Uint8Array {
  const { b, v } = bytes(12);
  v.setUint16(0, 0);
  u64(v, 2, size);
  v.setUint16(10, flags);
  return b;
}

/** NBD_REP_INFO's NBD_INFO_BLOCK_SIZE payload. */
export function infoBlockSize(minimum: number, preferred: number, maximum: number): Uint8Array {
  const { b, v } = bytes(14);
  v.setUint16(0, 3);
  v.setUint32(2, minimum);
  v.setUint32(6, preferred);
  v.setUint32(10, maximum);
  return b;
}

/** A whole successful handshake from the server: greeting, STRUCTURED_REPLY ack (or not), GO infos + ack. */
export function serverHandshake(size: number, flags: number, opts: { structured?: boolean; blockSize?: [number, number, number] } = {}): Uint8Array {
  const parts = [greeting(), optionReply(OPT.STRUCTURED_REPLY, opts.structured === false ? REP.ERR_UNSUP : REP.ACK),
    optionReply(OPT.GO, REP.INFO, infoExport(size, flags))];
  if (opts.blockSize) parts.push(optionReply(OPT.GO, REP.INFO, infoBlockSize(...opts.blockSize)));
  parts.push(optionReply(OPT.GO, REP.ACK));
  return concat(...parts);
}

/** A simple reply head. */
export function simpleReply(cookie: bigint, error = 0, data?: Uint8Array): Uint8Array {
  const { b, v } = bytes(16);
  v.setUint32(0, 0x67446698);
  v.setUint32(4, error);
  v.setBigUint64(8, cookie);
  return data === undefined ? b : concat(b, data);
}

/** A structured reply chunk. */
export function chunk(cookie: bigint, type: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const { b, v } = bytes(20);
  v.setUint32(0, 0x668e33ef);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  v.setBigUint64(8, cookie);
  v.setUint32(16, payload.length);
  return concat(b, payload);
}

export const CHUNK = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;
export const DONE = 1;

export function dataChunk(cookie: bigint, offset: number, data: Uint8Array, done = false): Uint8Array {
  const { b, v } = bytes(8);
  u64(v, 0, offset);
  return chunk(cookie, CHUNK.OFFSET_DATA, done ? DONE : 0, concat(b, data));
}

export function holeChunk(cookie: bigint, offset: number, size: number, done = false): Uint8Array {
  const { b, v } = bytes(12);
  u64(v, 0, offset);
  v.setUint32(8, size);
  return chunk(cookie, CHUNK.OFFSET_HOLE, done ? DONE : 0, b);
}

export function errorChunk(cookie: bigint, error: number, message = '', done = true, offset?: number): Uint8Array {
  const msg = new TextEncoder().encode(message);
  const { b, v } = bytes(6 + msg.length + (offset === undefined ? 0 : 8));
  v.setUint32(0, error);
  v.setUint16(4, msg.length);
  b.set(msg, 6);
  if (offset !== undefined) u64(v, 6 + msg.length, offset);
  return chunk(cookie, offset === undefined ? CHUNK.ERROR : CHUNK.ERROR_OFFSET, done ? DONE : 0, b);
}

export function noneChunk(cookie: bigint): Uint8Array {
  return chunk(cookie, CHUNK.NONE, DONE);
}

/** A request as the client sent it. */
export interface WireRequest {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly offset: number;
  readonly length: number;
  /** A write's data. */
  readonly data: Uint8Array | null;
}

/**
 * Splits client bytes of the transmission phase into requests (writes carry their data);
 * returns them and the number of bytes consumed. Throws on a bad magic.
 */
export function parseRequests(buf: Uint8Array): { requests: WireRequest[]; used: number } {
  const requests: WireRequest[] = [];
  let at = 0;
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  while (buf.length - at >= 28) {
    if (v.getUint32(at) !== 0x25609513) throw new Error(`bad request magic at ${at}`);
    const flags = v.getUint16(at + 4);
    const type = v.getUint16(at + 6);
    const cookie = v.getBigUint64(at + 8);
    const offset = Number(v.getBigUint64(at + 16));
    const length = v.getUint32(at + 24);
    const dataLength = type === 1 ? length : 0;
    if (buf.length - at < 28 + dataLength) break;
    requests.push({ flags, type, cookie, offset, length, data: type === 1 ? buf.slice(at + 28, at + 28 + length) : null });
    at += 28 + dataLength;
  }
  return { requests, used: at };
}

/** An option as the client sent it. */
export interface WireOption {
  readonly option: number;
  readonly data: Uint8Array;
}

/** Splits client bytes of the handshake (after the 4 client-flag bytes) into options. */
export function parseOptions(buf: Uint8Array): { options: WireOption[]; used: number } {
  const options: WireOption[] = [];
  let at = 0;
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  while (buf.length - at >= 16) {
    if (v.getUint32(at) !== MAGIC_OPTS[0] || v.getUint32(at + 4) !== MAGIC_OPTS[1]) throw new Error(`bad option magic at ${at}`);
    const option = v.getUint32(at + 8);
    const length = v.getUint32(at + 12);
    if (buf.length - at < 16 + length) break;
    options.push({ option, data: buf.slice(at + 16, at + 16 + length) });
    at += 16 + length;
  }
  return { options, used: at };
}
