/**
 * Request content for the device fuzzer: what a request says (type, sector, data,
 * segments) and how many bytes each direction has. Mostly what a driver sends, with a
 * steady trickle of what a careless or hostile one sends: sectors past the end or not on
 * a block, data that is not whole blocks, unknown types and flags, requests framed the
 * wrong way round. How the bytes are cut into descriptors is the caller's business.
 */
import {
  VIRTIO_BLK_DWZ_SEGMENT as SEG, VIRTIO_BLK_REQ_HEADER as HDR, VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from '../../src/spec/virtio-blk.js';
import type { Rng } from './fuzz-prng.js';

/** What the generator needs to know about the disk. */
export interface DiskShape {
  readonly capacitySectors: number;
  readonly sectorsPerBlock: number;
  /** Per range type: the limits the config space advertises (0 when not offered). */
  readonly discard: RangeShape;
  readonly writeZeroes: RangeShape;
  readonly secureErase: RangeShape;
}

export interface RangeShape {
  readonly maxSectors: number;
  readonly maxSegments: number;
}

/** One request's bytes, before framing. */
export interface RequestShape {
  /** Header (possibly cut short) followed by the device-readable data. */
  readonly readable: Uint8Array;
  /** Device-writable bytes, the status byte included; 0 leaves nowhere for a status. */
  readonly writableLen: number;
}

/** Largest data part of one generated IN or OUT, so a batch fits the fuzzer's memory. */
const MAX_IO_BYTES = 16 * 1024;
const UNKNOWN_TYPES = [
  VIRTIO_BLK_T.SCSI_CMD, VIRTIO_BLK_T.GET_LIFETIME, VIRTIO_BLK_T.ZONE_APPEND, VIRTIO_BLK_T.ZONE_REPORT,
  VIRTIO_BLK_T.ZONE_OPEN, VIRTIO_BLK_T.ZONE_CLOSE, VIRTIO_BLK_T.ZONE_FINISH, VIRTIO_BLK_T.ZONE_RESET,
  VIRTIO_BLK_T.ZONE_RESET_ALL, 3, 5, 7, 9, 12,
];
const KINDS = [
  VIRTIO_BLK_T.IN, VIRTIO_BLK_T.OUT, VIRTIO_BLK_T.FLUSH, VIRTIO_BLK_T.GET_ID, VIRTIO_BLK_T.DISCARD,
  VIRTIO_BLK_T.WRITE_ZEROES, VIRTIO_BLK_T.SECURE_ERASE, -1,
];
const KIND_WEIGHTS = [30, 30, 6, 4, 6, 6, 4, 6];

/** A random request: mostly well formed, sometimes not (see module comment). */
export function genRequest(rng: Rng, disk: DiskShape): RequestShape {
  const kind = KINDS[rng.weighted(KIND_WEIGHTS)];
  const blockBytes = disk.sectorsPerBlock * VIRTIO_BLK_SECTOR_SIZE;
  let readable: Uint8Array;
  let writableLen = 1;
  switch (kind) {
    case VIRTIO_BLK_T.IN: {
      const n = ioLength(rng, blockBytes);
      readable = header(rng, kind, sectorFor(rng, disk, n / VIRTIO_BLK_SECTOR_SIZE));
      writableLen = n + 1;
      break;
    }
    case VIRTIO_BLK_T.OUT: {
      const data = new Uint8Array(ioLength(rng, blockBytes));
      rng.fill(data);
      readable = concat(header(rng, kind, sectorFor(rng, disk, data.length / VIRTIO_BLK_SECTOR_SIZE)), data);
      break;
    }
    case VIRTIO_BLK_T.FLUSH:
      // The sector is unused: sometimes it holds junk, as a sloppy driver leaves it.
      readable = header(rng, kind, rng.chance(0.9) ? [0, 0] : [rng.u32(), rng.u32()]);
      if (rng.chance(0.05)) readable = concat(readable, random(rng, rng.range(1, 64)));
      if (rng.chance(0.05)) writableLen += rng.range(1, 64);
      break;
    case VIRTIO_BLK_T.GET_ID:
      readable = header(rng, kind, [0, 0]);
      writableLen = rng.pick([21, 21, 21, 1, 2, 5, 20, 22, 64]);
      break;
    case VIRTIO_BLK_T.DISCARD:
    case VIRTIO_BLK_T.WRITE_ZEROES:
    case VIRTIO_BLK_T.SECURE_ERASE:
      readable = concat(header(rng, kind, [0, 0]), segments(rng, disk, kind));
      break;
    default: {
      const type = rng.chance(0.8) ? rng.pick(UNKNOWN_TYPES) : rng.u32();
      readable = header(rng, type, [rng.u32(), rng.below(4)]);
      if (rng.chance(0.3)) readable = concat(readable, random(rng, rng.range(1, 600)));
      writableLen = rng.range(1, 64);
    }
  }
  // Framing a driver must not use: each is a request-level error (IOERR), never a ring fault.
  if (rng.chance(0.08)) {
    switch (rng.below(4)) {
      case 0: readable = readable.subarray(0, rng.below(HDR.size)); break;
      case 1: writableLen = 0; break;
      case 2: readable = concat(readable, random(rng, rng.range(1, 600))); break;
      default: writableLen += rng.range(1, 600);
    }
  }
  return { readable, writableLen };
}

/** Data bytes of an IN or OUT: whole blocks, rarely not. */
function ioLength(rng: Rng, blockBytes: number): number {
  const maxBlocks = MAX_IO_BYTES / blockBytes;
  const blocks = Math.min(maxBlocks, [0, 1, 2, rng.range(3, 4), rng.range(5, maxBlocks)][rng.weighted([2, 40, 25, 18, 10])]);
  if (rng.chance(0.05)) return rng.chance(0.5) ? rng.range(1, 700) : blocks * blockBytes + rng.range(1, blockBytes - 1);
  return blocks * blockBytes;
}

/**
 * A sector (as le64 halves) for `n` sectors of data: mostly a valid block-aligned one
 * inside the disk, otherwise one of the ways a sector goes wrong.
 */
function sectorFor(rng: Rng, disk: DiskShape, n: number, pValid = 0.85): [number, number] {
  const cap = disk.capacitySectors;
  const spb = disk.sectorsPerBlock;
  const blocksFree = Math.floor((cap - Math.ceil(n)) / spb);
  if (blocksFree >= 0 && rng.chance(pValid)) return [rng.range(0, blocksFree) * spb, 0];
  switch (rng.below(7)) {
    case 0: return [Math.max(0, cap - Math.ceil(n) + spb), 0];
    case 1: return [cap, 0];
    case 2: return [cap + rng.range(1, 1000), 0];
    case 3: return [rng.below(cap) + (spb > 1 ? rng.range(1, spb - 1) : 0), 0];
    // 2^53 - 1: the largest sector a JS number holds exactly.
    case 4: return [0xffff_ffff, 0x1f_ffff];
    case 5: return [rng.u32(), rng.range(0x20_0000, 0xffff_ffff)];
    default: return [rng.u32(), rng.below(0x20_0000)];
  }
}

/** Discard / write-zeroes / secure-erase segments; sometimes too many, or bad ones. */
function segments(rng: Rng, disk: DiskShape, type: number): Uint8Array {
  const limits = type === VIRTIO_BLK_T.DISCARD ? disk.discard : type === VIRTIO_BLK_T.WRITE_ZEROES ? disk.writeZeroes : disk.secureErase;
  const maxSegs = Math.max(1, limits.maxSegments);
  let count = rng.range(1, Math.min(maxSegs, 4));
  if (rng.chance(0.03)) count = maxSegs + 1;
  const out = new Uint8Array(count * SEG.size);
  const v = new DataView(out.buffer);
  const spb = disk.sectorsPerBlock;
  for (let k = 0; k < count; k++) {
    const at = k * SEG.size;
    const maxBlocks = Math.max(1, Math.floor(Math.min(limits.maxSectors || spb, disk.capacitySectors) / spb));
    const n = rng.chance(0.03) ? 0 : rng.range(1, Math.min(maxBlocks, 8)) * spb;
    let [lo, hi] = rng.chance(0.97) ? sectorFor(rng, disk, n, 0.95) : [rng.u32(), rng.below(3)];
    let numSectors = n;
    if (rng.chance(0.05)) numSectors = rng.chance(0.5) ? rng.u32() : n + rng.range(1, spb);
    let flags = type === VIRTIO_BLK_T.WRITE_ZEROES && rng.chance(0.5) ? VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP : 0;
    if (rng.chance(0.04)) flags |= VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    if (rng.chance(0.03)) flags |= rng.u32() & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    if (rng.chance(0.02)) [lo, hi] = [rng.u32(), rng.u32()];
    v.setUint32(at + SEG.sector, lo, true);
    v.setUint32(at + SEG.sector + 4, hi, true);
    v.setUint32(at + SEG.numSectors, numSectors >>> 0, true);
    v.setUint32(at + SEG.flags, flags >>> 0, true);
  }
  // A payload that is not whole segments.
  if (rng.chance(0.03)) return out.subarray(0, rng.below(out.length));
  return out;
}

function header(rng: Rng, type: number, sector: [number, number]): Uint8Array {
  const h = new Uint8Array(HDR.size);
  const v = new DataView(h.buffer);
  v.setUint32(HDR.type, type >>> 0, true);
  // The reserved word (formerly ioprio) means nothing to a virtio 1.x device.
  v.setUint32(HDR.reserved, rng.chance(0.1) ? rng.u32() : 0, true);
  v.setUint32(HDR.sector, sector[0] >>> 0, true);
  v.setUint32(HDR.sector + 4, sector[1] >>> 0, true);
  return h;
}

function random(rng: Rng, n: number): Uint8Array {
  const b = new Uint8Array(n);
  rng.fill(b);
  return b;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}
