// The benchmark suite runs and writes well-formed JSON: the loopback section, with tiny
// runtimes. No figure is asserted (benchmarks are never judged by wall-clock in tests);
// test/e2e/bench-smoke.test.ts runs the sections that need qemu-storage-daemon and fio.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const RUN = fileURLToPath(new URL('./run.js', import.meta.url));

test('npm run bench --only loopback prints the table and writes the same rows as JSON', () => {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-bench-test-'));
  try {
    const out = join(dir, 'results.json');
    const r = spawnSync(process.execPath, [RUN, '--only', 'loopback', '--runtime', '0.2', '--out', out], { encoding: 'utf8', timeout: 60_000 });
    assert.equal(r.status, 0, r.stderr);
    const results = JSON.parse(readFileSync(out, 'utf8'));
    assert.equal(results.loopback.length, 4);
    for (const row of results.loopback) {
      assert.ok(row.iops > 0 && row.baseline_iops > 0 && row.ratio > 0, JSON.stringify(row));
      assert.ok(row.lat_us.p99 >= row.lat_us.p50 && row.cpu_us_per_io > 0, JSON.stringify(row));
    }
    assert.deepEqual([results.peers, results.versus, results.fio, results.scaling, results.filters], [[], [], [], [], []]);
    // The loopback ratio is reported, never judged against a target.
    assert.deepEqual(results.targets.filter((t: { name: string }) => /loopback/.test(t.name)), []);
    assert.match(r.stdout, /\| EVENT_IDX \+ INDIRECT \| zero copy \|/);
    assert.match(r.stdout, /npm run bench -- --only loopback --runtime 0\.2/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('npm run bench --only filters measures each stack and checks the throttle against its limit', () => {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-bench-test-'));
  try {
    const out = join(dir, 'results.json');
    const r = spawnSync(process.execPath, [RUN, '--only', 'filters', '--runtime', '0.2', '--out', out], { encoding: 'utf8', timeout: 60_000 });
    assert.equal(r.status, 0, r.stderr);
    const results = JSON.parse(readFileSync(out, 'utf8'));
    assert.deepEqual(results.filters.map((f: { filters: string }) => f.filters), ['none', 'stats', 'throttle:iops=2000', 'throttle:iops=20000']);
    for (const row of results.filters) assert.ok(row.iops > 0, JSON.stringify(row));
    const limited = results.targets.filter((t: { name: string }) => t.name.startsWith('throttle'));
    assert.equal(limited.length, 2);
    assert.match(r.stdout, /\| throttle:iops=2000 +\|/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('bad options are refused with one line', () => {
  const r = spawnSync(process.execPath, [RUN, '--only', 'nothing'], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(r.status, 1);
  assert.equal(r.stderr, "bench: unknown section 'nothing' (loopback, peers, versus, fio, scaling, filters, nbd, qcow2, migration)\n");
});
