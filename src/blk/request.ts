/**
 * virtio-blk request parsing (VIRTIO 1.2, 5.2.6), crosvm style: the framing is whatever
 * the driver chose. The header is the first 16 device-readable bytes, however they are
 * split across descriptors; the status is the last device-writable byte; the data is
 * what lies between, in the direction the request type implies.
 *
 * Requests are guest input: nothing here throws. Parsing fills a reusable
 * {@link BlkRequest} in place (no allocation on the common layouts) and says what it
 * found; the device turns a malformed request into VIRTIO_BLK_S_IOERR.
 */
import {
  VIRTIO_BLK_DWZ_SEGMENT as SEG, VIRTIO_BLK_REQ_HEADER as HDR, VIRTIO_BLK_T,
} from '../spec/virtio-blk.js';
import { copyFromBuffers, sliceBuffers, type DescriptorChain } from '../virtqueue/chain.js';

/** What {@link parseRequest} found. */
export const REQUEST_PARSE = {
  /** Header, data and status located. */
  OK: 0,
  /** No device-writable byte: there is nowhere to put a status. Complete with used length 0. */
  NO_STATUS: 1,
  /** Fewer than 16 device-readable bytes. */
  SHORT_HEADER: 2,
  /** A request whose data flows to the driver (IN, GET_ID) carries device-readable data past the header. */
  READABLE_DATA_ON_IN: 3,
  /** A request whose data flows to the device (OUT, DISCARD, ...) carries device-writable bytes besides the status. */
  WRITABLE_DATA_ON_OUT: 4,
} as const;
/** One of the {@link REQUEST_PARSE} outcomes. */
export type RequestParse = (typeof REQUEST_PARSE)[keyof typeof REQUEST_PARSE];

/** `sector` of a header whose le64 does not fit a safe integer: past any capacity. */
export const SECTOR_UNREPRESENTABLE = -1;

/** Above this, the high half of a le64 makes the value exceed Number.MAX_SAFE_INTEGER. */
const U64_SAFE_HI = 0x20_0000;
const TWO_POW_32 = 0x1_0000_0000;

const NO_DATA: Uint8Array[] = [];
/** Header bytes gathered when the driver split them across descriptors (parsing is synchronous). */
const scratch = new Uint8Array(HDR.size);

/** One request, filled in place by {@link parseRequest}; reused from request to request. */
export class BlkRequest {
  /** Head of the chain: the id the used ring reports back. */
  head = 0;
  /** Request type (VIRTIO_BLK_T_*), as the driver wrote it. */
  type = 0;
  /** First sector (512-byte units), or {@link SECTOR_UNREPRESENTABLE}. */
  sector = 0;
  /**
   * Data buffers: for IN and GET_ID the device-writable bytes before the status, for
   * OUT, DISCARD, WRITE_ZEROES and SECURE_ERASE the device-readable bytes after the
   * header, empty for other types. Views into guest memory (they may be the chain's
   * own arrays, trimmed in place).
   */
  data: Uint8Array[] = NO_DATA;
  dataBytes = 0;
  /** The buffer holding the status byte, and the byte's index in it. */
  statusBuffer: Uint8Array | null = null;
  statusAt = 0;

  /** Drops references to guest memory once the request is done. */
  clear(): void {
    this.data = NO_DATA;
    this.statusBuffer = null;
  }
}

/** Which way a request type's data flows; unknown types and FLUSH carry none. */
const IN = 1;
const OUT = 2;
function direction(type: number): number {
  switch (type) {
    case VIRTIO_BLK_T.IN:
    case VIRTIO_BLK_T.GET_ID:
      return IN;
    case VIRTIO_BLK_T.OUT:
    case VIRTIO_BLK_T.DISCARD:
    case VIRTIO_BLK_T.WRITE_ZEROES:
    case VIRTIO_BLK_T.SECURE_ERASE:
      return OUT;
    default:
      return 0;
  }
}

/** Little-endian u32 at `at`, unsigned. */
function u32(b: Uint8Array, at: number): number {
  return (b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | (b[at + 3] << 24)) >>> 0;
}

