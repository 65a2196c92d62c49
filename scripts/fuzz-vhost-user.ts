/**
 * A seeded, reproducible fuzzer for the vhost-user backend (issue 7, item 2).
 *
 *   node dist/scripts/fuzz-vhost-user.js --iterations N --seed S [--time-limit SECONDS]
 *        [--check-every K] [--server cli|child] [--json] [--verbose] [--dry-run]
 *
 * Each iteration is one frontend connection. It starts from a valid session — the
 * handshake, a sealed memory table, a ring set up and enabled with a well-formed
 * request in it, GET_VRING_BASE — and mutates it: bytes flipped, size, flags and request
 * fields changed, interesting values in payload fields, fds added, dropped or swapped
 * for other kinds (pipes, files, sockets, unsealed memfds), messages reordered,
 * duplicated, deleted or invented, messages split across writes, a disconnect
 * mid-message, a corrupted ring. Iteration i's plan depends only on (seed, i), so
 * `--seed S --start i --iterations 1` replays it.
 *
 * The server is `vblk serve IMG --socket S` (the compiled CLI) when it is built, else
 * the test child around VhostUserServer (test/support/serve-child.ts); `--server`
 * chooses. After each iteration it must have logged why the connection ended, still be
 * alive, be back to its baseline of open fds with no shared memory left mapped, and never
 * have closed an fd twice; every
 * K iterations (and at the end) a well-behaved frontend must write and read back a
 * block. Exit status: 0 when all of that held, 1 on a crash, wedge, leak or double
 * close (the failing iteration is printed for replay), 2 on bad arguments.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import * as native from '../src/node/native.js';
import { VHOST_USER, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_PROTOCOL_F } from '../src/spec/vhost-user.js';
import { VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { VIRTIO_F } from '../src/spec/virtio.js';
import { encodeFrontendRequest } from '../src/transport/vhost-user/codec.js';
import type { FrontendRequest } from '../src/transport/vhost-user/messages.js';
import { FdFactory, GuestRing, RawFrontend, SharedRegion, bit } from '../test/support/raw-frontend.js';
import { ServerProcess, describeExit, sleep } from '../test/support/server-process.js';
import { wellBehavedRoundTrip } from '../test/support/well-behaved.js';

// ---------------------------------------------------------------------------------------
// A seeded PRNG: splitmix32 (Vigna's splitmix finaliser on a Weyl sequence). Small,
// fast, good enough to pick mutations, and the same on every machine.

export class Rng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** The stream for iteration `i` of a run seeded with `seed`: independent of every other iteration. */
  static forIteration(seed: number, i: number): Rng {
    return new Rng(new Rng(seed ^ Math.imul(i + 1, 0x9e37_79b1)).u32());
  }

  u32(): number {
    this.state = (this.state + 0x9e37_79b9) >>> 0;
    let t = this.state ^ (this.state >>> 16);
    t = Math.imul(t, 0x21f0_aaad);
    t ^= t >>> 15;
    t = Math.imul(t, 0x735a_2d97);
    t ^= t >>> 15;
    return t >>> 0;
  }

  /** An integer in [0, n). */
  below(n: number): number {
    return Math.floor((this.u32() / 0x1_0000_0000) * n);
  }

  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)];
  }
}

// ---------------------------------------------------------------------------------------
// Plans: what one iteration sends

/**
 * fds a message may carry. `kick` and `call` are eventfds the case keeps (it kicks with
 * them); `guest` is its memory; `inflight` a sealed memfd holding the plan's inflight log.
 */
type FdKind = 'eventfd' | 'kick' | 'call' | 'guest' | 'inflight' | 'memfd' | 'memfd-unsealed' | 'pipe' | 'socket' | 'file';
const HOSTILE_FDS: readonly FdKind[] = ['eventfd', 'memfd', 'memfd-unsealed', 'pipe', 'socket', 'file', 'guest'];

interface Msg {
  bytes: Uint8Array;
  fds: FdKind[];
  /** Send in this many writes (1: one sendmsg). */
  pieces: number;
}

