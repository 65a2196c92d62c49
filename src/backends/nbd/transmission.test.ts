import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { NbdRequest, NbdTransmission, NBD_MAX_OUT_OF_ORDER_CHUNKS } from './transmission.js';
import { NBD_CMD, NBD_CMD_FLAG_FUA, NbdRequestError, type NbdProtocolError } from './protocol.js';
import {
  CHUNK, DONE, chunk, concat, dataChunk, errorChunk, holeChunk, noneChunk, parseRequests, simpleReply, type WireRequest,
} from '../../../test/support/nbd-wire.js';

interface Rig {
  readonly t: NbdTransmission;
  /** Requests the client has sent so far (parsed from its bytes). */
  sent(): WireRequest[];
  readonly done: Map<NbdRequest, NbdRequestError | null>;
}

function rig(structured: boolean, maxInFlight = 64): Rig {
  const out: Uint8Array[] = [];
  const done = new Map<NbdRequest, NbdRequestError | null>();
  const t = new NbdTransmission({
    structuredReplies: structured, maxInFlight,
    // Copy: the client's head arena is reused once a request completes.
    sink: (b) => out.push(b.slice()),
    onComplete: (r, e) => done.set(r, e),
  });
  return { t, done, sent: () => parseRequests(concat(...out)).requests };
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13 + 1) & 0xff;
  return b;
}

/** Feeds `bytes` in pieces cut at `cuts`; returns the first protocol error. */
function feed(t: NbdTransmission, bytes: Uint8Array, cuts: number[] = []): NbdProtocolError | null {
  let at = 0;
  for (const c of [...cuts.filter((c) => c > 0 && c < bytes.length).sort((a, b) => a - b), bytes.length]) {
    const e = t.receive(bytes.subarray(at, c));
    if (e !== null) return e;
    at = c;
  }
  return null;
}

function read(offset: number, sizes: number[]): { req: NbdRequest; bufs: Uint8Array[] } {
  const bufs = sizes.map((n) => new Uint8Array(n).fill(0xee));
  const req = new NbdRequest().set(NBD_CMD.READ, 0, offset, sizes.reduce((a, b) => a + b, 0), bufs);
  return { req, bufs };
}

test('requests are encoded as the document lays them out; a write carries its data after its head', () => {
  const r = rig(true);
  const data = pattern(1024, 1);
  r.t.submit(new NbdRequest().set(NBD_CMD.WRITE, NBD_CMD_FLAG_FUA, 4096, 1024, [data.subarray(0, 100), data.subarray(100)]));
  r.t.submit(new NbdRequest().set(NBD_CMD.FLUSH, 0, 0, 0, []));
  r.t.submit(new NbdRequest().set(NBD_CMD.WRITE_ZEROES, 2, 2 ** 40, 1 << 20, []));
  const [w, f, z] = r.sent();
  assert.deepEqual({ ...w, cookie: 0n }, { flags: NBD_CMD_FLAG_FUA, type: NBD_CMD.WRITE, cookie: 0n, offset: 4096, length: 1024, data });
  assert.deepEqual([f.type, f.offset, f.length, f.data], [NBD_CMD.FLUSH, 0, 0, null]);
  assert.deepEqual([z.type, z.flags, z.offset, z.length], [NBD_CMD.WRITE_ZEROES, 2, 2 ** 40, 1 << 20]);
  assert.equal(new Set([w.cookie, f.cookie, z.cookie]).size, 3, 'distinct cookies');
  assert.equal(r.t.inFlight, 3);
  assert.throws(() => r.t.submit(new NbdRequest().set(NBD_CMD.READ, 0, 0, 512, [new Uint8Array(100)])), { code: 'BAD_ARGUMENT' });
});

test('simple replies: read data lands in the scattered buffers, whatever the split of the stream', () => {
  const data = pattern(3000, 2);
  const whole = (() => {
    const r = rig(false);
    r.t.submit(read(0, [1000, 2000]).req);
    return simpleReply(r.sent()[0].cookie, 0, data);
  })();
  for (let cut = 0; cut < whole.length; cut += 7) {
    const r = rig(false);
    const { req, bufs } = read(512, [1, 999, 2000]);
    r.t.submit(req);
    assert.equal(feed(r.t, whole, [cut, cut + 3]), null);
    assert.equal(r.done.get(req), null);
    assert.deepEqual(concat(...bufs), data);
    assert.equal(r.t.inFlight, 0);
  }
});

