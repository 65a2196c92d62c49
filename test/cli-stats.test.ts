// `vblk stats` against a real `vblk serve` with our driver's benchmark as its frontend,
// and its arithmetic on known snapshots; bad `--metrics` values get one line.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { STAT_STATUSES, STAT_TYPES, LATENCY_BUCKETS, type QueueStatsSnapshot } from '../src/blk/stats.js';
import { intervalFigures } from '../src/cli/stats.js';
import { CLI, runCli, scratchDir, startServe } from './e2e/serve-helpers.js';

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-cli-stats-');
});
after(() => scratch.cleanup());

function snapshot(reads: number, writes: number, latencies: number[], inFlight = 0): QueueStatsSnapshot {
  const requests = new Array<number>(STAT_TYPES.length * STAT_STATUSES.length).fill(0);
  requests[STAT_TYPES.indexOf('read') * STAT_STATUSES.length] = reads;
  requests[STAT_TYPES.indexOf('write') * STAT_STATUSES.length] = writes;
  const latencyBuckets = new Array<number>(LATENCY_BUCKETS.length + 1).fill(0);
  for (const s of latencies) latencyBuckets[LATENCY_BUCKETS.findIndex((b) => s <= b)]++;
  return { requests, bytesRead: reads * 4096, bytesWritten: writes * 4096, latencyBuckets, latencySum: 0, inFlight };
}

test('rates, bandwidth and percentiles come from the difference of two snapshots', () => {
  const a = snapshot(1000, 500, Array(10).fill(0.0001));
  const b = snapshot(3000, 1500, [...Array(10).fill(0.0001), ...Array(98).fill(0.00005), 0.01, 0.01], 4);
  const f = intervalFigures([a], [b], 2);
  assert.equal(f.readIops, 1000);
  assert.equal(f.writeIops, 500);
  assert.equal(f.readBytesPerSecond, 1000 * 4096);
  // Percentiles are the bounds of the buckets the latencies fell in.
  assert.equal(f.p50, LATENCY_BUCKETS.find((b) => 0.00005 <= b));
  assert.equal(f.p99, LATENCY_BUCKETS.find((b) => 0.01 <= b));
  assert.equal(f.inFlight, 4);
  assert.equal(intervalFigures([b], [b], 1).p50, null, 'no request in the interval: no percentile');
});

test('vblk stats --json reports the reads of a running benchmark', { timeout: 120_000 }, async () => {
  const image = join(scratch.dir, 'disk.img');
  const socket = join(scratch.dir, 's.sock');
  const control = join(scratch.dir, 'c.sock');
  const serve = await startServe(image, socket, ['--size', '16M', '--queues', '1', '--control', control]);
  // A benchmark that runs until it is stopped, so stats always samples it at work.
  const bench = spawn(process.execPath, [CLI, 'bench', '--socket', socket, '--rw', 'randread', '--runtime', '600', '--no-baseline'], { stdio: 'ignore' });
  try {
    await serve.waitForLog(/frontend \d+ connected/, 60_000);
    let reads = 0;
    // The first sample may land before the benchmark's first request: look again, a bounded number of times.
    for (let i = 0; i < 20 && reads === 0; i++) {
      const r = await runCli(['stats', '--control', control, '--json']);
      assert.equal(r.code, 0, r.stderr);
      const out = JSON.parse(r.stdout.toString()) as { sockets: { socket: string; connected: boolean; all: { readIops: number } }[] };
      assert.equal(out.sockets[0].socket, socket);
      reads = out.sockets[0].all.readIops;
    }
    assert.ok(reads > 0, 'vblk stats saw no reads while the benchmark ran');
    const text = await runCli(['stats', '--control', control]);
    assert.match(text.stdout.toString(), /read\/s/);
  } finally {
    bench.kill('SIGKILL');
    await serve.stop();
  }
});

test('--metrics wants HOST:PORT', async () => {
  for (const bad of ['9100', 'localhost', 'host:99999', '[::1]9100']) {
    const r = await runCli(['serve', join(scratch.dir, 'm.img'), '--size', '1M', '--socket', join(scratch.dir, 'm.sock'), '--metrics', bad]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr.trim(), /^vblk serve: --metrics wants HOST:PORT/);
  }
});
