// The cache mode a guest chose survives what QEMU 7.2 does around it: renegotiation at
// every driver start, guest resets, and a backend restarted under a running guest. The
// message sequences below are the ones QEMU 7.2 sent `vblk serve` (traced with a Linux
// 6.1 guest): the initial connection reads the config once; a reconnect never does.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBackend } from '../../backends/memory-backend.js';
import { BlkDevice } from '../../blk/device.js';
import { VIRTIO_BLK_CONFIG, VIRTIO_BLK_F } from '../../spec/virtio-blk.js';
import { VIRTIO_F, features } from '../../spec/virtio.js';
import { VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_PROTOCOL_F } from '../../spec/vhost-user.js';
import {
  BACKEND_PROTOCOL_FEATURES, BackendSessionError, VhostUserBackendSession, type BackendIo, type RegionMapping,
} from './backend.js';
import { CONFIG_RECORD_BYTES, readConfigRecord, writeConfigRecord } from './config-record.js';
import type { FrontendRequest } from './messages.js';
import { inflightQueueBytes } from '../../virtqueue/inflight.js';

const WCE = VIRTIO_BLK_CONFIG.writeback.offset;
const MEMORY = 64 * 1024;
const QUEUE = 16;
/** One queue's inflight log for QUEUE descriptors: where the config record starts. */
const QUEUE_LOG_BYTES = inflightQueueBytes(QUEUE);

/** Shared memory by fd number, as the frontend and every backend process see it. */
class FakeHost {
  readonly files = new Map<number, Uint8Array>();
  private nextFd = 100;

  add(bytes: Uint8Array): number {
    const fd = this.nextFd++;
    this.files.set(fd, bytes);
    return fd;
  }

  io(logs: string[]): BackendIo {
    const mapping = (bytes: Uint8Array): RegionMapping => ({ chunks: [bytes], unmap() {} });
    return {
      mapRegion: (fd, size, offset) => {
        const f = this.files.get(fd);
        if (!f || offset + size > f.length) throw new Error(`fd ${fd} cannot back ${size} bytes`);
        return mapping(f.subarray(offset, offset + size));
      },
      closeFd() {},
      createSharedMemory: (size) => {
        const bytes = new Uint8Array(size);
        return { fd: this.add(bytes), mapping: mapping(bytes) };
      },
      checkEventFd() {},
      watchEventFd: () => ({ stop() {} }),
      signalEventFd() {},
      sendOnBackendChannel() {},
      log: (line) => logs.push(line),
    };
  }
}

/** QEMU's features for a running Linux guest: FLUSH and CONFIG_WCE among them. */
const GUEST_FEATURES = features(VIRTIO_F.VERSION_1, VIRTIO_F.RING_EVENT_IDX, VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.CONFIG_WCE,
  VIRTIO_BLK_F.SEG_MAX, VIRTIO_BLK_F.BLK_SIZE, VHOST_USER_F_PROTOCOL_FEATURES);
const PROTOCOL = features(VHOST_USER_PROTOCOL_F.MQ, VHOST_USER_PROTOCOL_F.REPLY_ACK, VHOST_USER_PROTOCOL_F.CONFIG,
  VHOST_USER_PROTOCOL_F.INFLIGHT_SHMFD);

/** One backend process: a device over `backend` and a session on one connection. */
function backendProcess(host: FakeHost, backend: MemoryBackend, cache: 'writeback' | 'writethrough' = 'writeback') {
  const logs: string[] = [];
  const changes: number[] = [];
  const device = new BlkDevice({ backend, cache, onWritebackChange: (wb) => changes.push(wb) });
  const connect = () => new VhostUserBackendSession(device, host.io(logs));
  return { device, logs, changes, connect };
}

async function send(s: VhostUserBackendSession, req: FrontendRequest) {
  return s.handle(req);
}

