/**
 * The NBD transmission phase, client side, sans-IO: requests out (encoded into a sink the
 * caller writes to its socket), reply bytes in (split anywhere), completions reported by
 * callback. Many requests are in flight at once, each known by its cookie; replies come
 * in any order, simple or structured (doc/proto.md, "Transmission").
 *
 * Every reply is checked against the request it answers before a byte is copied: its
 * cookie must name a request in flight (a cookie is the request's slot and a generation
 * number, so a stale or invented one is caught), a data or hole chunk must lie inside the
 * request and overlap no earlier one, a read succeeds only when its chunks covered it
 * whole, and payload sizes are bounded by what the request asked. Read data is copied
 * straight from the socket's bytes into the request's buffers (guest memory), never
 * outside them. Anything else ends the connection: {@link NbdTransmission.receive}
 * returns an {@link NbdProtocolError}, and the caller closes the socket (and may
 * reconnect and resubmit: requests in flight are handed back by
 * {@link NbdTransmission.takeAll}).
 *
 * Hot path: request heads are encoded into one arena, one slot per request in flight; a
 * request is a caller-owned reusable object; a reply in order allocates nothing.
 */
import { UsageError } from '../../errors.js';
import { totalLength } from '../backend.js';
import {
  NBD_CMD, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE, NBD_REPLY_TYPE_ERROR_BIT, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC, NBD_WIRE, NbdProtocolError, NbdRequestError, errnoName, getU64BE, serverText, setU64BE,
} from './protocol.js';

const NO_BUFFERS: readonly Uint8Array[] = [];
const REQ = NBD_WIRE.request;
const SIMPLE = NBD_WIRE.simpleReply;
const CHUNK = NBD_WIRE.chunk;

/**
 * Most chunks of one read that may arrive out of order. Servers send a read's chunks in
 * order; a bound keeps one that does not from making the overlap check quadratic.
 */
export const NBD_MAX_OUT_OF_ORDER_CHUNKS = 64;
/**
 * Largest error chunk payload: the error, a message of at most 65535 bytes (its length
 * is a u16), and ERROR_OFFSET's offset.
 */
const MAX_ERROR_PAYLOAD = NBD_WIRE.errorChunk.size + 0xffff + NBD_WIRE.errorOffset.size;

/**
 * One request. The caller owns it (and may reuse it once completed); the transmission
 * reads its description at {@link NbdTransmission.submit} and keeps its progress here
 * while it is in flight.
 */
export class NbdRequest {
  /** `NBD_CMD` value. */
  type: number = NBD_CMD.READ;
  /** Command flags (`NBD_CMD_FLAG_*`), only those the export allows for this type. */
  flags = 0;
  offset = 0;
  length = 0;
  /** READ: where the data goes; WRITE: the data; exactly `length` bytes. Else empty. */
  buffers: readonly Uint8Array[] = NO_BUFFERS;

  // ---- progress, kept by the transmission while in flight ----
  /** Slot in the cookie table, -1 when not in flight. */
  slot = -1;
  /** A structured chunk for it has arrived (a simple reply may no longer). */
  chunked = false;
  /** Bytes of a read covered by data and hole chunks. */
  covered = 0;
  /** Request-relative end of the run covered from 0 in order. */
  inOrderEnd = 0;
  /** Covered runs past `inOrderEnd` (start, end pairs), only for chunks out of order. */
  outOfOrder: number[] | null = null;
  /** The first error a reply reported. */
  error: NbdRequestError | null = null;

  /** Describes the request (before submitting it). */
  set(type: number, flags: number, offset: number, length: number, buffers: readonly Uint8Array[]): this {
    this.type = type;
    this.flags = flags;
    this.offset = offset;
    this.length = length;
    this.buffers = buffers;
    return this;
  }
}

/** Where encoded bytes go: the caller writes them to the connection, in order. */
export type NbdSink = (bytes: Uint8Array) => void;
/** A request finished: `error` null on success. Called with the request out of flight. */
export type NbdCompletion = (request: NbdRequest, error: NbdRequestError | null) => void;

/** How to build an {@link NbdTransmission}. */
export interface NbdTransmissionOptions {
  /** Whether structured replies were negotiated. */
  readonly structuredReplies: boolean;
  /** Most requests in flight at once (cookie table size). */
  readonly maxInFlight: number;
  readonly sink: NbdSink;
  readonly onComplete: NbdCompletion;
}

