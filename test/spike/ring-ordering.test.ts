/**
 * Spike: does the memory-ordering contract of DESIGN.md hold on mmap'd, non-shared
 * ArrayBuffers against another process? A producer and a consumer in two processes
 * share a ring in a memfd (see ring.ts); payloads are written with plain stores and
 * indices published with Atomics.store, read with Atomics.load. Zero torn, stale or
 * overwritten payloads over up to hundreds of thousands of handoffs, in both directions,
 * is what the ring-index module (src/virtqueue/ring-index.ts) builds on.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fork } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import * as native from '../../src/node/native.js';
import { RING_BYTES, RING_SLOTS, consume, produce, ringViews } from './ring.js';
import type { ConsumeResult, ProduceLimits } from './ring.js';

/**
 * The handoffs run for a stated time, not a count raced against a clock: at least
 * MIN_HANDOFFS (sixteen laps of the ring, however slow or loaded the machine), then
 * for HANDOFF_MS or until MAX_HANDOFFS, whichever comes first. A fast machine does all
 * of them in a fraction of a second; a loaded one (two spinning processes sharing a
 * core hand over a ring's worth per time slice) fewer.
 */
const MIN_HANDOFFS = 16 * RING_SLOTS;
const MAX_HANDOFFS = 300_000;
const HANDOFF_MS = 2000;
/** A hang guard: a peer that never starts or stops answering fails the test after this long. */
const HANG_GUARD_MS = 60_000;
const PEER = new URL('./ring-peer.js', import.meta.url);

function limits(max: number): ProduceLimits {
  return { min: MIN_HANDOFFS, max, budgetMs: HANDOFF_MS, deadline: Date.now() + HANG_GUARD_MS };
}

interface Ring {
  readonly fd: number;
  readonly mapping: native.Mapping;
}

function createRing(): Ring {
  const fd = native.memfdCreate('vblk-ring-spike', RING_BYTES, { seal: true });
  return { fd, mapping: native.mmap(fd, RING_BYTES, 0, true) };
}

function destroyRing(ring: Ring): void {
  native.munmap(ring.mapping.buffer);
  native.close(ring.fd);
}

interface Peer {
  readonly child: ChildProcess;
  readonly report: Promise<unknown>;
  /** Kills the peer after a failure on this side, and waits for it. */
  abort(): Promise<void>;
}

/** Forks the peer with the ring's memfd as its fd 4. */
function startPeer(ring: Ring, role: string, l: ProduceLimits): Peer {
  const child = fork(PEER, [role, JSON.stringify(l)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc', ring.fd] });
  const report = new Promise<unknown>((resolve, reject) => {
    let result: unknown;
    child.once('message', (m: { ok?: unknown; error?: string }) => {
      if (m.error !== undefined) reject(new Error(`peer (${role}): ${m.error}`));
      else result = m.ok;
    });
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 && result !== undefined ? resolve(result) : reject(new Error(`peer (${role}) exited with ${code}`))));
  });
  return {
    child,
    report,
    async abort() {
      child.kill();
      await report.catch(() => {});
    },
  };
}

function assertClean(r: ConsumeResult, produced: number): void {
  assert.equal(r.received, produced, 'the consumer received every payload produced');
  assert.ok(produced >= MIN_HANDOFFS, `only ${produced} handoffs`);
  assert.deepEqual({ torn: r.torn, stale: r.stale, ahead: r.ahead }, { torn: 0, stale: 0, ahead: 0 });
}

test('payloads written before an Atomics.store of the index are seen by another process (peer produces)', async (t) => {
  const ring = createRing();
  try {
    const l = limits(MAX_HANDOFFS);
    const peer = startPeer(ring, 'produce', l);
    let result: ConsumeResult;
    try {
      result = consume(ringViews(ring.mapping.buffer), l.deadline);
    } catch (e) {
      await peer.abort();
      throw e;
    }
    const { produced } = (await peer.report) as { produced: number };
    t.diagnostic(`${result.received} handoffs`);
    assertClean(result, produced);
  } finally {
    destroyRing(ring);
  }
});

test('payloads written by this process before an Atomics.store are seen by another process (peer consumes)', async (t) => {
  const ring = createRing();
  try {
    const l = limits(MAX_HANDOFFS);
    const peer = startPeer(ring, 'consume', l);
    let produced: number;
    try {
      produced = produce(ringViews(ring.mapping.buffer), l);
    } catch (e) {
      await peer.abort();
      throw e;
    }
    const result = (await peer.report) as ConsumeResult;
    t.diagnostic(`${result.received} handoffs`);
    assertClean(result, produced);
  } finally {
    destroyRing(ring);
  }
});

test('control: publishing the index before the payload is caught by the same check', async (t) => {
  // How often the consumer catches the producer in the act depends on scheduling, so
  // this only reports; it shows the check above is able to see a broken order.
  const ring = createRing();
  try {
    const l = limits(MAX_HANDOFFS / 3);
    const peer = startPeer(ring, 'produce-publish-first', l);
    let result: ConsumeResult;
    try {
      result = consume(ringViews(ring.mapping.buffer), l.deadline);
    } catch (e) {
      await peer.abort();
      throw e;
    }
    const { produced } = (await peer.report) as { produced: number };
    t.diagnostic(`wrong order: ${result.torn} torn, ${result.stale} stale, ${result.ahead} ahead of ${result.received}`);
    assert.equal(result.received, produced);
  } finally {
    destroyRing(ring);
  }
});
