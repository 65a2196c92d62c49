// The callback form of the data path: submitRead / submitWrite.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { IoError, NotSupportedError, ReadOnlyError, RequestError } from '../src/blk/driver-errors.js';
import type { BlkDriver, Completion } from '../src/blk/driver.js';
import { VIRTIO_BLK_F, VIRTIO_BLK_S } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, features } from '../src/spec/virtio.js';
import { ScriptedDevice, pattern, rig, scriptedRig } from './blk-driver-harness.js';

/** Submits through the callback API and records whether the callback ran inside the call. */
function submit(
  driver: BlkDriver, kind: 'read' | 'write', sector: number, buffers: Uint8Array[],
): Promise<{ error: Error | null; synchronous: boolean; calls: number }> {
  return new Promise((resolve) => {
    let inside = true;
    let calls = 0;
    const done: Completion = (error) => {
      calls++;
      const synchronous = inside;
      // A second call would show up as calls > 1 by the time this settles.
      setTimeout(() => resolve({ error, synchronous, calls }), 5);
    };
    if (kind === 'read') driver.submitRead(sector, buffers, done);
    else driver.submitWrite(sector, buffers, done);
    inside = false;
  });
}

test('submitWrite then submitRead move the same bytes as the promise API, split requests and DMA buffers included', async () => {
  const r = await rig({ size: 4 << 20, driver: { maxRequestBytes: 64 << 10 } });
  try {
    const data = pattern(200 * 1024, 3);
    const w = await submit(r.driver, 'write', 16, [data.subarray(0, 1000), data.subarray(1000)]);
    assert.deepEqual(w, { error: null, synchronous: false, calls: 1 });
    const back = new Uint8Array(data.length);
    const rd = await submit(r.driver, 'read', 16, [back]);
    assert.deepEqual(rd, { error: null, synchronous: false, calls: 1 });
    assert.deepEqual(back, data);
    const dma = r.driver.allocBuffer(4096);
    assert.equal((await submit(r.driver, 'read', 16, [dma])).error, null);
    assert.deepEqual(dma, data.subarray(0, 4096));
    r.driver.freeBuffer(dma);
  } finally {
    await r.close();
  }
});

test('device statuses reach the callback as the promise API\'s errors', async () => {
  const statuses = new Map<number, number>([[8, VIRTIO_BLK_S.UNSUPP], [16, VIRTIO_BLK_S.IOERR]]);
  const device = new ScriptedDevice({ answer: (q) => ({ status: statuses.get(q.sector) ?? VIRTIO_BLK_S.OK }) });
  const r = await scriptedRig(device);
  try {
    const b = (): Uint8Array[] => [new Uint8Array(512)];
    assert.equal((await submit(r.driver, 'read', 0, b())).error, null);
    const unsupp = await submit(r.driver, 'read', 8, b());
    assert.ok(unsupp.error instanceof NotSupportedError, String(unsupp.error));
    const ioerr = await submit(r.driver, 'write', 16, b());
    assert.ok(ioerr.error instanceof IoError && ioerr.error.status === VIRTIO_BLK_S.IOERR, String(ioerr.error));
    assert.equal(ioerr.calls, 1);
  } finally {
    await r.close();
  }
});

test('requests refused before the ring call back later, never from inside the submit call', async () => {
  const r = await rig({ size: 1 << 20, device: { blockSize: 4096 } });
  try {
    const misaligned = await submit(r.driver, 'read', 1, [new Uint8Array(4096)]);
    assert.ok(misaligned.error instanceof RequestError && misaligned.error.code === 'MISALIGNED');
    assert.equal(misaligned.synchronous, false);
    const past = await submit(r.driver, 'write', 2048, [new Uint8Array(4096)]);
    assert.ok(past.error instanceof RequestError && past.error.code === 'OUT_OF_RANGE');
    assert.equal(past.synchronous, false);
    // A buffer freed before its request reached a ring fails while being launched.
    const dma = r.driver.allocBuffer(4096);
    let synchronous: boolean | null = null;
    let inside = true;
    r.driver.freeBuffer(dma);
    const freed = await new Promise<Error | null>((resolve) => {
      r.driver.submitRead(0, [dma], (e) => {
        synchronous = inside;
        resolve(e);
      });
      inside = false;
    });
    assert.equal(synchronous, false);
    // A freed buffer is no longer a DMA buffer: the request bounces and succeeds.
    assert.equal(freed, null);
    assert.throws(() => r.driver.submitRead(0, [new Uint8Array(4096)], undefined as unknown as Completion), { code: 'BAD_CALLBACK' });
  } finally {
    await r.close();
  }
  const gone = await submit(r.driver, 'read', 0, [new Uint8Array(4096)]);
  assert.ok(gone.error instanceof RequestError && gone.error.code === 'DISK_REMOVED');
  assert.equal(gone.synchronous, false);
});

test('submitWrite on a read-only disk is refused before the ring', async () => {
  const device = new ScriptedDevice({ features: features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.RO) });
  const r = await scriptedRig(device);
  try {
    const w = await submit(r.driver, 'write', 0, [new Uint8Array(512)]);
    assert.ok(w.error instanceof ReadOnlyError);
    assert.equal(w.synchronous, false);
    assert.equal(device.seen.length, 0, 'nothing reached the device');
  } finally {
    await r.close();
  }
});

test('a completion that throws surfaces as an uncaught exception and leaves the driver working', () => {
  // In a child process: the exception is meant to be uncaught, which the test runner would count against this test.
  const script = fileURLToPath(new URL('./support/throwing-completion.js', import.meta.url));
  const child = spawnSync(process.execPath, [script], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(child.status, 0, child.stderr);
  assert.deepEqual(JSON.parse(child.stdout), { uncaught: ['boom from a completion'], afterwards: 'ok', dataRight: true });
});