/** What QEMU sends when its device is realized: the one GET_CONFIG it ever makes. */
async function realize(s: VhostUserBackendSession): Promise<void> {
  await send(s, { request: 'GET_FEATURES', needReply: false });
  await send(s, { request: 'SET_PROTOCOL_FEATURES', needReply: false, features: PROTOCOL });
  await send(s, { request: 'GET_CONFIG', needReply: false, offset: 0, size: 57, flags: 0 });
}

/** A reconnect: the same, minus the GET_CONFIG. */
async function reconnect(s: VhostUserBackendSession): Promise<void> {
  await send(s, { request: 'GET_FEATURES', needReply: false });
  await send(s, { request: 'SET_PROTOCOL_FEATURES', needReply: false, features: PROTOCOL });
}

/**
 * A driver start: features, the inflight buffer (a fresh one from GET_INFLIGHT_FD, or the
 * one QEMU kept), memory, and one ring. Returns the inflight buffer's fd.
 */
async function start(s: VhostUserBackendSession, host: FakeHost, inflightFd: number | null, memFd: number): Promise<number> {
  await send(s, { request: 'SET_FEATURES', needReply: false, features: GUEST_FEATURES });
  let fd = inflightFd;
  let mmapSize = fd === null ? 0 : host.files.get(fd)!.length;
  if (fd === null) {
    const r = await send(s, { request: 'GET_INFLIGHT_FD', needReply: false, numQueues: 1, queueSize: QUEUE });
    assert.ok(r && r.request === 'GET_INFLIGHT_FD');
    fd = r.fd;
    mmapSize = r.mmapSize;
  }
  await send(s, { request: 'SET_INFLIGHT_FD', needReply: false, fd, mmapSize, mmapOffset: 0, numQueues: 1, queueSize: QUEUE });
  await send(s, { request: 'SET_FEATURES', needReply: false, features: GUEST_FEATURES });
  await send(s, { request: 'SET_MEM_TABLE', needReply: false, regions: [{ guestAddress: 0, size: MEMORY, userAddress: 0, mmapOffset: 0, fd: memFd }] });
  await send(s, { request: 'SET_VRING_NUM', needReply: false, index: 0, num: QUEUE });
  await send(s, { request: 'SET_VRING_BASE', needReply: false, index: 0, num: 0 });
  await send(s, { request: 'SET_VRING_ADDR', needReply: false, index: 0, flags: 0, desc: 0, avail: 0x1000, used: 0x2000, log: 0 });
  await send(s, { request: 'SET_VRING_KICK', needReply: false, index: 0, fd: 7 });
  await send(s, { request: 'SET_VRING_ENABLE', needReply: false, index: 0, enable: true });
  return fd;
}

/** A guest reset: rings stop; QEMU frees its inflight buffer and asks for a new one. */
async function stop(s: VhostUserBackendSession): Promise<void> {
  await send(s, { request: 'SET_VRING_ENABLE', needReply: false, index: 0, enable: false });
  await send(s, { request: 'GET_VRING_BASE', needReply: false, index: 0 });
}

const chooseWritethrough = (s: VhostUserBackendSession) =>
  send(s, { request: 'SET_CONFIG', needReply: false, offset: WCE, flags: 0, data: new Uint8Array([0]) });

test('the guest\'s writethrough survives the renegotiation and the new inflight buffer of a guest reset', async () => {
  const host = new FakeHost();
  const mem = host.add(new Uint8Array(MEMORY));
  const p = backendProcess(host, new MemoryBackend({ size: 1 << 20 }));
  const s = p.connect();
  await realize(s);
  await start(s, host, null, mem);
  assert.equal(p.device.writeback, 1);
  await chooseWritethrough(s);
  assert.equal(p.device.writeback, 0);
  await stop(s);
  // QEMU keeps writeback 0 in its copy and shows it to the rebooted guest; it sends no SET_CONFIG.
  await start(s, host, null, mem);
  assert.equal(p.device.writeback, 0, 'the rebooted guest believes writethrough: it must get it');
  await s.close();
});

