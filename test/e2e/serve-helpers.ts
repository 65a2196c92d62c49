// Starting `vblk serve` as a user would — the compiled CLI in a child process — for the
// end-to-end tests, with its log captured and its exit awaited.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
/** The compiled CLI (dist/src/cli/main.js), found from dist/test/e2e/. */
export const CLI = resolve(here, '../../src/cli/main.js');

export interface Served {
  readonly proc: ChildProcess;
  readonly socket: string;
  log(): string;
  /** Waits for a log line matching `pattern` (searching the whole log so far first). */
  waitForLog(pattern: RegExp, timeoutMs?: number): Promise<string>;
  /** SIGTERM (to its process group, when it has one), then the exit code (once its output is all read). */
  stop(): Promise<number | null>;
  readonly exited: Promise<number | null>;
}

export function scratchDir(prefix: string): { dir: string; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Runs `vblk serve IMAGE --socket SOCKET ...extra` and resolves once it listens. */
export function startServe(image: string, socket: string, extra: string[] = []): Promise<Served> {
  return launchServe(process.execPath, [CLI, 'serve', image, '--socket', socket, ...extra], socket);
}

/** Runs `vblk serve --backend MODULE --socket SOCKET ...extra` and resolves once it listens. */
export function startServeBackend(module: string, socket: string, extra: string[] = []): Promise<Served> {
  return launchServe(process.execPath, [CLI, 'serve', '--backend', module, '--socket', socket, ...extra], socket);
}

/** Where {@link launchServe} runs its command, and how {@link Served.stop} reaches it. */
export interface LaunchOptions {
  readonly cwd?: string;
  /**
   * Run the command in a process group of its own, and stop the whole group: npx does
   * not pass SIGTERM on to the `vblk serve` it started.
   */
  readonly processGroup?: boolean;
}

/**
 * Runs `command args`, a `vblk serve` however it is started (node and the compiled CLI,
 * npx in a project that installed vblk …), and resolves once it says it listens on `socket`.
 */
export async function launchServe(command: string, args: string[], socket: string, options: LaunchOptions = {}): Promise<Served> {
  const proc = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: options.cwd, detached: options.processGroup });
  let log = '';
  const waiters: { pattern: RegExp; resolve: (l: string) => void }[] = [];
  const onData = (d: Buffer): void => {
    log += d.toString();
    for (const w of [...waiters]) {
      const m = log.split('\n').find((l) => w.pattern.test(l));
      if (m !== undefined) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(m);
      }
    }
  };
  proc.stdout!.on('data', onData);
  proc.stderr!.on('data', onData);
  // 'close', not 'exit': at 'exit' the last lines it wrote may still be in the pipe.
  const exited = new Promise<number | null>((res) => proc.on('close', (code) => res(code)));
  const waitForLog = (pattern: RegExp, timeoutMs = 60_000): Promise<string> => {
    const m = log.split('\n').find((l) => pattern.test(l));
    if (m !== undefined) return Promise.resolve(m);
    return new Promise((res, rej) => {
      const t = setTimeout(() => rej(new Error(`vblk serve never logged ${pattern}; log:\n${log}`)), timeoutMs);
      waiters.push({ pattern, resolve: (l) => { clearTimeout(t); res(l); } });
    });
  };
  // The log line, not the socket file: a stale socket from a killed run may already be there.
  const started = Date.now();
  while (!/serving .* on /.test(log)) {
    if (proc.exitCode !== null) throw new Error(`vblk serve exited with ${proc.exitCode}:\n${log}`);
    if (Date.now() - started > 60_000) throw new Error(`vblk serve did not start listening on ${socket}:\n${log}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    proc, socket, log: () => log, waitForLog, exited,
    stop: async () => {
      if (options.processGroup) {
        try {
          process.kill(-(proc.pid as number), 'SIGTERM');
        } catch (e) {
          // ESRCH: the whole group is gone already.
          if ((e as { code?: string }).code !== 'ESRCH') throw e;
        }
      } else if (proc.exitCode === null) {
        proc.kill('SIGTERM');
      }
      return exited;
    },
  };
}

/** Runs the CLI to completion: exit code, stdout, stderr. */
export function runCli(args: string[], input?: Uint8Array): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
  return new Promise((res) => {
    const p = spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let err = '';
    p.stdout.on('data', (d: Buffer) => out.push(d));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    // 'close', not 'exit': at 'exit' the end of its output may still be in the pipes.
    p.on('close', (code) => res({ code, stdout: Buffer.concat(out), stderr: err }));
    if (input) p.stdin.end(input);
    else p.stdin.end();
  });
}
