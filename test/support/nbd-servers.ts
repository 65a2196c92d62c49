// Real NBD servers as test peers (DESIGN.md, "Real peers"): qemu-nbd in front of a raw or
// qcow2 image, and nbdkit with any plugin and filters. Each listens on a unix socket of
// the test's own; start() resolves once a connection to it succeeds.
import { spawn, type ChildProcess } from 'node:child_process';
import { createConnection } from 'node:net';
import { rmSync } from 'node:fs';

/** A running NBD server. */
export interface NbdServer {
  readonly proc: ChildProcess;
  readonly socket: string;
  /** The NBD URI of its export. */
  readonly uri: string;
  log(): string;
  /**
   * Sends `signal` (default SIGTERM), then waits for the exit; SIGKILL after 5 s (nbdkit
   * waits for its clients to hang up first).
   */
  stop(signal?: NodeJS.Signals): Promise<void>;
  readonly exited: Promise<number | null>;
}

export interface QemuNbdOptions {
  readonly format?: 'raw' | 'qcow2';
  /** Clients at once (qemu-nbd --shared); above 1 it advertises multi-conn. */
  readonly shared?: number;
  readonly readOnly?: boolean;
  readonly exportName?: string;
  /** Pass discards down to the image (default true: trim has an effect). */
  readonly discard?: boolean;
}

/** `qemu-nbd` serving `image` on `socket`. */
export function startQemuNbd(image: string, socket: string, o: QemuNbdOptions = {}): Promise<NbdServer> {
  const name = o.exportName ?? 'disk';
  // --persistent: without it qemu-nbd exits when its last client hangs up.
  const args = ['-f', o.format ?? 'raw', '-k', socket, '-x', name, '--shared', String(o.shared ?? 1), '--cache=writeback', '--persistent'];
  if (o.discard !== false) args.push('--discard=unmap');
  if (o.readOnly) args.push('--read-only');
  args.push(image);
  return start('qemu-nbd', args, socket, `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`);
}

/** `nbdkit` with `args` (filters, plugin, its parameters) on `socket`; the default export. */
export function startNbdkit(args: string[], socket: string): Promise<NbdServer> {
  // --foreground: the child is the server (so a kill reaches it); -U: a unix socket.
  return start('nbdkit', ['--foreground', '-U', socket, ...args], socket, `nbd+unix:///?socket=${socket}`);
}

async function start(program: string, args: string[], socket: string, uri: string): Promise<NbdServer> {
  rmSync(socket, { force: true });
  const proc = spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stdout!.on('data', (d: Buffer) => (log += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (log += d.toString()));
  const exited = new Promise<number | null>((res) => proc.on('close', (code) => res(code)));
  const started = Date.now();
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${program} exited with ${proc.exitCode}: ${log}`);
    if (await connects(socket)) break;
    if (Date.now() - started > 20_000) {
      proc.kill('SIGKILL');
      throw new Error(`${program} ${args.join(' ')} did not listen on ${socket} within 20 s: ${log}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    proc, socket, uri, exited, log: () => log,
    stop: async (signal = 'SIGTERM') => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const force = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(force);
    },
  };
}

/**
 * Whether a connection to `socket` succeeds. The probe hangs up at once; both servers
 * take that as a client that went away during the handshake.
 */
function connects(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(socket);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}
