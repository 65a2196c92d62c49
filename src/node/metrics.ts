/**
 * The Prometheus endpoint of `vblk serve --metrics HOST:PORT`: GET /metrics answers the
 * text exposition format. prom-client does the registry, the format and the process
 * metrics (resident memory, CPU, event-loop lag); the device's own figures are read from
 * its statistics (src/blk/stats.ts) when Prometheus scrapes, so the data path never
 * calls into prom-client: a scrape copies a few hundred numbers and returns.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import client from 'prom-client';
import type { BlkDevice } from '../blk/device.js';
import { LATENCY_BUCKETS, STAT_STATUSES, STAT_TYPES, type QueueStatsSnapshot } from '../blk/stats.js';
import { VblkError } from '../errors.js';

/** One served disk: its device and the figures of the vhost-user server in front of it. */
export interface MetricsSource {
  /** The `socket` label: the vhost-user socket path. */
  readonly socket: string;
  /** A device built with a `statsClock`. */
  readonly device: BlkDevice;
  readonly frontends: {
    readonly connectionCount: number;
    readonly isConnected: boolean;
    readonly resubmittedRequests: number;
    readonly isDirtyLogging: boolean;
  };
}

type Labels = Record<string, string | number>;
interface Value {
  value: number;
  labels: Labels;
  metricName?: string;
}

/**
 * A metric whose values are computed when scraped. prom-client's own metric classes keep
 * state that the data path would have to update; this one only reads.
 */
class ReadOnlyMetric {
  readonly aggregator = 'sum';
  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: 'counter' | 'gauge' | 'histogram',
    private readonly values: () => Value[],
  ) {}

  get(): { name: string; help: string; type: string; values: Value[]; aggregator: string } {
    return { name: this.name, help: this.help, type: this.type, values: this.values(), aggregator: this.aggregator };
  }
}

/** Per-queue snapshots of every source, taken once per scrape. */
type Snapshot = { source: MetricsSource; queues: QueueStatsSnapshot[] }[];

function histogramValues(name: string, labels: Labels, q: QueueStatsSnapshot): Value[] {
  const out: Value[] = [];
  let cumulative = 0;
  LATENCY_BUCKETS.forEach((le, i) => {
    cumulative += q.latencyBuckets[i];
    out.push({ metricName: `${name}_bucket`, labels: { ...labels, le }, value: cumulative });
  });
  cumulative += q.latencyBuckets[LATENCY_BUCKETS.length];
  out.push({ metricName: `${name}_bucket`, labels: { ...labels, le: '+Inf' }, value: cumulative });
  out.push({ metricName: `${name}_sum`, labels, value: q.latencySum });
  out.push({ metricName: `${name}_count`, labels, value: cumulative });
  return out;
}

/** The registry with every vblk metric and the process metrics. */
export function metricsRegistry(sources: readonly MetricsSource[]): client.Registry {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry });
  // Gauges that prom-client names like counters: `promtool check metrics` rejects them.
  for (const name of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) {
    registry.removeSingleMetric(name);
  }
  let snapshot: Snapshot = [];
  // Metrics are collected one after another in one scrape: take the snapshot once, in the
  // first, so that every metric of a scrape describes the same moment.
  const take = (): Snapshot => {
    snapshot = sources.map((source) => ({ source, queues: (source.device.stats ?? []).map((s) => s.snapshot()) }));
    return snapshot;
  };
  const perQueue = (f: (labels: Labels, q: QueueStatsSnapshot) => Value[], fresh = false): (() => Value[]) => () =>
    (fresh ? take() : snapshot).flatMap(({ source, queues }) => queues.flatMap((q, queue) => f({ socket: source.socket, queue }, q)));
  const perSource = (f: (s: MetricsSource) => number): (() => Value[]) => () =>
    sources.map((s) => ({ labels: { socket: s.socket }, value: f(s) }));

  const metrics = [
    new ReadOnlyMetric('vblk_requests_total', 'Requests completed, by type and status', 'counter', perQueue((labels, q) =>
      STAT_TYPES.flatMap((type, t) => STAT_STATUSES.map((status, s) => ({ labels: { ...labels, type, status }, value: q.requests[t * STAT_STATUSES.length + s] })))
        // Every type that happened, and reads and writes always (so rate() has a series).
        .filter((v) => v.value > 0 || (v.labels.status === 'ok' && (v.labels.type === 'read' || v.labels.type === 'write'))), true)),
    new ReadOnlyMetric('vblk_bytes_total', 'Data bytes of successful reads and writes', 'counter', perQueue((labels, q) => [
      { labels: { ...labels, direction: 'read' }, value: q.bytesRead },
      { labels: { ...labels, direction: 'write' }, value: q.bytesWritten },
    ])),
    new ReadOnlyMetric('vblk_request_duration_seconds', 'Time from a request taken off the ring to its used entry published', 'histogram',
      perQueue((labels, q) => histogramValues('vblk_request_duration_seconds', labels, q))),
    new ReadOnlyMetric('vblk_inflight_requests', 'Requests taken off the ring and not completed', 'gauge',
      perQueue((labels, q) => [{ labels, value: q.inFlight }])),
    new ReadOnlyMetric('vblk_frontend_connections_total', 'Frontends (QEMU, a driver) that connected', 'counter',
      perSource((s) => s.frontends.connectionCount)),
    new ReadOnlyMetric('vblk_frontend_connected', 'Whether a frontend is connected', 'gauge', perSource((s) => (s.frontends.isConnected ? 1 : 0))),
    new ReadOnlyMetric('vblk_resubmitted_requests_total', 'Requests a killed backend left in flight that were resubmitted', 'counter',
      perSource((s) => s.frontends.resubmittedRequests)),
    new ReadOnlyMetric('vblk_disk_size_bytes', 'Disk size in bytes', 'gauge', perSource((s) => s.device.capacity * 512)),
    new ReadOnlyMetric('vblk_dirty_log_active', 'Whether the frontend has the dirty log on: it is live-migrating the guest', 'gauge',
      perSource((s) => (s.frontends.isDirtyLogging ? 1 : 0))),
  ];
  // registerMetric wants prom-client's Metric class; it calls only name and get().
  for (const m of metrics) registry.registerMetric(m as unknown as client.Metric);
  return registry;
}

/** A running endpoint. */
export interface MetricsEndpoint {
  /** Where it listens, as `http://HOST:PORT/metrics`. */
  readonly url: string;
  close(): Promise<void>;
}

/** Serves `registry` at http://host:port/metrics (port 0: any free port). */
export async function listenMetrics(host: string, port: number, registry: client.Registry): Promise<MetricsEndpoint> {
  const server: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const path = (req.url ?? '').split('?')[0];
    if (req.method !== 'GET' || path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('vblk serves /metrics only\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (e: unknown) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${e instanceof Error ? e.message : String(e)}\n`),
    );
  });
  // A scraper that stops reading must not keep sockets (and their buffers) for ever.
  server.requestTimeout = 30_000;
  server.headersTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new VblkError('METRICS_LISTEN', `cannot serve metrics on ${host}:${port}: ${e.message}`)));
    server.listen(port, host, () => resolve());
  });
  const a = server.address() as AddressInfo;
  const shown = a.family === 'IPv6' ? `[${a.address}]` : a.address;
  return {
    url: `http://${shown}:${a.port}/metrics`,
    close: () => new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}
