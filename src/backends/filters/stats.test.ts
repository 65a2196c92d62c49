// The statistics filter counts operations, bytes and failures per kind, synchronous and
// asynchronous alike, and a snapshot does not move afterwards.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BackendResult } from '../backend.js';
import { MemoryBackend } from '../memory-backend.js';
import { FilterBackend } from './filter.js';
import { StatsFilter } from './stats.js';

/** Completes writes asynchronously. */
class AsyncWrites extends FilterBackend {
  override write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return Promise.resolve().then(() => this.inner.write(offset, buffers));
  }
}

test('counts operations, bytes and errors per kind', async () => {
  const stats = new StatsFilter(new AsyncWrites(new MemoryBackend({ size: 1 << 20 })));
  stats.read(0, [new Uint8Array(512), new Uint8Array(1024)]);
  await stats.write(4096, [new Uint8Array(4096)]);
  await assert.rejects(Promise.resolve(stats.write(1 << 20, [new Uint8Array(512)])), { code: 'OUT_OF_RANGE' });
  assert.throws(() => stats.read(1 << 20, [new Uint8Array(512)]), { code: 'OUT_OF_RANGE' });
  stats.flush();
  stats.discard(0, 8192);
  stats.writeZeroes(0, 512, true);
  const before = stats.snapshot();
  assert.deepEqual(before, {
    read: { ops: 2, bytes: 2048, errors: 1 },
    write: { ops: 2, bytes: 4608, errors: 1 },
    flush: { ops: 1, bytes: 0, errors: 0 },
    discard: { ops: 1, bytes: 8192, errors: 0 },
    zero: { ops: 1, bytes: 512, errors: 0 },
  });
  stats.flush();
  assert.equal(before.flush.ops, 1, 'a snapshot is a copy');
  assert.equal(stats.snapshot().flush.ops, 2);
});

test('a synchronous operation stays synchronous', () => {
  const stats = new StatsFilter(new MemoryBackend({ size: 1 << 20 }));
  assert.equal(stats.write(0, [new Uint8Array(512)]), undefined);
});
