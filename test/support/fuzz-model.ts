/**
 * The device fuzzer's reference model: a plain, independent re-statement of what a
 * virtio-blk device must do with one available chain (VIRTIO 1.2, 2.7.5 and 5.2.6),
 * working on raw host bytes through its own address translation. It shares no code with
 * the device: not the chain walker, not GuestMemory, not the request parser.
 *
 * Where the spec leaves a choice, the model states vblk's documented policy and says so:
 * an empty buffer is never dereferenced, so its address is not checked (GuestMemory);
 * "readable after writable" counts bytes, so an empty writable descriptor does not make
 * the readable one after it an error; FLUSH is served whenever the device offers it;
 * UNSUPP wins over IOERR in a range request; a chain without a writable byte completes
 * with used length 0.
 */
import type { ChainErrorCode } from '../../src/virtqueue/chain.js';
import { VIRTQ_DESC_F, VIRTQ_DESC_SIZE } from '../../src/spec/split-ring.js';
import {
  VIRTIO_BLK_DWZ_SEGMENT as SEG, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_REQ_HEADER as HDR, VIRTIO_BLK_S, VIRTIO_BLK_SECTOR_SIZE,
  VIRTIO_BLK_T, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from '../../src/spec/virtio-blk.js';
import type { FuzzMemory, HostRange } from './fuzz-memory.js';

/** Largest total a chain may describe (the used ring's u32 length). */
const MAX_CHAIN_BYTES = 0xffff_ffff;
/** A le64 whose high half reaches this does not fit a safe integer: past any disk. */
const U64_SAFE_HI = 0x20_0000;

/** Where one queue's rings are, as host offsets, and what was negotiated for it. */
export interface QueueModel {
  readonly size: number;
  readonly descAt: number;
  readonly availAt: number;
  readonly usedAt: number;
  readonly indirect: boolean;
}

/** A chain the device must accept: its buffers, and every byte it had to read to find them. */
export interface WalkedChain {
  readonly ok: true;
  readonly head: number;
  readonly readable: HostRange[];
  readonly writable: HostRange[];
  readonly readableBytes: number;
  readonly writableBytes: number;
  /** Descriptor and indirect-table bytes the walk read. */
  readonly metadata: HostRange[];
}

/** A chain that breaks the queue, why, and what the walk read up to the fault. */
export interface BrokenChain {
  readonly ok: false;
  readonly code: ChainErrorCode;
  readonly metadata: HostRange[];
  readonly readable: HostRange[];
}

/** Walks the chain at `head` as 2.7.5.3 says a device must, or says why the ring is broken. */
export function walkChain(mem: FuzzMemory, q: QueueModel, head: number): WalkedChain | BrokenChain {
  const host = mem.host;
  const readable: HostRange[] = [];
  const writable: HostRange[] = [];
  const metadata: HostRange[] = [];
  let rBytes = 0;
  let wBytes = 0;
  const broken = (code: ChainErrorCode): BrokenChain => ({ ok: false, code, metadata, readable });
  let i = head;
  for (let steps = 0; ; steps++) {
    // 2.7.5.3.1: a chain is at most the queue size long; a longer walk is a loop.
    if (steps >= q.size) return broken('CHAIN_LOOP');
    const at = q.descAt + i * VIRTQ_DESC_SIZE;
    metadata.push({ at, len: VIRTQ_DESC_SIZE });
    const d = readDesc(host, at);
    if (d.flags & VIRTQ_DESC_F.INDIRECT) {
      if (!q.indirect) return broken('INDIRECT_NOT_NEGOTIATED');
      if (d.flags & VIRTQ_DESC_F.NEXT) return broken('INDIRECT_WITH_NEXT');
      if (d.len === 0 || d.len % VIRTQ_DESC_SIZE !== 0) return broken('INDIRECT_BAD_LENGTH');
      // The device ignores WRITE on the descriptor that points to a table (2.7.5.3.2).
      const ranges = mem.translate(d.lo, d.hi, d.len);
      if (ranges === null) return broken('OUT_OF_BOUNDS');
      metadata.push(...ranges);
      const table = gather(host, ranges);
      const entries = d.len / VIRTQ_DESC_SIZE;
      let j = 0;
      for (let tsteps = 0; ; tsteps++) {
        if (tsteps >= entries) return broken('CHAIN_LOOP');
        const e = readDesc(table, j * VIRTQ_DESC_SIZE);
        // 2.7.5.3.1: no table inside a table.
        if (e.flags & VIRTQ_DESC_F.INDIRECT) return broken('INDIRECT_NESTED');
        const r = take(mem, e, readable, writable, wBytes);
        if (typeof r === 'string') return broken(r);
        if (e.flags & VIRTQ_DESC_F.WRITE) wBytes += e.len;
        else rBytes += e.len;
        if (rBytes + wBytes > MAX_CHAIN_BYTES) return broken('CHAIN_TOO_LARGE');
        if (!(e.flags & VIRTQ_DESC_F.NEXT)) break;
        if (e.next >= entries) return broken('NEXT_OUT_OF_RANGE');
        j = e.next;
      }
      break;
    }
    const r = take(mem, d, readable, writable, wBytes);
    if (typeof r === 'string') return broken(r);
    if (d.flags & VIRTQ_DESC_F.WRITE) wBytes += d.len;
    else rBytes += d.len;
    if (rBytes + wBytes > MAX_CHAIN_BYTES) return broken('CHAIN_TOO_LARGE');
    if (!(d.flags & VIRTQ_DESC_F.NEXT)) break;
    if (d.next >= q.size) return broken('NEXT_OUT_OF_RANGE');
    i = d.next;
  }
  return { ok: true, head, readable, writable, readableBytes: rBytes, writableBytes: wBytes, metadata };
}

interface Desc {
  lo: number;
  hi: number;
  len: number;
  flags: number;
  next: number;
}

function readDesc(b: Uint8Array, at: number): Desc {
  return { lo: u32(b, at), hi: u32(b, at + 4), len: u32(b, at + 8), flags: u16(b, at + 12), next: u16(b, at + 14) };
}

/** Adds one data descriptor's buffer to the chain, or names the fault. */
function take(mem: FuzzMemory, d: Desc, readable: HostRange[], writable: HostRange[], wBytes: number): HostRange[] | ChainErrorCode {
  const isWrite = (d.flags & VIRTQ_DESC_F.WRITE) !== 0;
  // 2.7.4.2: device-readable descriptors come first; vblk counts bytes (see module comment).
  if (!isWrite && wBytes > 0) return 'READABLE_AFTER_WRITABLE';
  const ranges = mem.translate(d.lo, d.hi, d.len);
  if (ranges === null) return 'OUT_OF_BOUNDS';
  (isWrite ? writable : readable).push(...ranges);
  return ranges;
}

/** The disk as the device must present it, and the negotiated state the model needs. */
export interface DiskModel {
  readonly bytes: Uint8Array;
  readonly capacitySectors: number;
  readonly sectorsPerBlock: number;
  readonly readOnly: boolean;
  readonly flushOffered: boolean;
  /** 20 bytes: the serial, NUL-padded. */
  readonly id: Uint8Array;
  readonly discard: RangeModel;
  readonly writeZeroes: RangeModel;
  readonly secureErase: RangeModel;
}

export interface RangeModel {
  readonly negotiated: boolean;
  readonly maxSectors: number;
  readonly maxSegments: number;
}

export type Outcome = 'ok' | 'ioerr' | 'unsupp' | 'no-status';

/** One thing a request does to the disk or to its writable buffers, in order. */
export type Effect =
  | { readonly kind: 'read'; readonly offset: number; readonly length: number }
  | { readonly kind: 'write'; readonly offset: number; readonly bytes: Uint8Array }
  | { readonly kind: 'zero'; readonly offset: number; readonly length: number }
  | { readonly kind: 'id'; readonly bytes: Uint8Array };

/** What the device must do with one accepted chain. */
export interface Served {
  readonly type: number;
  readonly outcome: Outcome;
  /** The used length the device must report. */
  readonly usedLen: number;
  readonly effects: Effect[];
}

/**
 * Serves one accepted chain (5.2.6): the header is the first 16 readable bytes, the
 * status the last writable byte, the data what lies between in the request's direction.
 * Effects carry copies of the bytes read from the chain, taken now.
 */
export function serveChain(mem: FuzzMemory, chain: WalkedChain, disk: DiskModel): Served {
  const W = chain.writableBytes;
  const R = chain.readableBytes;
  if (W === 0) return { type: -1, outcome: 'no-status', usedLen: 0, effects: [] };
  if (R < HDR.size) return done(-1, 'ioerr');
  const readable = gather(mem.host, chain.readable);
  const type = u32(readable, HDR.type);
  const sectorHi = u32(readable, HDR.sector + 4);
  const sector = sectorHi >= U64_SAFE_HI ? Infinity : sectorHi * 0x1_0000_0000 + u32(readable, HDR.sector);
  const spb = disk.sectorsPerBlock;
  const ioFits = (bytes: number): boolean => bytes % (spb * VIRTIO_BLK_SECTOR_SIZE) === 0 && sector % spb === 0 &&
    sector <= disk.capacitySectors && bytes / VIRTIO_BLK_SECTOR_SIZE <= disk.capacitySectors - sector;

  switch (type) {
    case VIRTIO_BLK_T.IN:
    case VIRTIO_BLK_T.GET_ID: {
      // Data flows to the driver: nothing readable may follow the header.
      if (R > HDR.size) return done(type, 'ioerr');
      const dataBytes = W - 1;
      if (type === VIRTIO_BLK_T.GET_ID) {
        const n = Math.min(VIRTIO_BLK_ID_BYTES, dataBytes);
        return { type, outcome: 'ok', usedLen: n + 1, effects: [{ kind: 'id', bytes: disk.id.subarray(0, n) }] };
      }
      if (!ioFits(dataBytes)) return done(type, 'ioerr');
      return { type, outcome: 'ok', usedLen: W, effects: [{ kind: 'read', offset: sector * VIRTIO_BLK_SECTOR_SIZE, length: dataBytes }] };
    }
    case VIRTIO_BLK_T.OUT:
    case VIRTIO_BLK_T.DISCARD:
    case VIRTIO_BLK_T.WRITE_ZEROES:
    case VIRTIO_BLK_T.SECURE_ERASE: {
      // Data flows to the device: the status is the only writable byte.
      if (W > 1) return done(type, 'ioerr');
      const data = readable.subarray(HDR.size);
      if (type === VIRTIO_BLK_T.OUT) {
        // 5.2.6.2: a write to a read-only disk fails with IOERR and writes nothing.
        if (disk.readOnly || !ioFits(data.length)) return done(type, 'ioerr');
        return { type, outcome: 'ok', usedLen: 1, effects: [{ kind: 'write', offset: sector * VIRTIO_BLK_SECTOR_SIZE, bytes: data }] };
      }
      return serveRange(type, data, disk);
    }
    case VIRTIO_BLK_T.FLUSH:
      return done(type, disk.flushOffered ? 'ok' : 'unsupp');
    default:
      return done(type, 'unsupp');
  }
}

/** DISCARD, WRITE_ZEROES, SECURE_ERASE: all segments checked before any runs. */
function serveRange(type: number, data: Uint8Array, disk: DiskModel): Served {
  const limits = type === VIRTIO_BLK_T.DISCARD ? disk.discard : type === VIRTIO_BLK_T.WRITE_ZEROES ? disk.writeZeroes : disk.secureErase;
  if (!limits.negotiated) return done(type, 'unsupp');
  const count = data.length / SEG.size;
  if (data.length === 0 || !Number.isInteger(count) || count > limits.maxSegments) return done(type, 'ioerr');
  let unsupported = false;
  let invalid = false;
  const effects: Effect[] = [];
  const spb = disk.sectorsPerBlock;
  for (let k = 0; k < count; k++) {
    const at = k * SEG.size;
    const hi = u32(data, at + SEG.sector + 4);
    const sector = hi >= U64_SAFE_HI ? Infinity : hi * 0x1_0000_0000 + u32(data, at + SEG.sector);
    const n = u32(data, at + SEG.numSectors);
    const flags = u32(data, at + SEG.flags);
    // 5.2.6.2: unknown flags, and unmap outside write-zeroes, are UNSUPP.
    if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) unsupported = true;
    if (type !== VIRTIO_BLK_T.WRITE_ZEROES && (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) unsupported = true;
    if (sector % spb !== 0 || n % spb !== 0 || n > limits.maxSectors || sector > disk.capacitySectors ||
        n > disk.capacitySectors - sector) {
      invalid = true;
    }
    if (!invalid) effects.push({ kind: 'zero', offset: sector * VIRTIO_BLK_SECTOR_SIZE, length: n * VIRTIO_BLK_SECTOR_SIZE });
  }
  if (unsupported) return done(type, 'unsupp');
  if (invalid) return done(type, 'ioerr');
  return { type, outcome: 'ok', usedLen: 1, effects };
}

function done(type: number, outcome: Outcome): Served {
  return { type, outcome, usedLen: 1, effects: [] };
}

/** Status byte value for an outcome that has one. */
export function statusOf(outcome: Outcome): number {
  return outcome === 'ok' ? VIRTIO_BLK_S.OK : outcome === 'ioerr' ? VIRTIO_BLK_S.IOERR : VIRTIO_BLK_S.UNSUPP;
}

/** The bytes of `ranges` of `b`, concatenated. */
export function gather(b: Uint8Array, ranges: readonly HostRange[]): Uint8Array {
  if (ranges.length === 1) return b.slice(ranges[0].at, ranges[0].at + ranges[0].len);
  let n = 0;
  for (const r of ranges) n += r.len;
  const out = new Uint8Array(n);
  let at = 0;
  for (const r of ranges) {
    out.set(b.subarray(r.at, r.at + r.len), at);
    at += r.len;
  }
  return out;
}

/** Writes `src` into the byte stream that `ranges` form, from stream offset `offset`. */
export function scatter(b: Uint8Array, ranges: readonly HostRange[], offset: number, src: Uint8Array): void {
  let skip = offset;
  let from = 0;
  for (const r of ranges) {
    if (from >= src.length) return;
    if (skip >= r.len) {
      skip -= r.len;
      continue;
    }
    const n = Math.min(r.len - skip, src.length - from);
    b.set(src.subarray(from, from + n), r.at + skip);
    from += n;
    skip = 0;
  }
}

export function u32(b: Uint8Array, at: number): number {
  return (b[at] | (b[at + 1] << 8) | (b[at + 2] << 16) | (b[at + 3] << 24)) >>> 0;
}

export function u16(b: Uint8Array, at: number): number {
  return b[at] | (b[at + 1] << 8);
}
