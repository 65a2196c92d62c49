/**
 * The other process of the ring-ordering spike (forked by ring-ordering.test.ts).
 * argv: role ('produce' | 'produce-publish-first' | 'consume'), count, deadline (ms
 * since the epoch). The ring's memfd is inherited as fd 4 (the parent's stdio slot 4).
 * Reports the outcome once over IPC and exits.
 */
import * as native from '../../src/node/native.js';
import { RING_BYTES, consume, produce, ringViews } from './ring.js';

const RING_FD = 4;

function main(): unknown {
  const [role, countArg, deadlineArg] = process.argv.slice(2);
  const count = Number(countArg);
  const deadline = Number(deadlineArg);
  const mapping = native.mmap(RING_FD, RING_BYTES, 0, true);
  const views = ringViews(mapping.buffer);
  try {
    switch (role) {
      case 'produce':
      case 'produce-publish-first':
        produce(views, count, deadline, role === 'produce-publish-first');
        return { produced: count };
      case 'consume':
        return consume(views, count, deadline);
      default:
        throw new Error(`ring-peer: unknown role ${role}`);
    }
  } finally {
    native.munmap(mapping.buffer);
  }
}

let report: unknown;
try {
  report = { ok: main() };
} catch (e) {
  report = { error: e instanceof Error ? e.message : String(e) };
}
process.send?.(report, () => process.disconnect());
