import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { NbdHandshake, NBD_MAX_OPTION_REPLY, type NbdHandshakeEvent } from './handshake.js';
import {
  ALL_FLAGS, FLAGS, OPT, REP, concat, greeting, infoBlockSize, infoExport, optionReply, parseOptions, serverHandshake,
} from '../../../test/support/nbd-wire.js';

const MiB = 1024 * 1024;

/** Feeds `chunks` in order; returns every event. */
function feed(h: NbdHandshake, ...chunks: Uint8Array[]): NbdHandshakeEvent[] {
  const events: NbdHandshakeEvent[] = [];
  for (const c of chunks) {
    if (h.isOver) break;
    events.push(...h.receive(c));
  }
  return events;
}

function sent(events: NbdHandshakeEvent[]): Uint8Array {
  return concat(...events.flatMap((e) => (e.type === 'send' ? [e.bytes] : [])));
}

/** What the client sent after its 4 flag bytes, as options. */
function optionsSent(events: NbdHandshakeEvent[]): number[] {
  return parseOptions(sent(events).subarray(4)).options.map((o) => o.option);
}

function last(events: NbdHandshakeEvent[]): NbdHandshakeEvent {
  const e = events[events.length - 1];
  assert.ok(e, 'no event');
  return e;
}

function failure(events: NbdHandshakeEvent[]): string {
  const e = last(events);
  assert.equal(e.type, 'failed', `expected a failure, got ${JSON.stringify(e)}`);
  return (e as { error: { code: string } }).error.code;
}

test('a fixed-newstyle handshake: client flags, structured replies, GO with NBD_INFO_BLOCK_SIZE, then the export', () => {
  const h = new NbdHandshake({ exportName: 'disk' });
  const events = feed(h, serverHandshake(64 * MiB, ALL_FLAGS, { blockSize: [512, 4096, 32 * MiB] }));
  const out = sent(events);
  assert.equal(new DataView(out.buffer).getUint32(0), 3, 'FIXED_NEWSTYLE | NO_ZEROES, both offered');
  const { options } = parseOptions(out.subarray(4));
  assert.deepEqual(options.map((o) => o.option), [OPT.STRUCTURED_REPLY, OPT.GO]);
  const go = new DataView(options[1].data.buffer);
  assert.equal(go.getUint32(0), 4);
  assert.equal(new TextDecoder().decode(options[1].data.subarray(4, 8)), 'disk');
  assert.equal(go.getUint16(8), 1, 'one information request');
  assert.equal(go.getUint16(10), 3, 'NBD_INFO_BLOCK_SIZE');
  const ready = last(events);
  assert.equal(ready.type, 'ready');
  if (ready.type !== 'ready') return;
  assert.deepEqual(ready.info, {
    name: 'disk', size: 64 * MiB, flags: ALL_FLAGS, structuredReplies: true,
    blockSizes: { minimum: 512, preferred: 4096, maximum: 32 * MiB }, blockSizesAdvertised: true,
  });
  assert.equal(ready.rest.length, 0);
  assert.ok(h.isOver);
});

test('the same events whatever way the server bytes are split (every split point, and random splits)', () => {
  const stream = concat(serverHandshake(MiB, ALL_FLAGS, { blockSize: [1, 4096, 0xffffffff] }), new Uint8Array([7, 8, 9]));
  const whole = feed(new NbdHandshake({ exportName: 'x' }), stream);
  for (let cut = 1; cut < stream.length; cut++) {
    const events = feed(new NbdHandshake({ exportName: 'x' }), stream.subarray(0, cut), stream.subarray(cut));
    assert.deepEqual(events.map((e) => (e.type === 'ready' ? e.info : e)), whole.map((e) => (e.type === 'ready' ? e.info : e)), `cut at ${cut}`);
  }
  fc.assert(fc.property(fc.array(fc.integer({ min: 1, max: stream.length }), { maxLength: 20 }), (cuts) => {
    const points = [...new Set(cuts)].sort((a, b) => a - b);
    const pieces: Uint8Array[] = [];
    let at = 0;
    for (const p of points) {
      pieces.push(stream.subarray(at, p));
      at = p;
    }
    pieces.push(stream.subarray(at));
    const h = new NbdHandshake({ exportName: 'x' });
    const events: NbdHandshakeEvent[] = [];
    for (const p of pieces) if (!h.isOver) events.push(...h.receive(p));
    const ready = last(events);
    assert.equal(ready.type, 'ready');
    // Bytes after the final ACK are handed back, wherever the split fell.
    if (ready.type === 'ready') assert.deepEqual([...ready.rest], [7, 8, 9].slice(0, ready.rest.length));
  }), { numRuns: 200 });
});

test('a server without structured replies: simple replies only', () => {
  const events = feed(new NbdHandshake({ exportName: '' }), serverHandshake(MiB, ALL_FLAGS, { structured: false }));
  const ready = last(events);
  assert.ok(ready.type === 'ready' && !ready.info.structuredReplies && !ready.info.blockSizesAdvertised);
  if (ready.type === 'ready') assert.deepEqual(ready.info.blockSizes, { minimum: 1, preferred: 4096, maximum: 32 * MiB });
});

