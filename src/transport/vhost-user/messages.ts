/**
 * vhost-user messages as typed data: what the codec decodes to and encodes from, the
 * error it reports, and the result shape every decoder returns. No I/O here; fds are
 * plain numbers that travel with the message that owns them.
 */
import { VblkError } from '../../errors.js';
import type { VhostUserBackendRequestName, VhostUserRequestName } from '../../spec/vhost-user.js';

// ---------------------------------------------------------------------------------------
// Header

/** A decoded 12-byte message header (vhost-user.rst, "Header"). */
export interface Header {
  /** The request number, not yet known to be one we understand. */
  readonly request: number;
  readonly flags: number;
  /** Payload bytes that follow the header; at most VHOST_USER_MAX_PAYLOAD_SIZE. */
  readonly size: number;
}

// ---------------------------------------------------------------------------------------
// Errors and results

/** Why a message was refused. Each code names one rule. */
export type VhostUserErrorCode =
  /** flags bits 0-1 are not version 1. Fatal: the byte stream cannot be trusted. */
  | 'BAD_VERSION'
  /** Payload size above VHOST_USER_MAX_PAYLOAD_SIZE. Fatal: we will not buffer it. */
  | 'OVERSIZED'
  /** Flags wrong for the direction: REPLY on a request, a reply whose flags are not exactly version|REPLY, unknown bits. */
  | 'BAD_FLAGS'
  /** A request number the spec does not define. */
  | 'UNKNOWN_REQUEST'
  /** A request the spec defines but vblk does not implement (never offered). */
  | 'UNSUPPORTED_REQUEST'
  /** A reply for another request than the one awaited, or about another ring / config range. */
  | 'WRONG_REPLY'
  /** Payload size not what the request takes. */
  | 'BAD_SIZE'
  /** Not the number of fds the request takes. */
  | 'BAD_FD_COUNT'
  /** A u64 address or size above 2^53-1, or a field above its range (status > 0xff). */
  | 'VALUE_TOO_LARGE'
  /** SET_MEM_TABLE with more than VHOST_USER_MAX_MEM_REGIONS regions. */
  | 'TOO_MANY_REGIONS'
  /** SET_MEM_TABLE with no region at all. */
  | 'NO_REGIONS'
  /** A config access outside the VHOST_USER_MAX_CONFIG_SIZE bytes of config space. */
  | 'BAD_CONFIG_RANGE'
  /** Reserved bits set in a field whose layout the spec fixes (vring file u64, enable not 0/1). */
  | 'BAD_VALUE';

/**
 * A message from the peer that vblk refuses. Decoders return it (they never throw on
 * input); a caller that decides the connection is over may throw it.
 */
export class VhostUserProtocolError extends VblkError {
  declare readonly code: VhostUserErrorCode;
  /**
   * The message's header when framing survived (everything but BAD_VERSION and
   * OVERSIZED): the back-end can still answer a NEED_REPLY with a failed REPLY_ACK.
   */
  readonly header: Header | undefined;

  constructor(code: VhostUserErrorCode, message: string, header?: Header) {
    super(code, message);
    this.header = header;
  }
}

/** A decode that failed. `fds` are every fd that came with the input: close them. */
export interface DecodeFailure {
  readonly ok: false;
  readonly error: VhostUserProtocolError;
  readonly fds: readonly number[];
}

/** What every decoder returns: a value, or an error plus the fds to close. */
export type DecodeResult<T> = { readonly ok: true; readonly value: T } | DecodeFailure;

/** A byte sequence to send in one sendmsg, with the fds to attach to its first byte. */
export interface EncodedMessage {
  readonly bytes: Uint8Array;
  readonly fds: readonly number[];
}

// ---------------------------------------------------------------------------------------
// Payload pieces

/**
 * One memory region as the front-end describes it. `guestAddress` is guest-physical,
 * `userAddress` is the front-end's virtual address (ring addresses are given in it),
 * `mmapOffset` is where the region starts in its fd.
 */
export interface MemoryRegionDescription {
  readonly guestAddress: number;
  readonly size: number;
  readonly userAddress: number;
  readonly mmapOffset: number;
}

