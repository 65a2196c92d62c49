import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { NBD_WIRE, errnoName, getU64BE, serverText, setU64BE } from './protocol.js';

test('each fixed message ends where its last field does (sizes from doc/proto.md)', () => {
  const W = NBD_WIRE;
  assert.equal(W.serverGreeting.flags + 2, W.serverGreeting.size);
  assert.equal(W.option.length + 4, W.option.size);
  assert.equal(W.optionReply.length + 4, W.optionReply.size);
  assert.equal(W.exportNameReply.flags + 2, W.exportNameReply.size);
  assert.equal(W.infoExport.flags + 2, W.infoExport.size);
  assert.equal(W.infoBlockSize.maximum + 4, W.infoBlockSize.size);
  assert.equal(W.request.length + 4, W.request.size);
  assert.equal(W.simpleReply.cookie + 8, W.simpleReply.size);
  assert.equal(W.chunk.length + 4, W.chunk.size);
  assert.equal(W.offsetHole.holeSize + 4, W.offsetHole.size);
  assert.equal(W.errorChunk.messageLength + 2, W.errorChunk.size);
});

test('big-endian u64: safe integers round-trip; anything above 2^53 - 1 reads as -1', () => {
  const v = new DataView(new ArrayBuffer(8));
  fc.assert(fc.property(fc.maxSafeNat(), (n) => {
    setU64BE(v, 0, n);
    assert.equal(v.getBigUint64(0), BigInt(n));
    assert.equal(getU64BE(v, 0), n);
  }));
  v.setBigUint64(0, 2n ** 53n);
  assert.equal(getU64BE(v, 0), -1);
  v.setBigUint64(0, 2n ** 64n - 1n);
  assert.equal(getU64BE(v, 0), -1);
});

test('error values and server text are printable', () => {
  assert.equal(errnoName(5), 'EIO (5)');
  assert.equal(errnoName(1234), 'error 1234');
  assert.equal(serverText(new Uint8Array([0x61, 0x0a, 0x1b, 0xff, 0x62])), 'a??\ufffdb');
  assert.equal(serverText(new Uint8Array(10_000).fill(0x41)).length, 4096);
});
