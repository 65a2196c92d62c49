/**
 * NBD URIs (doc/uri.md of github.com/NetworkBlockDevice/nbd), parsed strictly as RFC 3986
 * URIs: `nbd://HOST[:PORT]/EXPORT`, `nbds://…` (TLS, no fallback to clear text),
 * `nbd+unix:///EXPORT?socket=PATH` and `nbds+unix:///EXPORT?socket=PATH`.
 *
 * A URI is outside input: every character is checked against the RFC's grammar before
 * anything is decoded, and every mistake is an {@link NbdUriError} whose one-line message
 * says what is wrong and where. What the NBD URI document leaves to the client is refused
 * rather than guessed: a TCP URI without a host, a unix URI with one, query parameters this
 * client does not understand (the document says they "SHOULD be diagnosed"), TLS
 * parameters on a clear-text scheme, a fragment, and userinfo (it serves TLS PSK, which is
 * not supported; nor are `tls-type=anon` and `psk`: only X.509).
 */
import { VblkError } from '../../errors.js';
import { NBD_DEFAULT_PORT, NBD_MAX_STRING } from './protocol.js';

/** The URI schemes of the NBD URI document. */
export type NbdScheme = 'nbd' | 'nbds' | 'nbd+unix' | 'nbds+unix';

/** Where the server listens. */
export type NbdAddress =
  | {
    /** TCP (`nbd://`, `nbds://`). */
    readonly kind: 'tcp';
    /** A host name or an IP address (without brackets). */
    readonly host: string;
    /** The URI's port, else NBD's 10809. */
    readonly port: number;
  }
  | {
    /** A unix socket (`nbd+unix://`, `nbds+unix://`). */
    readonly kind: 'unix';
    /** The `socket` parameter: a path; one starting with NUL names a socket in Linux's abstract namespace. */
    readonly socket: string;
  };

/** A parsed NBD URI. */
export interface NbdUri {
  /** As written: it says whether TLS is required and whether the address is TCP or a unix socket. */
  readonly scheme: NbdScheme;
  /** Where the server listens. */
  readonly address: NbdAddress;
  /** The export name: the path without its leading `/`, percent-decoded ("" is the default export). */
  readonly exportName: string;
  /** TLS is required (`nbds`, `nbds+unix`): a server that will not start it is refused. */
  readonly tls: boolean;
  /** `tls-hostname`: the name to verify the server's certificate against. */
  readonly tlsHostname?: string;
  /** `tls-verify-peer` (default true): verify the server's certificate. */
  readonly tlsVerifyPeer: boolean;
}

/** A string that is not a usable NBD URI. */
export class NbdUriError extends VblkError {
  declare readonly code: 'BAD_NBD_URI';
  constructor(message: string) {
    super('BAD_NBD_URI', message);
  }
}

const SCHEMES: readonly NbdScheme[] = ['nbd', 'nbds', 'nbd+unix', 'nbds+unix'];
const QUERY_KEYS = ['socket', 'tls-type', 'tls-hostname', 'tls-verify-peer'] as const;
type QueryKey = (typeof QUERY_KEYS)[number];

/**
 * Whether `source` is meant as an NBD URI (one of the four schemes, then ':'), as
 * opposed to a file name: what `vblk serve SOURCE` goes by. It may still be a bad one.
 */
export function looksLikeNbdUri(source: string): boolean {
  return /^nbds?(\+unix)?:/i.test(source);
}

