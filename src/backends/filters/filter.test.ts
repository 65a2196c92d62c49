// A filter forwards everything it does not change: capabilities, the optional members
// exactly when the backend below has them, and the operations.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BackendResult, BlockBackend } from '../backend.js';
import { MemoryBackend } from '../memory-backend.js';
import { FilterBackend } from './filter.js';
import { FILTER_HELP, applyFilters, parseFilterSpec, type FilterName } from './registry.js';

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

test('every filter but cow keeps the FUA of a backend that has it: canFua, and the flag on each write', async () => {
  const seen: (boolean | undefined)[] = [];
  class FuaBackend extends MemoryBackend {
    readonly canFua = true;
    override write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
      seen.push(fua);
      return super.write(offset, buffers);
    }
  }
  for (const name of Object.keys(FILTER_HELP) as FilterName[]) {
    // Options that let every write through at once.
    const spec = parseFilterSpec({ cow: 'cow', error: 'error:rate=0', delay: 'delay:write=1ms', throttle: 'throttle:iops=1000000', stats: 'stats' }[name]);
    const f = applyFilters(new FuaBackend({ size: 1 << 20 }), [spec]);
    seen.length = 0;
    await f.write(0, [new Uint8Array(512)], true);
    await f.write(512, [new Uint8Array(512)], false);
    if (name === 'cow') {
      assert.equal(f.canFua, false, 'cow: its writes go to a throwaway overlay');
      assert.deepEqual(seen, [], 'cow wrote to the source');
    } else {
      assert.equal(f.canFua, true, `${name}: canFua`);
      assert.deepEqual(seen, [true, false], `${name}: the fua flag of each write`);
    }
  }
  // And a backend without FUA stays without it behind a filter.
  assert.equal(applyFilters(new MemoryBackend({ size: 1 << 20 }), [parseFilterSpec('stats')]).canFua, false);
});
