/**
 * The migration section of `npm run bench`: the downtime of live-migrating a Linux guest
 * (QEMU 7.2, TCG, 2 vCPUs) whose disk `vblk serve` serves, beside the same guest on
 * qemu-storage-daemon, on the e2e test's guest and workload (test/e2e/migration-helpers.ts):
 * fio random writes with crc32c verify on two queues, running throughout.
 *
 * Each round boots the guest on QEMU A for each backend in turn (rotating which goes
 * first), starts QEMU B with `-incoming`, and migrates at once with QEMU 7.2's default
 * downtime limit (300 ms) and the bandwidth limit raised to 1 GiB/s (the default is
 * 128 MiB/s): `query-migrate`'s `downtime` and
 * `total-time`. Most of a downtime is QEMU sending the last dirty RAM, which varies from
 * run to run by a factor of two and more: the figure is the ratio of the two backends'
 * medians over the rounds, with its spread shown by the rows.
 */
import { mkdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ensureGuest, startGuest, type Guest } from '../scripts/guest/guest.js';
import { median, spread, type Spread } from './stats.js';
import { IMAGE_SIZE, migrate, migrationGuest, qsdServer, vblkServer, type DiskServer } from '../test/e2e/migration-helpers.js';

export const MIGRATION_KINDS = ['vblk-serve', 'qsd'] as const;
export type MigrationKind = (typeof MIGRATION_KINDS)[number];

export interface MigrationRow {
  readonly round: number;
  readonly backend: MigrationKind;
  /** query-migrate's downtime, ms. */
  readonly downtime_ms: number;
  /** query-migrate's total-time, ms. */
  readonly total_ms: number;
}

export interface MigrationSummary {
  readonly backend: MigrationKind;
  readonly downtime_ms: Spread;
  readonly total_ms: number;
  /** Median downtime over the daemon's; null for the daemon. */
  readonly downtime_ratio: number | null;
}

const SERVERS: Record<MigrationKind, (image: string, dir: string) => Promise<DiskServer>> = {
  'vblk-serve': (image, dir) => vblkServer(image, dir),
  qsd: qsdServer,
};

/** One migration of a guest under fio from a fresh QEMU A to a fresh QEMU B, on a fresh image. */
async function once(kind: MigrationKind, round: number, dir: string, log: (line: string) => void): Promise<MigrationRow> {
  const runDir = join(dir, `${kind}-${round}`);
  mkdirSync(runDir, { recursive: true });
  const image = join(runDir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, IMAGE_SIZE);
  const server = await SERVERS[kind](image, runDir);
  const base = migrationGuest(await ensureGuest());
  const on = (s: string) => [{ path: s, numQueues: 2 }];
  const guests: Guest[] = [];
  try {
    const a = await startGuest({ ...base, vhostUserSockets: on(server.sockets[0]) });
    guests.push(a);
    await a.waitFor('READY', 180_000);
    await a.waitFor(/^FIO-ROUND 2/, 300_000);
    const uri = `unix:${join(runDir, 'mig.sock')}`;
    const b = await startGuest({ ...base, vhostUserSockets: on(server.sockets[1]), extraArgs: ['-incoming', uri] });
    guests.push(b);
    const info = await migrate(a, b, uri);
    // The guest must run on: fio goes on verifying on the destination.
    const next = await b.waitFor(/^(FIO-ROUND \d+|FIO-FAILED)/, 300_000);
    if (next.startsWith('FIO-FAILED')) throw new Error(`fio failed on the destination: ${next}`);
    const row = { round, backend: kind, downtime_ms: info.downtime ?? NaN, total_ms: info['total-time'] ?? NaN };
    log(`migration round ${round} ${kind}: downtime ${row.downtime_ms} ms, total ${row.total_ms} ms`);
    return row;
  } catch (e) {
    throw new Error(`migration with ${kind}: ${(e as Error).message}\n${server.log()}`);
  } finally {
    for (const g of guests) await g.kill();
    await server.stop();
  }
}

export async function migrationSection(rounds: number, dir: string, log: (line: string) => void): Promise<MigrationRow[]> {
  const rows: MigrationRow[] = [];
  for (let round = 1; round <= rounds; round++) {
    const order = round % 2 === 1 ? MIGRATION_KINDS : [...MIGRATION_KINDS].reverse();
    for (const kind of order) rows.push(await once(kind, round, dir, log));
  }
  return rows;
}

export function summarizeMigration(rows: readonly MigrationRow[]): MigrationSummary[] {
  const daemon = median(rows.filter((r) => r.backend === 'qsd').map((r) => r.downtime_ms));
  return MIGRATION_KINDS.filter((k) => rows.some((r) => r.backend === k)).map((backend) => {
    const mine = rows.filter((r) => r.backend === backend);
    const d = mine.map((r) => r.downtime_ms);
    return {
      backend,
      downtime_ms: spread(d),
      total_ms: median(mine.map((r) => r.total_ms)),
      downtime_ratio: backend === 'qsd' || !(daemon > 0) ? null : Math.round((median(d) / daemon) * 1000) / 1000,
    };
  });
}

/** The target of issue 16: a downtime at most 1.2 times the daemon's. */
export function migrationTargets(summary: readonly MigrationSummary[]): { name: string; value: number | null; limit: string; isMet(v: number): boolean }[] {
  const x = summary.find((s) => s.backend === 'vblk-serve');
  return [{
    name: 'live migration downtime, vblk serve / qsd (medians of rounds, guest under fio on 2 queues)',
    value: x?.downtime_ratio ?? null, limit: '<= 1.2', isMet: (v: number) => v <= 1.2,
  }];
}

export function migrationReport(rows: readonly MigrationRow[], summary: readonly MigrationSummary[], table: (h: string[], rows: (string | number)[][]) => string): string {
  const rounds = Math.max(...rows.map((r) => r.round));
  return `Live migration: QEMU 7.2 TCG guest (2 vCPUs, fio randwrite+verify on 2 queues), one vhost-user disk, ${rounds} rounds in rotating order\n` + table(
    ['backend', 'downtime ms, median (range)', 'total ms, median', 'downtime / qsd', 'downtime ms per round'],
    summary.map((x) => [x.backend, `${x.downtime_ms.median} (${x.downtime_ms.min}–${x.downtime_ms.max})`, x.total_ms,
      x.downtime_ratio === null ? '1' : x.downtime_ratio.toFixed(2), rows.filter((r) => r.backend === x.backend).map((r) => r.downtime_ms).join(' ')]),
  );
}