// RFC 3986, 2.2 and 2.3.
const UNRESERVED = /[A-Za-z0-9\-._~]/;
const SUB_DELIMS = /[!$&'()*+,;=]/;
const HEX = /^[0-9A-Fa-f]{2}$/;

function isPchar(c: string): boolean {
  return UNRESERVED.test(c) || SUB_DELIMS.test(c) || c === ':' || c === '@';
}

// ignoreBOM: a path or export name that begins with U+FEFF keeps it (by default the decoder drops it).
const fatalUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const utf8 = new TextEncoder();

/** Parses `text` as an NBD URI; throws {@link NbdUriError} saying what is wrong. */
export function parseNbdUri(text: string): NbdUri {
  const fail: (why: string) => never = (why) => {
    throw new NbdUriError(`not a usable NBD URI (${why}): ${printable(text)}`);
  };
  const colon = text.indexOf(':');
  if (colon < 0) fail('no scheme');
  const scheme = text.slice(0, colon).toLowerCase() as NbdScheme;
  if (!SCHEMES.includes(scheme)) fail(`scheme '${text.slice(0, colon)}' is not one of ${SCHEMES.join(', ')}`);
  // Every character must be one a URI may hold; the rest must be percent-encoded.
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (!(UNRESERVED.test(c) || SUB_DELIMS.test(c) || ':/?#[]@%'.includes(c))) {
      fail(`character ${JSON.stringify(c)} at position ${i} must be percent-encoded`);
    }
  }
  let rest = text.slice(colon + 1);
  const hash = rest.indexOf('#');
  if (hash >= 0) fail('a fragment (#…) has no meaning in an NBD URI');
  if (!rest.startsWith('//')) fail(`${scheme}: must be followed by // (${scheme}://…)`);
  rest = rest.slice(2);
  const q = rest.indexOf('?');
  const query = q < 0 ? null : rest.slice(q + 1);
  const beforeQuery = q < 0 ? rest : rest.slice(0, q);
  const slash = beforeQuery.indexOf('/');
  const authority = slash < 0 ? beforeQuery : beforeQuery.slice(0, slash);
  const path = slash < 0 ? '' : beforeQuery.slice(slash);

  // Path: "/" segments of pchars; the export name is all of it after the first "/".
  for (const c of path) if (c !== '/' && c !== '%' && !isPchar(c)) fail(`character ${JSON.stringify(c)} in the path must be percent-encoded`);
  const exportName = decode(path.slice(1), 'the export name', fail);
  if (exportName.includes('\0')) fail('the export name contains NUL');
  if (utf8.encode(exportName).length > NBD_MAX_STRING) fail(`the export name is longer than ${NBD_MAX_STRING} bytes`);

  const params = parseQuery(query, fail);
  const unix = scheme.endsWith('+unix');
  const tls = scheme.startsWith('nbds');
  if (!tls) {
    for (const k of ['tls-type', 'tls-hostname', 'tls-verify-peer'] as const) {
      if (params.has(k)) fail(`${k} is a TLS parameter and ${scheme}:// does not use TLS (nbds${unix ? '+unix' : ''}:// does)`);
    }
  }
  const tlsType = params.get('tls-type');
  if (tlsType !== undefined && tlsType !== 'x509') fail(`tls-type '${tlsType}' is not supported: only x509`);
  const verify = params.get('tls-verify-peer');
  if (verify !== undefined && verify !== '0' && verify !== '1') fail(`tls-verify-peer must be 0 or 1, got '${verify}'`);
  const tlsHostname = params.get('tls-hostname');
  if (tlsHostname !== undefined && !isRegName(tlsHostname)) fail(`tls-hostname '${tlsHostname}' is not a host name`);

  let address: NbdAddress;
  if (unix) {
    if (authority !== '') fail(`${scheme}:// names a unix socket with ?socket=PATH and has no host: ${scheme}:///EXPORT?socket=PATH`);
    const socket = params.get('socket');
    if (socket === undefined || socket === '') fail(`${scheme}:// needs ?socket=PATH`);
    if (socket.slice(1).includes('\0')) fail('the socket path contains NUL past its first byte');
    address = { kind: 'unix', socket };
  } else {
    if (params.has('socket')) fail(`socket= is for nbd+unix:// and nbds+unix://, not ${scheme}://`);
    address = parseAuthority(authority, scheme, fail);
  }
  const uri: NbdUri = { scheme, address, exportName, tls, tlsVerifyPeer: verify !== '0' };
  return tlsHostname === undefined ? uri : { ...uri, tlsHostname };
}

function parseQuery(query: string | null, fail: (why: string) => never): Map<QueryKey, string> {
  const params = new Map<QueryKey, string>();
  if (query === null || query === '') return params;
  for (const c of query) if (c !== '/' && c !== '?' && c !== '%' && !isPchar(c)) fail(`character ${JSON.stringify(c)} in the query must be percent-encoded`);
  for (const pair of query.split('&')) {
    const eq = pair.indexOf('=');
    if (eq < 0) fail(`query parameter '${pair}' has no =VALUE`);
    const key = decode(pair.slice(0, eq), 'a query parameter name', fail);
    const value = decode(pair.slice(eq + 1), `query parameter ${key}`, fail);
    if (!(QUERY_KEYS as readonly string[]).includes(key)) fail(`unknown query parameter '${key}' (known: ${QUERY_KEYS.join(', ')})`);
    if (params.has(key as QueryKey)) fail(`query parameter '${key}' given twice`);
    params.set(key as QueryKey, value);
  }
  return params;
}