const enum Rx {
  /** Collecting a reply head. */
  Head,
  /** A simple reply's read data. */
  SimpleData,
  /** Collecting a chunk's fixed payload (data offset, hole, error). */
  Small,
  /** A data chunk's data. */
  ChunkData,
}

/** One connection's transmission phase. */
export class NbdTransmission {
  private readonly structured: boolean;
  private readonly sink: NbdSink;
  private readonly onComplete: NbdCompletion;
  private readonly slots: (NbdRequest | null)[];
  private readonly generations: Uint32Array;
  private readonly free: Int32Array;
  private freeCount: number;
  /** Request heads, one per slot, and their views. */
  private readonly heads: Uint8Array[];
  private readonly headViews: DataView[];
  private inFlightCount = 0;

  // ---- receive state ----
  private rx = Rx.Head;
  private readonly head = new Uint8Array(CHUNK.size);
  private readonly headView = new DataView(this.head.buffer);
  private headUsed = 0;
  /** The request whose reply is being read. */
  private current: NbdRequest | null = null;
  /** Bytes of the current payload part still to come. */
  private remaining = 0;
  /** Where the next data byte goes in the current request's buffers. */
  private bufIndex = 0;
  private bufOffset = 0;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  /** A chunk's fixed payload (grown to at most MAX_ERROR_PAYLOAD for error chunks). */
  private small = new Uint8Array(64);
  private smallView = new DataView(this.small.buffer);
  private smallUsed = 0;
  private smallNeed = 0;
  private broken: NbdProtocolError | null = null;

  constructor(options: NbdTransmissionOptions) {
    const n = options.maxInFlight;
    if (!Number.isInteger(n) || n < 1 || n > 0xffff) throw new UsageError('BAD_OPTION', `maxInFlight ${n} is not an integer from 1 to 65535`);
    this.structured = options.structuredReplies;
    this.sink = options.sink;
    this.onComplete = options.onComplete;
    this.slots = new Array<NbdRequest | null>(n).fill(null);
    this.generations = new Uint32Array(n);
    this.free = new Int32Array(n);
    for (let i = 0; i < n; i++) this.free[i] = n - 1 - i;
    this.freeCount = n;
    const arena = new Uint8Array(n * REQ.size);
    this.heads = [];
    this.headViews = [];
    for (let i = 0; i < n; i++) {
      const h = arena.subarray(i * REQ.size, (i + 1) * REQ.size);
      this.heads.push(h);
      const v = new DataView(arena.buffer, h.byteOffset, REQ.size);
      v.setUint32(REQ.magic, NBD_REQUEST_MAGIC);
      // The cookie's low half is the slot, for ever; the high half a generation.
      v.setUint32(REQ.cookie + 4, i);
      this.headViews.push(v);
    }
  }

  /** Requests in flight. */
  get inFlight(): number {
    return this.inFlightCount;
  }

  /** Whether another request may be submitted now. */
  get hasRoom(): boolean {
    return this.freeCount > 0;
  }

  /**
   * Encodes `req` into the sink (head, then a write's data straight from its buffers)
   * and puts it in flight. Throws {@link UsageError} when no slot is free, the request
   * is already in flight, or its buffers do not hold `length` bytes.
   */
  submit(req: NbdRequest): void {
    if (this.freeCount === 0) throw new UsageError('BAD_STATE', 'no NBD cookie free: wait for hasRoom');
    if (req.slot !== -1) throw new UsageError('BAD_STATE', 'this NBD request is already in flight');
    const hasData = req.type === NBD_CMD.READ || req.type === NBD_CMD.WRITE;
    if (!Number.isSafeInteger(req.offset) || req.offset < 0 || !Number.isInteger(req.length) || req.length < 0 ||
        req.length > 0xffff_ffff || (hasData ? totalLength(req.buffers) !== req.length : req.buffers.length !== 0)) {
      throw new UsageError('BAD_ARGUMENT', `NBD request type ${req.type}: ${req.length} bytes at ${req.offset} with ${totalLength(req.buffers)} bytes of buffers`);
    }
    const slot = this.free[--this.freeCount];
    this.slots[slot] = req;
    const gen = (this.generations[slot] + 1) >>> 0;
    this.generations[slot] = gen;
    req.slot = slot;
    req.chunked = false;
    req.covered = 0;
    req.inOrderEnd = 0;
    req.outOfOrder = null;
    req.error = null;
    this.inFlightCount++;
    const v = this.headViews[slot];
    v.setUint16(REQ.flags, req.flags);
    v.setUint16(REQ.type, req.type);
    v.setUint32(REQ.cookie, gen);
    setU64BE(v, REQ.offset, req.offset);
    v.setUint32(REQ.length, req.length);
    this.sink(this.heads[slot]);
    if (req.type === NBD_CMD.WRITE) {
      const bufs = req.buffers;
      for (let i = 0; i < bufs.length; i++) if (bufs[i].length > 0) this.sink(bufs[i]);
    }
  }

