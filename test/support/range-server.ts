// A small HTTP server on 127.0.0.1 serving one image with byte ranges, for the HTTP range
// backend example: HEAD, single-range GETs (206 with Content-Range, 416 past the end),
// and switches to misbehave in each way a server can, flipped while it runs.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/** How the server misbehaves; everything off is a well-behaved range server. */
export interface Misbehaviour {
  /** HEAD answers 405 (the client must probe with a range instead). */
  noHead?: boolean;
  /** Ranges are ignored: every GET is 200 with the whole image, and HEAD says no Accept-Ranges. */
  ignoreRanges?: boolean;
  /** Every GET answers this status with a short text body. */
  failWith?: number;
  /** The Content-Range names other bytes than those asked for (and those bytes are sent). */
  wrongRange?: boolean;
  /** Half the body is sent (chunked, so the end is clean and the client sees it short). */
  shortBody?: boolean;
  /** A 206's Content-Range is this text, whatever was asked (the bytes asked are sent). */
  contentRange?: string;
  /** GETs get no answer (until the server closes). */
  hold?: boolean;
}

export interface RangeServer {
  /** The image's URL. */
  readonly url: string;
  /** Every request: method and Range header. */
  readonly requests: { method: string; range: string | undefined }[];
  /** Change to make the next requests misbehave. */
  misbehave: Misbehaviour;
  close(): Promise<void>;
}

/** Serves `image` at http://127.0.0.1:PORT/disk.img. */
export async function startRangeServer(image: Uint8Array, misbehave: Misbehaviour = {}): Promise<RangeServer> {
  const held: (() => void)[] = [];
  const requests: RangeServer['requests'] = [];
  const answer = (req: IncomingMessage, res: ServerResponse): void => {
    const m = state.misbehave;
    const total = image.length;
    if (req.method === 'HEAD') {
      if (m.noHead) return void res.writeHead(405).end();
      res.writeHead(200, { 'Content-Length': total, ...(m.ignoreRanges ? {} : { 'Accept-Ranges': 'bytes' }) });
      return void res.end();
    }
    if (m.failWith !== undefined) return void res.writeHead(m.failWith, { 'Content-Type': 'text/plain' }).end('no\n');
    const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (m.ignoreRanges || range === null) return void res.writeHead(200, { 'Content-Length': total }).end(image);
    const start = Number(range[1]);
    const end = Math.min(Number(range[2]), total - 1);
    if (start >= total || start > end) return void res.writeHead(416, { 'Content-Range': `bytes */${total}` }).end();
    const from = m.wrongRange ? Math.max(0, start - 512) : start;
    const to = from + (end - start);
    const body = image.subarray(from, to + 1);
    if (m.shortBody) {
      res.writeHead(206, { 'Content-Range': `bytes ${from}-${to}/${total}` });
      return void res.end(body.subarray(0, body.length >> 1));
    }
    res.writeHead(206, { 'Content-Range': m.contentRange ?? `bytes ${from}-${to}/${total}`, 'Content-Length': body.length }).end(body);
  };
  const server = createServer((req, res) => {
    requests.push({ method: req.method ?? '', range: req.headers.range });
    if (state.misbehave.hold && req.method === 'GET') held.push(() => answer(req, res));
    else answer(req, res);
  });
  await new Promise<void>((res) => server.listen(0, '127.0.0.1', res));
  const { port } = server.address() as AddressInfo;
  // Requests arrive only from here on, so the handlers above never see `state` unset.
  const state: RangeServer = {
    url: `http://127.0.0.1:${port}/disk.img`, requests, misbehave,
    close: () => new Promise((res) => {
      held.splice(0).forEach((go) => go());
      server.closeAllConnections();
      server.close(() => res());
    }),
  };
  return state;
}