test('a backend restarted under a guest that chose writethrough serves writethrough', async () => {
  const host = new FakeHost();
  const mem = host.add(new Uint8Array(MEMORY));
  const disk = new MemoryBackend({ size: 1 << 20 });
  const first = backendProcess(host, disk);
  const s1 = first.connect();
  await realize(s1);
  const inflight = await start(s1, host, null, mem);
  await chooseWritethrough(s1);
  // The process dies: its session and device are gone; QEMU keeps the inflight buffer.
  const second = backendProcess(host, disk);
  assert.equal(second.device.writeback, 1);
  const s2 = second.connect();
  await reconnect(s2);
  await start(s2, host, inflight, mem);
  assert.equal(second.device.writeback, 0, 'restored from the record in the inflight buffer');
  assert.deepEqual(second.changes, [0]);
  assert.ok(!second.logs.some((l) => /unknown/.test(l)), second.logs.join('\n'));
  await s2.close();
});

test('a backend restarted with nothing recorded assumes writethrough, and the guest can still choose writeback', async () => {
  const host = new FakeHost();
  const mem = host.add(new Uint8Array(MEMORY));
  const p = backendProcess(host, new MemoryBackend({ size: 1 << 20 }));
  const s = p.connect();
  await reconnect(s);
  // A buffer from a backend that recorded nothing (all zero past the queue logs).
  const inflight = host.add(new Uint8Array(4096));
  await start(s, host, inflight, mem);
  assert.equal(p.device.writeback, 0);
  assert.ok(p.logs.some((l) => /copy of the config space is unknown/.test(l)), p.logs.join('\n'));
  // The assumption is recorded, so a further restart keeps it.
  assert.equal(readConfigRecord(host.files.get(inflight)!.subarray(QUEUE_LOG_BYTES))?.[WCE], 0);
  await send(s, { request: 'SET_CONFIG', needReply: false, offset: WCE, flags: 0, data: new Uint8Array([1]) });
  assert.equal(p.device.writeback, 1);
  await s.close();
});

test('a new frontend (one that reads the config) gets the configured cache mode, not the last guest\'s', async () => {
  const host = new FakeHost();
  const mem = host.add(new Uint8Array(MEMORY));
  const p = backendProcess(host, new MemoryBackend({ size: 1 << 20 }));
  const s1 = p.connect();
  await realize(s1);
  await start(s1, host, null, mem);
  await chooseWritethrough(s1);
  await s1.close();
  assert.equal(p.device.writeback, 1, 'the device is back to its initial mode once the frontend is gone');
  const s2 = p.connect();
  await realize(s2);
  await start(s2, host, null, mem);
  assert.equal(p.device.writeback, 1);
  await s2.close();
  assert.deepEqual(p.changes, [0, 1]);
});

test('a hostile record in the inflight buffer is ignored or validated like any config write', async () => {
  for (const [what, record] of [
    ['a writeback byte of 7', (() => { const c = new Uint8Array(72); c[WCE] = 7; return c; })()],
    ['a truncated config', new Uint8Array(3)],
  ] as const) {
    const host = new FakeHost();
    const mem = host.add(new Uint8Array(MEMORY));
    const p = backendProcess(host, new MemoryBackend({ size: 1 << 20 }), 'writethrough');
    const s = p.connect();
    await reconnect(s);
    const bytes = new Uint8Array(QUEUE_LOG_BYTES + CONFIG_RECORD_BYTES);
    writeConfigRecord(bytes.subarray(QUEUE_LOG_BYTES), record);
    await start(s, host, host.add(bytes), mem);
    assert.equal(p.device.writeback, 0, what);
    await s.close();
  }
});