  /** `NBD_CMD_DISC`'s bytes: after them the client sends nothing more. */
  static disconnectBytes(): Uint8Array {
    const out = new Uint8Array(REQ.size);
    const v = new DataView(out.buffer);
    v.setUint32(REQ.magic, NBD_REQUEST_MAGIC);
    v.setUint16(REQ.type, NBD_CMD.DISC);
    return out;
  }

  /**
   * Takes every request in flight out of it (the connection is gone; the caller may
   * resubmit them elsewhere), in slot order, and forgets any reply half read. Their
   * buffers are never touched again by this transmission.
   */
  takeAll(): NbdRequest[] {
    const out: NbdRequest[] = [];
    for (let i = 0; i < this.slots.length; i++) {
      const r = this.slots[i];
      if (r === null) continue;
      this.release(r);
      out.push(r);
    }
    this.current = null;
    this.rx = Rx.Head;
    this.headUsed = 0;
    return out;
  }

  /**
   * Takes reply bytes. Completes requests as their replies end. Returns null, or the
   * protocol error that makes the rest of the stream meaningless: then the connection
   * must be closed, and every later call returns the same error.
   */
  receive(bytes: Uint8Array): NbdProtocolError | null {
    if (this.broken !== null) return this.broken;
    let at = 0;
    const end = bytes.length;
    while (at < end) {
      switch (this.rx) {
        case Rx.Head: {
          const need = this.headUsed < 4 ? 4 : this.headSize();
          if (need < 0) return this.fail(this.badMagic());
          const n = Math.min(need - this.headUsed, end - at);
          this.head.set(bytes.subarray(at, at + n), this.headUsed);
          this.headUsed += n;
          at += n;
          if (this.headUsed === need && need > 4) {
            const e = this.onHead();
            if (e !== null) return this.fail(e);
          }
          break;
        }
        case Rx.SimpleData:
        case Rx.ChunkData: {
          const n = Math.min(this.remaining, end - at);
          this.copyIn(bytes, at, n);
          at += n;
          this.remaining -= n;
          if (this.remaining === 0) {
            const e = this.rx === Rx.SimpleData ? this.complete(this.current as NbdRequest) : this.chunkEnd();
            if (e !== null) return this.fail(e);
          }
          break;
        }
        case Rx.Small: {
          const n = Math.min(this.smallNeed - this.smallUsed, end - at);
          this.small.set(bytes.subarray(at, at + n), this.smallUsed);
          this.smallUsed += n;
          at += n;
          if (this.smallUsed === this.smallNeed) {
            const e = this.onSmall();
            if (e !== null) return this.fail(e);
          }
          break;
        }
      }
    }
    return null;
  }

  // ---- heads ---------------------------------------------------------------------------