test('replies out of order complete the right requests; errors carry the errno', () => {
  const r = rig(false);
  const a = read(0, [512]);
  const w = new NbdRequest().set(NBD_CMD.WRITE, 0, 512, 512, [pattern(512, 3)]);
  const f = new NbdRequest().set(NBD_CMD.FLUSH, 0, 0, 0, []);
  r.t.submit(a.req);
  r.t.submit(w);
  r.t.submit(f);
  const [ca, cw, cf] = r.sent().map((s) => s.cookie);
  assert.equal(feed(r.t, concat(simpleReply(cf, 0), simpleReply(cw, 28), simpleReply(ca, 0, pattern(512, 4)))), null);
  assert.equal(r.done.get(f), null);
  const err = r.done.get(w);
  assert.ok(err instanceof NbdRequestError && err.errno === 28 && /ENOSPC/.test(err.message));
  assert.deepEqual(a.bufs[0], pattern(512, 4));
  // A failed read (simple reply) carries no data.
  const b = read(0, [512]);
  r.t.submit(b.req);
  assert.equal(feed(r.t, simpleReply(r.sent()[3].cookie, 5)), null);
  assert.equal((r.done.get(b.req) as NbdRequestError).errno, 5);
  assert.deepEqual(b.bufs[0], new Uint8Array(512).fill(0xee));
});

test('structured replies: data and hole chunks in and out of order, then NONE', () => {
  const r = rig(true);
  const { req, bufs } = read(8192, [100, 3996, 4096]);
  r.t.submit(req);
  const c = r.sent()[0].cookie;
  const d = pattern(8192, 5);
  const stream = concat(
    dataChunk(c, 8192 + 4096, d.subarray(4096, 6000)),
    holeChunk(c, 8192 + 6000, 2192),
    dataChunk(c, 8192, d.subarray(0, 4096)),
    noneChunk(c),
  );
  assert.equal(feed(r.t, stream, [21, 29, 33, 4000]), null);
  assert.equal(r.done.get(req), null);
  const want = d.slice();
  want.fill(0, 6000);
  assert.deepEqual(concat(...bufs), want);
  // A last data chunk may carry DONE itself.
  const x = read(0, [512]);
  r.t.submit(x.req);
  assert.equal(feed(r.t, dataChunk(r.sent()[1].cookie, 0, pattern(512, 6), true)), null);
  assert.equal(r.done.get(x.req), null);
  assert.deepEqual(x.bufs[0], pattern(512, 6));
  // A write may be answered by a simple reply or a chunk.
  const w = new NbdRequest().set(NBD_CMD.WRITE, 0, 0, 512, [pattern(512, 7)]);
  r.t.submit(w);
  assert.equal(feed(r.t, simpleReply(r.sent()[2].cookie, 0)), null);
  assert.equal(r.done.get(w), null);
});

test('structured errors: ERROR and ERROR_OFFSET fail the request with the server message; the connection goes on', () => {
  const r = rig(true);
  const a = read(0, [1024]);
  const b = read(4096, [1024]);
  r.t.submit(a.req);
  r.t.submit(b.req);
  const [ca, cb] = r.sent().map((s) => s.cookie);
  assert.equal(feed(r.t, concat(
    dataChunk(ca, 0, pattern(512, 1)), errorChunk(ca, 5, 'disk on\nfire', false, 512), noneChunk(ca),
    errorChunk(cb, 22, '', false), chunk(cb, 0x8abc, DONE, concat(new Uint8Array([0, 0, 0, 1, 0, 0]))),
  )), null);
  const ea = r.done.get(a.req) as NbdRequestError;
  assert.equal(ea.errno, 5);
  assert.match(ea.message, /NBD_CMD_READ of 1024 bytes at 0 failed on the server at 512: EIO \(5\): disk on\?fire/);
  assert.equal((r.done.get(b.req) as NbdRequestError).errno, 22);
  assert.equal(r.t.inFlight, 0);
});

