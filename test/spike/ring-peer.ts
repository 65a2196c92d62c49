/**
 * The other process of the ring-ordering spike (forked by ring-ordering.test.ts).
 * argv: role ('produce' | 'produce-publish-first' | 'consume'), then the JSON of the
 * producer's {@link ProduceLimits} (the consumer uses only its deadline). The ring's
 * memfd is inherited as fd 4 (the parent's stdio slot 4). Reports the outcome once over
 * IPC and exits.
 */
import * as native from '../../src/node/native.js';
import { RING_BYTES, consume, produce, ringViews, type ProduceLimits } from './ring.js';

const RING_FD = 4;

function main(): unknown {
  const [role, limitsArg] = process.argv.slice(2);
  const limits = JSON.parse(limitsArg) as ProduceLimits;
  const mapping = native.mmap(RING_FD, RING_BYTES, 0, true);
  const views = ringViews(mapping.buffer);
  try {
    switch (role) {
      case 'produce':
      case 'produce-publish-first':
        return { produced: produce(views, limits, role === 'produce-publish-first') };
      case 'consume':
        return consume(views, limits.deadline);
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
