// qemu-storage-daemon as a test peer: each test starts its own daemon exporting one raw
// image over vhost-user-blk, with its own QMP socket (DESIGN.md, "Real peers").
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createConnection } from 'node:net';

export interface Qsd {
  readonly proc: ChildProcess;
  readonly socket: string;
  readonly qmpSocket: string;
  log(): string;
  /** Runs one QMP command and returns its `return` (rejects on `error`). */
  qmp(command: string, args?: Record<string, unknown>): Promise<unknown>;
  stop(): Promise<void>;
}

export interface QsdOptions {
  numQueues?: number;
  writable?: boolean;
  /** Extra options for the file blockdev, e.g. `aio=io_uring`. */
  fileOptions?: string;
  /**
   * Pass discards down to the image (`discard=unmap` on both nodes). Without it the block
   * layer's default, `discard=ignore`, completes every discard and does nothing.
   */
  unmap?: boolean;
  /** The image's format: QEMU's `raw` block driver over the file (default), or its `qcow2` driver. */
  format?: 'raw' | 'qcow2';
  /**
   * Serve an NBD export instead of the image (QEMU's `nbd` block driver, one
   * connection): the image argument is then ignored.
   */
  nbd?: { readonly socket: string; readonly export: string };
  /** More vhost-user-blk exports of the same node, one per socket (a migration's destination connects to one). */
  moreSockets?: readonly string[];
}

export async function startQsd(image: string, socket: string, qmpSocket: string, options: QsdOptions = {}): Promise<Qsd> {
  const discard = options.unmap ? ',discard=unmap' : '';
  const file = `driver=file,node-name=f,filename=${image}${discard}${options.fileOptions ? `,${options.fileOptions}` : ''}`;
  const disk = options.nbd
    ? ['--blockdev', `driver=nbd,node-name=d,server.type=unix,server.path=${options.nbd.socket},export=${options.nbd.export}`]
    : ['--blockdev', file, '--blockdev', `driver=${options.format ?? 'raw'},node-name=d,file=f${discard}`];
  const exportOn = (id: string, path: string) => ['--export',
    `type=vhost-user-blk,id=${id},node-name=d,addr.type=unix,addr.path=${path},writable=${options.writable === false ? 'off' : 'on'},num-queues=${options.numQueues ?? 1}`];
  const more = options.moreSockets ?? [];
  const args = [
    ...disk,
    ...exportOn('e', socket),
    ...more.flatMap((path, i) => exportOn(`e${i + 1}`, path)),
    '--chardev', `socket,id=m,path=${qmpSocket},server=on,wait=off`,
    '--monitor', 'chardev=m',
  ];
  const proc = spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stdout!.on('data', (d: Buffer) => (log += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (log += d.toString()));
  const exited = new Promise<void>((res) => proc.on('exit', () => res()));
  const started = Date.now();
  while (![socket, qmpSocket, ...more].every((p) => existsSync(p))) {
    if (proc.exitCode !== null) throw new Error(`qemu-storage-daemon exited with ${proc.exitCode}: ${log}`);
    if (Date.now() - started > 10_000) throw new Error(`qemu-storage-daemon did not create its sockets: ${log}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    proc, socket, qmpSocket, log: () => log,
    qmp: (command, a) => qmpCommand(qmpSocket, command, a),
    stop: async () => {
      if (proc.exitCode === null) proc.kill('SIGTERM');
      await exited;
    },
  };
}

/** One QMP session: greeting, qmp_capabilities, the command, its answer. */
export function qmpCommand(path: string, command: string, args?: Record<string, unknown>): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const sock = createConnection(path);
    let buf = '';
    let stage = 0;
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`QMP ${command}: no answer`));
    }, 10_000);
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const msg = JSON.parse(buf.slice(0, nl)) as { QMP?: unknown; return?: unknown; error?: { desc: string }; event?: string };
        buf = buf.slice(nl + 1);
        if (msg.event) continue;
        if (stage === 0 && msg.QMP) {
          stage = 1;
          sock.write(JSON.stringify({ execute: 'qmp_capabilities' }) + '\n');
        } else if (stage === 1) {
          stage = 2;
          sock.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
        } else if (stage === 2) {
          clearTimeout(timer);
          sock.end();
          if (msg.error) reject(new Error(`QMP ${command}: ${msg.error.desc}`));
          else resolve(msg.return);
        }
      }
    });
    sock.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}
