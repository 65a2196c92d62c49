import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SplitDeviceQueue } from './split-device.js';
import { ChainError } from './chain.js';
import { QueueSetupError } from './ring-views.js';
import { RawRing } from './testing.js';
import { DirtyLog } from '../memory/dirty-log.js';
import { VIRTQ_DESC_F, VIRTQ_USED_F_NO_NOTIFY, VIRTQ_AVAIL_F_NO_INTERRUPT } from '../spec/split-ring.js';

const { NEXT, WRITE, INDIRECT } = VIRTQ_DESC_F;

function queue(r: RawRing): SplitDeviceQueue {
  const q = SplitDeviceQueue.create(r.memory, r.config);
  assert.ok(q instanceof SplitDeviceQueue);
  return q;
}

test('pops a readable+writable chain as views of the right bytes', () => {
  const r = new RawRing(8);
  const a = r.dataBase;
  r.fill(a, 16, 7);
  r.desc(0, a, 16, NEXT, 3);
  r.desc(3, a + 16, 100, WRITE | NEXT, 5);
  r.desc(5, a + 200, 1, WRITE);
  r.publish(0);
  const q = queue(r);
  const c = q.pop();
  assert.ok(c && !(c instanceof ChainError));
  assert.equal(c.head, 0);
  assert.equal(c.readableBytes, 16);
  assert.equal(c.writableBytes, 101);
  assert.deepEqual([...c.readable[0]], new Array(16).fill(7));
  assert.deepEqual(c.writable.map((v) => v.length), [100, 1]);
  assert.equal(q.pop(), null);
});

test('used entries are invisible until published, then published in one index update', () => {
  const r = new RawRing(4);
  for (let h = 0; h < 3; h++) {
    r.desc(h, r.dataBase + h * 64, 64, WRITE);
    r.publish(h);
  }
  const q = queue(r);
  const heads = [q.pop(), q.pop(), q.pop()].map((c) => (c as { head: number }).head);
  q.pushUsed(heads[2], 10);
  q.pushUsed(heads[0], 20);
  assert.equal(r.usedIdx(), 0);
  assert.equal(q.publishUsed(), true);
  assert.equal(r.usedIdx(), 2);
  assert.deepEqual(r.usedElem(0), { id: 2, len: 10 });
  assert.deepEqual(r.usedElem(1), { id: 0, len: 20 });
  assert.equal(q.publishUsed(), false, 'nothing new to publish');
});

test('without EVENT_IDX, NO_INTERRUPT suppresses the used notification', () => {
  const r = new RawRing(4);
  r.desc(0, r.dataBase, 8, WRITE);
  r.publish(0);
  const q = queue(r);
  q.pop();
  r.setAvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT);
  q.pushUsed(0, 1);
  assert.equal(q.publishUsed(), false);
});

test('with EVENT_IDX, notification follows used_event', () => {
  const r = new RawRing(8, { eventIdx: true });
  for (let h = 0; h < 4; h++) {
    r.desc(h, r.dataBase + h * 64, 64, WRITE);
    r.publish(h);
  }
  const q = queue(r);
  r.setUsedEvent(2); // the driver wants to hear when used.idx passes 2
  for (let h = 0; h < 2; h++) q.pushUsed((q.pop() as { head: number }).head, 0);
  assert.equal(q.publishUsed(), false, 'used.idx 0 → 2 did not cross 2');
  q.pushUsed((q.pop() as { head: number }).head, 0);
  assert.equal(q.publishUsed(), true, 'used.idx 2 → 3 crossed 2');
});

test('notification suppression towards the driver, with and without EVENT_IDX', () => {
  const plain = new RawRing(4);
  const q1 = queue(plain);
  q1.disableNotifications();
  assert.equal(plain.usedFlags(), VIRTQ_USED_F_NO_NOTIFY);
  assert.equal(q1.enableNotifications(), false);
  assert.equal(plain.usedFlags(), 0);

  const ev = new RawRing(4, { eventIdx: true });
  const q2 = queue(ev);
  ev.desc(0, ev.dataBase, 8, WRITE);
  ev.publish(0);
  assert.equal(q2.enableNotifications(), true, 'a buffer is already there: drain again');
  q2.pop();
  assert.equal(q2.enableNotifications(), false);
  assert.equal(ev.availEvent(), 1, 'avail_event names the next index we wait for');
});

