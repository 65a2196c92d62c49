/**
 * The control socket of `vblk serve` (`--control PATH`): one JSON object per line each
 * way over a unix socket. `vblk resize` is its client. Requests:
 *   {"op":"resize","size":BYTES}  →  {"ok":true,"size":BYTES} | {"ok":false,"error":"…"}
 */
import { createConnection, createServer, type Server } from 'node:net';
import { chmodSync, unlinkSync } from 'node:fs';
import { VblkError } from '../errors.js';

export interface ControlHandlers {
  resize(size: number): Promise<number>;
}

type Reply = { ok: true; size: number } | { ok: false; error: string };

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

/** Sends one request to a control socket and returns the new size. */
export async function controlResize(path: string, size: number, timeoutMs = 30_000): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const sock = createConnection(path);
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new VblkError('TIMEOUT', `no answer from the control socket ${path} within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify({ op: 'resize', size }) + '\n'));
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
      if (reply.ok) resolve(reply.size);
      else reject(new VblkError('RESIZE_FAILED', reply.error));
    });
    sock.on('error', (e) => {
      clearTimeout(timer);
      reject(new VblkError('CONNECT_FAILED', `cannot reach the control socket ${path}: ${e.message}`));
    });
  });
}
