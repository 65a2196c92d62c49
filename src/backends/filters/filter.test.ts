// A filter forwards everything it does not change: capabilities, the optional members
// exactly when the backend below has them, and the operations.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BackendResult, BlockBackend } from '../backend.js';
import { MemoryBackend } from '../memory-backend.js';
import { FilterBackend } from './filter.js';

class Plain extends FilterBackend {}

test('capabilities and hints come from the backend below, read when asked', () => {
  const inner = Object.assign(new MemoryBackend({ size: 1 << 20, readOnly: true }), {
    blockSize: { minimum: 4096, preferred: 4096, maximum: 1 << 20 },
    concurrency: 'serial' as const,
  });
  const f = new Plain(inner);
  assert.equal(f.size, 1 << 20);
  assert.equal(f.readOnly, true);
  assert.ok(f.canFlush && f.canDiscard && f.canWriteZeroes);
  assert.deepEqual(f.blockSize, inner.blockSize);
  assert.equal(f.concurrency, 'serial');
  inner.resize(2 << 20);
  assert.equal(f.size, 2 << 20);
});

test('optional members exist exactly when the backend below has them', async () => {
  const memory = new Plain(new MemoryBackend({ size: 1 << 20 }));
  assert.ok(memory.resize && memory.extents);
  assert.equal(memory.open, undefined);
  await memory.resize(2 << 20);
  assert.equal(memory.size, 2 << 20);
  assert.deepEqual(memory.extents(0, 4096), [{ length: 4096, kind: 'hole' }]);

  let opened = 0;
  const bare: BlockBackend = {
    size: 512, readOnly: false, canFlush: false, canDiscard: false, canWriteZeroes: false,
    read: () => undefined, write: () => undefined, flush: () => undefined, discard: () => undefined,
    writeZeroes: () => undefined, close: () => undefined,
    open(): BackendResult {
      opened++;
    },
  };
  const f = new Plain(bare);
  assert.equal(f.resize, undefined);
  assert.equal(f.extents, undefined);
  assert.equal(f.blockSize, undefined);
  assert.equal(f.concurrency, undefined);
  f.open?.();
  assert.equal(opened, 1);
});

test('operations and close go to the backend below', async () => {
  const inner = new MemoryBackend({ size: 1 << 20 });
  const f = new Plain(inner);
  f.write(512, [new Uint8Array(512).fill(3)]);
  const back = new Uint8Array(512);
  inner.read(512, [back]);
  assert.deepEqual(back, new Uint8Array(512).fill(3));
  f.writeZeroes(512, 512, false);
  f.read(512, [back]);
  assert.deepEqual(back, new Uint8Array(512));
  f.close();
  assert.throws(() => inner.flush(), { code: 'CLOSED' });
});
