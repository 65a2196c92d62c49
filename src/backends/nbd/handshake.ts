/**
 * The client side of the NBD handshake as a sans-IO state machine: server bytes in (split
 * anywhere), events out — bytes to send, "upgrade this connection to TLS now", the export
 * once transmission may start, or why not. The socket, TLS and timers belong to the caller
 * (src/node/nbd-backend.ts); tests drive this with bytes alone.
 *
 * The flow (doc/proto.md, "Fixed newstyle negotiation"):
 *
 *   greeting ─► client flags ─► [STARTTLS ─► (TLS)] ─► STRUCTURED_REPLY ─► GO ─► ready
 *
 * GO asks for `NBD_INFO_BLOCK_SIZE`, so the client commits to the server's size
 * constraints (which the backend honours: whole minimum blocks, payloads split at the
 * maximum). A server without GO (`NBD_REP_ERR_UNSUP`), or without fixed newstyle, gets
 * `NBD_OPT_EXPORT_NAME` instead, as the document asks of clients. An oldstyle server is
 * refused. Every reply is checked before use: its magic, that it answers the option just
 * sent (the client sends one option at a time, so any other is out of order), its length
 * against a bound and against what its type requires.
 *
 * Refusals the server states (unknown export, TLS required, shutting down) end with a
 * soft disconnect (`NBD_OPT_ABORT` is sent), protocol violations with a hard one.
 */
import { UsageError } from '../../errors.js';
import {
  NBD_CLISERV_MAGIC, NBD_DEFAULT_MAX_PAYLOAD, NBD_DEFAULT_PREFERRED_BLOCK, NBD_FLAG, NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO, NBD_INIT_PASSWD, NBD_MAX_MINIMUM_BLOCK,
  NBD_MAX_STRING, NBD_OPT, NBD_OPTS_MAGIC, NBD_REP, NBD_REP_FLAG_ERROR, NBD_REP_MAGIC, NBD_WIRE, NbdHandshakeError,
  NbdProtocolError, getU64BE, isMagic64, serverText, viewOf,
} from './protocol.js';

/** The server's size constraints (doc/proto.md, "Size constraints"), in bytes. */
export interface NbdBlockSizes {
  /** Power of two, 1 … 64 KiB: requests start and end on multiples of it. */
  readonly minimum: number;
  /** Power of two, at least max(minimum, 512): the size served best. */
  readonly preferred: number;
  /** Most bytes in one read or write payload (0xffffffff: no fixed limit). */
  readonly maximum: number;
}

/** What the handshake learned about the export. */
export interface NbdExportInfo {
  /** The export name the client asked for. */
  readonly name: string;
  /** Bytes; a positive multiple of 512. */
  readonly size: number;
  /** Transmission flags (`NBD_FLAG`), as sent. */
  readonly flags: number;
  /** Whether the server agreed to structured replies. */
  readonly structuredReplies: boolean;
  /** The constraints advertised, or the document's defaults when none were. */
  readonly blockSizes: NbdBlockSizes;
  /** Whether `NBD_INFO_BLOCK_SIZE` came (false: `blockSizes` are the defaults). */
  readonly blockSizesAdvertised: boolean;
}

/** What the caller must do next. */
export type NbdHandshakeEvent =
  | { readonly type: 'send'; readonly bytes: Uint8Array }
  /** Upgrade the connection to TLS (client side), then call {@link NbdHandshake.tlsReady}. */
  | { readonly type: 'starttls' }
  /** Transmission starts; `rest` is what came after the handshake's last byte (normally nothing). */
  | { readonly type: 'ready'; readonly info: NbdExportInfo; readonly rest: Uint8Array }
  /** The handshake is over without an export; close the connection (after sending what came before). */
  | { readonly type: 'failed'; readonly error: NbdHandshakeError | NbdProtocolError };

/** How to negotiate. */
export interface NbdHandshakeOptions {
  /** The export to use ("" is the server's default export). At most 4096 bytes of UTF-8. */
  readonly exportName: string;
  /** Insist on TLS: STARTTLS first, and any refusal ends the handshake. */
  readonly tls?: boolean;
  /** Ask for structured replies (default true). */
  readonly structuredReplies?: boolean;
}