/** A memory region with the fd to map it from. */
export interface MappedMemoryRegion extends MemoryRegionDescription {
  readonly fd: number;
}

/** The inflight buffer description of GET/SET_INFLIGHT_FD. */
export interface InflightDescription {
  readonly mmapSize: number;
  readonly mmapOffset: number;
  readonly numQueues: number;
  readonly queueSize: number;
}

// ---------------------------------------------------------------------------------------
// Front-end → back-end requests

/**
 * Every front-end request, by `request` (the spec name without `VHOST_USER_`). Numbers
 * are JS numbers; addresses and sizes went through the 2^53-1 check; feature sets are
 * bigint (bit sets, control path). `needReply` is the NEED_REPLY flag: the back-end owes
 * a REPLY_ACK when REPLY_ACK was negotiated and the request has no reply of its own.
 */
export type FrontendRequest = { readonly needReply: boolean } & (
  | { readonly request: 'GET_FEATURES' }
  | { readonly request: 'SET_FEATURES'; readonly features: bigint }
  | { readonly request: 'SET_OWNER' }
  | { readonly request: 'RESET_OWNER' }
  | { readonly request: 'SET_MEM_TABLE'; readonly regions: readonly MappedMemoryRegion[] }
  | { readonly request: 'SET_LOG_BASE'; readonly mmapSize: number; readonly mmapOffset: number; readonly fd: number }
  | { readonly request: 'SET_LOG_FD'; readonly fd: number }
  | { readonly request: 'SET_VRING_NUM'; readonly index: number; readonly num: number }
  | {
      readonly request: 'SET_VRING_ADDR';
      readonly index: number;
      /** Bit VHOST_VRING_F_LOG: log used-ring writes. */
      readonly flags: number;
      /** Descriptor table, available and used ring: front-end user addresses. */
      readonly desc: number;
      readonly used: number;
      readonly avail: number;
      /** Guest-physical address used for logging used-ring writes. */
      readonly log: number;
    }
  | { readonly request: 'SET_VRING_BASE'; readonly index: number; readonly num: number }
  | { readonly request: 'GET_VRING_BASE'; readonly index: number }
  | {
      readonly request: 'SET_VRING_KICK' | 'SET_VRING_CALL' | 'SET_VRING_ERR';
      readonly index: number;
      /** The eventfd, or null when the NOFD bit says "poll instead". */
      readonly fd: number | null;
    }
  | { readonly request: 'GET_PROTOCOL_FEATURES' }
  | { readonly request: 'SET_PROTOCOL_FEATURES'; readonly features: bigint }
  | { readonly request: 'GET_QUEUE_NUM' }
  | { readonly request: 'SET_VRING_ENABLE'; readonly index: number; readonly enable: boolean }
  | { readonly request: 'SET_BACKEND_REQ_FD'; readonly fd: number }
  | { readonly request: 'GET_CONFIG'; readonly offset: number; readonly size: number; readonly flags: number }
  | { readonly request: 'SET_CONFIG'; readonly offset: number; readonly flags: number; readonly data: Uint8Array }
  | { readonly request: 'GET_INFLIGHT_FD'; readonly numQueues: number; readonly queueSize: number }
  | ({ readonly request: 'SET_INFLIGHT_FD'; readonly fd: number } & InflightDescription)
  | { readonly request: 'RESET_DEVICE' }
  | { readonly request: 'GET_MAX_MEM_SLOTS' }
  | { readonly request: 'ADD_MEM_REG'; readonly region: MappedMemoryRegion }
  | {
      readonly request: 'REM_MEM_REG';
      readonly region: MemoryRegionDescription;
      /**
       * An fd the front-end should not have sent but QEMU 7.2 does: the spec says the
       * back-end MUST close it without using it.
       */
      readonly fdToClose: number | null;
    }
  | { readonly request: 'SET_STATUS'; readonly status: number }
  | { readonly request: 'GET_STATUS' }
);

/** The front-end requests vblk implements: a subset of {@link VhostUserRequestName}. */
export type FrontendRequestName = FrontendRequest['request'];

/** The request variant named `N`. */
export type FrontendRequestOf<N extends FrontendRequestName> = Extract<FrontendRequest, { readonly request: N }>;

