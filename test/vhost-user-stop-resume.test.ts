/**
 * The switchover of a live migration, as the backend sees it (vhost-user.rst, "Migration"
 * and GET_VRING_BASE; VHOST-USER-NOTES.md): the source stops each ring with GET_VRING_BASE
 * and the destination resumes it with SET_VRING_BASE. No request may be lost or completed
 * twice across the two. Here the requests the backend holds when GET_VRING_BASE arrives
 * are slow (the serve child delays every read and write): the reply must wait until they
 * completed and were published, and name the next avail index; a ring resumed from it
 * serves the requests made available afterwards, and only those.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { MappedRegion } from '../src/node/mapped-memory.js';
import * as native from '../src/node/native.js';
import {
  VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_INFLIGHT_DESC_STATE_SPLIT as DESC, VHOST_USER_INFLIGHT_QUEUE_REGION_SPLIT as HEAD,
  VHOST_USER, VHOST_USER_PROTOCOL_F, VHOST_VRING_F_LOG,
} from '../src/spec/vhost-user.js';
import { VIRTIO_F } from '../src/spec/virtio.js';
import { VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { inflightQueueBytes } from '../src/virtqueue/inflight.js';
import { RING_SIZE, RunningGuest } from './support/hostile-guest.js';
import { SharedRegion, bit } from './support/raw-frontend.js';
import { ServerProcess } from './support/server-process.js';
import { waitUntil } from './support/wait.js';

const SLOW_IO_MS = 300;
let dir: string;
let server: ServerProcess;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vblk-stop-resume-'));
  server = await ServerProcess.start(join(dir, 'vhost.sock'), ['--slow-io', String(SLOW_IO_MS)]);
});
after(async () => {
  await server.stop();
  rmSync(dir, { recursive: true, force: true });
});

test('GET_VRING_BASE waits for the requests in flight, and a ring resumed from its answer serves only what came after', async () => {
  // The inflight buffer shows which requests the backend took: the stop is sent only once
  // it holds all three, so it really stops a ring with requests in flight.
  const inflightBytes = inflightQueueBytes(RING_SIZE);
  const inflightFd = native.memfdCreate('test-inflight', inflightBytes * 2, { seal: true });
  const inflight = MappedRegion.map(inflightFd, inflightBytes * 2);
  const g = await RunningGuest.start(server.socketPath, {
    rings: 1, inflight: { fd: inflightFd, mmapSize: inflightBytes * 2, numQueues: 2, queueSize: RING_SIZE },
  });
  try {
    const ring = g.rings[0];
    const held = () => {
      const b = inflight.windows[0].bytes;
      let n = 0;
      for (let i = 0; i < RING_SIZE; i++) n += b[HEAD.size + i * DESC.size + DESC.fields.inflight.offset];
      return n;
    };
    const pattern = (k: number) => new Uint8Array(4096).fill(0x40 + k);
    const first = [0, 1, 2].map((k) => ring.blkRequest(VIRTIO_BLK_T.OUT, k * 8, 4096, pattern(k)));
    g.kick(0);
    await waitUntil(() => held() === 3, { what: 'the backend to take the three writes' });
    assert.equal(ring.usedIdx, 0, `no write completes before ${SLOW_IO_MS} ms`);

    const reply = await g.f.call({ request: 'GET_VRING_BASE', needReply: false, index: 0 }, 30_000);
    assert.equal(reply?.request, VHOST_USER.GET_VRING_BASE);
    const base = new DataView(reply.payload.buffer, reply.payload.byteOffset).getUint32(4, true);
    // At the reply: every request taken has completed and is published, and none is left in flight.
    assert.equal(base, 3, 'the next avail index to process');
    assert.equal(ring.usedIdx, 3, 'the three writes completed before the reply');
    for (const r of first) assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
    assert.equal(held(), 0);

    // Made available while the ring is stopped (the guest runs on while the source
    // stops; the destination finds them): two reads of what the first two writes wrote.
    const later = [0, 1].map((k) => ring.blkRequest(VIRTIO_BLK_T.IN, k * 8, 4096));
    // The destination's start: size, base from GET_VRING_BASE, addresses, kick, enable.
    const kick = native.eventfd();
    try {
      for (const req of [
        { request: 'SET_VRING_NUM', index: 0, num: RING_SIZE },
        { request: 'SET_VRING_BASE', index: 0, num: base },
        { request: 'SET_VRING_ADDR', index: 0, flags: 0, ...ring.userAddresses, log: 0 },
        { request: 'SET_VRING_KICK', index: 0, fd: kick },
        { request: 'SET_VRING_ENABLE', index: 0, enable: true },
      ] as const) {
        assert.equal(await g.f.acked({ ...req, needReply: true }), true, req.request);
      }
      native.eventfdWrite(kick, 1);
      await waitUntil(() => ring.usedIdx === 5, { what: 'the two reads made available after the stop', timeoutMs: 30_000 });
    } finally {
      native.close(kick);
    }
    // The used ring's slots 3 and 4 are the reads: the writes were not completed again.
    const usedId = (slot: number) => g.mem.view.getUint32(ring.used + 4 + 8 * slot, true);
    assert.deepEqual([3, 4].map(usedId), later.map((r) => r.head));
    later.forEach((r, k) => {
      assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
      assert.deepEqual(g.mem.bytes.subarray(r.data, r.data + 4096), pattern(k));
    });
  } finally {
    g.release();
    inflight.unmap();
    native.close(inflightFd);
  }
});

test('logging that starts while requests are in flight (QEMU 7.2: SET_LOG_BASE, SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log flag): the ack comes after they completed, none completes twice, and later requests are marked', async () => {
  // The ring is restarted when its logging changes (backend.ts, refreshLogging): here it
  // holds three slow writes when LOG_ALL arrives. They complete unmarked under the old
  // queue, before the ack: QEMU's first pass copies all memory after that ack.
  const migrating = await ServerProcess.start(join(dir, 'log.sock'), ['--slow-io', String(SLOW_IO_MS)]);
  const inflightBytes = inflightQueueBytes(RING_SIZE);
  const inflightFd = native.memfdCreate('test-inflight', inflightBytes * 2, { seal: true });
  const inflight = MappedRegion.map(inflightFd, inflightBytes * 2);
  const g = await RunningGuest.start(migrating.socketPath, {
    rings: 1, inflight: { fd: inflightFd, mmapSize: inflightBytes * 2, numQueues: 2, queueSize: RING_SIZE },
    protocol: bit(VHOST_USER_PROTOCOL_F.LOG_SHMFD),
  });
  const logBytes = Math.ceil((g.mem.guestAddress + g.mem.size) / 4096 / 8);
  const log = new SharedRegion(logBytes, { seal: true });
  try {
    const ring = g.rings[0];
    const held = () => {
      const b = inflight.windows[0].bytes;
      let n = 0;
      for (let i = 0; i < RING_SIZE; i++) n += b[HEAD.size + i * DESC.size + DESC.fields.inflight.offset];
      return n;
    };
    const pattern = (k: number) => new Uint8Array(4096).fill(0x60 + k);
    [0, 1, 2].map((k) => ring.blkRequest(VIRTIO_BLK_T.OUT, k * 8, 4096, pattern(k)));
    g.kick(0);
    await waitUntil(() => held() === 3, { what: 'the backend to take the three writes' });

    const reply = await g.f.call({ request: 'SET_LOG_BASE', needReply: false, fd: log.fd, mmapSize: logBytes, mmapOffset: 0 });
    assert.equal(reply?.request, VHOST_USER.SET_LOG_BASE);
    const features = bit(VIRTIO_F.VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | bit(VHOST_F_LOG_ALL);
    assert.equal(await g.f.acked({ request: 'SET_FEATURES', needReply: true, features }), true);
    assert.equal(ring.usedIdx, 3, 'the writes in flight completed before the LOG_ALL ack');
    assert.equal(held(), 0);
    assert.equal(await g.f.acked({ request: 'SET_VRING_ADDR', needReply: true, index: 0, flags: 1 << VHOST_VRING_F_LOG, ...ring.userAddresses, log: ring.gpa(ring.used) }), true);

    const later = [0, 1].map((k) => ring.blkRequest(VIRTIO_BLK_T.IN, k * 8, 4096));
    g.kick(0);
    await waitUntil(() => ring.usedIdx === 5, { what: 'the two reads made available after logging started', timeoutMs: 30_000 });
    await new Promise((r) => setTimeout(r, 2 * SLOW_IO_MS));
    assert.equal(ring.usedIdx, 5, 'no completion repeated');
    const usedId = (slot: number) => g.mem.view.getUint32(ring.used + 4 + 8 * slot, true);
    assert.deepEqual([3, 4].map(usedId), later.map((r) => r.head));
    const marked = (offset: number) => {
      const page = Math.floor(ring.gpa(offset) / 4096);
      return (log.bytes[page >> 3] & (1 << (page & 7))) !== 0;
    };
    later.forEach((r, k) => {
      assert.equal(g.mem.bytes[r.status], VIRTIO_BLK_S.OK);
      assert.deepEqual(g.mem.bytes.subarray(r.data, r.data + 4096), pattern(k));
      assert.ok(marked(r.data), `read ${k}: data page marked`);
      assert.ok(marked(r.status), `read ${k}: status page marked`);
    });
    assert.ok(marked(ring.used), 'used ring marked');
  } finally {
    g.release();
    log.release();
    inflight.unmap();
    native.close(inflightFd);
    await migrating.stop();
  }
});
