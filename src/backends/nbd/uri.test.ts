import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { NbdUriError, formatNbdUri, looksLikeNbdUri, parseNbdUri, type NbdUri } from './uri.js';

test('the export names of the NBD URI document\'s table', () => {
  const table: [string, string][] = [
    ['nbd://example.com/disk', 'disk'],
    ['nbd+unix:///disk?socket=sock', 'disk'],
    ['nbd://example.com/', ''],
    ['nbd://example.com', ''],
    ['nbd://example.com//disk', '/disk'],
    ['nbd://example.com/hello%20world', 'hello world'],
  ];
  for (const [uri, name] of table) assert.equal(parseNbdUri(uri).exportName, name, uri);
});

test('addresses, ports and TLS parameters', () => {
  assert.deepEqual(parseNbdUri('nbd://127.0.0.1:10810/x'), {
    scheme: 'nbd', address: { kind: 'tcp', host: '127.0.0.1', port: 10810 }, exportName: 'x', tls: false, tlsVerifyPeer: true,
  });
  assert.deepEqual(parseNbdUri('NBD://h').address, { kind: 'tcp', host: 'h', port: 10809 }, 'default port; scheme case-insensitive');
  assert.deepEqual(parseNbdUri('nbd://h:/').address, { kind: 'tcp', host: 'h', port: 10809 }, 'an empty port is the default');
  assert.deepEqual(parseNbdUri('nbd://[::1]:99/e').address, { kind: 'tcp', host: '::1', port: 99 });
  assert.deepEqual(parseNbdUri('nbd://[fe80::1:2:192.168.0.1]/').address, { kind: 'tcp', host: 'fe80::1:2:192.168.0.1', port: 10809 });
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=/run/a%20b.sock').address, { kind: 'unix', socket: '/run/a b.sock' });
  assert.deepEqual(parseNbdUri('nbd+unix:///?socket=%00/abstract').address, { kind: 'unix', socket: '\0/abstract' });
  assert.equal(parseNbdUri('nbd+unix:///a+b?socket=s').exportName, 'a+b', '+ is a plus, not a space (RFC 3986)');
  const s = parseNbdUri('nbds://h/e?tls-hostname=server.example&tls-verify-peer=0&tls-type=x509');
  assert.deepEqual([s.tls, s.tlsHostname, s.tlsVerifyPeer], [true, 'server.example', false]);
  assert.equal(parseNbdUri('nbds+unix:///e?socket=/s').tls, true);
  assert.equal(parseNbdUri('nbd://h/%C3%A9t%C3%A9').exportName, 'été');
});

