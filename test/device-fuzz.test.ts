// The virtio-blk device under the fuzzer (test/support/fuzz-device.ts): 100 000 cases
// from a fixed seed, so CI always covers the same ground, and 100 000 from a random seed,
// printed in the test's name, so every run also explores somewhere new. A failure is
// reproduced with `node dist/scripts/fuzz-device.js --seed S` (or `--setup X` from
// the failure report); longer runs the same way with `--iterations 10000000`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fuzzDevice, formatReport, type FuzzReport } from './support/fuzz-device.js';

const CASES = 100_000;
const FIXED_SEED = 0x5eed_b10c;
const randomSeed = (Math.random() * 0x1_0000_0000) >>> 0;

async function fuzz(seed: number, diagnostic: (line: string) => void): Promise<FuzzReport> {
  const report = await fuzzDevice({ seed, iterations: CASES });
  for (const line of formatReport(report).split('\n')) diagnostic(line);
  assert.equal(report.failures.length, 0, formatReport(report));
  assert.ok(report.cases >= CASES, `ran only ${report.cases} cases`);
  return report;
}

test(`${CASES} fuzz cases from the fixed seed ${FIXED_SEED}: no oracle fails, and every kind of case was run`, async (t) => {
  const r = await fuzz(FIXED_SEED, (l) => t.diagnostic(l));
  // The fuzzer must not quietly degrade into testing little: each outcome, most ring
  // faults, out-of-order completions and every corruption showed up.
  for (const outcome of ['ok', 'ioerr', 'unsupp', 'no-status']) assert.ok((r.outcomes[outcome] ?? 0) > 100, `few ${outcome} cases`);
  const faults = Object.keys(r.outcomes).filter((k) => k.startsWith('needs-reset:'));
  assert.ok(faults.length >= 9, `only ${faults.join(', ')}`);
  assert.ok(Object.keys(r.corruptions).length >= 14, `only ${Object.keys(r.corruptions).join(', ')}`);
  assert.ok(r.asyncBatches > 1000, `only ${r.asyncBatches} out-of-order batches`);
});

test(`${CASES} fuzz cases from the random seed ${randomSeed}: no oracle fails`, async (t) => {
  await fuzz(randomSeed, (l) => t.diagnostic(l));
});
