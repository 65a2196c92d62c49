/**
 * Fuzzes the virtio-blk device model (test/support/fuzz-device.ts) from the command line:
 *
 *   node dist/scripts/fuzz-device.js [--iterations N] [--seed S] [--setup X]
 *
 * N cases (default 100000) from seed S (default: random, printed). A failure prints the
 * seed of the device setup it happened in; `--setup X` runs that setup alone. Exits 1
 * when any oracle failed.
 */
import { parseArgs } from 'node:util';
import { fuzzDevice, formatReport } from '../test/support/fuzz-device.js';

const USAGE = 'usage: node dist/scripts/fuzz-device.js [--iterations N] [--seed S] [--setup X]';

function u32Option(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 0xffff_ffff) {
    process.stderr.write(`fuzz-device: --${name} must be an integer from 0 to 4294967295, got '${value}'\n${USAGE}\n`);
    process.exit(2);
  }
  return n;
}

let values;
try {
  ({ values } = parseArgs({
    options: { iterations: { type: 'string' }, seed: { type: 'string' }, setup: { type: 'string' } },
    strict: true,
  }));
} catch (e) {
  process.stderr.write(`fuzz-device: ${(e as Error).message}\n${USAGE}\n`);
  process.exit(2);
}
const iterations = u32Option('iterations', values.iterations) ?? 100_000;
const seed = u32Option('seed', values.seed) ?? (Math.random() * 0x1_0000_0000) >>> 0;
const setupSeed = u32Option('setup', values.setup);

process.stdout.write(`fuzzing the blk device: ${iterations} cases, seed ${seed}${setupSeed === undefined ? '' : `, setup ${setupSeed} only`}\n`);
const report = await fuzzDevice({ seed, iterations, setupSeed });
process.stdout.write(`${formatReport(report)}\n`);
process.exit(report.failures.length > 0 ? 1 : 0);