// Compile-time check that every implemented request is a spec request.
type AssertSubset<T extends U, U> = T;
type _FrontendNamesAreSpecNames = AssertSubset<FrontendRequestName, VhostUserRequestName>;

// ---------------------------------------------------------------------------------------
// Back-end → front-end replies (main socket)

/** The requests with a reply body of their own (vhost-user.rst, "Communication"). */
export type RequestWithReply =
  | 'GET_FEATURES'
  | 'GET_PROTOCOL_FEATURES'
  | 'GET_VRING_BASE'
  | 'GET_QUEUE_NUM'
  | 'GET_CONFIG'
  | 'GET_INFLIGHT_FD'
  | 'GET_MAX_MEM_SLOTS'
  | 'GET_STATUS';

/** Requests answered, when asked to, by a REPLY_ACK: a u64, 0 for success. */
export type AckedRequest = Exclude<FrontendRequestName, RequestWithReply>;

/** A config space window: `data.length` bytes from `offset`. */
export interface ConfigWindow {
  readonly offset: number;
  readonly flags: number;
  readonly data: Uint8Array;
}

/**
 * A back-end's reply, by the request it answers. A reply always has flags exactly
 * version|REPLY and repeats the request number.
 */
export type BackendReply =
  | { readonly request: 'GET_FEATURES' | 'GET_PROTOCOL_FEATURES'; readonly features: bigint }
  | { readonly request: 'GET_VRING_BASE'; readonly index: number; readonly num: number }
  | { readonly request: 'GET_QUEUE_NUM'; readonly queues: number }
  | { readonly request: 'GET_MAX_MEM_SLOTS'; readonly slots: number }
  | {
      readonly request: 'GET_CONFIG';
      /** null: the back-end refused (a zero-length payload, per the spec). */
      readonly config: ConfigWindow | null;
    }
  | ({ readonly request: 'GET_INFLIGHT_FD'; readonly fd: number } & InflightDescription)
  | { readonly request: 'GET_STATUS'; readonly status: number }
  | { readonly request: AckedRequest; readonly success: boolean };

// Compile-time check that every request has exactly one reply shape.
type _EveryRequestHasAReply = AssertSubset<FrontendRequestName, BackendReply['request']>;

// ---------------------------------------------------------------------------------------
// The back-end channel: back-end → front-end requests, front-end → back-end replies

/** A request the back-end sends on the back-end channel (spec name without `VHOST_USER_BACKEND_`). */
export type BackendRequest = {
  readonly request: 'CONFIG_CHANGE_MSG';
  /** Set only when REPLY_ACK was negotiated and the back-end wants to wait for the front-end. */
  readonly needReply: boolean;
};

/** The back-end requests vblk implements. */
export type BackendRequestName = BackendRequest['request'];

type _BackendNamesAreSpecNames = AssertSubset<BackendRequestName, VhostUserBackendRequestName>;

/** The front-end's REPLY_ACK to a back-end request that asked for one. */
export type FrontendReply = { readonly request: BackendRequestName; readonly success: boolean };

// ---------------------------------------------------------------------------------------
// Fds carried by a message

/**
 * Every fd a front-end request carries, in wire order: what the encoder attaches and
 * what a caller must close when it drops the message.
 */
export function requestFds(req: FrontendRequest): number[] {
  switch (req.request) {
    case 'SET_MEM_TABLE':
      return req.regions.map((r) => r.fd);
    case 'ADD_MEM_REG':
      return [req.region.fd];
    case 'REM_MEM_REG':
      return req.fdToClose === null ? [] : [req.fdToClose];
    case 'SET_VRING_KICK':
    case 'SET_VRING_CALL':
    case 'SET_VRING_ERR':
      return req.fd === null ? [] : [req.fd];
    case 'SET_LOG_BASE':
    case 'SET_LOG_FD':
    case 'SET_BACKEND_REQ_FD':
    case 'SET_INFLIGHT_FD':
      return [req.fd];
    default:
      return [];
  }
}

/** Every fd a back-end reply carries (only GET_INFLIGHT_FD's reply has one). */
export function replyFds(reply: BackendReply): number[] {
  return reply.request === 'GET_INFLIGHT_FD' ? [reply.fd] : [];
}
