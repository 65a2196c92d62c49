/**
 * A read-only disk image on an HTTP(S) server, read with range requests. It needs only
 * `fetch`, so the same backend runs in Node.js and in a browser:
 *
 *   vblk serve --backend ./http-range-backend.js --backend-opt url=https://example.org/disk.img --socket /tmp/vblk.sock
 *
 * The size comes from a HEAD request (Content-Length, when the server also says
 * `Accept-Ranges: bytes`), else from the Content-Range of a one-byte range request. Each
 * read is one GET with a Range header; any answer but 206 with exactly the bytes asked
 * for fails that read, and the guest sees an I/O error. Nothing is cached: the guest's
 * page cache does that.
 */
import { BackendError, VblkError, checkDiskSize, checkRange, totalLength, type BlockBackend } from 'vblk';

/** Why the server's answer cannot be used. */
export class HttpRangeError extends VblkError {
  constructor(code: 'HTTP_STATUS' | 'NO_RANGES' | 'BAD_RESPONSE', message: string) {
    super(code, message);
  }
}

/** How {@link HttpRangeBackend.open} reaches the image. */
export interface HttpRangeOptions {
  /** Give up on a request after this many milliseconds. Default 30 000. */
  readonly timeoutMs?: number;
}

/** `bytes START-END/TOTAL` (RFC 9110, 14.4), or null. */
function parseContentRange(header: string | null): { start: number; end: number; total: number } | null {
  const m = header === null ? null : /^bytes (\d+)-(\d+)\/(\d+)$/.exec(header.trim());
  if (m === null) return null;
  const [start, end, total] = [Number(m[1]), Number(m[2]), Number(m[3])];
  return Number.isSafeInteger(total) && start <= end && end < total ? { start, end, total } : null;
}

/** A disk image at a URL, read-only. */
export class HttpRangeBackend implements BlockBackend {
  readonly readOnly = true;
  readonly canFlush = false;
  readonly canDiscard = false;
  readonly canWriteZeroes = false;
  /** Aborts every request in flight when the backend closes. */
  private readonly closing = new AbortController();

  private constructor(readonly url: string, readonly size: number, private readonly timeoutMs: number) {}

  /** Finds the image's size and checks that the server serves ranges. */
  static async open(url: string, options: HttpRangeOptions = {}): Promise<HttpRangeBackend> {
    const parsed = new URL(url);
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new TypeError(`${url} is not an http: or https: URL`);
    const timeoutMs = options.timeoutMs ?? 30_000;
    const signal = AbortSignal.timeout(timeoutMs);
    let size: number | null = null;
    const head = await fetch(url, { method: 'HEAD', signal });
    const length = Number(head.headers.get('content-length') ?? NaN);
    if (head.ok && head.headers.get('accept-ranges') === 'bytes' && Number.isSafeInteger(length)) size = length;
    else {
      // Not every server answers HEAD usefully; a one-byte range tells the size and proves ranges work.
      const probe = await fetch(url, { headers: { Range: 'bytes=0-0' }, signal });
      await probe.body?.cancel();
      if (probe.status !== 206) throw new HttpRangeError('NO_RANGES', `${url}: the server does not serve byte ranges (HTTP ${probe.status})`);
      size = parseContentRange(probe.headers.get('content-range'))?.total ?? null;
      if (size === null) throw new HttpRangeError('BAD_RESPONSE', `${url}: no usable Content-Range in the answer to a range request`);
    }
    checkDiskSize(size);
    return new HttpRangeBackend(url, size, timeoutMs);
  }

  async read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    const length = totalLength(buffers);
    this.check(offset, length);
    if (length === 0) return;
    const range = `bytes ${offset}-${offset + length - 1}`;
    const response = await fetch(this.url, {
      headers: { Range: `bytes=${offset}-${offset + length - 1}` },
      signal: AbortSignal.any([this.closing.signal, AbortSignal.timeout(this.timeoutMs)]),
    });
    if (response.status !== 206) {
      await response.body?.cancel();
      throw new HttpRangeError('HTTP_STATUS', `GET ${this.url} ${range}: HTTP ${response.status} instead of 206`);
    }
    const got = parseContentRange(response.headers.get('content-range'));
    // Other bytes than those asked for, or an image whose size changed since open: unusable.
    if (got === null || got.start !== offset || got.end !== offset + length - 1 || got.total !== this.size) {
      await response.body?.cancel();
      throw new HttpRangeError('BAD_RESPONSE', `GET ${this.url} ${range}: the server sent ${response.headers.get('content-range') ?? 'no Content-Range'}`);
    }
    const body = new Uint8Array(await response.arrayBuffer());
    if (body.length !== length) throw new BackendError('SHORT_IO', `GET ${this.url} ${range}: ${body.length} bytes arrived`);
    let at = 0;
    for (const b of buffers) {
      b.set(body.subarray(at, at + b.length));
      at += b.length;
    }
  }

  write(): void {
    this.refuse();
  }

  discard(): void {
    this.refuse();
  }

  writeZeroes(): void {
    this.refuse();
  }

  /** Nothing is ever written, so nothing waits to be made durable. */
  flush(): void {
    this.check(0, 0);
  }

  close(): void {
    this.closing.abort(new BackendError('CLOSED', 'the HTTP backend is closed'));
  }

  private check(offset: number, length: number): void {
    if (this.closing.signal.aborted) throw new BackendError('CLOSED', 'the HTTP backend is closed');
    checkRange(this.size, offset, length);
  }

  private refuse(): never {
    this.check(0, 0);
    throw new BackendError('READ_ONLY', `${this.url} is served read-only`);
  }
}

/** The factory `vblk serve --backend` calls: `--backend-opt url=URL`, and `timeout-ms=N` if you like. */
export default function (options: Readonly<Record<string, string>>): Promise<HttpRangeBackend> {
  if (options.url === undefined) throw new TypeError('--backend-opt url=URL is required');
  const timeout = options['timeout-ms'];
  if (timeout !== undefined && !/^[1-9]\d{0,8}$/.test(timeout)) throw new TypeError(`timeout-ms must be a positive whole number, got '${timeout}'`);
  return HttpRangeBackend.open(options.url, { timeoutMs: timeout === undefined ? undefined : Number(timeout) });
}