test('GO unsupported: NBD_OPT_EXPORT_NAME instead, with and without the 124 zero bytes', () => {
  for (const noZeroes of [true, false]) {
    const reply = new Uint8Array(10 + (noZeroes ? 0 : 124));
    const v = new DataView(reply.buffer);
    v.setBigUint64(0, BigInt(2 * MiB));
    v.setUint16(8, ALL_FLAGS);
    const h = new NbdHandshake({ exportName: 'e' });
    const events = feed(h, greeting(noZeroes ? 3 : 1), optionReply(OPT.STRUCTURED_REPLY, REP.ACK), optionReply(OPT.GO, REP.ERR_UNSUP), reply);
    assert.deepEqual(optionsSent(events), [OPT.STRUCTURED_REPLY, OPT.GO, OPT.EXPORT_NAME]);
    assert.equal(new DataView(sent(events).buffer).getUint32(0), noZeroes ? 3 : 1);
    const ready = last(events);
    assert.ok(ready.type === 'ready' && ready.info.size === 2 * MiB && ready.info.structuredReplies, `noZeroes ${noZeroes}`);
  }
});

test('plain (not fixed) newstyle: straight to NBD_OPT_EXPORT_NAME; its silence then means "no such export"', () => {
  const h = new NbdHandshake({ exportName: 'e' });
  const events = feed(h, greeting(0));
  assert.equal(new DataView(sent(events).buffer).getUint32(0), 0, 'no client flag the server did not offer');
  assert.deepEqual(optionsSent(events), [OPT.EXPORT_NAME]);
  assert.equal(h.closedError().code, 'EXPORT_UNKNOWN');
  assert.equal(failure(feed(new NbdHandshake({ exportName: 'e', tls: true }), greeting(0))), 'TLS_UNAVAILABLE');
});

test('refusals end with NBD_OPT_ABORT and say why: unknown export, TLS required, shutting down', () => {
  const unknown = feed(new NbdHandshake({ exportName: 'nope' }), greeting(), optionReply(OPT.STRUCTURED_REPLY, REP.ACK),
    optionReply(OPT.GO, REP.ERR_UNKNOWN, new TextEncoder().encode('no such\nexport')));
  assert.equal(failure(unknown), 'EXPORT_UNKNOWN');
  assert.match((last(unknown) as { error: Error }).error.message, /no export 'nope': no such\?export/);
  assert.deepEqual(optionsSent(unknown), [OPT.STRUCTURED_REPLY, OPT.GO, OPT.ABORT]);
  const tls = feed(new NbdHandshake({ exportName: '' }), greeting(), optionReply(OPT.STRUCTURED_REPLY, REP.ERR_TLS_REQD));
  assert.equal(failure(tls), 'TLS_REQUIRED');
  const down = feed(new NbdHandshake({ exportName: '' }), greeting(), optionReply(OPT.STRUCTURED_REPLY, REP.ACK), optionReply(OPT.GO, REP.ERR_SHUTDOWN));
  assert.equal(failure(down), 'SERVER_SHUTDOWN');
  assert.deepEqual(optionsSent(down).at(-1), OPT.ABORT);
});

test('TLS: STARTTLS first, the upgrade, then negotiation inside it; a refusal is final', () => {
  const h = new NbdHandshake({ exportName: 'd', tls: true });
  const before = feed(h, greeting(), optionReply(OPT.STARTTLS, REP.ACK));
  assert.deepEqual(optionsSent(before), [OPT.STARTTLS]);
  assert.equal(last(before).type, 'starttls');
  const after = h.tlsReady();
  assert.deepEqual(parseOptions(sent(after)).options.map((o) => o.option), [OPT.STRUCTURED_REPLY]);
  const rest = feed(h, optionReply(OPT.STRUCTURED_REPLY, REP.ACK), optionReply(OPT.GO, REP.INFO, infoExport(MiB, ALL_FLAGS)), optionReply(OPT.GO, REP.ACK));
  assert.equal(last(rest).type, 'ready');

  const refused = feed(new NbdHandshake({ exportName: 'd', tls: true }), greeting(), optionReply(OPT.STARTTLS, REP.ERR_POLICY));
  assert.equal(failure(refused), 'TLS_REFUSED');
  // Clear-text bytes after the server agreed to TLS: a downgrade attempt, refused.
  const sneaky = feed(new NbdHandshake({ exportName: 'd', tls: true }), concat(greeting(), optionReply(OPT.STARTTLS, REP.ACK), new Uint8Array(4)));
  assert.equal(failure(sneaky), 'UNEXPECTED_REPLY');
});

