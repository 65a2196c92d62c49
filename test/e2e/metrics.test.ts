// `vblk serve --metrics` under a real guest: what Prometheus scrapes matches what the
// guest's fio says it did, the histogram counts every request, and promtool accepts the
// exposition. The workload runs for a stated time on the guest's clock.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { GUEST_PEERS, ensureGuest, requirePeer, startGuest, type Guest } from '../../scripts/guest/guest.js';
import { scratchDir, startServe, type Served } from './serve-helpers.js';

/** Sample lines of a Prometheus text exposition: name, labels, value. */
function parseExposition(text: string): { name: string; labels: Record<string, string>; value: number }[] {
  const out: { name: string; labels: Record<string, string>; value: number }[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert.ok(m, `not an exposition line: ${line}`);
    const labels: Record<string, string> = {};
    for (const [, k, v] of (m[2] ?? '').matchAll(/([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

async function scrape(url: string): Promise<string> {
  const res = await fetch(url);
  assert.equal(res.status, 200);
  return res.text();
}

function total(samples: ReturnType<typeof parseExposition>, name: string, labels: Record<string, string> = {}): number {
  return samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((n, s) => n + s.value, 0);
}

describe('vblk serve --metrics with a Linux guest', { skip: requirePeer(...GUEST_PEERS, 'promtool') }, () => {
  let scratch: { dir: string; cleanup(): void };
  before(async () => {
    scratch = scratchDir('vblk-metrics-e2e-');
    await ensureGuest();
  });
  after(() => scratch.cleanup());

  it('request and byte counters match fio\'s own counts, the histogram counts every request, promtool accepts it', { timeout: 300_000 }, async (t) => {
    const image = join(scratch.dir, 'disk.img');
    const socket = join(scratch.dir, 'vblk.sock');
    let serve: Served | undefined;
    let guest: Guest | undefined;
    try {
      serve = await startServe(image, socket, ['--size', '128M', '--queues', '2', '--metrics', '127.0.0.1:0']);
      const url = /metrics on (http:\/\/\S+)/.exec(await serve.waitForLog(/metrics on http/))![1];
      guest = await startGuest({
        vhostUserSockets: [{ path: socket, numQueues: 2 }],
        smp: 2,
        timeoutMs: 240_000,
        script: `set -e
# No merging: the device then sees exactly the requests fio issues.
echo 2 > /sys/block/vda/queue/nomerges
echo READY
read -r line
fio --name=m --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --rw=randrw --bs=4k --size=32M \\
    --numjobs=2 --offset_increment=64M --time_based --runtime=8 --group_reporting --output-format=json > /tmp/fio.json
echo FIO-JSON-BEGIN
cat /tmp/fio.json
echo FIO-JSON-END
`,
      });
      await guest.waitFor('READY', 120_000);
      const before = parseExposition(await scrape(url));
      guest.send('go');
      // One scrape while fio runs: the format holds under load too.
      await new Promise((r) => setTimeout(r, 3000));
      const during = await scrape(url);
      const r = await guest.done;
      assert.equal(r.exitCode, 0, `guest failed (${r.error ?? ''}):\n${r.output.split('\n').slice(-30).join('\n')}`);
      const afterText = await scrape(url);
      const afterSamples = parseExposition(afterText);

      const json = r.output.slice(r.output.indexOf('FIO-JSON-BEGIN') + 'FIO-JSON-BEGIN'.length, r.output.indexOf('FIO-JSON-END'));
      const job = (JSON.parse(json.slice(json.indexOf('{'))) as { jobs: { read: { total_ios: number; io_bytes: number }; write: { total_ios: number; io_bytes: number } }[] }).jobs[0];
      const delta = (name: string, labels: Record<string, string>) => total(afterSamples, name, labels) - total(before, name, labels);
      const reads = delta('vblk_requests_total', { type: 'read', status: 'ok' });
      const writes = delta('vblk_requests_total', { type: 'write', status: 'ok' });
      t.diagnostic(`fio: ${job.read.total_ios} reads, ${job.write.total_ios} writes; vblk: ${reads} reads, ${writes} writes`);
      assert.ok(job.read.total_ios > 100 && job.write.total_ios > 100, 'fio did some I/O');
      // The guest issues nothing but fio's I/O between the scrapes (raw device, direct I/O, no merging).
      assert.ok(Math.abs(reads - job.read.total_ios) <= 0.01 * job.read.total_ios, `reads: vblk ${reads}, fio ${job.read.total_ios}`);
      assert.ok(Math.abs(writes - job.write.total_ios) <= 0.01 * job.write.total_ios, `writes: vblk ${writes}, fio ${job.write.total_ios}`);
      assert.ok(Math.abs(delta('vblk_bytes_total', { direction: 'read' }) - job.read.io_bytes) <= 0.01 * job.read.io_bytes);
      assert.ok(Math.abs(delta('vblk_bytes_total', { direction: 'write' }) - job.write.io_bytes) <= 0.01 * job.write.io_bytes);
      // Per queue, the histogram counts each completed request once.
      for (const queue of ['0', '1']) {
        const requests = total(afterSamples, 'vblk_requests_total', { queue });
        assert.equal(total(afterSamples, 'vblk_request_duration_seconds_count', { queue }), requests, `queue ${queue}`);
        assert.equal(total(afterSamples, 'vblk_request_duration_seconds_bucket', { queue, le: '+Inf' }), requests, `queue ${queue}`);
      }
      assert.ok(total(afterSamples, 'vblk_requests_total', { queue: '1' }) > 0, 'both queues served requests');
      assert.equal(total(afterSamples, 'vblk_disk_size_bytes'), 128 * 1024 * 1024);
      assert.equal(total(afterSamples, 'vblk_frontend_connections_total'), 1);
      assert.ok(total(afterSamples, 'process_resident_memory_bytes') > 0);
      for (const text of [during, afterText]) {
        const check = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
        assert.equal(check.status, 0, `promtool check metrics: ${check.stdout}${check.stderr}`);
      }
    } finally {
      if (guest) await guest.kill();
      await serve?.stop();
    }
  });
});
