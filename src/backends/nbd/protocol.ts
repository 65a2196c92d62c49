/**
 * NBD protocol facts, in one place (the NBD protocol document, doc/proto.md of
 * github.com/NetworkBlockDevice/nbd): magic numbers, flags, option, reply, command and
 * error values, and the layout of every fixed-size message, named as the document names
 * them. Everything on the wire is big-endian ("network byte order").
 *
 * Also here: the checked big-endian u64 reader every parser uses, and the error classes
 * the NBD client throws or reports.
 */
import { VblkError } from '../../errors.js';

/** The IANA port for NBD, the default of an `nbd://` URI without a port. */
export const NBD_DEFAULT_PORT = 10809;

// ---- magic numbers (as two u32 halves: a u64 compare without BigInt) --------------------

/** `NBDMAGIC` (INIT_PASSWD): the first 8 bytes a server sends. */
export const NBD_INIT_PASSWD = { hi: 0x4e42444d, lo: 0x41474943 } as const;
/** `IHAVEOPT`: the newstyle magic, sent by the server and before every option. */
export const NBD_OPTS_MAGIC = { hi: 0x49484156, lo: 0x454f5054 } as const;
/** `cliserv_magic`: what an oldstyle server sends instead of IHAVEOPT. */
export const NBD_CLISERV_MAGIC = { hi: 0x00004202, lo: 0x81861253 } as const;
/** Magic of an option reply. */
export const NBD_REP_MAGIC = { hi: 0x0003e889, lo: 0x045565a9 } as const;
/** Magic of a transmission request. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** Magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`, once `NBD_REPLY_MAGIC`). */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Magic of a structured reply chunk. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// ---- handshake -------------------------------------------------------------------------

/** Handshake flag (server, 16 bits): the server speaks fixed newstyle. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
/** Handshake flag: the server can leave out EXPORT_NAME's 124 zero bytes. */
export const NBD_FLAG_NO_ZEROES = 1 << 1;
/** Client flag (32 bits): the client speaks fixed newstyle. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
/** Client flag: leave out EXPORT_NAME's 124 zero bytes (only when the server offered it). */
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

/** Option types. */
export const NBD_OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

/** Bit 31 marks an error reply type. */
export const NBD_REP_FLAG_ERROR = 0x8000_0000;
/** Option reply types. */
export const NBD_REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: NBD_REP_FLAG_ERROR + 1,
  ERR_POLICY: NBD_REP_FLAG_ERROR + 2,
  ERR_INVALID: NBD_REP_FLAG_ERROR + 3,
  ERR_PLATFORM: NBD_REP_FLAG_ERROR + 4,
  ERR_TLS_REQD: NBD_REP_FLAG_ERROR + 5,
  ERR_UNKNOWN: NBD_REP_FLAG_ERROR + 6,
  ERR_SHUTDOWN: NBD_REP_FLAG_ERROR + 7,
  ERR_BLOCK_SIZE_REQD: NBD_REP_FLAG_ERROR + 8,
  ERR_TOO_BIG: NBD_REP_FLAG_ERROR + 9,
  ERR_EXT_HEADER_REQD: NBD_REP_FLAG_ERROR + 10,
} as const;

/** `NBD_REP_INFO` information types. */
export const NBD_INFO = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (16 bits), sent with the export's size. */
export const NBD_FLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

// ---- transmission ----------------------------------------------------------------------

/** Request types. */
export const NBD_CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

/** Command flag (16 bits): reply only once the data is on stable storage. */
export const NBD_CMD_FLAG_FUA = 1 << 0;
/** Command flag of WRITE_ZEROES: keep the range allocated (no hole). */
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;

/** Structured reply flags. */
export const NBD_REPLY_FLAG_DONE = 1 << 0;
/** Bit 15 of a chunk type marks an error chunk. */
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;
/** Structured reply chunk types. */
export const NBD_REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: NBD_REPLY_TYPE_ERROR_BIT + 1,
  ERROR_OFFSET: NBD_REPLY_TYPE_ERROR_BIT + 2,
} as const;