test('hostile replies: each is a typed protocol error and no byte lands outside the request buffers', () => {
  const cases: [string, boolean, (c: bigint) => Uint8Array][] = [
    ['UNKNOWN_COOKIE', true, (c) => noneChunk(c + 1n)],
    ['UNKNOWN_COOKIE', true, (c) => noneChunk(c ^ (1n << 40n))],
    ['BAD_MAGIC', true, () => new Uint8Array(16).fill(0x41)],
    ['BAD_MAGIC', false, (c) => noneChunk(c)],
    ['SIMPLE_REPLY_TO_READ', true, (c) => simpleReply(c, 0, new Uint8Array(4096))],
    ['CHUNK_OUT_OF_RANGE', true, (c) => dataChunk(c, 4096 - 512, new Uint8Array(512))],
    ['CHUNK_OUT_OF_RANGE', true, (c) => dataChunk(c, 8192 - 512, new Uint8Array(1024))],
    ['CHUNK_OUT_OF_RANGE', true, (c) => holeChunk(c, 4096, 0xffffffff)],
    ['CHUNK_OUT_OF_RANGE', true, (c) => holeChunk(c, 2 ** 60, 512)],
    ['CHUNK_OUT_OF_RANGE', true, (c) => errorChunk(c, 5, '', true, 8192)],
    ['CHUNK_OVERLAP', true, (c) => concat(dataChunk(c, 4096, new Uint8Array(1024)), holeChunk(c, 4096 + 512, 512))],
    ['CHUNK_OVERLAP', true, (c) => concat(holeChunk(c, 4096 + 768, 256), dataChunk(c, 4096 + 512, new Uint8Array(512)))],
    ['INCOMPLETE_READ', true, (c) => concat(dataChunk(c, 4096, new Uint8Array(512)), noneChunk(c))],
    ['INCOMPLETE_READ', true, (c) => noneChunk(c)],
    ['BAD_CHUNK', true, (c) => chunk(c, CHUNK.NONE, 0)],
    ['BAD_CHUNK', true, (c) => chunk(c, CHUNK.NONE, DONE, new Uint8Array(1))],
    ['BAD_CHUNK', true, (c) => chunk(c, CHUNK.OFFSET_DATA, DONE, new Uint8Array(8))],
    ['BAD_CHUNK', true, (c) => chunk(c, CHUNK.OFFSET_HOLE, DONE, new Uint8Array(13))],
    ['BAD_CHUNK', true, (c) => holeChunk(c, 4096, 0)],
    ['BAD_CHUNK', true, (c) => chunk(c, CHUNK.BLOCK_STATUS, DONE, new Uint8Array(12))],
    ['BAD_CHUNK', true, (c) => chunk(c, 77, DONE)],
    ['BAD_CHUNK', true, (c) => chunk(c, CHUNK.ERROR, DONE, new Uint8Array(5))],
    ['BAD_CHUNK', true, (c) => errorChunk(c, 0, 'zero')],
    ['BAD_CHUNK', true, (c) => chunk(c, CHUNK.ERROR, DONE, new Uint8Array([0, 0, 0, 5, 0, 9, 1, 2]))],
    ['BAD_CHUNK', true, (c) => chunk(c, CHUNK.ERROR, DONE, new Uint8Array([0, 0, 0, 5, 0, 0, 1]))],
    ['OVERSIZED', true, (c) => chunk(c, CHUNK.ERROR, DONE, new Uint8Array(70_000))],
  ];
  for (const [code, structured, reply] of cases) {
    const r = rig(structured);
    const memory = new Uint8Array(4096 + 1024 + 4096).fill(0xcc);
    const target = memory.subarray(4096, 4096 + 1024);
    const req = new NbdRequest().set(NBD_CMD.READ, 0, 4096, 1024, [target]);
    r.t.submit(req);
    const e = feed(r.t, reply(r.sent()[0].cookie));
    assert.equal(e?.code, code, `${code}: got ${e?.code} (${e?.message})`);
    assert.ok(memory.subarray(0, 4096).every((b) => b === 0xcc) && memory.subarray(5120).every((b) => b === 0xcc), `${code}: guard bytes`);
    assert.equal(r.t.receive(new Uint8Array(1))?.code, code, 'a broken stream stays broken');
    assert.deepEqual(r.t.takeAll(), [req]);
  }
  // A content chunk answers only a read; a simple reply may not follow chunks.
  const r = rig(true);
  r.t.submit(new NbdRequest().set(NBD_CMD.WRITE, 0, 0, 512, [new Uint8Array(512)]));
  assert.equal(feed(r.t, dataChunk(r.sent()[0].cookie, 0, new Uint8Array(512)))?.code, 'BAD_CHUNK');
  const s = rig(true);
  s.t.submit(new NbdRequest().set(NBD_CMD.WRITE, 0, 0, 512, [new Uint8Array(512)]));
  const c = s.sent()[0].cookie;
  assert.equal(feed(s.t, concat(errorChunk(c, 5, '', false), simpleReply(c, 0)))?.code, 'UNEXPECTED_REPLY');
});

