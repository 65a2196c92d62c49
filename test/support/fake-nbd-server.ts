// An NBD server in the test process, scriptable per connection: it negotiates as a
// well-behaved fixed-newstyle server (structured replies, GO, block sizes) over a memory
// disk, and each request is answered by `answer`, which may answer correctly (the
// default), wrongly, late, never, or drop the connection. What the NBD backend does
// against servers nobody would ship: a hostile one, one that breaks mid-reply.
import { createServer, type Server, type Socket } from 'node:net';
import { rmSync } from 'node:fs';
import {
  ALL_FLAGS, OPT, REP, concat, dataChunk, greeting, infoBlockSize, infoExport, noneChunk, optionReply, parseOptions, parseRequests,
  simpleReply, type WireRequest,
} from './nbd-wire.js';

/** One client connection, as the script sees it. */
export interface FakeConnection {
  /** Numbered from 1 in the order clients connected. */
  readonly index: number;
  readonly socket: Socket;
  /** Sends raw bytes. */
  send(bytes: Uint8Array): void;
  /** The correct reply to `req` (from the memory disk; writes are applied). */
  correct(req: WireRequest): Uint8Array;
}

/** What to do with a request: bytes to send (now), or nothing (the script answers later or never). */
export type Answer = (req: WireRequest, conn: FakeConnection) => Uint8Array | null;

export interface FakeNbdServerOptions {
  readonly size: number;
  readonly flags?: number;
  /** Default: correct answers. */
  readonly answer?: Answer;
  /** NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum (default 1, 4096, 32 MiB). */
  readonly blockSizes?: readonly [number, number, number];
  /** Replaces the handshake's last reply (the ACK to GO), e.g. with garbage. */
  readonly handshake?: (conn: FakeConnection) => Uint8Array | null;
}

export class FakeNbdServer {
  readonly disk: Uint8Array;
  readonly connections: FakeConnection[] = [];
  /** Every request received, in order. */
  readonly requests: WireRequest[] = [];
  /** NBD_CMD_DISC requests received (each ends its connection). */
  disconnects = 0;
  answer: Answer;
  private readonly server: Server;

  private constructor(readonly socket: string, private readonly options: FakeNbdServerOptions) {
    this.disk = new Uint8Array(options.size);
    this.answer = options.answer ?? ((req, conn) => conn.correct(req));
    this.server = createServer((s) => this.accept(s));
  }

  /** Listens on `socket`. */
  static async listen(socket: string, options: FakeNbdServerOptions): Promise<FakeNbdServer> {
    rmSync(socket, { force: true });
    const f = new FakeNbdServer(socket, options);
    await new Promise<void>((resolve) => f.server.listen(socket, resolve));
    return f;
  }

  get uri(): string {
    return `nbd+unix:///?socket=${this.socket}`;
  }

  /** Stops listening and drops every connection. */
  async close(): Promise<void> {
    for (const c of this.connections) c.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(socket: Socket): void {
    const conn: FakeConnection = {
      index: this.connections.length + 1,
      socket,
      send: (b) => {
        if (!socket.destroyed) socket.write(b);
      },
      correct: (req) => this.correct(req),
    };
    this.connections.push(conn);
    socket.on('error', () => {});
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    let buf: Uint8Array = new Uint8Array(0);
    socket.on('data', (d: Buffer) => {
      buf = concat(buf, d);
      if (phase === 'flags') {
        if (buf.length < 4) return;
        buf = buf.subarray(4);
        phase = 'options';
      }
      if (phase === 'options') {
        const { options, used } = parseOptions(buf);
        buf = buf.subarray(used);
        for (const o of options) {
          if (o.option === OPT.STRUCTURED_REPLY) conn.send(optionReply(OPT.STRUCTURED_REPLY, REP.ACK));
          else if (o.option === OPT.GO) {
            conn.send(optionReply(OPT.GO, REP.INFO, infoExport(this.options.size, this.options.flags ?? ALL_FLAGS)));
            const [min, pref, max] = this.options.blockSizes ?? [1, 4096, 1 << 25];
            conn.send(optionReply(OPT.GO, REP.INFO, infoBlockSize(min, pref, max)));
            const last = this.options.handshake ? this.options.handshake(conn) : optionReply(OPT.GO, REP.ACK);
            if (last !== null) conn.send(last);
            phase = 'transmission';
            break;
          } else if (o.option === OPT.ABORT) {
            socket.end();
            return;
          } else conn.send(optionReply(o.option, REP.ERR_UNSUP));
        }
      }
      if (phase === 'transmission') {
        const { requests, used } = parseRequests(buf);
        buf = buf.subarray(used);
        for (const r of requests) {
          if (r.type === 2) {
            this.disconnects++;
            socket.end();
            return;
          }
          this.requests.push(r);
          const reply = this.answer(r, conn);
          if (reply !== null) conn.send(reply);
        }
      }
    });
    conn.send(greeting());
  }

  private correct(req: WireRequest): Uint8Array {
    switch (req.type) {
      case 0:
        return dataChunk(req.cookie, req.offset, this.disk.slice(req.offset, req.offset + req.length), true);
      case 1:
        this.disk.set(req.data as Uint8Array, req.offset);
        return simpleReply(req.cookie, 0);
      case 4:
      case 6:
        this.disk.fill(0, req.offset, req.offset + req.length);
        return noneChunk(req.cookie);
      default:
        return simpleReply(req.cookie, 0);
    }
  }
}
