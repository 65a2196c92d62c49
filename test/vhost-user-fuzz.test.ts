/**
 * The vhost-user fuzzer (scripts/fuzz-vhost-user.ts) as a test: a bounded run against
 * the server must end with exit 0 (no crash, wedge, fd leak or double close), and plans
 * must be reproducible from the seed. Longer runs are for the command line:
 * `node dist/scripts/fuzz-vhost-user.js --iterations 30000 --seed S`.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';

const here = dirname(fileURLToPath(import.meta.url));
const FUZZER = resolve(here, '../scripts/fuzz-vhost-user.js');
const HAS_SERVE = existsSync(resolve(here, '../src/cli/serve.js'));

function fuzz(args: string[], timeoutMs: number): { status: number | null; out: string } {
  const r = spawnSync(process.execPath, [FUZZER, ...args], { encoding: 'utf8', timeout: timeoutMs });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

test('the same seed gives the same plans, another seed other plans', () => {
  const digest = (seed: string): string => JSON.parse(fuzz(['--dry-run', '--seed', seed, '--iterations', '300'], 30_000).out).digest;
  assert.equal(digest('42'), digest('42'));
  assert.notEqual(digest('42'), digest('43'));
});

/**
 * Every run covers the same iterations, on any machine: they all run (a few seconds
 * here), and the time limit is only a hang guard, with the child's timeout beyond it.
 */
const ITERATIONS = 1500;
const TIME_LIMIT_S = 240;

for (const server of ['child', 'cli']) {
  const name = `${ITERATIONS} fuzzed frontends against the ${server === 'cli' ? '`vblk serve` CLI' : 'server child'}: no crash, wedge or leak`;
  test(name, { skip: server === 'cli' && !HAS_SERVE ? 'the CLI has no serve command yet' : false }, () => {
    const { status, out } = fuzz(['--iterations', String(ITERATIONS), '--seed', server === 'cli' ? '20240607' : '1', '--server', server,
      '--check-every', '100', '--time-limit', String(TIME_LIMIT_S), '--json'], (TIME_LIMIT_S + 60) * 1000);
    assert.equal(status, 0, out);
    const report = JSON.parse(out.trim().split('\n').pop() ?? '{}');
    assert.deepEqual(report.failures, []);
    assert.equal(report.iterations, ITERATIONS, `only ${report.iterations} iterations ran in the ${TIME_LIMIT_S} s time limit (a hang guard)`);
    assert.ok(report.droppedByServer > 0 && report.closedByFrontend > 0 && report.ringsStopped > 0, JSON.stringify(report));
    assert.ok(report.wellBehavedChecks >= report.iterations / 100, JSON.stringify(report));
  });
}

test('bad arguments exit 2', () => {
  assert.equal(fuzz(['--iterations', 'many'], 10_000).status, 2);
});