interface Plan {
  readonly msgs: Msg[];
  /** Disconnect after this many bytes of message `msg`. */
  cut: { msg: number; bytes: number } | null;
  /** The first bytes of guest memory: the ring and its requests, as the (hostile) guest wrote them. */
  image: Uint8Array;
  /** What the `inflight` memfd holds: a log as a hostile frontend (or a dead backend) left it. */
  readonly inflightLog: Uint8Array;
  /** Kick ring 0 after sending. */
  kick: boolean;
  /** Close at once after the last message instead of waiting a little for the server. */
  hangUp: boolean;
  /** What was done, for --verbose and replays. */
  readonly mutations: string[];
}

const RING_SIZE = 16;
const MEMORY_BYTES = 1 << 20;
/** The ring and the requests' headers and data sit in these first bytes of guest memory. */
const IMAGE_BYTES = 128 * 1024;
/** One queue's inflight log for a ring of RING_SIZE: 16-byte head, 16 bytes per descriptor, rounded to 64. */
const INFLIGHT_QUEUE_BYTES = 320;
/** Request types a guest may send, known and not. */
const REQUEST_TYPES = [VIRTIO_BLK_T.IN, VIRTIO_BLK_T.OUT, VIRTIO_BLK_T.FLUSH, VIRTIO_BLK_T.GET_ID, VIRTIO_BLK_T.DISCARD, VIRTIO_BLK_T.WRITE_ZEROES, 99];

function encode(req: FrontendRequest, fds: FdKind[] = []): Msg {
  return { bytes: encodeFrontendRequest(req).bytes.slice(), fds, pieces: 1 };
}