test('dirty logging is offered by default; a caller that leaves LOG_SHMFD out gets the log requests refused as not negotiated', async () => {
  const host = new FakeHost();
  const device = new BlkDevice({ backend: new MemoryBackend({ size: 1 << 20 }) });
  const LOG_SHMFD = 1n << BigInt(VHOST_USER_PROTOCOL_F.LOG_SHMFD);
  const LOG_ALL = 1n << BigInt(VHOST_F_LOG_ALL);
  const offers = async (s: VhostUserBackendSession) => {
    const f = await send(s, { request: 'GET_FEATURES', needReply: false });
    const p = await send(s, { request: 'GET_PROTOCOL_FEATURES', needReply: false });
    assert.ok(f?.request === 'GET_FEATURES' && p?.request === 'GET_PROTOCOL_FEATURES');
    return { features: f.features, protocol: p.features };
  };

  const on = new VhostUserBackendSession(device, host.io([]));
  const n = await offers(on);
  assert.equal(n.protocol, BACKEND_PROTOCOL_FEATURES);
  assert.equal(n.protocol & LOG_SHMFD, LOG_SHMFD);
  assert.equal(n.features & LOG_ALL, LOG_ALL, 'VHOST_F_LOG_ALL comes with the shared-memory log');
  await on.close();

  const off = new VhostUserBackendSession(device, host.io([]), { protocolFeatures: BACKEND_PROTOCOL_FEATURES & ~LOG_SHMFD });
  const o = await offers(off);
  assert.equal(o.protocol & LOG_SHMFD, 0n);
  assert.equal(o.features & LOG_ALL, 0n, 'no VHOST_F_LOG_ALL without a log to mark in');
  await send(off, { request: 'SET_PROTOCOL_FEATURES', needReply: false, features: PROTOCOL & ~LOG_SHMFD });
  for (const req of [
    { request: 'SET_LOG_BASE', needReply: false, fd: host.add(new Uint8Array(4096)), mmapSize: 4096, mmapOffset: 0 },
    { request: 'SET_LOG_FD', needReply: false, fd: 9 },
  ] as const) {
    await assert.rejects(send(off, req), (e: unknown) => e instanceof BackendSessionError && e.code === 'NOT_NEGOTIATED', req.request);
  }
  await assert.rejects(send(off, { request: 'SET_FEATURES', needReply: false, features: GUEST_FEATURES | LOG_ALL }),
    (e: unknown) => e instanceof BackendSessionError && e.code === 'BAD_FEATURES');
  await off.close();
});