  /** The head size its magic announces, or -1 for a magic that is not allowed here. */
  private headSize(): number {
    const magic = this.headView.getUint32(0);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) return SIMPLE.size;
    if (magic === NBD_STRUCTURED_REPLY_MAGIC && this.structured) return CHUNK.size;
    return -1;
  }

  private badMagic(): NbdProtocolError {
    const magic = this.headView.getUint32(0);
    if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      return new NbdProtocolError('BAD_MAGIC', 'a structured reply chunk, but structured replies were not negotiated');
    }
    return new NbdProtocolError('BAD_MAGIC', `a reply with magic 0x${magic.toString(16).padStart(8, '0')}`);
  }

  /** The request the head's cookie names, or null. */
  private lookup(): NbdRequest | null {
    const v = this.headView;
    const gen = v.getUint32(SIMPLE.cookie);
    const slot = v.getUint32(SIMPLE.cookie + 4);
    if (slot >= this.slots.length || this.generations[slot] !== gen) return null;
    return this.slots[slot];
  }

  private unknownCookie(): NbdProtocolError {
    const v = this.headView;
    const hex = v.getUint32(SIMPLE.cookie).toString(16) + v.getUint32(SIMPLE.cookie + 4).toString(16).padStart(8, '0');
    return new NbdProtocolError('UNKNOWN_COOKIE', `a reply for cookie 0x${hex}, which names no request in flight`);
  }

  private onHead(): NbdProtocolError | null {
    this.headUsed = 0;
    const req = this.lookup();
    if (req === null) return this.unknownCookie();
    this.current = req;
    const v = this.headView;
    if (v.getUint32(0) === NBD_SIMPLE_REPLY_MAGIC) {
      const errno = v.getUint32(SIMPLE.error);
      if (req.chunked) return new NbdProtocolError('UNEXPECTED_REPLY', `a simple reply to ${describe(req)} after structured chunks for it`);
      if (req.type === NBD_CMD.READ && this.structured) {
        return new NbdProtocolError('SIMPLE_REPLY_TO_READ', `a simple reply to ${describe(req)}: with structured replies negotiated a read "MUST NOT" get one`);
      }
      if (errno !== 0) req.error = new NbdRequestError(errno, `${describe(req)} failed on the server: ${errnoName(errno)}`);
      if (req.type === NBD_CMD.READ && errno === 0 && req.length > 0) {
        this.startData(req, 0, req.length, Rx.SimpleData);
        return null;
      }
      return this.complete(req);
    }
    req.chunked = true;
    this.chunkFlags = v.getUint16(CHUNK.flags);
    this.chunkType = v.getUint16(CHUNK.type);
    this.chunkLength = v.getUint32(CHUNK.length);
    const type = this.chunkType;
    const length = this.chunkLength;
    if (type === NBD_REPLY_TYPE.NONE) {
      if (length !== 0) return this.badChunk(req, `NBD_REPLY_TYPE_NONE with a ${length}-byte payload`);
      if ((this.chunkFlags & NBD_REPLY_FLAG_DONE) === 0) return this.badChunk(req, 'NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE');
      return this.finish(req);
    }
    if (type === NBD_REPLY_TYPE.OFFSET_DATA || type === NBD_REPLY_TYPE.OFFSET_HOLE) {
      if (req.type !== NBD_CMD.READ) return this.badChunk(req, `a content chunk (type ${type}) answers only a read`);
      if (type === NBD_REPLY_TYPE.OFFSET_DATA && length < NBD_WIRE.offsetData.size + 1) {
        return this.badChunk(req, `NBD_REPLY_TYPE_OFFSET_DATA of ${length} bytes (at least 9)`);
      }
      if (type === NBD_REPLY_TYPE.OFFSET_HOLE && length !== NBD_WIRE.offsetHole.size) {
        return this.badChunk(req, `NBD_REPLY_TYPE_OFFSET_HOLE of ${length} bytes (exactly 12)`);
      }
      // Data is bounded by the request: checked once the offset is known, before any copy.
      return this.startSmall(type === NBD_REPLY_TYPE.OFFSET_DATA ? NBD_WIRE.offsetData.size : NBD_WIRE.offsetHole.size);
    }
    if ((type & NBD_REPLY_TYPE_ERROR_BIT) !== 0) {
      if (length < NBD_WIRE.errorChunk.size) return this.badChunk(req, `error chunk of ${length} bytes (at least 6)`);
      if (length > MAX_ERROR_PAYLOAD) {
        return new NbdProtocolError('OVERSIZED', `a ${length}-byte error chunk for ${describe(req)}, above the ${MAX_ERROR_PAYLOAD} an error can take`);
      }
      return this.startSmall(length);
    }
    // BLOCK_STATUS and anything else: this client negotiates no metadata context, and
    // "If the client receives an unknown or unexpected type, other than an error chunk,
    // it MUST initiate a hard disconnect."
    return this.badChunk(req, `unexpected chunk type ${type}`);
  }

  private badChunk(req: NbdRequest, what: string): NbdProtocolError {
    return new NbdProtocolError('BAD_CHUNK', `${what}, in the reply to ${describe(req)}`);
  }

  // ---- chunk payloads ------------------------------------------------------------------

  private startSmall(need: number): null {
    if (this.small.length < need) {
      this.small = new Uint8Array(Math.max(need, this.small.length * 2));
      this.smallView = new DataView(this.small.buffer);
    }
    this.smallNeed = need;
    this.smallUsed = 0;
    if (need === 0) return null;
    this.rx = Rx.Small;
    return null;
  }

  private onSmall(): NbdProtocolError | null {
    const req = this.current as NbdRequest;
    const v = this.smallView;
    const type = this.chunkType;
    this.rx = Rx.Head;
    if (type === NBD_REPLY_TYPE.OFFSET_DATA) {
      const offset = getU64BE(v, 0);
      const length = this.chunkLength - NBD_WIRE.offsetData.size;
      const e = this.cover(req, offset, length, 'NBD_REPLY_TYPE_OFFSET_DATA');
      if (e !== null) return e;
      this.startData(req, offset - req.offset, length, Rx.ChunkData);
      return null;
    }
    if (type === NBD_REPLY_TYPE.OFFSET_HOLE) {
      const H = NBD_WIRE.offsetHole;
      const offset = getU64BE(v, H.offset);
      const size = v.getUint32(H.holeSize);
      if (size === 0) return this.badChunk(req, 'NBD_REPLY_TYPE_OFFSET_HOLE of hole size 0');
      const e = this.cover(req, offset, size, 'NBD_REPLY_TYPE_OFFSET_HOLE');
      if (e !== null) return e;
      this.seek(req, offset - req.offset);
      this.zeroIn(size);
      return this.chunkEnd();
    }
    return this.onError(req);
  }

  /** An error chunk, whole in `small`: record the first error of the request. */
  private onError(req: NbdRequest): NbdProtocolError | null {
    const E = NBD_WIRE.errorChunk;
    const v = this.smallView;
    const type = this.chunkType;
    const length = this.chunkLength;
    const errno = v.getUint32(E.error);
    const messageLength = v.getUint16(E.messageLength);
    if (errno === 0) return this.badChunk(req, `error chunk type ${type} with error 0`);
    if (messageLength > length - E.size) return this.badChunk(req, `error chunk message of ${messageLength} bytes in a ${length}-byte chunk`);
    let where = '';
    if (type === NBD_REPLY_TYPE.ERROR) {
      if (length !== E.size + messageLength) return this.badChunk(req, `NBD_REPLY_TYPE_ERROR of ${length} bytes with a ${messageLength}-byte message`);
    } else if (type === NBD_REPLY_TYPE.ERROR_OFFSET) {
      if (length !== E.size + messageLength + NBD_WIRE.errorOffset.size) {
        return this.badChunk(req, `NBD_REPLY_TYPE_ERROR_OFFSET of ${length} bytes with a ${messageLength}-byte message`);
      }
      const offset = getU64BE(v, E.size + messageLength);
      if (offset < 0 || offset < req.offset || offset - req.offset >= req.length) {
        return new NbdProtocolError('CHUNK_OUT_OF_RANGE', `NBD_REPLY_TYPE_ERROR_OFFSET at ${offset}, outside ${describe(req)}`);
      }
      where = ` at ${offset}`;
    }
    // Other error types: "it MUST consider the current reply as errored, but MAY continue".
    if (req.error === null) {
      const text = messageLength > 0 ? `: ${serverText(this.small.subarray(E.size, E.size + messageLength))}` : '';
      req.error = new NbdRequestError(errno, `${describe(req)} failed on the server${where}: ${errnoName(errno)}${text}`);
    }
    return this.chunkEnd();
  }

  /**
   * Checks that `[offset, offset + length)` lies inside the read and overlaps no earlier
   * content chunk, and records it as covered.
   */
  private cover(req: NbdRequest, offset: number, length: number, what: string): NbdProtocolError | null {
    // offset is -1 when above 2^53: outside any request. Compared by subtraction: no overflow.
    const start = offset - req.offset;
    if (offset < 0 || start < 0 || start > req.length || length > req.length - start) {
      return new NbdProtocolError('CHUNK_OUT_OF_RANGE', `${what} of ${length} bytes at ${offset}, outside ${describe(req)}`);
    }
    const end = start + length;
    if (start < req.inOrderEnd) return this.overlap(req, what, offset, length);
    const runs = req.outOfOrder;
    if (runs !== null) {
      for (let i = 0; i < runs.length; i += 2) if (start < runs[i + 1] && runs[i] < end) return this.overlap(req, what, offset, length);
    }
    req.covered += length;
    if (start === req.inOrderEnd) {
      req.inOrderEnd = end;
      if (runs !== null) this.absorb(req, runs);
      return null;
    }
    if (runs === null) req.outOfOrder = [start, end];
    else if (runs.length >= 2 * NBD_MAX_OUT_OF_ORDER_CHUNKS) {
      return new NbdProtocolError('BAD_CHUNK', `more than ${NBD_MAX_OUT_OF_ORDER_CHUNKS} chunks out of order in the reply to ${describe(req)}`);
    } else runs.push(start, end);
    return null;
  }

  /** Moves runs that now continue the in-order run into it. */
  private absorb(req: NbdRequest, runs: number[]): void {
    for (let i = 0; i < runs.length;) {
      if (runs[i] === req.inOrderEnd) {
        req.inOrderEnd = runs[i + 1];
        runs.splice(i, 2);
        i = 0;
      } else i += 2;
    }
  }

  private overlap(req: NbdRequest, what: string, offset: number, length: number): NbdProtocolError {
    return new NbdProtocolError('CHUNK_OVERLAP', `${what} of ${length} bytes at ${offset} overlaps an earlier chunk of the reply to ${describe(req)}`);
  }

  /** A chunk is over: the request's reply ends with it when DONE is set. */
  private chunkEnd(): NbdProtocolError | null {
    this.rx = Rx.Head;
    const req = this.current as NbdRequest;
    if ((this.chunkFlags & NBD_REPLY_FLAG_DONE) === 0) return null;
    return this.finish(req);
  }

  /** The last chunk of a structured reply arrived. */
  private finish(req: NbdRequest): NbdProtocolError | null {
    if (req.error === null && req.type === NBD_CMD.READ && req.covered !== req.length) {
      return new NbdProtocolError('INCOMPLETE_READ', `the reply to ${describe(req)} ended after ${req.covered} bytes of data and holes`);
    }
    return this.complete(req);
  }

  private complete(req: NbdRequest): null {
    this.rx = Rx.Head;
    this.current = null;
    this.release(req);
    this.onComplete(req, req.error);
    return null;
  }

  private release(req: NbdRequest): void {
    const slot = req.slot;
    this.slots[slot] = null;
    this.free[this.freeCount++] = slot;
    req.slot = -1;
    this.inFlightCount--;
  }

  private fail(e: NbdProtocolError): NbdProtocolError {
    this.broken = e;
    this.current = null;
    return e;
  }

  // ---- copying into the request's buffers ----------------------------------------------

  private startData(req: NbdRequest, at: number, length: number, rx: Rx): void {
    this.seek(req, at);
    this.remaining = length;
    this.rx = rx;
  }

  /** Points the cursor at byte `at` of the current request's buffers. */
  private seek(req: NbdRequest, at: number): void {
    const bufs = req.buffers;
    let i = 0;
    let skip = at;
    while (i < bufs.length && skip >= bufs[i].length) {
      skip -= bufs[i].length;
      i++;
    }
    this.bufIndex = i;
    this.bufOffset = skip;
  }

  /** Copies `n` bytes of `src` from `at` to the cursor (n never exceeds what the buffers hold: cover() checked). */
  private copyIn(src: Uint8Array, at: number, n: number): void {
    const bufs = (this.current as NbdRequest).buffers;
    let from = at;
    let left = n;
    while (left > 0) {
      const b = bufs[this.bufIndex];
      const k = Math.min(left, b.length - this.bufOffset);
      b.set(k === src.length && from === 0 ? src : src.subarray(from, from + k), this.bufOffset);
      from += k;
      left -= k;
      this.bufOffset += k;
      if (this.bufOffset === b.length) {
        this.bufIndex++;
        this.bufOffset = 0;
      }
    }
  }

  private zeroIn(n: number): void {
    const bufs = (this.current as NbdRequest).buffers;
    let left = n;
    while (left > 0) {
      const b = bufs[this.bufIndex];
      const k = Math.min(left, b.length - this.bufOffset);
      b.fill(0, this.bufOffset, this.bufOffset + k);
      left -= k;
      this.bufOffset += k;
      if (this.bufOffset === b.length) {
        this.bufIndex++;
        this.bufOffset = 0;
      }
    }
  }
}

const COMMAND_NAMES: ReadonlyMap<number, string> = new Map(Object.entries(NBD_CMD).map(([k, v]) => [v, `NBD_CMD_${k}`]));

/** "NBD_CMD_READ of 4096 bytes at 8192", for messages. */
function describe(req: NbdRequest): string {
  const name = COMMAND_NAMES.get(req.type) ?? `command ${req.type}`;
  return req.type === NBD_CMD.FLUSH ? name : `${name} of ${req.length} bytes at ${req.offset}`;
}