function parseAuthority(authority: string, scheme: NbdScheme, fail: (why: string) => never): NbdAddress {
  if (authority.includes('@')) fail('userinfo (user@) is for TLS PSK authentication, which is not supported');
  let host: string;
  let portText: string | undefined;
  if (authority.startsWith('[')) {
    const close = authority.indexOf(']');
    if (close < 0) fail('an IPv6 address opened with [ is not closed with ]');
    host = authority.slice(1, close);
    const after = authority.slice(close + 1);
    if (after !== '' && !after.startsWith(':')) fail(`'${after}' after the IPv6 address`);
    portText = after === '' ? undefined : after.slice(1);
    if (!isIPv6(host)) fail(`[${host}] is not an IPv6 address`);
  } else {
    if (authority.includes('[') || authority.includes(']')) fail('[ and ] may only enclose an IPv6 address');
    const c = authority.lastIndexOf(':');
    host = c < 0 ? authority : authority.slice(0, c);
    portText = c < 0 ? undefined : authority.slice(c + 1);
    if (host === '') fail(`${scheme}:// needs a host: ${scheme}://HOST[:PORT]/EXPORT (a unix socket: ${scheme}+unix:///EXPORT?socket=PATH)`);
    if (!isRegName(host)) fail(`host '${host}' is not a host name or IPv4 address`);
  }
  let port = NBD_DEFAULT_PORT;
  // RFC 3986 allows an empty port ("host:"): the default.
  if (portText !== undefined && portText !== '') {
    if (!/^\d{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) fail(`port '${portText}' is not a number from 1 to 65535`);
    port = Number(portText);
  }
  return { kind: 'tcp', host, port };
}

/** A DNS-style host name or an IPv4 address (no percent-encoding: hosts need none). */
function isRegName(s: string): boolean {
  return /^[A-Za-z0-9\-._~]+$/.test(s);
}

/** RFC 4291 text form (RFC 3986's IPv6address): eight groups, one "::", an IPv4 tail. */
function isIPv6(s: string): boolean {
  if (!/^[0-9A-Fa-f:.]+$/.test(s)) return false;
  const halves = s.split('::');
  if (halves.length > 2) return false;
  const all = halves.flatMap((part) => (part === '' ? [] : part.split(':')));
  let count = 0;
  for (let i = 0; i < all.length; i++) {
    const g = all[i];
    if (g.includes('.')) {
      // An IPv4 tail: only the very last group, and it counts for two.
      if (i !== all.length - 1 || !/^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/.test(g)) return false;
      count += 2;
    } else {
      if (!/^[0-9A-Fa-f]{1,4}$/.test(g)) return false;
      count += 1;
    }
  }
  return halves.length === 2 ? count <= 7 : count === 8;
}

/** Percent-decodes `s` as UTF-8; fails on a broken escape or bytes that are not UTF-8. */
function decode(s: string, what: string, fail: (why: string) => never): string {
  if (!s.includes('%')) return s;
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '%') {
      const hex = s.slice(i + 1, i + 3);
      if (!HEX.test(hex)) fail(`'%${hex}' in ${what} is not a percent-encoded byte (%XX)`);
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      // Only ASCII reaches here: parseNbdUri refused everything else.
      bytes.push(s.charCodeAt(i));
    }
  }
  try {
    return fatalUtf8.decode(new Uint8Array(bytes));
  } catch {
    return fail(`${what} is not UTF-8 once percent-decoded`);
  }
}

/** Percent-encodes every byte of `s` (UTF-8) except unreserved characters and `keep`. */
function encode(s: string, keep: string): string {
  let out = '';
  for (const b of utf8.encode(s)) {
    const c = String.fromCharCode(b);
    out += b < 0x80 && (UNRESERVED.test(c) || keep.includes(c)) ? c : `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** The URI of `uri`, in a canonical form that {@link parseNbdUri} reads back as the same. */
export function formatNbdUri(uri: NbdUri): string {
  const a = uri.address;
  let authority = '';
  const query: string[] = [];
  if (a.kind === 'tcp') {
    authority = a.host.includes(':') ? `[${a.host}]` : a.host;
    if (a.port !== NBD_DEFAULT_PORT) authority += `:${a.port}`;
  } else {
    query.push(`socket=${encode(a.socket, '/:@')}`);
  }
  if (uri.tlsHostname !== undefined) query.push(`tls-hostname=${uri.tlsHostname}`);
  if (!uri.tlsVerifyPeer) query.push('tls-verify-peer=0');
  return `${uri.scheme}://${authority}/${encode(uri.exportName, '/:@')}${query.length > 0 ? `?${query.join('&')}` : ''}`;
}

/** A URI for a message: non-printable characters escaped. */
function printable(s: string): string {
  const shown = s.length > 200 ? `${s.slice(0, 200)}…` : s;
  return JSON.stringify(shown);
}
