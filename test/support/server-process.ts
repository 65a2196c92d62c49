/**
 * A vhost-user backend running in a child process, watched from outside: its log lines
 * (stderr), how it exited, and its open fds (/proc/<pid>/fd). The hostile-frontend
 * catalogue and the fuzzer use it to tell "survived" from "crashed", "wedged" or
 * "leaked" after every case.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The compiled child (dist/test/support/serve-child.js), next to this module. */
export const SERVE_CHILD = join(dirname(fileURLToPath(import.meta.url)), 'serve-child.js');

export interface ServerExit {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
}

/** What a server line "frontend N disconnected: reason" says. */
export interface Disconnect {
  readonly frontend: number;
  readonly reason: string;
}

// `vblk serve` prefixes its lines with "vblk serve: "; the test child does not.
const DISCONNECT = /^(?:vblk serve: )?frontend (\d+) disconnected: (.*)$/;
const CONNECT = /^(?:vblk serve: )?frontend \d+ connected$/;

export class ServerProcess {
  /** Every log line so far. */
  readonly lines: string[] = [];
  private partial = '';
  /** Counted as lines arrive: long runs (the fuzzer) must not rescan the whole log. */
  private connectCount = 0;
  private disconnectCount = 0;
  private exitInfo: ServerExit | null = null;
  private readonly exitWaiters: ((e: ServerExit) => void)[] = [];
  private readonly lineWaiters: (() => void)[] = [];

  private constructor(private readonly proc: ChildProcess, readonly socketPath: string) {
    const onData = (d: Buffer): void => {
      const text = this.partial + d.toString();
      const parts = text.split('\n');
      this.partial = parts.pop() ?? '';
      this.lines.push(...parts);
      for (const line of parts) {
        if (CONNECT.test(line)) this.connectCount++;
        else if (DISCONNECT.test(line)) this.disconnectCount++;
      }
      if (parts.length > 0) this.lineWaiters.splice(0).forEach((w) => w());
    };
    proc.stdout?.on('data', onData);
    proc.stderr?.on('data', onData);
    proc.on('exit', (code, signal) => {
      this.exitInfo = { code, signal };
      this.exitWaiters.splice(0).forEach((w) => w({ code, signal }));
      this.lineWaiters.splice(0).forEach((w) => w());
    });
  }

  /**
   * Starts `command` (default: the serve child with `args`) and resolves once it is
   * ready: the serve child says so ("listening on PATH"), after listen(2) and after it
   * handles SIGTERM; for another command, once the socket exists. `args` go after the
   * command.
   */
  static async start(socketPath: string, args: readonly string[] = [], command: readonly string[] = [SERVE_CHILD, '--socket', socketPath, '--exit-with-parent']): Promise<ServerProcess> {
    // stdin is a pipe that ends when we die: the serve child (--exit-with-parent) follows us.
    const proc = spawn(process.execPath, [...command, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    const server = new ServerProcess(proc, socketPath);
    const deadline = Date.now() + 20_000;
    // The socket file appears at bind(2), before listen(2): a connect in between is refused.
    const ready = command[0] === SERVE_CHILD
      ? (): boolean => server.lines.includes(`listening on ${socketPath}`)
      : (): boolean => existsSync(socketPath);
    while (!ready()) {
      if (server.exitInfo) throw new Error(`the server exited (${describeExit(server.exitInfo)}) before listening:\n${server.log()}`);
      if (Date.now() > deadline) {
        proc.kill('SIGKILL');
        throw new Error(`the server was not ready on ${socketPath} within 20 s:\n${server.log()}`);
      }
      await sleep(20);
    }
    return server;
  }

  get pid(): number {
    return this.proc.pid ?? -1;
  }

  /** How the process ended, or null while it runs. */
  get exit(): ServerExit | null {
    return this.exitInfo;
  }

  log(from = 0): string {
    return this.lines.slice(from).join('\n');
  }

  /** Open fds of the server process. */
  fdCount(): number {
    return readdirSync(`/proc/${this.pid}/fd`).length;
  }

  /** Mappings of memfds in the server process (guest memory, inflight buffers): leaked ones show here. */
  memfdMappings(): string[] {
    return readFileSync(`/proc/${this.pid}/maps`, 'utf8').split('\n').filter((l) => l.includes('/memfd:'));
  }

  /** What each open fd is (for a leak report). */
  fdTargets(): string[] {
    const out: string[] = [];
    for (const fd of readdirSync(`/proc/${this.pid}/fd`)) {
      try {
        out.push(`${fd} -> ${readlinkSync(`/proc/${this.pid}/fd/${fd}`)}`);
      } catch {
        // Closed between the listing and the readlink: not open any more.
      }
    }
    return out;
  }

  /** The "frontend N disconnected" lines logged at or after line `from`. */
  disconnects(from = 0): Disconnect[] {
    const out: Disconnect[] = [];
    for (const line of this.lines.slice(from)) {
      const m = DISCONNECT.exec(line);
      if (m) out.push({ frontend: Number(m[1]), reason: m[2] });
    }
    return out;
  }

  /** How many frontends the server accepted so far. */
  get connected(): number {
    return this.connectCount;
  }

  /** How many connections the server logged as ended so far. */
  get disconnected(): number {
    return this.disconnectCount;
  }

  /** Resolves once `done()` holds, re-checking on each new log line; rejects after `timeoutMs` or on exit. */
  async waitFor(what: string, done: () => boolean, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!done()) {
      if (this.exitInfo) throw new Error(`the server died (${describeExit(this.exitInfo)}) while waiting for ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 50));
        this.lineWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Polls until the server has `expected` fds open; resolves with the count it settled at (or the last seen). */
  async settleFds(expected: number, timeoutMs = 10_000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const n = this.fdCount();
      // Fewer is no leak: the baseline may have been taken while a session still closed its fds.
      if (n <= expected || Date.now() > deadline) return n;
      await sleep(10);
    }
  }

  /** SIGTERM (SIGKILL after 5 s), then how it exited. */
  async stop(): Promise<ServerExit> {
    if (this.exitInfo) return this.exitInfo;
    const exited = new Promise<ServerExit>((resolve) => this.exitWaiters.push(resolve));
    this.proc.kill('SIGTERM');
    const t = setTimeout(() => this.proc.kill('SIGKILL'), 5000);
    const e = await exited;
    clearTimeout(t);
    return e;
  }
}

export function describeExit(e: ServerExit): string {
  return e.signal !== null ? `killed by ${e.signal}` : `exit code ${e.code}`;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
