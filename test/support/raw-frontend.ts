/**
 * A vhost-user frontend that says exactly what it is told, byte for byte — well-formed
 * requests through the codec, or any bytes and fds at all — plus the guest side of a
 * split ring written by hand in a sealed memfd. The hostile catalogue and the fuzzer
 * build their cases from it; the well-behaved frontend is `connectVhostUser`.
 */
import { closeSync, constants, openSync, rmSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MappedRegion } from '../../src/node/mapped-memory.js';
import * as native from '../../src/node/native.js';
import { UnixConnection } from '../../src/node/unix-socket.js';
import { contiguousRingLayout, VIRTQ_DESC_F, VIRTQ_DESC_SIZE } from '../../src/spec/split-ring.js';
import {
  VHOST_USER, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_HEADER_SIZE, VHOST_USER_MAX_FDS, VHOST_USER_PROTOCOL_F,
  VHOST_USER_VERSION,
} from '../../src/spec/vhost-user.js';
import { VIRTIO_BLK_REQ_HEADER, VIRTIO_BLK_T } from '../../src/spec/virtio-blk.js';
import { VIRTIO_F } from '../../src/spec/virtio.js';
import { encodeFrontendRequest } from '../../src/transport/vhost-user/codec.js';
import type { FrontendRequest, MappedMemoryRegion } from '../../src/transport/vhost-user/messages.js';

/** Request flags of a well-formed request: version 1. */
export const FLAGS = VHOST_USER_VERSION;

/** Header + payload; `size` defaults to the payload's length (a lie is the point of some cases). */
export function rawMessage(request: number, flags: number, payload: Uint8Array = new Uint8Array(0), size = payload.length): Uint8Array {
  const out = new Uint8Array(VHOST_USER_HEADER_SIZE + payload.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, request >>> 0, true);
  v.setUint32(4, flags >>> 0, true);
  v.setUint32(8, size >>> 0, true);
  out.set(payload, VHOST_USER_HEADER_SIZE);
  return out;
}

/** A little-endian payload built from (width, value) pairs. */
export function payloadOf(...fields: [1 | 2 | 4 | 8, number | bigint][]): Uint8Array {
  const size = fields.reduce((n, [w]) => n + w, 0);
  const out = new Uint8Array(size);
  const v = new DataView(out.buffer);
  let at = 0;
  for (const [w, value] of fields) {
    if (w === 1) v.setUint8(at, Number(value));
    else if (w === 2) v.setUint16(at, Number(value), true);
    else if (w === 4) v.setUint32(at, Number(value) >>> 0, true);
    else v.setBigUint64(at, BigInt.asUintN(64, BigInt(value)), true);
    at += w;
  }
  return out;
}

export interface RawReply {
  readonly request: number;
  readonly flags: number;
  readonly payload: Uint8Array;
  readonly fds: number[];
}

export class RawFrontend {
  private pending: Promise<unknown> = Promise.resolve();
  private constructor(readonly conn: UnixConnection) {}

  static async connect(socketPath: string): Promise<RawFrontend> {
    return new RawFrontend(await UnixConnection.connect(socketPath));
  }

  /** Sends bytes with fds on the first byte; our copies of the fds stay ours to close. */
  sendBytes(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (!this.conn.isClosed) this.conn.send(bytes, fds);
  }

  /** Sends a well-formed request (the codec encodes it). */
  send(req: FrontendRequest): void {
    const m = encodeFrontendRequest(req);
    this.sendBytes(m.bytes, m.fds);
  }

