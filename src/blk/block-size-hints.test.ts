import { test } from 'node:test';
import assert from 'node:assert/strict';
import { NO_MAXIMUM_BLOCK_SIZE } from '../backends/backend.js';
import { topologyFromHints } from './block-size-hints.js';

test('a 4 KiB physical block behind 512-byte sectors is exponent 3', () => {
  assert.deepEqual(topologyFromHints({ minimum: 4096, preferred: 4096, maximum: 1 << 20 }, 512),
    { physicalBlockExp: 3, minIoSize: 8, optIoSize: 2048 });
});

test('on 4 KiB logical blocks the same hints count 4 KiB blocks', () => {
  assert.deepEqual(topologyFromHints({ minimum: 4096, preferred: 65536, maximum: 1 << 20 }, 4096),
    { physicalBlockExp: 0, minIoSize: 16, optIoSize: 256 });
});

test('a minimum below the logical block gives no physical exponent, a small preferred no min_io_size', () => {
  assert.deepEqual(topologyFromHints({ minimum: 1, preferred: 512, maximum: 8192 }, 4096),
    { physicalBlockExp: 0, minIoSize: 0, optIoSize: 2 });
});

test('no maximum gives no opt_io_size (Linux would size its readahead on it)', () => {
  assert.equal(topologyFromHints({ minimum: 512, preferred: 4096, maximum: NO_MAXIMUM_BLOCK_SIZE }, 512).optIoSize, 0);
  assert.equal(topologyFromHints({ minimum: 512, preferred: 4096, maximum: 2 ** 40 }, 512).optIoSize, 0);
});

test('min_io_size stays inside its u16 field', () => {
  assert.equal(topologyFromHints({ minimum: 512, preferred: 32 << 20, maximum: 32 << 20 }, 512).minIoSize, 2 ** 15);
});

test('hints outside their bounds are refused with a readable error', () => {
  const bad = [
    { minimum: 0, preferred: 4096, maximum: 4096 },
    { minimum: 3000, preferred: 4096, maximum: 4096 },
    { minimum: 128 * 1024, preferred: 128 * 1024, maximum: 128 * 1024 },
    { minimum: 512, preferred: 256, maximum: 4096 },
    { minimum: 4096, preferred: 2048, maximum: 4096 },
    { minimum: 512, preferred: 64 << 20, maximum: 64 << 20 },
    { minimum: 512, preferred: 4096, maximum: 2048 },
    { minimum: 4096, preferred: 4096, maximum: 6144 },
    { minimum: 512, preferred: 4096, maximum: Number.NaN },
  ];
  for (const hints of bad) {
    assert.throws(() => topologyFromHints(hints, 512), (e: Error & { code?: string }) =>
      e.code === 'BAD_BLOCK_SIZE_HINTS' && /block size hints/.test(e.message) && !e.message.includes('\n'), JSON.stringify(hints));
  }
});
