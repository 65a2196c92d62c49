import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SplitDriverQueue } from './split-driver.js';
import { SplitDeviceQueue } from './split-device.js';
import { ChainError } from './chain.js';
import { QueueSetupError } from './ring-views.js';
import { RawRing } from './testing.js';
import { VIRTQ_DESC_F, VIRTQ_DESC_SIZE } from '../spec/split-ring.js';

/** A 4-entry ring with indirect tables of 4 entries, driver and device side over it. */
function pair(): { r: RawRing; driver: SplitDriverQueue<string>; device: SplitDeviceQueue; tables: number } {
  const r = new RawRing(4, { indirect: true });
  const tables = r.dataBase;
  const driver = SplitDriverQueue.create<string>(r.memory, r.config, { addr: tables, entries: 4 });
  const device = SplitDeviceQueue.create(r.memory, r.config);
  assert.ok(!(driver instanceof QueueSetupError) && !(device instanceof QueueSetupError));
  return { r, driver, device, tables };
}

function chain(at: number): { out: { addr: number; len: number }[]; inp: { addr: number; len: number }[] } {
  return { out: [{ addr: at, len: 16 }], inp: [{ addr: at + 16, len: 512 }, { addr: at + 528, len: 1 }] };
}

function descFlags(r: RawRing, i: number): number {
  const { bytes, guestAddress } = r.memory.regions[0];
  return new DataView(bytes.buffer, bytes.byteOffset).getUint16(r.config.desc - guestAddress + i * VIRTQ_DESC_SIZE + 12, true);
}

test('chains go direct while the ring has room, through an indirect table once it runs short', () => {
  const { r, driver, device } = pair();
  const data = r.dataBase + 4096;
  const a = chain(data);
  const b = chain(data + 4096);
  assert.equal(driver.add(a.out, a.inp, 'a'), true);
  assert.equal(driver.numFree, 1, 'three descriptors of the ring for the direct chain');
  assert.equal(descFlags(r, 0) & VIRTQ_DESC_F.INDIRECT, 0);
  assert.equal(driver.add(b.out, b.inp, 'b'), true);
  assert.equal(driver.numFree, 0, 'one descriptor for the indirect chain');
  assert.equal(descFlags(r, 3), VIRTQ_DESC_F.INDIRECT);
  assert.equal(driver.add(a.out, a.inp, 'c'), false, 'no descriptor left at all');
  driver.kickPrepare();

  for (const [head, at] of [[0, data], [3, data + 4096]]) {
    const c = device.pop();
    assert.ok(c !== null && !(c instanceof ChainError));
    assert.equal(c.head, head);
    assert.equal(c.readableBytes, 16);
    assert.equal(c.writableBytes, 513);
    const region = r.memory.regions[0];
    assert.equal(c.readable[0].byteOffset - region.bytes.byteOffset, at - region.guestAddress);
    device.pushUsed(c.head, 513);
  }
  device.publishUsed();
  const used = [driver.getUsed(), driver.getUsed()];
  assert.deepEqual(used, [{ token: 'a', len: 513 }, { token: 'b', len: 513 }]);
  assert.equal(driver.numFree, 4, 'both chains gave their descriptors back');
});