test('a reply to a request already answered is an unknown cookie (the cookie is retired)', () => {
  const r = rig(true);
  r.t.submit(new NbdRequest().set(NBD_CMD.FLUSH, 0, 0, 0, []));
  const c = r.sent()[0].cookie;
  assert.equal(feed(r.t, simpleReply(c, 0)), null);
  r.t.submit(new NbdRequest().set(NBD_CMD.FLUSH, 0, 0, 0, []));
  assert.notEqual(r.sent()[1].cookie, c, 'the slot is reused under a new generation');
  assert.equal(feed(r.t, simpleReply(c, 0))?.code, 'UNKNOWN_COOKIE');
});

test('out-of-order chunks are bounded', () => {
  const r = rig(true);
  const n = NBD_MAX_OUT_OF_ORDER_CHUNKS + 2;
  const { req } = read(0, [n * 512]);
  r.t.submit(req);
  const c = r.sent()[0].cookie;
  // Every chunk but the first, last to first: none continues the in-order run.
  const chunks: Uint8Array[] = [];
  for (let i = n - 1; i >= 1; i--) chunks.push(holeChunk(c, i * 512, 512));
  assert.equal(feed(r.t, concat(...chunks))?.code, 'BAD_CHUNK');
  // Just under the bound, then the first chunk joins them all.
  const s = rig(true);
  const m = NBD_MAX_OUT_OF_ORDER_CHUNKS + 1;
  const x = read(0, [m * 512]);
  s.t.submit(x.req);
  const d = s.sent()[0].cookie;
  const ok: Uint8Array[] = [];
  for (let i = m - 1; i >= 1; i--) ok.push(holeChunk(d, i * 512, 512));
  ok.push(dataChunk(d, 0, pattern(512, 9), true));
  assert.equal(feed(s.t, concat(...ok)), null);
  assert.equal(s.done.get(x.req), null);
});

test('the cookie table bounds what is in flight; takeAll hands every request back', () => {
  const r = rig(true, 2);
  r.t.submit(new NbdRequest().set(NBD_CMD.FLUSH, 0, 0, 0, []));
  const b = new NbdRequest().set(NBD_CMD.FLUSH, 0, 0, 0, []);
  r.t.submit(b);
  assert.equal(r.t.hasRoom, false);
  assert.throws(() => r.t.submit(new NbdRequest().set(NBD_CMD.FLUSH, 0, 0, 0, [])), { code: 'BAD_STATE' });
  assert.throws(() => r.t.submit(b), { code: 'BAD_STATE' });
  const back = r.t.takeAll();
  assert.equal(back.length, 2);
  assert.ok(back.every((q) => q.slot === -1));
  assert.equal(r.t.inFlight, 0);
  assert.ok(r.t.hasRoom);
});

// ---- properties ---------------------------------------------------------------------

/** A server that answers correctly, in its own order and chunking, from a model disk. */
function serve(req: WireRequest, disk: Uint8Array, structured: boolean, pieces: number, holes: boolean): Uint8Array {
  if (req.type === NBD_CMD.WRITE) {
    disk.set(req.data as Uint8Array, req.offset);
    return structured && pieces % 2 === 0 ? noneChunk(req.cookie) : simpleReply(req.cookie, 0);
  }
  if (req.type !== NBD_CMD.READ) return simpleReply(req.cookie, 0);
  const data = disk.subarray(req.offset, req.offset + req.length);
  if (!structured) return simpleReply(req.cookie, 0, data);
  const out: Uint8Array[] = [];
  const step = Math.ceil(req.length / pieces);
  const parts: [number, number][] = [];
  for (let at = 0; at < req.length; at += step) parts.push([at, Math.min(step, req.length - at)]);
  // Chunks "MAY" come in any order: reverse every other reply.
  if (pieces % 3 === 0) parts.reverse();
  for (const [at, n] of parts) {
    const bytes = data.subarray(at, at + n);
    out.push(holes && bytes.every((b) => b === 0) ? holeChunk(req.cookie, req.offset + at, n) : dataChunk(req.cookie, req.offset + at, bytes));
  }
  out.push(noneChunk(req.cookie));
  return concat(...out);
}