test('what the URI document leaves open, or forbids, is refused with a message that says why', () => {
  const bad: [string, RegExp][] = [
    ['http://h/e', /scheme 'http'/],
    ['disk.img', /no scheme/],
    ['nbd:h/e', /must be followed by \/\//],
    ['nbd:///e', /needs a host/],
    ['nbd+unix:///e', /needs \?socket=PATH/],
    ['nbd+unix://h/e?socket=/s', /has no host/],
    ['nbd://h/e?socket=/s', /socket= is for nbd\+unix/],
    ['nbd://h/e?tls-hostname=x', /TLS parameter/],
    ['nbds://h/e?tls-type=psk', /tls-type 'psk' is not supported/],
    ['nbds://h/e?tls-verify-peer=yes', /must be 0 or 1/],
    ['nbd://h/e?x-foo=1', /unknown query parameter 'x-foo'/],
    ['nbd://h/e?flag', /has no =VALUE/],
    ['nbd+unix:///e?socket=/a&socket=/b', /given twice/],
    ['nbd://h/e#frag', /fragment/],
    ['nbd://user@h/e', /userinfo/],
    ['nbd://h:0/e', /port '0'/],
    ['nbd://h:65536/e', /port '65536'/],
    ['nbd://h:x/e', /port 'x'/],
    ['nbd://[::1/e', /not closed/],
    ['nbd://[1:2]/e', /not an IPv6 address/],
    ['nbd://[::1]x/e', /after the IPv6 address/],
    ['nbd://h/a b', /character " " at position 9 must be percent-encoded/],
    ['nbd://h/%zz', /not a percent-encoded byte/],
    ['nbd://h/%ff', /not UTF-8/],
    ['nbd://h/a%00b', /contains NUL/],
    ['nbd://h%41/e', /not a host name/],
    ['nbd://h/é', /must be percent-encoded/],
    [`nbd://h/${'x'.repeat(4097)}`, /longer than 4096 bytes/],
  ];
  for (const [uri, why] of bad) {
    assert.throws(() => parseNbdUri(uri), (e: unknown) => e instanceof NbdUriError && e.code === 'BAD_NBD_URI' && why.test(e.message) && !e.message.includes('\n'), uri);
  }
});

test('looksLikeNbdUri tells URIs from image paths', () => {
  for (const s of ['nbd://h', 'nbds://h', 'nbd+unix:///', 'NBDS+UNIX:///', 'nbd:bad']) assert.ok(looksLikeNbdUri(s), s);
  for (const s of ['disk.img', '/tmp/nbd://x', './nbd:x', 'nbdx://h']) assert.ok(!looksLikeNbdUri(s), s);
});

const hostArb = fc.oneof(
  fc.stringMatching(/^[a-z0-9][a-z0-9.-]{0,20}$/),
  fc.tuple(fc.nat(255), fc.nat(255), fc.nat(255), fc.nat(255)).map((p) => p.join('.')),
  fc.ipV6(),
);

const uriArb: fc.Arbitrary<NbdUri> = fc.record({
  tls: fc.boolean(),
  unix: fc.boolean(),
  host: hostArb,
  port: fc.integer({ min: 1, max: 65535 }),
  socket: fc.string({ unit: 'binary', minLength: 1, maxLength: 40 }).filter((s) => !s.slice(1).includes('\0')),
  exportName: fc.string({ unit: 'binary', maxLength: 40 }).filter((s) => !s.includes('\0')),
  tlsHostname: fc.option(fc.stringMatching(/^[a-z0-9][a-z0-9.-]{0,20}$/), { nil: undefined }),
  verify: fc.boolean(),
}).map((r) => {
  const scheme = `${r.tls ? 'nbds' : 'nbd'}${r.unix ? '+unix' : ''}` as NbdUri['scheme'];
  const uri: NbdUri = {
    scheme,
    address: r.unix ? { kind: 'unix', socket: r.socket } : { kind: 'tcp', host: r.host, port: r.port },
    exportName: r.exportName,
    tls: r.tls,
    tlsVerifyPeer: r.tls ? r.verify : true,
  };
  return r.tls && r.tlsHostname !== undefined ? { ...uri, tlsHostname: r.tlsHostname } : uri;
});

test('property: every URI formatNbdUri writes parses back to the same thing', () => {
  fc.assert(fc.property(uriArb, (uri) => {
    const text = formatNbdUri(uri);
    const back = parseNbdUri(text);
    // fast-check's IPv6 may use forms the parser keeps as written: compare as written.
    assert.deepEqual(back, uri, text);
  }), { numRuns: 2000 });
});

test('property: any string is parsed or refused with an NbdUriError, never anything else', () => {
  const near = fc.tuple(fc.constantFrom('nbd://', 'nbds://', 'nbd+unix://', 'nbds+unix:///', 'nbd:', ''), fc.string({ unit: 'binary', maxLength: 60 }))
    .map(([a, b]) => a + b);
  fc.assert(fc.property(fc.oneof(near, fc.string({ maxLength: 80 })), (s) => {
    try {
      const u = parseNbdUri(s);
      // Whatever parses formats to a URI that parses to the same.
      assert.deepEqual(parseNbdUri(formatNbdUri(u)), u);
    } catch (e) {
      assert.ok(e instanceof NbdUriError, `${JSON.stringify(s)}: ${String(e)}`);
    }
  }), { numRuns: 5000 });
});

test('a socket path or export name that begins with U+FEFF keeps it (found by the round-trip property, seed -1486950337)', () => {
  const uri: NbdUri = { scheme: 'nbd+unix', address: { kind: 'unix', socket: '\uFEFF\u0001' }, exportName: '\uFEFFdisk', tls: false, tlsVerifyPeer: true };
  assert.deepEqual(parseNbdUri(formatNbdUri(uri)), uri);
});