/** Error values of replies. */
export const NBD_ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

const ERRNO_NAMES: ReadonlyMap<number, string> = new Map(Object.entries(NBD_ERRNO).map(([k, v]) => [v, k]));

/** `EIO (5)`, or the bare number for a value the document does not define. */
export function errnoName(errno: number): string {
  const name = ERRNO_NAMES.get(errno);
  return name === undefined ? `error ${errno}` : `${name} (${errno})`;
}

// ---- sizes and limits ------------------------------------------------------------------

/**
 * Strings (export names, messages): "MUST be no longer than 4096 bytes".
 */
export const NBD_MAX_STRING = 4096;
/** The largest minimum block size a server may advertise. */
export const NBD_MAX_MINIMUM_BLOCK = 1 << 16;
/**
 * Read and write payloads without advertised constraints: "a client desiring maximum
 * interoperability SHOULD ... limit NBD_CMD_READ and NBD_CMD_WRITE commands to a maximum
 * payload size of 2^25".
 */
export const NBD_DEFAULT_MAX_PAYLOAD = 1 << 25;
/** The preferred block size to assume when none is advertised. */
export const NBD_DEFAULT_PREFERRED_BLOCK = 1 << 12;
/** A maximum payload of 0xffffffff: "the server does not have a fixed limit". */
export const NBD_NO_PAYLOAD_LIMIT = 0xffff_ffff;

/** Every fixed-size message: its size, and each field's offset. */
export const NBD_WIRE = {
  /** What a newstyle server sends first: NBDMAGIC, IHAVEOPT, handshake flags. */
  serverGreeting: { size: 18, passwd: 0, magic: 8, flags: 16 },
  /** Client flags. */
  clientFlags: { size: 4 },
  /** An option request head (data follows). */
  option: { size: 16, magic: 0, option: 8, length: 12 },
  /** An option reply head (data follows). */
  optionReply: { size: 20, magic: 0, option: 8, type: 12, length: 16 },
  /** `NBD_OPT_EXPORT_NAME`'s reply: size, transmission flags (then 124 zeroes unless NO_ZEROES). */
  exportNameReply: { size: 10, exportSize: 0, flags: 8, zeroes: 124 },
  /** `NBD_INFO_EXPORT` (type included). */
  infoExport: { size: 12, type: 0, exportSize: 2, flags: 10 },
  /** `NBD_INFO_BLOCK_SIZE` (type included). */
  infoBlockSize: { size: 14, type: 0, minimum: 2, preferred: 6, maximum: 10 },
  /** A transmission request head (write data follows). */
  request: { size: 28, magic: 0, flags: 4, type: 6, cookie: 8, offset: 16, length: 24 },
  /** A simple reply head (read data may follow). */
  simpleReply: { size: 16, magic: 0, error: 4, cookie: 8 },
  /** A structured reply chunk head (payload follows). */
  chunk: { size: 20, magic: 0, flags: 4, type: 6, cookie: 8, length: 16 },
  /** `NBD_REPLY_TYPE_OFFSET_DATA`'s payload head (data follows). */
  offsetData: { size: 8, offset: 0 },
  /** `NBD_REPLY_TYPE_OFFSET_HOLE`'s payload. */
  offsetHole: { size: 12, offset: 0, holeSize: 8 },
  /** An error chunk's payload head (message, then for ERROR_OFFSET an offset, follow). */
  errorChunk: { size: 6, error: 0, messageLength: 4 },
  /** ERROR_OFFSET's trailing offset. */
  errorOffset: { size: 8 },
} as const;

// ---- big-endian helpers ----------------------------------------------------------------

/** Above this high half a u64 is no safe integer. */
const SAFE_HI_LIMIT = 0x20_0000;

