// Every filter is a backend, so every filter passes the backend compliance suite — over
// a memory backend, alone and stacked, configured so that it lets everything through
// (the error filter fails nothing, the throttle's limits are far above what the suite
// asks, the delays are short).
import { MemoryBackend } from '../memory-backend.js';
import { backendComplianceSuite } from '../../testing/backend-compliance.js';
import type { BlockBackend } from '../backend.js';
import { CowFilter } from './cow.js';
import { DelayFilter } from './delay.js';
import { ErrorFilter } from './error.js';
import { StatsFilter } from './stats.js';
import { ThrottleFilter } from './throttle.js';
import { applyFilters, parseFilterSpec } from './registry.js';

function suite(name: string, wrap: (inner: BlockBackend) => BlockBackend, readOnlyToo = true): void {
  backendComplianceSuite(name, (size) => ({
    backend: wrap(new MemoryBackend({ size })),
    readOnly: readOnlyToo ? () => ({ backend: wrap(new MemoryBackend({ size, readOnly: true })), sameData: false }) : undefined,
  }), { expectCodes: true });
}

suite('stats filter', (b) => new StatsFilter(b));
suite('error filter (sectors no request touches)', (b) => new ErrorFilter(b, { sectors: [{ first: 2 ** 40, last: 2 ** 40 }] }));
suite('error filter (rate 0)', (b) => new ErrorFilter(b, { rate: 0 }));
suite('delay filter', (b) => new DelayFilter(b, { read: 1, write: 1, flush: 1, discard: 0, zero: 1 }));
suite('throttle filter (limits never reached)', (b) => new ThrottleFilter(b, { iops: 1e9, bps: 1e15 }));
// A real limit: the suite's operations wait for tokens and go through the queue.
suite('throttle filter (waiting)', (b) => new ThrottleFilter(b, { iops: 20_000, burst: 0 }));
// The copy-on-write filter is never read-only, whatever its base: no read-only twin.
suite('cow filter (memory overlay)', (b) => new CowFilter(b), false);
suite('cow filter (512-byte blocks)', (b) => new CowFilter(b, { granularity: 512 }), false);
suite('cow filter (1 MiB blocks, larger than some requests)', (b) => new CowFilter(b, { granularity: 1 << 20 }), false);
suite('cow filter over a read-only base', (b) => new CowFilter(new MemoryBackend({ size: b.size, readOnly: true })), false);
suite('a stack: stats, error, delay, throttle, cow', (b) => applyFilters(b, [
  'stats', 'error:rate=0', 'delay:write=1', 'throttle:iops=1000000', 'cow:block=4K',
].map(parseFilterSpec)), false);