/** The valid session every plan starts from (the NOTES' working order for a frontend). */
function baseSession(ring: GuestRing, mem: SharedRegion, needReply: boolean): Msg[] {
  const protocol = bit(VHOST_USER_PROTOCOL_F.REPLY_ACK) | bit(VHOST_USER_PROTOCOL_F.CONFIG) | bit(VHOST_USER_PROTOCOL_F.MQ);
  const features = bit(VIRTIO_F.VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
  // fd numbers are placeholders: the codec checks them, the real fds ride beside the bytes.
  const placeholder = { ...mem.region, fd: 0 };
  return [
    encode({ request: 'SET_OWNER', needReply: false }),
    encode({ request: 'GET_FEATURES', needReply: false }),
    encode({ request: 'SET_FEATURES', needReply, features }),
    encode({ request: 'GET_PROTOCOL_FEATURES', needReply: false }),
    encode({ request: 'SET_PROTOCOL_FEATURES', needReply: false, features: protocol }),
    encode({ request: 'GET_QUEUE_NUM', needReply: false }),
    encode({ request: 'GET_CONFIG', needReply: false, offset: 0, size: 60, flags: 0 }),
    encode({ request: 'SET_MEM_TABLE', needReply, regions: [placeholder] }, ['guest']),
    encode({ request: 'SET_VRING_NUM', needReply, index: 0, num: RING_SIZE }),
    encode({ request: 'SET_VRING_BASE', needReply, index: 0, num: 0 }),
    encode({ request: 'SET_VRING_ADDR', needReply, index: 0, flags: 0, ...ring.userAddresses, log: 0 }),
    encode({ request: 'SET_VRING_KICK', needReply, index: 0, fd: 0 }, ['kick']),
    encode({ request: 'SET_VRING_CALL', needReply, index: 0, fd: 0 }, ['call']),
    encode({ request: 'SET_VRING_ENABLE', needReply, index: 0, enable: true }),
    encode({ request: 'GET_VRING_BASE', needReply: false, index: 0 }),
  ];
}

/** Values that sit on the edges of the checks: counts, indexes, sizes, addresses. */
const INTERESTING = [0n, 1n, 2n, 3n, 7n, 8n, 9n, 15n, 16n, 17n, 200n, 0xffn, 0x100n, 0x101n, 0xffffn, 0x10000n, 0x7fff_ffffn,
  0xffff_ffffn, 0x1_0000_0000n, (1n << 53n) - 1n, 1n << 53n, (1n << 64n) - 1n];

function setU32(bytes: Uint8Array, at: number, value: number): void {
  new DataView(bytes.buffer, bytes.byteOffset).setUint32(at, value >>> 0, true);
}

/** The mutations, each small; a plan gets one to four of them. */
const MUTATIONS: readonly [string, (p: Plan, r: Rng, ring: GuestRing) => void][] = [
  ['flip bytes', (p, r) => {
    const m = r.pick(p.msgs);
    for (let n = 1 + r.below(4); n > 0; n--) m.bytes[r.below(m.bytes.length)] ^= 1 << r.below(8);
  }],
  ['size field', (p, r) => {
    const m = r.pick(p.msgs);
    const len = m.bytes.length - 12;
    setU32(m.bytes, 8, r.pick([len - 1, len + 1, 0, r.below(300), 4096, 4097, 0xffff_ffff]));
  }],
  ['flags field', (p, r) => setU32(r.pick(p.msgs).bytes, 4, r.pick([0, 1, 2, 3, 5, 9, 0xd, 0x11, r.u32()]))],
  ['request field', (p, r) => setU32(r.pick(p.msgs).bytes, 0, r.chance(0.8) ? r.below(46) : r.u32())],
  ['payload value', (p, r) => {
    const m = r.pick(p.msgs);
    const len = m.bytes.length - 12;
    if (len < 4) return;
    const at = 12 + 4 * r.below(Math.floor(len / 4));
    const v = r.pick(INTERESTING);
    const view = new DataView(m.bytes.buffer, m.bytes.byteOffset);
    if (at + 8 <= m.bytes.length && r.chance(0.5)) view.setBigUint64(at, v, true);
    else view.setUint32(at, Number(v & 0xffff_ffffn), true);
  }],
  ['truncate payload', (p, r) => {
    const m = r.pick(p.msgs);
    m.bytes = m.bytes.slice(0, 12 + r.below(m.bytes.length - 11));
  }],
  ['add fd', (p, r) => {
    const m = r.pick(p.msgs);
    if (m.fds.length < 8) m.fds.push(r.pick(HOSTILE_FDS));
  }],
  ['drop fd', (p, r) => {
    const withFds = p.msgs.filter((x) => x.fds.length > 0);
    if (withFds.length === 0) return;
    const m = r.pick(withFds);
    m.fds.splice(r.below(m.fds.length), 1);
  }],
  ['swap fd kind', (p, r) => {
    const withFds = p.msgs.filter((x) => x.fds.length > 0);
    if (withFds.length === 0) return;
    const m = r.pick(withFds);
    m.fds[r.below(m.fds.length)] = r.pick(HOSTILE_FDS);
  }],
  ['swap messages', (p, r) => {
    const a = r.below(p.msgs.length);
    const b = r.below(p.msgs.length);
    [p.msgs[a], p.msgs[b]] = [p.msgs[b], p.msgs[a]];
  }],
  ['duplicate message', (p, r) => {
    const at = r.below(p.msgs.length);
    const m = p.msgs[at];
    p.msgs.splice(at, 0, { bytes: m.bytes.slice(), fds: [...m.fds], pieces: m.pieces });
  }],
  ['delete message', (p, r) => {
    if (p.msgs.length > 1) p.msgs.splice(r.below(p.msgs.length), 1);
  }],
  ['invent message', (p, r) => {
    const payload = new Uint8Array(r.pick([0, 8, 16, 24, 40, 40, r.below(64)]));
    for (let i = 0; i < payload.length; i++) payload[i] = r.chance(0.7) ? 0 : r.below(256);
    const bytes = new Uint8Array(12 + payload.length);
    setU32(bytes, 0, 1 + r.below(40));
    setU32(bytes, 4, r.pick([1, 9]));
    setU32(bytes, 8, payload.length);
    bytes.set(payload, 12);
    p.msgs.splice(r.below(p.msgs.length + 1), 0, { bytes, fds: Array.from({ length: r.below(3) }, () => r.pick(HOSTILE_FDS)), pieces: 1 });
  }],
  ['split writes', (p, r) => {
    r.pick(p.msgs).pieces = 2 + r.below(3);
  }],
  ['disconnect mid-message', (p, r) => {
    const msg = r.below(p.msgs.length);
    p.cut = { msg, bytes: 1 + r.below(p.msgs[msg].bytes.length - 1) };
  }],
  ['more requests', (_p, r, ring) => {
    for (let n = 1 + r.below(4); n > 0; n--) {
      ring.blkRequest(r.pick(REQUEST_TYPES), r.chance(0.8) ? r.below(4096) : r.pick([2 ** 40, 32767, 32768, 2 ** 53 - 1]), r.pick([512, 4096, 100, 0, 8192]));
    }
  }],
  ['corrupt ring bytes', (_p, r, ring) => {
    const end = ring.used + 6 + 8 * RING_SIZE;
    for (let n = 1 + r.below(8); n > 0; n--) ring.mem.bytes[r.below(end)] = r.below(256);
  }],
  ['hostile descriptor', (_p, r, ring) => {
    const i = r.below(RING_SIZE);
    const at = ring.desc + 16 * i;
    const v = ring.mem.view;
    switch (r.below(4)) {
      case 0: v.setBigUint64(at, r.pick([0n, BigInt(ring.gpa(MEMORY_BYTES - 1)), 1n << 53n, (1n << 64n) - 1n, BigInt(ring.gpa(0))]), true); break;
      case 1: v.setUint32(at + 8, Number(r.pick(INTERESTING) & 0xffff_ffffn), true); break;
      case 2: v.setUint16(at + 12, r.below(8), true); break;
      default: v.setUint16(at + 14, r.chance(0.5) ? i : r.below(0x10000), true);
    }
  }],
  ['hostile avail', (_p, r, ring) => {
    if (r.chance(0.5)) ring.setAvailIdx(r.chance(0.5) ? r.below(0x10000) : r.below(RING_SIZE + 2));
    else ring.mem.view.setUint16(ring.avail + 4 + 2 * r.below(RING_SIZE), r.chance(0.5) ? r.below(RING_SIZE * 2) : r.below(0x10000), true);
  }],
  ['inflight buffer', (p, r) => {
    const at = p.msgs.findIndex((m) => new DataView(m.bytes.buffer, m.bytes.byteOffset).getUint32(0, true) === VHOST_USER.SET_PROTOCOL_FEATURES);
    if (at < 0 || p.msgs[at].bytes.length !== 20) return;
    const view = new DataView(p.msgs[at].bytes.buffer, p.msgs[at].bytes.byteOffset);
    view.setBigUint64(12, view.getBigUint64(12, true) | bit(VHOST_USER_PROTOCOL_F.INFLIGHT_SHMFD), true);
    // A log that looks right (version 1, this queue size) with states a hostile frontend chose.
    const log = new DataView(p.inflightLog.buffer);
    for (const q of [0, INFLIGHT_QUEUE_BYTES]) {
      log.setUint16(q + 8, r.chance(0.9) ? 1 : r.below(4), true);
      log.setUint16(q + 10, r.chance(0.9) ? RING_SIZE : r.below(0x10000), true);
      log.setUint16(q + 14, r.chance(0.5) ? 0 : r.below(0x10000), true);
      for (let i = 0; i < RING_SIZE; i++) {
        if (r.chance(0.3)) log.setUint8(q + 16 + 16 * i, 1 + r.below(255));
        log.setUint16(q + 16 + 16 * i + 6, r.below(0x10000), true);
        log.setBigUint64(q + 16 + 16 * i + 8, r.pick(INTERESTING), true);
      }
    }
    const inflight = r.chance(0.8)
      ? encode({ request: 'SET_INFLIGHT_FD', needReply: r.chance(0.5), fd: 0, mmapSize: r.pick([4096, 4096, 640, 100, 8192]), mmapOffset: r.pick([0, 0, 0, 64, 4096]), numQueues: r.pick([2, 2, 1, 3]), queueSize: r.pick([RING_SIZE, RING_SIZE, 8, 0]) }, [r.chance(0.8) ? 'inflight' : r.pick(HOSTILE_FDS)])
      : encode({ request: 'GET_INFLIGHT_FD', needReply: false, numQueues: r.pick([1, 2, 3]), queueSize: r.pick([RING_SIZE, 256, 3]) });
    p.msgs.splice(at + 1 + r.below(p.msgs.length - at), 0, inflight);
  }],
  ['backend channel', (p, r) => {
    const at = p.msgs.findIndex((m) => new DataView(m.bytes.buffer, m.bytes.byteOffset).getUint32(0, true) === VHOST_USER.SET_PROTOCOL_FEATURES);
    if (at < 0 || p.msgs[at].bytes.length !== 20) return;
    const view = new DataView(p.msgs[at].bytes.buffer, p.msgs[at].bytes.byteOffset);
    view.setBigUint64(12, view.getBigUint64(12, true) | bit(VHOST_USER_PROTOCOL_F.BACKEND_REQ), true);
    p.msgs.splice(at + 1 + r.below(p.msgs.length - at), 0, encode({ request: 'SET_BACKEND_REQ_FD', needReply: r.chance(0.5), fd: 0 }, [r.chance(0.7) ? 'socket' : r.pick(HOSTILE_FDS)]));
  }],
  ['no kick', (p) => {
    p.kick = false;
  }],
  ['hang up at once', (p) => {
    p.hangUp = true;
  }],
];

/** Iteration `i`'s plan; depends on nothing but (seed, i). */
export function makePlan(seed: number, i: number): Plan {
  const r = Rng.forIteration(seed, i);
  // Plans are written into memory of their own; the run copies the image into the memory it shares.
  const mem = new SharedRegion(MEMORY_BYTES);
  try {
    const ring = new GuestRing(mem, 0, RING_SIZE);
    const plan: Plan = {
      msgs: baseSession(ring, mem, r.chance(0.5)), cut: null, image: mem.bytes, inflightLog: new Uint8Array(4096), kick: true, hangUp: false, mutations: [],
    };
    // A well-formed request for the device to find, then whatever the mutations add.
    ring.blkRequest(VIRTIO_BLK_T.IN, 0, 4096);
    // A few iterations stay valid: the baseline the mutations are measured against.
    const count = r.chance(0.05) ? 0 : 1 + r.below(4);
    for (let n = 0; n < count; n++) {
      const [name, mutate] = r.pick(MUTATIONS);
      mutate(plan, r, ring);
      plan.mutations.push(name);
    }
    plan.image = mem.bytes.slice(0, IMAGE_BYTES);
    return plan;
  } finally {
    mem.release();
  }
}

/** A digest of `n` plans from `start`: equal digests, equal runs (--dry-run prints it). */
function planDigest(seed: number, start: number, n: number): string {
  const h = createHash('sha256');
  for (let i = start; i < start + n; i++) {
    const p = makePlan(seed, i);
    for (const m of p.msgs) h.update(m.bytes).update(`${m.fds.join(',')}/${m.pieces};`);
    h.update(p.image).update(p.inflightLog).update(JSON.stringify([p.cut, p.kick, p.hangUp]));
  }
  return h.digest('hex').slice(0, 16);
}

// ---------------------------------------------------------------------------------------
// Running a plan

interface Outcome {
  /** The server closed the connection before we did. */
  readonly dropped: boolean;
  /** Why the server says the connection ended, numbers elided. */
  readonly reason: string;
  /** Lines the server logged during the iteration. */
  readonly lines: string[];
}

/**
 * How long the server may take to end a connection, close its fds and unmap its memory
 * after a case before that counts as a wedge or a leak: it needs milliseconds; the bound
 * is for a loaded machine, not a fast one.
 */
const SETTLE_MS = 10_000;

/**
 * Waits until the server is back to `baseline` open fds or fewer; returns the count it
 * settled at (above the baseline after {@link SETTLE_MS}: a leak).
 */
async function settleFds(server: ServerProcess, baseline: number): Promise<number> {
  const deadline = Date.now() + SETTLE_MS;
  for (;;) {
    const n = server.fdCount();
    if (n <= baseline || Date.now() > deadline) return n;
    await sleep(10);
  }
}

/** Runs one plan over a fresh connection; resolves once the server logged its end. */
async function runPlan(server: ServerProcess, plan: Plan, fds: FdFactory): Promise<Outcome> {
  const from = server.lines.length;
  const disconnectsBefore = server.disconnected;
  const mem = new SharedRegion(MEMORY_BYTES);
  mem.bytes.set(plan.image);
  const kick = native.eventfd();
  const call = native.eventfd();
  const peers: { close(): void }[] = [];
  let dropped = false;
  let hungUp = false;
  const f = await RawFrontend.connect(server.socketPath);
  try {
    const replies = (async () => {
      for (;;) {
        const r = await f.reply(60_000);
        if (r === null) break;
        r.fds.forEach((fd) => native.close(fd));
      }
      dropped = !hungUp;
    })();
    const fdOf = (kind: FdKind): number => {
      switch (kind) {
        case 'kick': return kick;
        case 'call': return call;
        case 'guest': return mem.fd;
        case 'eventfd': return fds.eventfd();
        case 'memfd': return fds.memfd(MEMORY_BYTES, true);
        case 'memfd-unsealed': return fds.memfd(MEMORY_BYTES, false);
        case 'pipe': return fds.pipe();
        case 'socket': {
          const s = fds.socket();
          peers.push(s.peer);
          return s.fd;
        }
        case 'file': return fds.file(MEMORY_BYTES);
        case 'inflight': {
          const fd = fds.memfd(plan.inflightLog.length, true);
          native.pwritev(fd, [plan.inflightLog], 0);
          return fd;
        }
      }
    };
    for (let i = 0; i < plan.msgs.length && !dropped; i++) {
      const m = plan.msgs[i];
      const bytes = plan.cut?.msg === i ? m.bytes.subarray(0, plan.cut.bytes) : m.bytes;
      const sent = m.fds.map(fdOf);
      const step = Math.ceil(bytes.length / m.pieces);
      for (let at = 0; at < bytes.length; at += step) {
        f.sendBytes(bytes.subarray(at, at + step), at === 0 ? sent : []);
        if (m.pieces > 1) await new Promise((resolve) => setImmediate(resolve));
      }
      fds.closeAll();
      if (plan.cut?.msg === i) break;
    }
    if (plan.kick && !plan.cut) native.eventfdWrite(kick, 1);
    if (!plan.hangUp && !plan.cut) await Promise.race([replies, sleep(5)]);
    hungUp = true;
    f.close();
    await replies;
  } finally {
    f.close();
    fds.closeAll();
    peers.forEach((p) => p.close());
    native.close(kick);
    native.close(call);
    mem.release();
  }
  await server.waitFor('the server to end the connection', () => server.disconnected > disconnectsBefore, SETTLE_MS);
  const reason = server.disconnects(from)[0]?.reason ?? '?';
  return { dropped, reason: bucket(reason), lines: server.lines.slice(from) };
}

/** A reason with its numbers elided, so that equal causes count together. */
function bucket(reason: string): string {
  return reason.replace(/0x[0-9a-f]+/gi, '#').replace(/\d+/g, '#').slice(0, 120);
}

// ---------------------------------------------------------------------------------------
// The run

interface Report {
  seed: number;
  start: number;
  iterations: number;
  seconds: number;
  server: string;
  droppedByServer: number;
  closedByFrontend: number;
  ringsStopped: number;
  requestsRefused: number;
  wellBehavedChecks: number;
  reasons: Record<string, number>;
  failures: string[];
}

const USAGE = 'usage: fuzz-vhost-user --iterations N --seed S [--start I] [--time-limit SECONDS] [--check-every K] [--server cli|child] [--json] [--verbose] [--dry-run]';

const OPTIONS = {
  iterations: { type: 'string', default: '1000' },
  seed: { type: 'string' },
  start: { type: 'string', default: '0' },
  'time-limit': { type: 'string', default: '600' },
  'check-every': { type: 'string', default: '50' },
  server: { type: 'string' },
  json: { type: 'boolean', default: false },
  verbose: { type: 'boolean', default: false },
  'dry-run': { type: 'boolean', default: false },
} as const;

async function main(): Promise<number> {
  let values: ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>['values'];
  try {
    ({ values } = parseArgs({ options: OPTIONS }));
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n${USAGE}\n`);
    return 2;
  }
  const int = (name: string, v: string | undefined, min: number): number => {
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n < min) throw new Error(`--${name} must be an integer >= ${min}, got '${v}'`);
    return n;
  };
  let iterations: number; let seed: number; let start: number; let timeLimit: number; let checkEvery: number;
  try {
    iterations = int('iterations', values.iterations, 1);
    seed = values.seed === undefined ? Date.now() >>> 0 : int('seed', values.seed, 0) >>> 0;
    start = int('start', values.start, 0);
    timeLimit = int('time-limit', values['time-limit'], 1);
    checkEvery = int('check-every', values['check-every'], 1);
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n${USAGE}\n`);
    return 2;
  }
  if (values['dry-run']) {
    process.stdout.write(`${JSON.stringify({ seed, start, iterations, digest: planDigest(seed, start, iterations) })}\n`);
    return 0;
  }

  const here = dirname(fileURLToPath(import.meta.url));
  const cli = resolve(here, '../src/cli/main.js');
  const useCli = values.server === 'cli' || (values.server === undefined && existsSync(resolve(here, '../src/cli/serve.js')));
  if (values.server !== undefined && values.server !== 'cli' && values.server !== 'child') {
    process.stderr.write(`--server must be cli or child\n${USAGE}\n`);
    return 2;
  }
  const dir = mkdtempSync(join(tmpdir(), 'vblk-fuzz-'));
  const socketPath = join(dir, 'vhost.sock');
  const image = join(dir, 'disk.img');
  writeFileSync(image, new Uint8Array(0));
  const server = useCli
    ? await ServerProcess.start(socketPath, [], [cli, 'serve', image, '--socket', socketPath, '--size', '16M', '--queues', '2'])
    : await ServerProcess.start(socketPath);
  const fds = new FdFactory();
  const report: Report = {
    seed, start, iterations: 0, seconds: 0, server: useCli ? 'vblk serve' : 'serve-child', droppedByServer: 0, closedByFrontend: 0,
    ringsStopped: 0, requestsRefused: 0, wellBehavedChecks: 0, reasons: {}, failures: [],
  };
  const began = Date.now();
  const say = (line: string): void => {
    if (!values.json) process.stdout.write(`${line}\n`);
  };
  say(`fuzz-vhost-user: seed ${seed}, iterations ${start}..${start + iterations - 1}, server ${report.server} (pid ${server.pid})`);

  let sector = 0;
  const wellBehaved = async (when: string): Promise<boolean> => {
    sector = (sector + 8) % 4096;
    const before = server.disconnected;
    try {
      await wellBehavedRoundTrip(socketPath, sector, SETTLE_MS);
      await server.waitFor('the well-behaved frontend to end', () => server.disconnected > before, SETTLE_MS);
      report.wellBehavedChecks++;
      return true;
    } catch (e) {
      report.failures.push(`wedge: the well-behaved frontend failed ${when}: ${(e as Error).message}`);
      return false;
    }
  };

  let baseline = -1;
  try {
    // Warm up what Node opens lazily, then take the fd baseline. The server logs a
    // disconnect before it closes the session's fds: on a loaded machine the warm-up's may
    // still be open now, so a lower count later is the baseline, not a miracle.
    if (!(await wellBehaved('before the first iteration')) || !(await wellBehaved('before the first iteration'))) return finish();
    await sleep(50);
    baseline = server.fdCount();
    for (let i = start; i < start + iterations; i++) {
      if ((Date.now() - began) / 1000 > timeLimit) {
        say(`time limit of ${timeLimit} s reached after ${report.iterations} iterations`);
        break;
      }
      const plan = makePlan(seed, i);
      const replay = `replay: node dist/scripts/fuzz-vhost-user.js --seed ${seed} --start ${i} --iterations 1 --verbose`;
      let outcome: Outcome;
      try {
        outcome = await runPlan(server, plan, fds);
      } catch (e) {
        const what = server.exit ? `crash: the server ${describeExit(server.exit)}` : `wedge: ${(e as Error).message}`;
        report.failures.push(`${what} in iteration ${i} (${plan.mutations.join(', ')}); ${replay}`);
        break;
      }
      report.iterations++;
      if (values.verbose) say(`#${i} [${plan.mutations.join(', ')}] ${outcome.dropped ? 'dropped' : 'closed'}: ${outcome.reason}`);
      if (outcome.dropped) report.droppedByServer++;
      else report.closedByFrontend++;
      report.reasons[outcome.reason] = (report.reasons[outcome.reason] ?? 0) + 1;
      report.ringsStopped += outcome.lines.filter((l) => /ring \d+ stopped/.test(l)).length;
      report.requestsRefused += outcome.lines.filter((l) => / refused: /.test(l)).length;
      const doubleClose = outcome.lines.find((l) => /closing fd \d+: /.test(l) || /cleanup failed/.test(l));
      if (doubleClose) {
        report.failures.push(`bad cleanup in iteration ${i} ('${doubleClose}'); ${replay}`);
        break;
      }
      if (server.exit) {
        report.failures.push(`crash: the server ${describeExit(server.exit)} after iteration ${i}; ${replay}`);
        break;
      }
      const open = await settleFds(server, baseline);
      if (open > baseline) {
        report.failures.push(`leak: ${open} fds open after iteration ${i}, baseline ${baseline} (${plan.mutations.join(', ')}):\n  ${server.fdTargets().join('\n  ')}\n${replay}`);
        break;
      }
      baseline = open;
      // The session unmaps once its requests completed and the device reset: allow for that.
      await server.waitFor('shared memory to be unmapped', () => server.memfdMappings().length === 0, SETTLE_MS).catch(() => {});
      const maps = server.memfdMappings();
      if (maps.length > 0) {
        report.failures.push(`leak: shared memory still mapped after iteration ${i} (${plan.mutations.join(', ')}):\n  ${maps.join('\n  ')}\n${replay}`);
        break;
      }
      if ((i - start + 1) % checkEvery === 0 && !(await wellBehaved(`after iteration ${i}`))) break;
      if (report.iterations % 1000 === 0) say(`  ${report.iterations} iterations, ${Math.round((Date.now() - began) / 1000)} s`);
    }
    if (report.failures.length === 0) await wellBehaved('at the end');
    if (report.failures.length === 0 && (await settleFds(server, baseline)) > baseline) {
      report.failures.push(`leak: ${server.fdCount()} fds open at the end, baseline ${baseline}`);
    }
  } finally {
    fds.cleanup();
  }
  return finish();

  async function finish(): Promise<number> {
    const exit = await server.stop();
    if (report.failures.length === 0 && (exit.code !== 0 || exit.signal !== null)) report.failures.push(`the server did not stop cleanly: ${describeExit(exit)}`);
    rmSync(dir, { recursive: true, force: true });
    report.seconds = Math.round((Date.now() - began) / 100) / 10;
    if (values.json) {
      process.stdout.write(`${JSON.stringify(report)}\n`);
    } else {
      say(`${report.iterations} iterations in ${report.seconds} s: ${report.droppedByServer} dropped by the server, ${report.closedByFrontend} closed by the frontend; ` +
        `${report.ringsStopped} rings stopped, ${report.requestsRefused} requests refused, ${report.wellBehavedChecks} well-behaved checks passed`);
      say('connections ended, by reason:');
      for (const [reason, n] of Object.entries(report.reasons).sort((a, b) => b[1] - a[1])) say(`  ${String(n).padStart(6)}  ${reason}`);
      for (const f of report.failures) say(`FAILURE: ${f}`);
      if (report.failures.length > 0) say(`server log (last 40 lines):\n  ${server.lines.slice(-40).join('\n  ')}`);
    }
    return report.failures.length === 0 ? 0 : 1;
  }
}

// Run when executed, not when imported (a test or a replay script may import makePlan).
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) process.exitCode = await main();