test('hostile servers: each broken reply is a typed error, never an exception', () => {
  const go = (...replies: Uint8Array[]) => feed(new NbdHandshake({ exportName: '' }), greeting(), optionReply(OPT.STRUCTURED_REPLY, REP.ACK), ...replies);
  const exportInfo = optionReply(OPT.GO, REP.INFO, infoExport(MiB, ALL_FLAGS));
  const cases: [string, NbdHandshakeEvent[]][] = [
    ['BAD_MAGIC', feed(new NbdHandshake({ exportName: '' }), new Uint8Array(18))],
    ['OLDSTYLE', feed(new NbdHandshake({ exportName: '' }), (() => {
      const g = greeting();
      new DataView(g.buffer).setBigUint64(8, 0x00420281861253n);
      return g;
    })())],
    ['OPTION_OUT_OF_ORDER', go(optionReply(OPT.STRUCTURED_REPLY, REP.ACK))],
    ['OVERSIZED', go(optionReply(OPT.GO, REP.INFO, new Uint8Array(0)).map((b, i) => (i === 16 ? 0x7f : b)).subarray(0, 20))],
    ['BAD_INFO', go(optionReply(OPT.GO, REP.INFO, infoExport(MiB, ALL_FLAGS).subarray(0, 11)))],
    ['BAD_INFO', go(optionReply(OPT.GO, REP.INFO, new Uint8Array(1)))],
    ['BAD_INFO', go(optionReply(OPT.GO, REP.INFO, infoExport(MiB, FLAGS.SEND_FLUSH)), optionReply(OPT.GO, REP.ACK))],
    ['BAD_INFO', go(exportInfo, optionReply(OPT.GO, REP.ACK, new Uint8Array(1)))],
    ['NO_EXPORT_INFO', go(optionReply(OPT.GO, REP.ACK))],
    ['BAD_SIZE', go(optionReply(OPT.GO, REP.INFO, infoExport(1n << 60n, ALL_FLAGS)), optionReply(OPT.GO, REP.ACK))],
    ['EXPORT_UNUSABLE', go(optionReply(OPT.GO, REP.INFO, infoExport(MiB + 1, ALL_FLAGS)), optionReply(OPT.GO, REP.ACK))],
    ['EXPORT_UNUSABLE', go(optionReply(OPT.GO, REP.INFO, infoExport(0, ALL_FLAGS)), optionReply(OPT.GO, REP.ACK))],
    ['EXPORT_UNUSABLE', go(exportInfo, optionReply(OPT.GO, REP.INFO, infoBlockSize(4096, 4096, MiB)),
      optionReply(OPT.GO, REP.INFO, infoExport(MiB + 512, ALL_FLAGS)), optionReply(OPT.GO, REP.ACK))],
    ['BAD_BLOCK_SIZE', go(exportInfo, optionReply(OPT.GO, REP.INFO, infoBlockSize(3, 4096, MiB)))],
    ['BAD_BLOCK_SIZE', go(exportInfo, optionReply(OPT.GO, REP.INFO, infoBlockSize(1 << 17, 1 << 17, 1 << 20)))],
    ['BAD_BLOCK_SIZE', go(exportInfo, optionReply(OPT.GO, REP.INFO, infoBlockSize(512, 256, MiB)))],
    ['BAD_BLOCK_SIZE', go(exportInfo, optionReply(OPT.GO, REP.INFO, infoBlockSize(512, 4096, 1024)))],
    ['UNEXPECTED_REPLY', go(optionReply(OPT.GO, 2 /* NBD_REP_SERVER */))],
    ['OPTION_REFUSED', go(optionReply(OPT.GO, REP.ERR_POLICY))],
  ];
  for (const [code, events] of cases) assert.equal(failure(events), code);
  // The oversized reply was refused from its head alone: nothing waited for 2 GiB.
  assert.ok(NBD_MAX_OPTION_REPLY < 0x7f000000);
});

test('property: any corruption of a server stream ends in ready, a typed failure, or a wait for more bytes; never an exception', () => {
  const good = serverHandshake(MiB, ALL_FLAGS, { blockSize: [512, 4096, MiB] });
  fc.assert(fc.property(
    fc.array(fc.tuple(fc.nat(good.length - 1), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 }),
    fc.nat(good.length), fc.boolean(),
    (flips, truncate, tls) => {
      const bad = good.slice(0, Math.max(1, truncate));
      for (const [at, value] of flips) if (at < bad.length) bad[at] = value;
      const h = new NbdHandshake({ exportName: 'p', tls });
      const events = h.receive(bad);
      for (const e of events) assert.ok(['send', 'starttls', 'ready', 'failed'].includes(e.type));
      if (h.isOver) assert.ok(['ready', 'failed'].includes(last(events).type));
    },
  ), { numRuns: 2000 });
});

test('an export name longer than 4096 bytes or holding NUL is refused up front', () => {
  assert.throws(() => new NbdHandshake({ exportName: 'x'.repeat(4097) }), { code: 'BAD_ARGUMENT' });
  assert.throws(() => new NbdHandshake({ exportName: 'a\0b' }), { code: 'BAD_ARGUMENT' });
});
