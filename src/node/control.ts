/**
 * The control socket of `vblk serve` (`--control PATH`): one JSON object per line each
 * way over a unix socket. `vblk resize` and `vblk stats` are its clients. Requests:
 *   {"op":"resize","size":BYTES}  →  {"ok":true,"size":BYTES} | {"ok":false,"error":"…"}
 *   {"op":"stats"}                →  {"ok":true,"stats":ServeStats}
 */
import { createConnection, createServer, type Server } from 'node:net';
import { chmodSync, unlinkSync } from 'node:fs';
import type { QueueStatsSnapshot } from '../blk/stats.js';
import { VblkError } from '../errors.js';

/** What `vblk serve` reports of one socket it serves. */
export interface SocketStats {
  readonly socket: string;
  readonly diskSizeBytes: number;
  readonly connected: boolean;
  readonly connections: number;
  readonly resubmitted: number;
  readonly queues: readonly QueueStatsSnapshot[];
}

/** The `stats` reply: every socket's figures at one moment (`time`: monotonic ms). */
export interface ServeStats {
  readonly time: number;
  readonly sockets: readonly SocketStats[];
}

export interface ControlHandlers {
  resize(size: number): Promise<number>;
  stats(): ServeStats;
}

type Reply = { ok: true; size?: number; stats?: ServeStats } | { ok: false; error: string };

/** Largest request line accepted: a control request is a few dozen bytes. */
const MAX_LINE = 4096;

async function answer(line: string, handlers: ControlHandlers): Promise<Reply> {
  let req: unknown;
  try {
    req = JSON.parse(line);
  } catch {
    return { ok: false, error: 'request is not JSON' };
  }
  const r = req as { op?: unknown; size?: unknown };
  if (r.op === 'stats') return { ok: true, stats: handlers.stats() };
  if (r.op !== 'resize') return { ok: false, error: `unknown op ${JSON.stringify(r.op)}` };
  if (typeof r.size !== 'number' || !Number.isSafeInteger(r.size) || r.size <= 0) {
    return { ok: false, error: 'size must be a positive integer number of bytes' };
  }
  try {
    return { ok: true, size: await handlers.resize(r.size) };
  } catch (e) {
    return { ok: false, error: e instanceof Error ? e.message : String(e) };
  }
}

/** Listens on `path` (mode 0600). A stale socket file is replaced. */
export async function listenControl(path: string, handlers: ControlHandlers): Promise<Server> {
  try {
    unlinkSync(path);
  } catch {
    // Nothing there.
  }
  const server = createServer((sock) => {
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > MAX_LINE) {
        sock.end(JSON.stringify({ ok: false, error: 'request too long' }) + '\n');
        return;
      }
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        void answer(line, handlers).then((reply) => sock.write(JSON.stringify(reply) + '\n'));
      }
    });
    sock.on('error', () => sock.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => resolve());
  });
  chmodSync(path, 0o600);
  return server;
}

/** Sends one request to a control socket and returns its successful reply. */
function request(path: string, req: object, timeoutMs: number): Promise<Reply & { ok: true }> {
  return new Promise((resolve, reject) => {
    const sock = createConnection(path);
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new VblkError('TIMEOUT', `no answer from the control socket ${path} within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify(req) + '\n'));
    sock.on('data', (chunk: string) => {
      buf += chunk;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      sock.end();
      let reply: Reply;
      try {
        reply = JSON.parse(buf.slice(0, nl)) as Reply;
      } catch {
        reject(new VblkError('BAD_REPLY', `the control socket ${path} answered something that is not JSON`));
        return;
      }
      if (reply.ok) resolve(reply);
      else reject(new VblkError('CONTROL_FAILED', reply.error));
    });
    sock.on('error', (e) => {
      clearTimeout(timer);
      reject(new VblkError('CONNECT_FAILED', `cannot reach the control socket ${path}: ${e.message}`));
    });
  });
}

/** Asks the serve process behind `path` to grow its disk; returns the new size. */
export async function controlResize(path: string, size: number, timeoutMs = 30_000): Promise<number> {
  const reply = await request(path, { op: 'resize', size }, timeoutMs);
  if (typeof reply.size !== 'number') throw new VblkError('BAD_REPLY', `the control socket ${path} did not say the new size`);
  return reply.size;
}

/** The statistics of the serve process behind `path`. */
export async function controlStats(path: string, timeoutMs = 30_000): Promise<ServeStats> {
  const reply = await request(path, { op: 'stats' }, timeoutMs);
  const s = reply.stats;
  if (typeof s !== 'object' || s === null || !Array.isArray(s.sockets) || typeof s.time !== 'number') {
    throw new VblkError('BAD_REPLY', `the control socket ${path} answered no statistics (is it a vblk serve of this version?)`);
  }
  return s;
}
