import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const MAIN = fileURLToPath(new URL('./main.js', import.meta.url));

function vblk(...args: string[]) {
  return spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', timeout: 60_000 });
}

test('vblk bench --loopback --runtime 1 --json prints one JSON line with iops > 0 and no errors', () => {
  const r = vblk('bench', '--loopback', '--runtime', '1', '--json', '--size', '8M');
  assert.equal(r.status, 0, r.stderr);
  const lines = r.stdout.split('\n').filter(Boolean);
  assert.equal(lines.length, 1, r.stdout);
  const result = JSON.parse(lines[0]);
  assert.ok(result.iops > 0);
  assert.equal(result.errors, 0);
  assert.ok(result.bw_bytes > 0);
  assert.ok(result.lat_us.p50 > 0 && result.lat_us.p99 >= result.lat_us.p50);
  assert.ok(result.baseline_iops > 0);
  assert.ok(result.ratio > 0);
  assert.equal(result.rw, 'randread');
  assert.equal(result.bs, 4096);
  assert.equal(result.iodepth, 32);
});

test('vblk bench writes and sequential patterns run too (human summary)', () => {
  const r = vblk('bench', '--loopback', '--rw', 'write', '--bs', '64k', '--iodepth', '4', '--queues', '2', '--runtime', '0.3', '--size', '4M');
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^vblk bench: loopback, write, bs 64K, iodepth 4, queues 2/);
  assert.match(r.stdout, /iops +\d+/);
});

test('bad options give a one-line error and a non-zero exit status', () => {
  for (const [args, message] of [
    [['bench', '--loopback', '--iodepth', 'x'], "vblk bench: --iodepth must be a positive integer, got 'x'"],
    [['bench', '--loopback', '--bs', '1000'], 'vblk bench: --bs must be a multiple of 512, got 1000'],
    [['bench', '--loopback', '--rw', 'sideways'], "vblk bench: --rw must be one of randread, randwrite, read, write, got 'sideways'"],
    [['bench'], 'vblk bench: give exactly one of --socket PATH or --loopback'],
    [['bench', '--loopback', '--socket', '/nonexistent'], 'vblk bench: give exactly one of --socket PATH or --loopback'],
    [['bench', '--loopback', '--frob'], 'vblk bench: unknown option --frob (see vblk bench --help)'],
  ] as const) {
    const r = vblk(...args);
    assert.notEqual(r.status, 0, args.join(' '));
    assert.equal(r.stdout, '');
    assert.equal(r.stderr, `${message}\n`);
  }
});