test('nextAvail can be set (vhost-user vring base) and the used index continues from the ring', () => {
  const r = new RawRing(4);
  r.desc(2, r.dataBase, 8, WRITE);
  // Avail ring slot 1 holds head 2; start processing at index 1.
  r.publish(0);
  r.publish(2);
  const q = queue(r);
  q.nextAvail = 1;
  assert.equal(q.pending(), 1);
  const c = q.pop();
  assert.ok(c && !(c instanceof ChainError));
  assert.equal(c.head, 2);
  assert.equal(q.nextAvail, 2);
});

test('indirect chains are walked when negotiated', () => {
  const r = new RawRing(4, { indirect: true });
  const table = r.dataBase;
  r.desc(0, r.dataBase + 0x1000, 16, NEXT, 1, table);
  r.desc(1, r.dataBase + 0x2000, 512, WRITE | NEXT, 2, table);
  r.desc(2, r.dataBase + 0x3000, 1, WRITE, 0, table);
  r.desc(0, table, 48, INDIRECT);
  r.publish(0);
  const c = queue(r).pop();
  assert.ok(c && !(c instanceof ChainError));
  assert.equal(c.readableBytes, 16);
  assert.equal(c.writableBytes, 513);
});

test('a chain counts its buffer descriptors and its longest one, an indirect table by its entries', () => {
  const r = new RawRing(8, { indirect: true });
  const q = queue(r);
  const d = r.dataBase;
  // Direct: header, two data descriptors, status.
  r.desc(0, d, 16, NEXT, 1);
  r.desc(1, d + 0x100, 1024, WRITE | NEXT, 2);
  r.desc(2, d + 0x1000, 3000, WRITE | NEXT, 3);
  r.desc(3, d + 0x2000, 1, WRITE);
  r.publish(0);
  // A direct header, then an indirect table of data and status: the pointer is no buffer.
  const table = d + 0x4000;
  r.desc(0, d + 0x3000, 512, WRITE | NEXT, 1, table);
  r.desc(1, d + 0x3200, 1, WRITE, 0, table);
  r.desc(4, d, 16, NEXT, 5);
  r.desc(5, table, 32, INDIRECT);
  r.publish(4);
  // Zero-length descriptors are descriptors too.
  r.desc(6, d, 0, NEXT, 7);
  r.desc(7, d, 0, WRITE);
  r.publish(6);
  const counts = [q.pop(), q.pop(), q.pop()].map((c) => {
    assert.ok(c && !(c instanceof ChainError));
    return [c.descriptors, c.longestDescriptor];
  });
  assert.deepEqual(counts, [[4, 3000], [3, 512], [2, 0]]);
});

test('a descriptor crossing two adjacent regions yields two views', () => {
  const r = new RawRing(4);
  const end = r.regionEnd;
  // A second region right after the first.
  const mem2 = new (r.memory.constructor as typeof import('../memory/guest-memory.js').GuestMemory)([
    ...r.memory.regions, { guestAddress: end, bytes: new Uint8Array(4096) },
  ]);
  r.desc(0, end - 10, 30, WRITE);
  r.publish(0);
  const q = SplitDeviceQueue.create(mem2, r.config);
  assert.ok(q instanceof SplitDeviceQueue);
  const c = q.pop();
  assert.ok(c && !(c instanceof ChainError));
  assert.deepEqual(c.writable.map((v) => v.length), [10, 20]);
  assert.equal(c.descriptors, 1, 'still one descriptor');
});