/**
 * Largest option reply accepted: every reply this client can receive is an ACK, an INFO
 * (at most a 4096-byte string) or an error with a message (idem), so anything near 64 KiB
 * is a server gone wrong, not one to buffer for.
 */
export const NBD_MAX_OPTION_REPLY = 64 * 1024;

const enum State {
  Greeting,
  OptionReply,
  TlsWait,
  ExportNameReply,
  Done,
}

const utf8 = new TextEncoder();

function isPowerOfTwo(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

/** The names of option reply types, for messages. */
const REP_NAMES: ReadonlyMap<number, string> = new Map(Object.entries(NBD_REP).map(([k, v]) => [v, `NBD_REP_${k}`]));
const OPT_NAMES: ReadonlyMap<number, string> = new Map(Object.entries(NBD_OPT).map(([k, v]) => [v, `NBD_OPT_${k}`]));

function repName(type: number): string {
  return REP_NAMES.get(type) ?? `reply type 0x${type.toString(16)}`;
}

function optName(option: number): string {
  return OPT_NAMES.get(option) ?? `option ${option}`;
}

/** One client handshake. Feed it the server's bytes; act on the events it returns. */
export class NbdHandshake {
  private state = State.Greeting;
  /** Bytes received and not yet consumed (bounded by NBD_MAX_OPTION_REPLY + a head). */
  private buffer = new Uint8Array(256);
  private used = 0;
  private readonly name: Uint8Array;
  private readonly tls: boolean;
  private readonly wantStructured: boolean;
  private noZeroes = false;
  /** The option whose reply is awaited. */
  private pending = 0;
  private structured = false;
  /** NBD_INFO_EXPORT (or EXPORT_NAME's reply) arrived. */
  private haveExport = false;
  /** -1 when above 2^53 - 1. */
  private exportSize = -1;
  private exportFlags = 0;
  private blockSizes: NbdBlockSizes | null = null;

  /** Throws {@link UsageError} for an export name longer than the protocol allows. */
  constructor(private readonly options: NbdHandshakeOptions) {
    this.name = utf8.encode(options.exportName);
    if (this.name.length > NBD_MAX_STRING) {
      throw new UsageError('BAD_ARGUMENT', `an NBD export name is at most ${NBD_MAX_STRING} bytes, got ${this.name.length}`);
    }
    if (options.exportName.includes('\0')) throw new UsageError('BAD_ARGUMENT', 'an NBD export name cannot contain NUL');
    this.tls = options.tls ?? false;
    this.wantStructured = options.structuredReplies ?? true;
  }

  /** Whether the handshake has ended (ready or failed). */
  get isOver(): boolean {
    return this.state === State.Done;
  }

  /** Whether parsing must stop: the handshake ended, or waits for TLS. */
  private paused(): boolean {
    return this.state === State.Done || this.state === State.TlsWait;
  }

  /** Takes server bytes; returns what to do, in order. */
  receive(bytes: Uint8Array): NbdHandshakeEvent[] {
    if (this.state === State.Done) throw new UsageError('BAD_STATE', 'the NBD handshake is over');
    const events: NbdHandshakeEvent[] = [];
    if (this.state === State.TlsWait) {
      if (bytes.length === 0) return events;
      return this.fail(events, new NbdProtocolError('UNEXPECTED_REPLY', 'the server sent data in clear after agreeing to start TLS'));
    }
    this.append(bytes);
    let at = 0;
    for (;;) {
      const n = this.step(events, at);
      if (n === 0) break;
      at += n;
      if (this.paused()) break;
    }
    const rest = this.buffer.slice(at, this.used);
    this.buffer.copyWithin(0, at, this.used);
    this.used -= at;
    const last = events[events.length - 1];
    if (last !== undefined && last.type === 'ready') events[events.length - 1] = { ...last, rest };
    else if (this.paused() && !this.isOver && this.used > 0) {
      return this.fail(events, new NbdProtocolError('UNEXPECTED_REPLY', 'the server sent data in clear after agreeing to start TLS'));
    }
    return events;
  }

  /** The TLS session is up: go on negotiating inside it. */
  tlsReady(): NbdHandshakeEvent[] {
    if (this.state !== State.TlsWait) throw new UsageError('BAD_STATE', 'tlsReady() without a pending STARTTLS');
    this.state = State.OptionReply;
    const events: NbdHandshakeEvent[] = [];
    this.afterTls(events);
    return events;
  }

  /**
   * The server closed the connection before the handshake ended: why, as well as it can
   * be told. After `NBD_OPT_EXPORT_NAME` that is how a server says "no such export".
   */
  closedError(): NbdHandshakeError | NbdProtocolError {
    if (this.state === State.ExportNameReply) {
      return new NbdHandshakeError('EXPORT_UNKNOWN', `the server closed the connection after NBD_OPT_EXPORT_NAME: it has no export '${this.options.exportName}' or refuses it`);
    }
    return new NbdProtocolError('TRUNCATED', 'the server closed the connection during the handshake');
  }

  // ---- parsing ------------------------------------------------------------------------

  private append(bytes: Uint8Array): void {
    const need = this.used + bytes.length;
    if (need > this.buffer.length) {
      // Bounded: step() refuses any message above NBD_MAX_OPTION_REPLY before waiting for it.
      const grown = new Uint8Array(Math.max(need, this.buffer.length * 2));
      grown.set(this.buffer.subarray(0, this.used));
      this.buffer = grown;
    }
    this.buffer.set(bytes, this.used);
    this.used = need;
  }

  /** Consumes one message starting at `at` if it is complete; returns its size, or 0. */
  private step(events: NbdHandshakeEvent[], at: number): number {
    const avail = this.used - at;
    const view = new DataView(this.buffer.buffer, this.buffer.byteOffset + at, avail);
    switch (this.state) {
      case State.Greeting: {
        const G = NBD_WIRE.serverGreeting;
        if (avail < G.size) return 0;
        this.greeting(events, view);
        return G.size;
      }
      case State.OptionReply: {
        const R = NBD_WIRE.optionReply;
        if (avail < R.size) return 0;
        if (!isMagic64(view, R.magic, NBD_REP_MAGIC)) {
          this.fail(events, new NbdProtocolError('BAD_MAGIC', `option reply with magic 0x${view.getUint32(R.magic).toString(16)}${view.getUint32(R.magic + 4).toString(16).padStart(8, '0')}`));
          return avail;
        }
        const option = view.getUint32(R.option);
        const type = view.getUint32(R.type);
        const length = view.getUint32(R.length);
        if (option !== this.pending) {
          this.fail(events, new NbdProtocolError('OPTION_OUT_OF_ORDER', `a reply to ${optName(option)} came while ${optName(this.pending)} was the only option asked`));
          return avail;
        }
        if (length > NBD_MAX_OPTION_REPLY) {
          this.fail(events, new NbdProtocolError('OVERSIZED', `a ${length}-byte reply to ${optName(option)}, above the ${NBD_MAX_OPTION_REPLY} accepted`));
          return avail;
        }
        if (avail < R.size + length) return 0;
        const data = this.buffer.subarray(at + R.size, at + R.size + length);
        this.optionReply(events, type, data);
        return R.size + length;
      }
      case State.ExportNameReply: {
        const E = NBD_WIRE.exportNameReply;
        const size = E.size + (this.noZeroes ? 0 : E.zeroes);
        if (avail < size) return 0;
        this.haveExport = true;
        this.exportSize = getU64BE(view, E.exportSize);
        this.exportFlags = view.getUint16(E.flags);
        this.finish(events);
        return size;
      }
      default:
        return 0;
    }
  }

  private greeting(events: NbdHandshakeEvent[], view: DataView): void {
    const G = NBD_WIRE.serverGreeting;
    if (!isMagic64(view, G.passwd, NBD_INIT_PASSWD)) {
      this.fail(events, new NbdProtocolError('BAD_MAGIC', 'not an NBD server: it did not begin with NBDMAGIC'));
      return;
    }
    if (isMagic64(view, G.magic, NBD_CLISERV_MAGIC)) {
      this.fail(events, new NbdProtocolError('OLDSTYLE', 'the server speaks the oldstyle handshake, which has no export names and is not supported'));
      return;
    }
    if (!isMagic64(view, G.magic, NBD_OPTS_MAGIC)) {
      this.fail(events, new NbdProtocolError('BAD_MAGIC', 'not an NBD server: IHAVEOPT missing after NBDMAGIC'));
      return;
    }
    const flags = view.getUint16(G.flags);
    const fixed = (flags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & NBD_FLAG_NO_ZEROES) !== 0;
    // Only flags the server offered may be set (doc/proto.md, "Client flags").
    const clientFlags = (fixed ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (this.noZeroes ? NBD_FLAG_C_NO_ZEROES : 0);
    const out = new Uint8Array(NBD_WIRE.clientFlags.size);
    viewOf(out).setUint32(0, clientFlags);
    events.push({ type: 'send', bytes: out });
    if (!fixed) {
      // Plain newstyle knows only NBD_OPT_EXPORT_NAME, and no TLS.
      if (this.tls) {
        this.fail(events, new NbdHandshakeError('TLS_UNAVAILABLE', 'the server does not speak fixed newstyle, so it cannot start TLS, and the URI asks for TLS'));
        return;
      }
      this.exportName(events);
      return;
    }
    if (this.tls) this.sendOption(events, NBD_OPT.STARTTLS, new Uint8Array(0));
    else this.afterTls(events);
  }

  /** Negotiation that follows TLS (or its absence): structured replies, then GO. */
  private afterTls(events: NbdHandshakeEvent[]): void {
    if (this.wantStructured) this.sendOption(events, NBD_OPT.STRUCTURED_REPLY, new Uint8Array(0));
    else this.go(events);
  }

  private go(events: NbdHandshakeEvent[]): void {
    // Name length, name, one information request: NBD_INFO_BLOCK_SIZE.
    const data = new Uint8Array(4 + this.name.length + 2 + 2);
    const v = viewOf(data);
    v.setUint32(0, this.name.length);
    data.set(this.name, 4);
    v.setUint16(4 + this.name.length, 1);
    v.setUint16(6 + this.name.length, NBD_INFO.BLOCK_SIZE);
    this.sendOption(events, NBD_OPT.GO, data);
  }

  private exportName(events: NbdHandshakeEvent[]): void {
    // No reply head: the export's size and flags come back, or the connection closes.
    events.push({ type: 'send', bytes: this.optionBytes(NBD_OPT.EXPORT_NAME, this.name) });
    this.state = State.ExportNameReply;
  }

  private sendOption(events: NbdHandshakeEvent[], option: number, data: Uint8Array): void {
    events.push({ type: 'send', bytes: this.optionBytes(option, data) });
    this.pending = option;
    this.state = State.OptionReply;
  }

  private optionBytes(option: number, data: Uint8Array): Uint8Array {
    const O = NBD_WIRE.option;
    const out = new Uint8Array(O.size + data.length);
    const v = viewOf(out);
    v.setUint32(O.magic, NBD_OPTS_MAGIC.hi);
    v.setUint32(O.magic + 4, NBD_OPTS_MAGIC.lo);
    v.setUint32(O.option, option);
    v.setUint32(O.length, data.length);
    out.set(data, O.size);
    return out;
  }

  private optionReply(events: NbdHandshakeEvent[], type: number, data: Uint8Array): void {
    const option = this.pending;
    const isError = (type & NBD_REP_FLAG_ERROR) !== 0;
    if (type === NBD_REP.ACK && data.length !== 0) {
      this.fail(events, new NbdProtocolError('BAD_INFO', `NBD_REP_ACK to ${optName(option)} carries ${data.length} bytes; it has none`));
      return;
    }
    if (isError) {
      this.refused(events, option, type, data);
      return;
    }
    switch (option) {
      case NBD_OPT.STARTTLS:
        if (type !== NBD_REP.ACK) break;
        this.state = State.TlsWait;
        events.push({ type: 'starttls' });
        return;
      case NBD_OPT.STRUCTURED_REPLY:
        if (type !== NBD_REP.ACK) break;
        this.structured = true;
        this.go(events);
        return;
      case NBD_OPT.GO:
        if (type === NBD_REP.INFO) {
          this.info(events, data);
          return;
        }
        if (type !== NBD_REP.ACK) break;
        this.finish(events);
        return;
    }
    this.fail(events, new NbdProtocolError('UNEXPECTED_REPLY', `${repName(type)} is no answer to ${optName(option)}`));
  }

  /** An `NBD_REP_INFO` to GO: the export, its block sizes, or something to ignore. */
  private info(events: NbdHandshakeEvent[], data: Uint8Array): void {
    if (data.length < 2) {
      this.fail(events, new NbdProtocolError('BAD_INFO', `NBD_REP_INFO of ${data.length} bytes has no information type`));
      return;
    }
    const v = viewOf(data);
    const infoType = v.getUint16(0);
    if (infoType === NBD_INFO.EXPORT) {
      const I = NBD_WIRE.infoExport;
      if (data.length !== I.size) {
        this.fail(events, new NbdProtocolError('BAD_INFO', `NBD_INFO_EXPORT of ${data.length} bytes, not ${I.size}`));
        return;
      }
      this.haveExport = true;
      this.exportSize = getU64BE(v, I.exportSize);
      this.exportFlags = v.getUint16(I.flags);
    } else if (infoType === NBD_INFO.BLOCK_SIZE) {
      const B = NBD_WIRE.infoBlockSize;
      if (data.length !== B.size) {
        this.fail(events, new NbdProtocolError('BAD_INFO', `NBD_INFO_BLOCK_SIZE of ${data.length} bytes, not ${B.size}`));
        return;
      }
      const sizes = { minimum: v.getUint32(B.minimum), preferred: v.getUint32(B.preferred), maximum: v.getUint32(B.maximum) };
      const bad = checkBlockSizes(sizes);
      if (bad !== null) {
        this.fail(events, new NbdProtocolError('BAD_BLOCK_SIZE', `NBD_INFO_BLOCK_SIZE: ${bad}`));
        return;
      }
      this.blockSizes = sizes;
    }
    // NBD_INFO_NAME, NBD_INFO_DESCRIPTION and types unknown to us: "The client MUST
    // ignore information replies it does not understand."
  }

  private refused(events: NbdHandshakeEvent[], option: number, type: number, data: Uint8Array): void {
    const said = data.length > 0 ? `: ${serverText(data)}` : '';
    if (type === NBD_REP.ERR_SHUTDOWN) {
      // "If the client receives NBD_REP_ERR_SHUTDOWN it MUST initiate a soft disconnect."
      this.abort(events, new NbdHandshakeError('SERVER_SHUTDOWN', `the server is shutting down${said}`));
      return;
    }
    if (option === NBD_OPT.STARTTLS) {
      this.abort(events, new NbdHandshakeError('TLS_REFUSED', `the server will not start TLS (${repName(type)})${said}`));
      return;
    }
    if (type === NBD_REP.ERR_TLS_REQD) {
      this.abort(events, new NbdHandshakeError('TLS_REQUIRED', `the server requires TLS (an nbds:// or nbds+unix:// URI)${said}`));
      return;
    }
    if (option === NBD_OPT.STRUCTURED_REPLY) {
      // "clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP; in this case, no
      // structured replies will be sent." Any other refusal means the same to us.
      this.go(events);
      return;
    }
    if (option === NBD_OPT.GO && type === NBD_REP.ERR_UNSUP) {
      // "clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP by falling back to
      // using NBD_OPT_EXPORT_NAME."
      this.blockSizes = null;
      this.exportName(events);
      return;
    }
    if (option === NBD_OPT.GO && type === NBD_REP.ERR_UNKNOWN) {
      this.abort(events, new NbdHandshakeError('EXPORT_UNKNOWN', `the server has no export '${this.options.exportName}'${said}`));
      return;
    }
    this.abort(events, new NbdHandshakeError('OPTION_REFUSED', `the server refused ${optName(option)} with ${repName(type)}${said}`));
  }

  /** The final ACK (or EXPORT_NAME's reply): check the export and start transmission. */
  private finish(events: NbdHandshakeEvent[]): void {
    if (!this.haveExport) {
      this.fail(events, new NbdProtocolError('NO_EXPORT_INFO', 'NBD_OPT_GO succeeded without NBD_INFO_EXPORT'));
      return;
    }
    if (this.exportSize < 0) {
      this.fail(events, new NbdProtocolError('BAD_SIZE', 'the export size is above 2^53 - 1 bytes'));
      return;
    }
    if ((this.exportFlags & NBD_FLAG.HAS_FLAGS) === 0) {
      this.fail(events, new NbdProtocolError('BAD_INFO', `transmission flags 0x${this.exportFlags.toString(16)} lack NBD_FLAG_HAS_FLAGS, which "MUST always be 1"`));
      return;
    }
    if (this.exportSize === 0 || this.exportSize % 512 !== 0) {
      this.abortOrClose(events, new NbdHandshakeError('EXPORT_UNUSABLE', `the export is ${this.exportSize} bytes, not a positive multiple of 512: no virtio-blk disk has that size`));
      return;
    }
    const sizes = this.blockSizes;
    if (sizes !== null && this.exportSize % sizes.minimum !== 0) {
      this.abortOrClose(events, new NbdHandshakeError('EXPORT_UNUSABLE', `the export is ${this.exportSize} bytes, not a multiple of its ${sizes.minimum}-byte minimum block`));
      return;
    }
    this.state = State.Done;
    events.push({
      type: 'ready',
      rest: new Uint8Array(0),
      info: {
        name: this.options.exportName,
        size: this.exportSize,
        flags: this.exportFlags,
        structuredReplies: this.structured,
        blockSizes: sizes ?? { minimum: 1, preferred: NBD_DEFAULT_PREFERRED_BLOCK, maximum: NBD_DEFAULT_MAX_PAYLOAD },
        blockSizesAdvertised: sizes !== null,
      },
    });
  }

  /**
   * An unusable export found in transmission phase already (after EXPORT_NAME) cannot be
   * aborted with an option; NBD_CMD_DISC would be its soft disconnect, which the caller's
   * close amounts to here.
   */
  private abortOrClose(events: NbdHandshakeEvent[], error: NbdHandshakeError): void {
    if (this.state === State.ExportNameReply) this.fail(events, error);
    else this.abort(events, error);
  }

  /** A soft disconnect: NBD_OPT_ABORT, then close. */
  private abort(events: NbdHandshakeEvent[], error: NbdHandshakeError): void {
    events.push({ type: 'send', bytes: this.optionBytes(NBD_OPT.ABORT, new Uint8Array(0)) });
    this.fail(events, error);
  }

  private fail(events: NbdHandshakeEvent[], error: NbdHandshakeError | NbdProtocolError): NbdHandshakeEvent[] {
    this.state = State.Done;
    events.push({ type: 'failed', error });
    return events;
  }
}

/** Why advertised size constraints break doc/proto.md's rules, or null when they keep them. */
export function checkBlockSizes(s: NbdBlockSizes): string | null {
  if (!isPowerOfTwo(s.minimum) || s.minimum > NBD_MAX_MINIMUM_BLOCK) {
    return `minimum block size ${s.minimum} is not a power of two from 1 to ${NBD_MAX_MINIMUM_BLOCK}`;
  }
  if (!isPowerOfTwo(s.preferred) || s.preferred < Math.max(s.minimum, 512)) {
    return `preferred block size ${s.preferred} is not a power of two of at least ${Math.max(s.minimum, 512)}`;
  }
  if (s.maximum < s.preferred) return `maximum payload ${s.maximum} is below the preferred block size ${s.preferred}`;
  return null;
}