  /** The next message from the server, or null when it closed the connection (or failed it, or `timeoutMs` passed). */
  async reply(timeoutMs = 10_000): Promise<RawReply | null> {
    const read = async (): Promise<RawReply | null> => {
      const head = await this.conn.readExact(VHOST_USER_HEADER_SIZE, VHOST_USER_MAX_FDS);
      if (head === null) return null;
      const v = new DataView(head.data.buffer, head.data.byteOffset);
      const body = await this.conn.readExact(v.getUint32(8, true), 0);
      return { request: v.getUint32(0, true), flags: v.getUint32(4, true), payload: body?.data ?? new Uint8Array(0), fds: head.fds };
    };
    const run = this.pending.then(read).catch(() => null);
    this.pending = run;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<null>((resolve) => {
      timer = setTimeout(() => resolve(null), timeoutMs);
    });
    try {
      return await Promise.race([run, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Sends `req` and reads the reply it owes. */
  async call(req: FrontendRequest, timeoutMs = 10_000): Promise<RawReply | null> {
    this.send(req);
    return this.reply(timeoutMs);
  }

  /**
   * Whether the server closes the connection within `timeoutMs`, reading (and dropping)
   * whatever replies it sends meanwhile.
   */
  async serverCloses(timeoutMs = 10_000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      const r = await this.reply(left);
      if (r === null) return this.conn.isClosed || Date.now() < deadline;
      r.fds.forEach((fd) => native.close(fd));
    }
  }

  /** Runs the opening a frontend must: features, protocol features, owner. Returns what was offered. */
  async handshake(opts: { features?: bigint; protocol?: bigint } = {}): Promise<{ features: bigint; protocol: bigint }> {
    const f = await this.call({ request: 'GET_FEATURES', needReply: false });
    if (!f || f.payload.length !== 8) throw new Error('handshake: no GET_FEATURES reply');
    const offered = new DataView(f.payload.buffer, f.payload.byteOffset).getBigUint64(0, true);
    const features = opts.features ?? (bit(VIRTIO_F.VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES));
    this.send({ request: 'SET_FEATURES', needReply: false, features });
    const p = await this.call({ request: 'GET_PROTOCOL_FEATURES', needReply: false });
    if (!p || p.payload.length !== 8) throw new Error('handshake: no GET_PROTOCOL_FEATURES reply');
    const protocolOffered = new DataView(p.payload.buffer, p.payload.byteOffset).getBigUint64(0, true);
    const protocol = opts.protocol ?? (bit(VHOST_USER_PROTOCOL_F.REPLY_ACK) | bit(VHOST_USER_PROTOCOL_F.CONFIG) | bit(VHOST_USER_PROTOCOL_F.MQ));
    this.send({ request: 'SET_PROTOCOL_FEATURES', needReply: false, features: protocol });
    this.send({ request: 'SET_OWNER', needReply: false });
    return { features: offered, protocol: protocolOffered };
  }

  /** With REPLY_ACK negotiated: sends `req` with NEED_REPLY and says whether the server acked it (null: no ack at all). */
  async acked(req: FrontendRequest): Promise<boolean | null> {
    const r = await this.call({ ...req, needReply: true });
    if (!r || r.payload.length !== 8) return null;
    return new DataView(r.payload.buffer, r.payload.byteOffset).getBigUint64(0, true) === 0n;
  }

  close(): void {
    if (!this.conn.isClosed) this.conn.close();
  }
}

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** Request numbers by name, for raw messages. */
export const REQ = VHOST_USER;

// ---------------------------------------------------------------------------------------
// fds of every kind a hostile frontend might send

/** A scratch directory for FIFOs and files; remove it with `cleanup`. */
export class FdFactory {
  private readonly dir: string;
  private n = 0;
  private hasFifo = false;
  private readonly owned: number[] = [];

  constructor() {
    this.dir = join(tmpdir(), `vblk-hostile-${process.pid}-${Date.now()}`);
    execFileSync('mkdir', ['-p', this.dir]);
  }

  private own(fd: number): number {
    this.owned.push(fd);
    return fd;
  }

  /** One end of a pipe (a FIFO, made once, opened read-write so opening never blocks). */
  pipe(): number {
    const path = join(this.dir, 'fifo');
    if (!this.hasFifo) execFileSync('mkfifo', [path]);
    this.hasFifo = true;
    return this.own(openSync(path, constants.O_RDWR | constants.O_NONBLOCK));
  }

  /** A regular file of `size` bytes. */
  file(size = 1 << 20): number {
    const path = join(this.dir, `file${this.n++}`);
    writeFileSync(path, new Uint8Array(0));
    const fd = openSync(path, 'r+');
    if (size > 0) native.fallocate(fd, 0, 0, size);
    return this.own(fd);
  }

  /** One end of a socketpair; `peer` is the other end, to watch for EOF. */
  socket(): { fd: number; peer: UnixConnection } {
    const [a, b] = native.socketpair();
    return { fd: this.own(a), peer: new UnixConnection(b) };
  }

  eventfd(): number {
    return this.own(native.eventfd());
  }

  memfd(size: number, seal: boolean): number {
    return this.own(native.memfdCreate('vblk-hostile', size, { seal }));
  }

  /** Closes every fd made so far (our copies; the server holds its own). */
  closeAll(): void {
    for (const fd of this.owned.splice(0)) {
      try {
        closeSync(fd);
      } catch {
        // Closed by the case already.
      }
    }
  }

  cleanup(): void {
    this.closeAll();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------------------
// Guest memory and a hand-written ring

/** Where the hostile guest's memory sits: guest-physical and frontend-virtual bases. */
export const GUEST_BASE = 0x4000_0000;
export const USER_BASE = 0x7f00_0000_0000;

/** A memfd mapped in this process, shared with the backend as one region. */
export class SharedRegion {
  readonly fd: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
  private readonly mapping: MappedRegion;

  /** `opts.fd` adopts an fd of at least `size` bytes (a file, say) instead of creating a memfd. */
  constructor(readonly size: number, opts: { seal?: boolean; fd?: number; guestAddress?: number; userAddress?: number } = {}) {
    this.fd = opts.fd ?? native.memfdCreate('vblk-guest', size, { seal: opts.seal ?? true });
    this.mapping = MappedRegion.map(this.fd, size);
    this.bytes = this.mapping.windows[0].bytes;
    this.view = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength);
    this.guestAddress = opts.guestAddress ?? GUEST_BASE;
    this.userAddress = opts.userAddress ?? USER_BASE;
  }

  readonly guestAddress: number;
  readonly userAddress: number;

  /** The SET_MEM_TABLE entry for this region. */
  get region(): MappedMemoryRegion {
    return { guestAddress: this.guestAddress, size: this.size, userAddress: this.userAddress, mmapOffset: 0, fd: this.fd };
  }

  release(): void {
    this.mapping.unmap();
    try {
      native.close(this.fd);
    } catch {
      // Already closed by the case.
    }
  }
}

/** The guest side of a split ring at `offset` in a {@link SharedRegion}, written by hand. */
export class GuestRing {
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  /** Region offset of free space after the ring, for request headers and data. */
  readonly dataOffset: number;
  private availIdx = 0;
  private nextDesc = 0;

  constructor(readonly mem: SharedRegion, readonly offset: number, readonly size: number) {
    const l = contiguousRingLayout(size);
    this.desc = offset + l.desc;
    this.avail = offset + l.avail;
    this.used = offset + l.used;
    this.dataOffset = offset + Math.ceil(l.total / 4096) * 4096;
  }

  /** Frontend-virtual addresses for SET_VRING_ADDR. */
  get userAddresses(): { desc: number; avail: number; used: number } {
    const u = this.mem.userAddress;
    return { desc: u + this.desc, avail: u + this.avail, used: u + this.used };
  }

  /** Guest-physical address of a region offset (what descriptors hold). */
  gpa(offset: number): number {
    return this.mem.guestAddress + offset;
  }

  /** Writes descriptor `i`; `addr` is guest-physical. */
  writeDesc(i: number, addr: number, len: number, flags: number, next = 0): void {
    const at = this.desc + i * VIRTQ_DESC_SIZE;
    this.mem.view.setBigUint64(at, BigInt(addr), true);
    this.mem.view.setUint32(at + 8, len >>> 0, true);
    this.mem.view.setUint16(at + 12, flags, true);
    this.mem.view.setUint16(at + 14, next, true);
  }

  /** Puts `head` in the next avail slot and publishes the index. */
  publish(head: number): void {
    this.mem.view.setUint16(this.avail + 4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.setAvailIdx(this.availIdx);
  }

  /** Writes avail->idx as is (a hostile guest's jump). */
  setAvailIdx(idx: number): void {
    Atomics.store(new Uint16Array(this.mem.bytes.buffer, this.mem.bytes.byteOffset + this.avail + 2, 1), 0, idx & 0xffff);
  }

  get usedIdx(): number {
    return Atomics.load(new Uint16Array(this.mem.bytes.buffer, this.mem.bytes.byteOffset + this.used + 2, 1), 0);
  }

  /**
   * Builds a well-formed virtio-blk request chain (header, one data buffer, status) in
   * descriptors and data space of its own, publishes it, and returns where its status
   * byte and data are. `data` is written for OUT requests.
   */
  blkRequest(type: number, sector: number, length: number, data?: Uint8Array): { status: number; data: number; head: number } {
    const slot = this.nextDesc;
    this.nextDesc = (this.nextDesc + 3) % (this.size - (this.size % 3));
    const base = this.dataOffset + slot * 8192;
    const header = base;
    const status = base + 32;
    const buf = base + 4096;
    this.mem.view.setUint32(header + VIRTIO_BLK_REQ_HEADER.type, type, true);
    this.mem.view.setUint32(header + VIRTIO_BLK_REQ_HEADER.reserved, 0, true);
    this.mem.view.setBigUint64(header + VIRTIO_BLK_REQ_HEADER.sector, BigInt(sector), true);
    this.mem.bytes[status] = 0xff;
    if (data) this.mem.bytes.set(data, buf);
    const isIn = type === VIRTIO_BLK_T.IN || type === VIRTIO_BLK_T.GET_ID;
    this.writeDesc(slot, this.gpa(header), VIRTIO_BLK_REQ_HEADER.size, VIRTQ_DESC_F.NEXT, slot + 1);
    this.writeDesc(slot + 1, this.gpa(buf), length, VIRTQ_DESC_F.NEXT | (isIn ? VIRTQ_DESC_F.WRITE : 0), slot + 2);
    this.writeDesc(slot + 2, this.gpa(status), 1, VIRTQ_DESC_F.WRITE);
    this.publish(slot);
    return { status, data: buf, head: slot };
  }
}