/** Little-endian u64 at `at`, or {@link SECTOR_UNREPRESENTABLE} above 2^53 - 1. */
function u64(b: Uint8Array, at: number): number {
  const hi = u32(b, at + 4);
  // Below 2^32 as read: the sum would be a heap number even for 0 + lo (see getU64).
  if (hi === 0) return u32(b, at);
  return hi >= U64_SAFE_HI ? SECTOR_UNREPRESENTABLE : hi * TWO_POW_32 + u32(b, at);
}

/**
 * Parses `chain` into `req`. May trim `chain.readable` / `chain.writable` in place (the
 * header and status are cut off so the data lists can go to the backend as they are):
 * the chain belongs to the device once popped.
 */
export function parseRequest(chain: DescriptorChain, req: BlkRequest): RequestParse {
  req.head = chain.head;
  req.data = NO_DATA;
  req.dataBytes = 0;
  req.statusBuffer = null;
  const writable = chain.writable;
  // Zero-length descriptors add no views, so the last view holds the last writable byte.
  if (chain.writableBytes === 0 || writable.length === 0) return REQUEST_PARSE.NO_STATUS;
  const last = writable[writable.length - 1];
  req.statusBuffer = last;
  req.statusAt = last.length - 1;
  const readable = chain.readable;
  if (chain.readableBytes < HDR.size) return REQUEST_PARSE.SHORT_HEADER;
  let h = readable[0];
  if (h.length < HDR.size) {
    copyFromBuffers(readable, 0, scratch);
    h = scratch;
  }
  req.type = u32(h, HDR.type);
  req.sector = u64(h, HDR.sector);

  const dir = direction(req.type);
  if (dir === IN) {
    if (chain.readableBytes > HDR.size) return REQUEST_PARSE.READABLE_DATA_ON_IN;
    // Cut the status byte off the end of the writable list.
    if (last.length === 1) writable.pop();
    else writable[writable.length - 1] = last.subarray(0, last.length - 1);
    req.data = writable;
    req.dataBytes = chain.writableBytes - 1;
  } else if (dir === OUT) {
    if (chain.writableBytes > 1) return REQUEST_PARSE.WRITABLE_DATA_ON_OUT;
    // Cut the header off the front of the readable list.
    const first = readable[0];
    if (first.length === HDR.size) readable.shift();
    else if (first.length > HDR.size) readable[0] = first.subarray(HDR.size);
    else return outData(chain, req);
    req.data = readable;
    req.dataBytes = chain.readableBytes - HDR.size;
  }
  return REQUEST_PARSE.OK;
}

/** The slow path of a header split across descriptors: data from byte 16 of the readable part. */
function outData(chain: DescriptorChain, req: BlkRequest): RequestParse {
  const n = chain.readableBytes - HDR.size;
  // Cannot be null: the readable views add up to readableBytes.
  req.data = sliceBuffers(chain.readable, HDR.size, n) ?? NO_DATA;
  req.dataBytes = n;
  return REQUEST_PARSE.OK;
}

/** One `struct virtio_blk_discard_write_zeroes` (5.2.6). */
export interface DwzSegment {
  /** First sector, or {@link SECTOR_UNREPRESENTABLE}. */
  readonly sector: number;
  readonly numSectors: number;
  readonly flags: number;
}

/**
 * The `count` segments at the start of `data` (which holds at least `count × 16`
 * bytes, however split). Not a hot path: one object per segment.
 */
export function parseSegments(data: readonly Uint8Array[], count: number): DwzSegment[] {
  const out: DwzSegment[] = [];
  const whole = data.length === 1 ? data[0] : null;
  const one = new Uint8Array(SEG.size);
  for (let i = 0; i < count; i++) {
    let b: Uint8Array;
    let at: number;
    if (whole) {
      b = whole;
      at = i * SEG.size;
    } else {
      copyFromBuffers(data, i * SEG.size, one);
      b = one;
      at = 0;
    }
    out.push({ sector: u64(b, at + SEG.sector), numSectors: u32(b, at + SEG.numSectors), flags: u32(b, at + SEG.flags) });
  }
  return out;
}