test('property: random requests, a correct server answering in any order, any split of the stream: every request completes with the model\'s data', () => {
  const SIZE = 64 * 1024;
  const op = fc.record({
    write: fc.boolean(),
    sector: fc.integer({ min: 0, max: SIZE / 512 - 1 }),
    sectors: fc.integer({ min: 1, max: 16 }),
    seed: fc.integer({ min: 0, max: 255 }),
    segments: fc.integer({ min: 1, max: 4 }),
    pieces: fc.integer({ min: 1, max: 6 }),
  });
  fc.assert(fc.property(fc.boolean(), fc.array(op, { minLength: 1, maxLength: 24 }), fc.array(fc.nat(), { maxLength: 30 }), fc.boolean(),
    (structured, ops, order, holes) => {
      const disk = new Uint8Array(SIZE);
      const model = new Uint8Array(SIZE);
      const r = rig(structured, 32);
      const reads: { req: NbdRequest; bufs: Uint8Array[]; want: Uint8Array | null }[] = [];
      /** The read of each submitted request, by submission order (what the server sees). */
      const byIndex: ({ want: Uint8Array | null } | null)[] = [];
      // Submit all, then serve in a shuffled order: all in flight together. Reads and
      // writes of one batch may overlap; reads are checked against the disk as served.
      for (const o of ops) {
        const offset = o.sector * 512;
        const length = Math.min(o.sectors * 512, SIZE - offset);
        const cut = Math.floor(length / o.segments);
        const sizes = Array.from({ length: o.segments }, (_, i) => (i === o.segments - 1 ? length - cut * i : cut)).filter((n) => n > 0);
        if (o.write) {
          const data = pattern(length, o.seed);
          if (o.seed % 5 === 0) data.fill(0);
          let at = 0;
          const bufs = sizes.map((n) => data.subarray(at, (at += n)));
          r.t.submit(new NbdRequest().set(NBD_CMD.WRITE, 0, offset, length, bufs));
          byIndex.push(null);
        } else {
          const bufs = sizes.map((n) => new Uint8Array(n).fill(0xee));
          const req = new NbdRequest().set(NBD_CMD.READ, 0, offset, length, bufs);
          const entry = { req, bufs, want: null };
          reads.push(entry);
          byIndex.push(entry);
          r.t.submit(req);
        }
      }
      const sent = r.sent();
      const pending = sent.map((s, i) => ({ s, i }));
      const replies: Uint8Array[] = [];
      for (let k = 0; pending.length > 0; k++) {
        const [{ s, i }] = pending.splice((order[k] ?? 0) % pending.length, 1);
        if (s.type === NBD_CMD.WRITE) model.set(s.data as Uint8Array, s.offset);
        const reply = serve(s, disk, structured, ops[i].pieces, holes);
        const entry = byIndex[i];
        if (entry !== null) entry.want = model.slice(s.offset, s.offset + s.length);
        replies.push(reply);
      }
      const stream = concat(...replies);
      assert.equal(feed(r.t, stream, order.map((n) => n % (stream.length + 1))), null);
      assert.equal(r.t.inFlight, 0);
      assert.equal(r.done.size, sent.length);
      for (const e of r.done.values()) assert.equal(e, null);
      for (const x of reads) assert.deepEqual(concat(...x.bufs), x.want);
      assert.deepEqual(disk, model);
    }), { numRuns: 300 });
});

test('property: a corrupted reply stream never throws, never writes outside the request buffers, and leaves every request completed or handed back', () => {
  fc.assert(fc.property(
    fc.boolean(),
    fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }),
    fc.array(fc.nat(), { maxLength: 8 }),
    (structured, flips, cuts) => {
      const r = rig(structured, 8);
      const memory = new Uint8Array(5 * 2048).fill(0xcc);
      const reqs: NbdRequest[] = [];
      // Four reads of 1 KiB, each in the middle of its own 2 KiB of guard bytes.
      for (let i = 0; i < 4; i++) {
        const req = new NbdRequest().set(NBD_CMD.READ, 0, i * 1024, 1024, [memory.subarray(i * 2048 + 512, i * 2048 + 1536)]);
        reqs.push(req);
        r.t.submit(req);
      }
      const disk = pattern(8192, 3);
      const stream = concat(...r.sent().map((s, i) => serve(s, disk, structured, i + 1, false)));
      for (const [at, value] of flips) stream[at % stream.length] = value;
      const error = feed(r.t, stream, cuts.map((c) => c % stream.length));
      for (let i = 0; i < 4; i++) {
        const base = i * 2048;
        assert.ok(memory.subarray(base, base + 512).every((b) => b === 0xcc) && memory.subarray(base + 1536, base + 2048).every((b) => b === 0xcc), 'guard bytes intact');
      }
      const back = r.t.takeAll();
      for (const q of reqs) assert.ok(r.done.has(q) !== back.includes(q), 'each request completed xor handed back');
      if (error === null) assert.equal(back.length + r.done.size, 4);
    },
  ), { numRuns: 3000 });
});
