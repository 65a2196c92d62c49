// The whole benchmark suite against real peers (vblk serve, qemu-storage-daemon, fio, qemu-nbd),
// shrunk to tiny images and runtimes: it runs, and its JSON is well formed. No figure is
// asserted: benchmarks are never judged by wall-clock in tests.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GUEST_PEERS, requirePeer } from '../../scripts/guest/guest.js';

const RUN = fileURLToPath(new URL('../../bench/run.js', import.meta.url));

test('npm run bench: every section runs against real peers and writes well-formed JSON',
  { skip: requirePeer('qemu-storage-daemon', 'fio', 'qemu-nbd', 'qemu-img', ...GUEST_PEERS), timeout: 600_000 }, () => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-bench-smoke-'));
    try {
      const out = join(dir, 'results.json');
      const r = spawnSync(process.execPath, [
        RUN, '--runtime', '0.2', '--image-size', '32M', '--sparse-size', '1G', '--iodepths', '1,8', '--queues', '1', '--rounds', '2', '--migration-rounds', '1',
        '--out', out, '--dir', join(dir, 'scratch'),
      ], { encoding: 'utf8', timeout: 590_000 });
      assert.equal(r.status, 0, `${r.signal ?? ''} ${r.error?.message ?? ''}\n${r.stderr}`);
      const results = JSON.parse(readFileSync(out, 'utf8'));
      assert.deepEqual(results.skipped, []);
      assert.equal(results.loopback.length, 4);
      // 4 backends × 5 patterns, one queue count (metrics on has its row in versus only).
      assert.equal(results.peers.length, 20);
      assert.deepEqual(new Set(results.peers.map((x: { backend: string }) => x.backend)),
        new Set(['vblk-serve', 'vblk-serve-mmap', 'qsd', 'qsd-io_uring']));
      for (const row of results.peers) {
        assert.ok(row.iops > 0 && row.backend_cpu_us_per_io > 0 && row.driver_cpu_us_per_io > 0 && row.backend_rss_bytes > 0, JSON.stringify(row));
      }
      // 2 rounds × 4 backends, each round in a different order; ratios to io_uring per backend,
      // and of serve with metrics to serve without.
      assert.equal(results.versus.length, 8);
      assert.deepEqual(results.versus.map((x: { backend: string }) => x.backend), [
        'vblk-serve', 'vblk-serve-mmap', 'vblk-serve-metrics', 'qsd-io_uring',
        'vblk-serve-mmap', 'vblk-serve-metrics', 'qsd-io_uring', 'vblk-serve',
      ]);
      for (const row of results.versus) assert.ok(row.iops > 0 && row.backend_cpu_us_per_io > 0, JSON.stringify(row));
      assert.deepEqual(results.versus_summary.map((x: { backend: string; base: string }) => `${x.backend}/${x.base}`),
        ['vblk-serve/qsd-io_uring', 'vblk-serve-mmap/qsd-io_uring', 'vblk-serve-metrics/qsd-io_uring', 'vblk-serve-metrics/vblk-serve']);
      for (const x of results.versus_summary) {
        assert.ok(x.iops_ratio.min > 0 && x.iops_ratio.min <= x.iops_ratio.median && x.iops_ratio.median <= x.iops_ratio.max, JSON.stringify(x));
      }
      const serveTarget = results.targets.find((t: { name: string }) => t.name.startsWith('vblk serve / qsd aio=io_uring IOPS'));
      assert.equal(serveTarget.value, results.versus_summary[0].iops_ratio.median);
      assert.equal(results.fio.length, 6);
      for (const row of results.fio) assert.ok(row.iops > 0 && row.client_cpu_us_per_io > 0, JSON.stringify(row));
      // 2 images × 1 queue count × 2 iodepths.
      assert.equal(results.scaling.length, 4);
      assert.deepEqual(results.scaling.map((x: { image: string; iodepth: number }) => `${x.image} ${x.iodepth}`), ['data 1', 'data 8', 'sparse 1', 'sparse 8']);
      // The throttle filter at two limits.
      assert.equal(results.filters.length > 0, true);
      // 2 rounds × 3 NBD-sourced backends × 2 patterns; medians and ratios to qsd's nbd driver.
      assert.equal(results.nbd.length, 12);
      for (const row of results.nbd) assert.ok(row.iops > 0 && row.backend_cpu_us_per_io > 0 && row.server_cpu_us_per_io > 0, JSON.stringify(row));
      assert.deepEqual(results.nbd_summary.map((x: { backend: string; rw: string }) => `${x.backend} ${x.rw}`), [
        'vblk-serve-nbd randread', 'vblk-serve-nbd randwrite', 'vblk-serve-nbd-4 randread', 'vblk-serve-nbd-4 randwrite', 'qsd-nbd randread', 'qsd-nbd randwrite',
      ]);
      // 2 rounds × 2 backends × 3 qcow2 workloads; medians and ratios to the daemon's qcow2 driver.
      assert.equal(results.qcow2.length, 12);
      for (const row of results.qcow2) assert.ok(row.iops > 0 && row.backend_cpu_us_per_io > 0, JSON.stringify(row));
      assert.deepEqual(results.qcow2_summary.map((x: { workload: string; backend: string }) => `${x.workload} ${x.backend}`), [
        'randread vblk-serve-qcow2', 'randread qsd-qcow2-io_uring', 'randwrite vblk-serve-qcow2', 'randwrite qsd-qcow2-io_uring',
        'read-compressed vblk-serve-qcow2', 'read-compressed qsd-qcow2-io_uring',
      ]);
      // One round: a guest under fio migrated once with each backend, and the downtimes.
      assert.deepEqual(results.migration.map((x: { backend: string }) => x.backend), ['vblk-serve', 'qsd']);
      for (const row of results.migration) assert.ok(Number.isInteger(row.downtime_ms) && row.total_ms > 0 && row.total_ms >= row.downtime_ms, JSON.stringify(row));
      assert.deepEqual(results.migration_summary.map((x: { backend: string; downtime_ratio: number | null }) => [x.backend, x.downtime_ratio === null]),
        [['vblk-serve', false], ['qsd', true]]);
      // IOPS and CPU for serve and for serve --io mmap, metrics on/off, driver CPU, RSS, two
      // throttle limits; IOPS and CPU of the two NBD-sourced vblk serves, for reads and writes;
      // IOPS and CPU of vblk serve on qcow2, for random reads and random writes; the
      // migration downtime.
      assert.equal(results.targets.length, 9 + 8 + 4 + 1);
      for (const t of results.targets) assert.equal(typeof t.met, 'boolean', JSON.stringify(t));
      assert.match(r.stdout, /^Targets$/m);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