/**
 * The big-endian u64 at `offset`, or -1 when it is above Number.MAX_SAFE_INTEGER (a
 * size, offset or length that large cannot be one the client asked about).
 */
export function getU64BE(view: DataView, offset: number): number {
  const hi = view.getUint32(offset, false);
  const lo = view.getUint32(offset + 4, false);
  if (hi === 0) return lo;
  return hi >= SAFE_HI_LIMIT ? -1 : hi * 0x1_0000_0000 + lo;
}

/** Writes a safe non-negative integer as a big-endian u64. */
export function setU64BE(view: DataView, offset: number, value: number): void {
  view.setUint32(offset, Math.floor(value / 0x1_0000_0000), false);
  view.setUint32(offset + 4, value % 0x1_0000_0000, false);
}

/** Whether the u64 at `offset` equals the magic `m`. */
export function isMagic64(view: DataView, offset: number, m: { readonly hi: number; readonly lo: number }): boolean {
  return view.getUint32(offset, false) === m.hi && view.getUint32(offset + 4, false) === m.lo;
}

/** A DataView over exactly the bytes of `bytes`. */
export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

const lenientUtf8 = new TextDecoder('utf-8', { fatal: false });

/**
 * Text a server sent (an error message), made safe to print on one line: at most
 * 4096 bytes, invalid UTF-8 replaced, control characters (which could forge log lines)
 * shown as '?'.
 */
export function serverText(bytes: Uint8Array): string {
  return lenientUtf8.decode(bytes.subarray(0, NBD_MAX_STRING)).replace(/[\u0000-\u001f\u007f]/g, '?');
}

// ---- errors ----------------------------------------------------------------------------

/** Why a server's bytes were refused; each ends the connection (a hard disconnect). */
export type NbdProtocolErrorCode =
  | 'BAD_MAGIC' | 'OLDSTYLE' | 'NOT_FIXED_NEWSTYLE' | 'OPTION_OUT_OF_ORDER' | 'OVERSIZED' | 'TRUNCATED'
  | 'BAD_INFO' | 'BAD_SIZE' | 'BAD_BLOCK_SIZE' | 'NO_EXPORT_INFO' | 'UNEXPECTED_REPLY'
  | 'UNKNOWN_COOKIE' | 'CHUNK_OUT_OF_RANGE' | 'CHUNK_OVERLAP' | 'BAD_CHUNK' | 'INCOMPLETE_READ'
  | 'SIMPLE_REPLY_TO_READ' | 'EXPORT_CHANGED' | 'CLOSED';

/** A server broke the protocol; the connection is closed (and, for a backend, reconnected). */
export class NbdProtocolError extends VblkError {
  declare readonly code: NbdProtocolErrorCode;
  constructor(code: NbdProtocolErrorCode, message: string) {
    super(code, message);
  }
}

/** Why a handshake ended without an export: the server said no, or cannot do what we need. */
export type NbdHandshakeErrorCode =
  | 'EXPORT_UNKNOWN' | 'TLS_REQUIRED' | 'TLS_REFUSED' | 'TLS_UNAVAILABLE' | 'SERVER_SHUTDOWN' | 'OPTION_REFUSED'
  | 'EXPORT_UNUSABLE';

/** The server refused the handshake (or its export cannot be served); the message says why. */
export class NbdHandshakeError extends VblkError {
  declare readonly code: NbdHandshakeErrorCode;
  constructor(code: NbdHandshakeErrorCode, message: string) {
    super(code, message);
  }
}

/** A request failed on the server: its error value, and the message of an error chunk. */
export class NbdRequestError extends VblkError {
  declare readonly code: 'NBD_REQUEST_FAILED';
  constructor(
    /** The reply's error value (`NBD_ERRNO`), never 0. */
    readonly errno: number,
    message: string,
  ) {
    super('NBD_REQUEST_FAILED', message);
  }
}