test('queue setup refuses bad sizes and rings outside memory', () => {
  const r = new RawRing(4);
  const bad = (over: object): unknown => SplitDeviceQueue.create(r.memory, { ...r.config, ...over });
  assert.equal((bad({ size: 3 }) as QueueSetupError).code, 'BAD_QUEUE_SIZE');
  assert.equal((bad({ size: 65536 }) as QueueSetupError).code, 'BAD_QUEUE_SIZE');
  assert.equal((bad({ used: r.regionEnd - 8 }) as QueueSetupError).code, 'RING_OUT_OF_BOUNDS');
  assert.equal((bad({ desc: r.config.desc + 8 }) as QueueSetupError).code, 'RING_MISALIGNED');
  assert.equal((bad({ used: r.config.used + 2 }) as QueueSetupError).code, 'RING_MISALIGNED');
});

/** Writes a read chain (16-byte header, 512 data bytes, status) as an indirect table at `table`. */
function indirectRead(r: RawRing, table: number): void {
  r.fill(r.dataBase + 0x1000, 16, 9);
  r.desc(0, r.dataBase + 0x1000, 16, NEXT, 1, table);
  r.desc(1, r.dataBase + 0x2000, 512, WRITE | NEXT, 2, table);
  r.desc(2, r.dataBase + 0x3000, 1, WRITE, 0, table);
  r.desc(0, table, 48, INDIRECT);
  r.publish(0);
}

test('an indirect table at a misaligned address is read as well as an aligned one', () => {
  for (const misalign of [0, 1, 2, 4, 8, 15]) {
    const r = new RawRing(4, { indirect: true });
    indirectRead(r, r.dataBase + 0x4000 + misalign);
    const c = queue(r).pop();
    assert.ok(c && !(c instanceof ChainError), `misaligned by ${misalign}`);
    assert.equal(c.readableBytes, 16);
    assert.equal(c.writableBytes, 513);
    assert.deepEqual([...c.readable[0]], new Array(16).fill(9));
    assert.deepEqual(c.writable.map((v) => v.length), [512, 1]);
  }
});

test('an indirect table spanning two regions is read from both', () => {
  const r = new RawRing(4, { indirect: true });
  const end = r.regionEnd;
  const second = new Uint8Array(4096);
  const mem2 = new (r.memory.constructor as typeof import('../memory/guest-memory.js').GuestMemory)([
    ...r.memory.regions, { guestAddress: end, bytes: second },
  ]);
  // The table's first 32 bytes end the first region; its last entry opens the second.
  const table = end - 32;
  r.desc(0, r.dataBase + 0x1000, 16, NEXT, 1, table);
  r.desc(1, r.dataBase + 0x2000, 512, WRITE | NEXT, 2, table);
  const last = new DataView(second.buffer);
  last.setUint32(0, r.dataBase + 0x3000, true);
  last.setUint32(8, 1, true);
  last.setUint16(12, WRITE, true);
  r.desc(0, table, 48, INDIRECT);
  r.publish(0);
  const q = SplitDeviceQueue.create(mem2, r.config);
  assert.ok(q instanceof SplitDeviceQueue);
  const c = q.pop();
  assert.ok(c && !(c instanceof ChainError));
  assert.equal(c.writableBytes, 513);
});

test('pop into a chain object refills it, emptying its lists first', () => {
  const r = new RawRing(4);
  r.desc(0, r.dataBase, 16, NEXT, 1);
  r.desc(1, r.dataBase + 64, 1, WRITE);
  r.publish(0);
  r.desc(2, r.dataBase + 128, 8, WRITE);
  r.publish(2);
  const q = queue(r);
  const into = {
    head: -1, readable: [new Uint8Array(3)], writable: [new Uint8Array(5)], readableBytes: 7, writableBytes: 7,
    descriptors: 7, longestDescriptor: 7,
  };
  assert.equal(q.pop(into), into);
  assert.equal(into.head, 0);
  assert.deepEqual(into.readable.map((v) => v.length), [16]);
  assert.deepEqual(into.writable.map((v) => v.length), [1]);
  assert.deepEqual([into.readableBytes, into.writableBytes, into.descriptors, into.longestDescriptor], [16, 1, 2, 16]);
  assert.equal(q.pop(into), into);
  assert.equal(into.head, 2);
  assert.deepEqual(into.readable, []);
  assert.deepEqual(into.writable.map((v) => v.length), [8]);
  assert.deepEqual([into.readableBytes, into.writableBytes, into.descriptors, into.longestDescriptor], [0, 8, 1, 8]);
  assert.equal(q.pop(into), null);
});