test('with the log on, a read whose buffers lie in several regions of one memfd (a pc guest: 0 and 0xc0000, and memory above 4 GiB at another file offset) marks the pages at their guest addresses', async () => {
  const host = new FakeHost();
  const device = new BlkDevice({ backend: new MemoryBackend({ size: 1 << 20 }) });
  const logs: string[] = [];
  const s = new VhostUserBackendSession(device, host.io(logs));
  // One 1 MiB memfd: guest 0..0xa0000 at file offset 0, guest 0xc0000..1 MiB at file
  // offset 0xc0000, as QEMU sends a pc guest's RAM; and 64 KiB at 4 GiB from file offset
  // 0xa0000, where guest and file offsets differ (a larger pc guest's RAM above 4 GiB).
  // The frontend maps it once: user address = base + file offset.
  const file = new Uint8Array(1 << 20);
  const memFd = host.add(file);
  const UVA = 0x7f00_0000_0000;
  const view = new DataView(file.buffer);
  const LOG_SHMFD = 1n << BigInt(VHOST_USER_PROTOCOL_F.LOG_SHMFD);
  const LOG_ALL = 1n << BigInt(VHOST_F_LOG_ALL);
  const DESC = 0xd0000;
  const AVAIL = 0xd1000;
  const USED = 0xd2000;
  const HEADER = 0xe0000;
  const DATA = 0xf3000; // region 1
  const STATUS = 0x9f000; // region 0
  const HIGH = 2 ** 32; // region 2, file offset 0xa0000
  await send(s, { request: 'GET_FEATURES', needReply: false });
  await send(s, { request: 'SET_PROTOCOL_FEATURES', needReply: false, features: PROTOCOL | LOG_SHMFD });
  await send(s, { request: 'SET_FEATURES', needReply: false, features: GUEST_FEATURES });
  await send(s, { request: 'SET_MEM_TABLE', needReply: false, regions: [
    { guestAddress: 0, size: 0xa0000, userAddress: UVA, mmapOffset: 0, fd: memFd },
    { guestAddress: 0xc0000, size: 0x40000, userAddress: UVA + 0xc0000, mmapOffset: 0xc0000, fd: memFd },
    { guestAddress: HIGH, size: 0x10000, userAddress: UVA + 0xa0000, mmapOffset: 0xa0000, fd: memFd },
  ] });
  const bits = new Uint8Array((HIGH + 0x10000) / 4096 / 8);
  const reply = await send(s, { request: 'SET_LOG_BASE', needReply: false, fd: host.add(bits), mmapSize: bits.length, mmapOffset: 0 });
  assert.equal(reply?.request, 'SET_LOG_BASE');
  await send(s, { request: 'SET_FEATURES', needReply: false, features: GUEST_FEATURES | LOG_ALL });
  // A read of sector 0: header (readable), 2 × 4 KiB of data and the status byte (writable).
  const desc = (i: number, addr: number, len: number, flags: number, next: number) => {
    view.setBigUint64(DESC + 16 * i, BigInt(addr), true);
    view.setUint32(DESC + 16 * i + 8, len, true);
    view.setUint16(DESC + 16 * i + 12, flags, true);
    view.setUint16(DESC + 16 * i + 14, next, true);
  };
  desc(0, HEADER, 16, 1, 1);
  desc(1, DATA, 4096, 1 | 2, 2);
  desc(2, HIGH + 0x3000, 4096, 1 | 2, 3);
  desc(3, STATUS, 1, 2, 0);
  view.setUint16(AVAIL + 4, 0, true); // ring[0] = head 0
  view.setUint16(AVAIL + 2, 1, true); // idx
  file[STATUS] = 0xff;
  await send(s, { request: 'SET_VRING_NUM', needReply: false, index: 0, num: QUEUE });
  await send(s, { request: 'SET_VRING_BASE', needReply: false, index: 0, num: 0 });
  await send(s, { request: 'SET_VRING_ADDR', needReply: false, index: 0, flags: 1, desc: UVA + DESC, avail: UVA + AVAIL, used: UVA + USED, log: USED });
  await send(s, { request: 'SET_VRING_KICK', needReply: false, index: 0, fd: 7 });
  assert.equal(s.isDirtyLogging, false, 'no ring runs yet');
  await send(s, { request: 'SET_VRING_ENABLE', needReply: false, index: 0, enable: true });
  assert.equal(s.isDirtyLogging, true, 'a running ring logs');
  for (let i = 0; i < 100 && view.getUint16(USED + 2, true) !== 1; i++) await new Promise((r) => setImmediate(r));
  assert.equal(view.getUint16(USED + 2, true), 1, 'the read completed');
  assert.equal(file[STATUS], 0, 'status OK');
  const marked: number[] = [];
  for (let p = 0; p < bits.length * 8; p++) if (bits[p >> 3] & (1 << (p & 7))) marked.push(p);
  assert.deepEqual(marked, [STATUS / 4096, USED / 4096, DATA / 4096, (HIGH + 0x3000) / 4096],
    'status page (region 0), used ring and a data page (region 1), a data page above 4 GiB (region 2)');
  // A migration that fails: QEMU turns logging off with SET_FEATURES without LOG_ALL and the ring's flag cleared.
  await send(s, { request: 'SET_FEATURES', needReply: false, features: GUEST_FEATURES });
  await send(s, { request: 'SET_VRING_ADDR', needReply: false, index: 0, flags: 0, desc: UVA + DESC, avail: UVA + AVAIL, used: UVA + USED, log: 0 });
  assert.equal(s.isDirtyLogging, false, 'logging off');
  assert.deepEqual(logs.filter((l) => l.startsWith('dirty log')), [
    `dirty log on (${bits.length} bytes): the frontend is live-migrating the guest`, 'dirty log off: the migration ended or failed',
  ]);
  await s.close();
});