test('a descriptor posted again with the same range gives the same view; a changed one is looked up and checked afresh', () => {
  const r = new RawRing(4);
  const q = queue(r);
  const post = (addr: number, len: number): ReturnType<SplitDeviceQueue['pop']> => {
    r.desc(0, addr, len, WRITE);
    r.publish(0);
    return q.pop();
  };
  const a = post(r.dataBase, 512);
  const b = post(r.dataBase, 512);
  assert.ok(a && !(a instanceof ChainError) && b && !(b instanceof ChainError));
  assert.equal(b.writable[0], a.writable[0], 'the same view object');
  const c = post(r.dataBase + 512, 512);
  assert.ok(c && !(c instanceof ChainError));
  r.fill(r.dataBase + 512, 512, 9);
  assert.ok(c.writable[0].every((x) => x === 9), 'the view of the new range');
  assert.equal(c.writable[0].length, 512);
  // The same index, now outside guest memory: refused, whatever it held before.
  const d = post(r.dataBase + 512, 0x7fff_ffff);
  assert.ok(d instanceof ChainError);
  assert.equal(d.code, 'OUT_OF_BOUNDS');
});

/** The pages set in a dirty-log bitmap. */
function dirtyPages(bits: Uint8Array): number[] {
  const out: number[] = [];
  for (let p = 0; p < bits.length * 8; p++) if (bits[p >> 3] & (1 << (p & 7))) out.push(p);
  return out;
}

test('with a dirty log, completing a chain marks its writable pages and the used element, publishing marks used.idx', () => {
  const r = new RawRing(4);
  const log = new DirtyLog();
  const bits = new Uint8Array(64);
  log.replace(bits);
  // The used ring is logged at SET_VRING_ADDR's log address, here a page of its own.
  const usedAt = 200 * 4096;
  const q = SplitDeviceQueue.create(r.memory, { ...r.config, dirtyLog: { log, usedAt } });
  assert.ok(q instanceof SplitDeviceQueue);
  const page = (a: number) => Math.floor(a / 4096);
  const data = r.dataBase + 3 * 4096 + 100;
  r.desc(0, r.dataBase, 16, NEXT, 1); // readable: never marked
  r.desc(1, data, 5000, WRITE | NEXT, 2); // two pages
  r.desc(2, r.dataBase + 9 * 4096, 1, WRITE); // a status byte
  r.publish(0);
  const c = q.pop();
  assert.ok(c && !(c instanceof ChainError));
  assert.deepEqual(dirtyPages(bits), [], 'nothing is marked before the device wrote it');
  q.pushUsed(0, 5001);
  assert.deepEqual(dirtyPages(bits), [page(data), page(data) + 1, page(r.dataBase) + 9, 200]);
  bits.fill(0);
  q.publishUsed();
  assert.deepEqual(dirtyPages(bits), [200], 'used.idx, at the log address');
});

test('without a dirty log nothing is marked, and the queue says it has none', () => {
  const r = new RawRing(4);
  const q = queue(r);
  assert.equal(q.dirtyLog, null);
  r.desc(0, r.dataBase, 64, WRITE);
  r.publish(0);
  q.pop();
  q.pushUsed(0, 64);
  q.publishUsed();
});

test('with a dirty log and EVENT_IDX, re-arming marks avail_event in the used ring', () => {
  const r = new RawRing(8);
  const log = new DirtyLog();
  const bits = new Uint8Array(64);
  log.replace(bits);
  // usedAt at the last byte of page 300: avail_event (offset 4 + 8 * 8) is on page 301.
  const usedAt = 301 * 4096 - 1;
  const q = SplitDeviceQueue.create(r.memory, { ...r.config, eventIdx: true, dirtyLog: { log, usedAt } });
  assert.ok(q instanceof SplitDeviceQueue);
  q.enableNotifications();
  assert.deepEqual(dirtyPages(bits), [301]);
});
