// The QEMU runner behind every end-to-end test: boots Debian's cloud kernel with the
// base initramfs of build.sh plus a per-test script, under TCG, with vhost-user-blk
// and/or plain virtio-blk disks, and reports what the script did. scripts/guest/README.md
// explains how to write a guest script (including scripts that span reboots).
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants as fsConstants, rmSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createConnection, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root: this file runs as dist/scripts/guest/guest.js. */
const repoRoot = fileURLToPath(new URL('../../../', import.meta.url));
const buildScript = join(repoRoot, 'scripts', 'guest', 'build.sh');

// ---- peers: skip or fail --------------------------------------------------------------

/** What the guest harness itself needs: QEMU and the tools build.sh packs or uses. */
export const GUEST_PEERS: readonly string[] = [
  'qemu-system-x86_64', 'busybox', 'cpio', 'zstd', 'mke2fs', 'e2fsck', 'debugfs', 'resize2fs',
  'tune2fs', 'dumpe2fs', 'fio', 'apt-get', 'dpkg', 'flock',
];

// e2fsprogs lives in /usr/sbin, which is not on an ordinary user's PATH.
const searchPath = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/sbin'].filter((d) => d !== '');
const found = new Map<string, string | undefined>();

/** Where an executable is installed (PATH, plus the sbin directories), or undefined. */
export function peerPath(name: string): string | undefined {
  if (!found.has(name)) {
    const path = searchPath.map((dir) => join(dir, name)).find((p) => {
      try {
        accessSync(p, fsConstants.X_OK);
        return true;
      } catch {
        return false;
      }
    });
    found.set(name, path);
  }
  return found.get(name);
}

/** Whether an executable of this name is installed (see peerPath). */
export function peerAvailable(name: string): boolean {
  return peerPath(name) !== undefined;
}

/**
 * For node:test's `skip` option: `test('…', { skip: requirePeer(...GUEST_PEERS) }, …)`.
 * Returns false when every named executable is installed, else a message that says what
 * is missing. With CI=true a missing peer is the machine's fault, not a reason to skip:
 * it throws, so the test file fails instead of passing vacuously.
 */
export function requirePeer(...names: string[]): string | false {
  const missing = names.filter((n) => !peerAvailable(n));
  if (missing.length === 0) return false;
  const message = `missing ${missing.join(', ')} (run scripts/install-deps.sh)`;
  if (process.env.CI === 'true') throw new Error(`CI=true and ${message}`);
  return message;
}

// ---- the image ------------------------------------------------------------------------

export interface GuestImage {
  kernel: string;
  /** The base initramfs (zstd-compressed cpio). */
  initrd: string;
}

export interface EnsureGuestOptions {
  /** Where build.sh caches the kernel and base initramfs; default .cache/guest/. */
  cacheDir?: string;
  /** Progress lines from build.sh (downloading, unpacking); default: to stderr. */
  onProgress?: (line: string) => void;
}

const images = new Map<string, Promise<GuestImage>>();

/** Builds the kernel and base initramfs, or finds them in the cache. Once per process. */
export function ensureGuest(opts: EnsureGuestOptions = {}): Promise<GuestImage> {
  const key = opts.cacheDir ?? '';
  let image = images.get(key);
  if (image === undefined) {
    image = runBuild(opts);
    // A failed build (no network, say) may succeed when asked again.
    image.catch(() => images.delete(key));
    images.set(key, image);
  }
  return image;
}

function runBuild(opts: EnsureGuestOptions): Promise<GuestImage> {
  const env = opts.cacheDir === undefined ? process.env : { ...process.env, VBLK_GUEST_CACHE: opts.cacheDir };
  const progress = opts.onProgress ?? ((line: string) => process.stderr.write(`${line}\n`));
  return new Promise((resolve, reject) => {
    const child = spawn('bash', [buildScript], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => { stdout += s; });
    splitLines(child.stderr, (line) => {
      stderr += `${line}\n`;
      progress(line);
    });
    child.on('error', reject);
    child.on('close', (status) => {
      const kernel = /^kernel=(.+)$/m.exec(stdout)?.[1];
      const initrd = /^initrd=(.+)$/m.exec(stdout)?.[1];
      if (status === 0 && kernel !== undefined && initrd !== undefined) resolve({ kernel, initrd });
      else reject(new Error(`scripts/guest/build.sh failed (status ${status}):\n${stderr.trim()}`));
    });
  });
}

// ---- running a guest ------------------------------------------------------------------

export interface VhostUserDisk {
  /** The backend's listening socket (`vblk serve --socket`, qemu-storage-daemon …). */
  path: string;
  /** vhost-user-blk-pci num-queues; QEMU's default is the vCPU count. */
  numQueues?: number;
  /** vhost-user-blk-pci queue-size; QEMU's default is 128. */
  queueSize?: number;
}

export interface Drive {
  /** An image file served by QEMU's own virtio-blk (for the harness's self-test). */
  path: string;
  format?: 'raw' | 'qcow2';
}

export interface GuestOptions {
  /**
   * The guest shell script (busybox sh), run as /test.sh with $VBLK_BOOT set to the boot
   * number. An array allows reboots: boot N runs script[N-1], and one reboot fewer than
   * there are scripts is allowed (more ends the run with an error). A single script runs
   * under -no-reboot, so a reboot or panic ends QEMU.
   */
  script: string | string[];
  /** vhost-user-blk disks, attached first: the first is /dev/vda. */
  vhostUserSockets?: VhostUserDisk[];
  /** Plain virtio-blk disks, attached after the vhost-user ones. */
  drives?: Drive[];
  smp?: number;
  /**
   * Guest RAM in KiB, shared with vhost-user backends through a memfd; default 262144
   * (256 MiB). QEMU rounds it up to a multiple of 8 KiB.
   */
  memoryKiB?: number;
  /** The whole run, boot to power-off; default 120 s. QEMU is killed when it expires. */
  timeoutMs?: number;
  /** chardev reconnect=N for the vhost-user sockets: QEMU reconnects after N s. */
  reconnect?: number;
  /** Appended to the QEMU command line. */
  extraArgs?: string[];
  /** Appended to the guest kernel's command line (`init_on_alloc=0`, say). */
  kernelArgs?: string[];
  /** Every console line as it arrives (QEMU's own stderr lines start with "qemu: "). */
  onOutput?: (line: string) => void;
  /** Where to put the QMP socket; default a temporary directory of the run. */
  qmpSocket?: string;
  /** The kernel and base initramfs; default ensureGuest(). */
  image?: GuestImage;
}

export interface GuestResult {
  /** The status of /test.sh on the last boot that finished it, null if none did. */
  exitCode: number | null;
  /** The console (kernel, init and script), \r stripped, plus QEMU's stderr. */
  output: string;
  timedOut: boolean;
  /** How many boots reached init. */
  boots: number;
  /** From starting QEMU to the script starting on the first boot; null if it never did. */
  bootMs: number | null;
  /** Why the run went wrong, beyond a non-zero exit code (init failure, panic, …). */
  error?: string;
}

/** A running guest, for tests that act while it runs. */
export interface Guest {
  readonly pid: number;
  readonly qmpSocket: string;
  /** The exact QEMU command line (argv). */
  readonly argv: readonly string[];
  /** Settles when QEMU has exited (never rejects). */
  readonly done: Promise<GuestResult>;
  output(): string;
  /**
   * The next console line matching `pattern`, searching from just after the line the
   * previous waitFor matched (so sequential waits never see the same line twice).
   * Rejects when the guest ends first or after timeoutMs (default 60 s).
   */
  waitFor(pattern: string | RegExp, timeoutMs?: number): Promise<string>;
  /** Writes a line on the guest console; the script reads it with `read -r VAR`. */
  send(line: string): void;
  /** Runs a QMP command (system_reset, quit, query-block …) and returns its `return`. */
  qmp(command: string, args?: Record<string, unknown>): Promise<unknown>;
  /** SIGKILLs QEMU and waits for it. */
  kill(): Promise<GuestResult>;
}

/** Boots a guest, runs the script, and returns when QEMU has exited. */
export async function runGuest(opts: GuestOptions): Promise<GuestResult> {
  return (await startGuest(opts)).done;
}

// The markers init.sh prints (see init.sh).
const BOOT_MARKER = 'VBLK-GUEST-BOOT';
const START_MARKER = /VBLK-GUEST-START boot=\d+/;
const EXIT_MARKER = /VBLK-GUEST-EXIT=(\d+)/;
const ERROR_MARKER = /VBLK-GUEST-ERROR: (.*)/;
const PANIC = /Kernel panic - not syncing: .*/;
// init powers off right after the exit marker; a QEMU still alive this long after it is stuck.
const POWEROFF_GRACE_MS = 30_000;

/** Running QEMUs and their temporary directories, for the exit hook. */
const live = new Map<ChildProcess, string>();
let exitHookInstalled = false;

/** Starts QEMU with the guest and returns at once; see Guest. */
export async function startGuest(opts: GuestOptions): Promise<Guest> {
  const scripts = typeof opts.script === 'string' ? [opts.script] : opts.script;
  if (scripts.length === 0) throw new Error('startGuest: no script');
  const image = opts.image ?? (await ensureGuest());
  const dir = await mkdtemp(join(tmpdir(), 'vblk-guest-'));
  try {
    const initrd = join(dir, 'initrd.img');
    // The script's archive goes first: Linux 6.1 loses its place after a zstd member and
    // rejects whatever follows it, while an uncompressed archive ends cleanly on its trailer.
    await writeFile(initrd, Buffer.concat([scriptArchive(scripts), await readFile(image.initrd)]));
    const qmpSocket = opts.qmpSocket ?? join(dir, 'qmp.sock');
    const argv = qemuArgv(opts, image.kernel, initrd, qmpSocket, scripts.length > 1);
    return launch(argv, opts, scripts.length, qmpSocket, dir);
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

/** QEMU wants a literal comma in an option value doubled. */
function optValue(s: string): string {
  return s.replaceAll(',', ',,');
}

function qemuArgv(opts: GuestOptions, kernel: string, initrd: string, qmpSocket: string, reboots: boolean): string[] {
  const mem = `${opts.memoryKiB ?? 256 * 1024}K`;
  const argv = [
    'qemu-system-x86_64', '-nodefaults', '-no-user-config', '-accel', 'tcg', '-display', 'none',
    '-smp', String(opts.smp ?? 1), '-m', mem,
    // vhost-user backends map guest RAM: it must be a shareable memfd.
    '-object', `memory-backend-memfd,id=mem,size=${mem},share=on`, '-numa', 'node,memdev=mem',
    '-serial', 'stdio',
    '-qmp', `unix:${optValue(qmpSocket)},server=on,wait=off`,
  ];
  (opts.vhostUserSockets ?? []).forEach((d, i) => {
    const reconnect = opts.reconnect === undefined ? '' : `,reconnect=${opts.reconnect}`;
    argv.push('-chardev', `socket,id=vu${i},path=${optValue(d.path)}${reconnect}`);
    let dev = `vhost-user-blk-pci,chardev=vu${i}`;
    if (d.numQueues !== undefined) dev += `,num-queues=${d.numQueues}`;
    if (d.queueSize !== undefined) dev += `,queue-size=${d.queueSize}`;
    argv.push('-device', dev);
  });
  for (const d of opts.drives ?? []) {
    argv.push('-drive', `file=${optValue(d.path)},if=virtio,format=${d.format ?? 'raw'}`);
  }
  argv.push(
    '-kernel', kernel, '-initrd', initrd,
    // panic=-1: a panic reboots at once, which under -no-reboot ends QEMU instead of hanging.
    '-append', ['console=ttyS0 quiet panic=-1 vblk.handshake', ...(opts.kernelArgs ?? [])].join(' '),
  );
  if (!reboots) argv.push('-no-reboot');
  argv.push(...(opts.extraArgs ?? []));
  return argv;
}

function launch(argv: string[], opts: GuestOptions, maxBoots: number, qmpSocket: string, dir: string): Guest {
  // PR_SET_PDEATHSIG: the kernel kills QEMU even when node dies by SIGKILL, where no
  // exit hook runs. setpriv (util-linux) sets it and execs QEMU in the same process.
  const [cmd, ...args] = peerAvailable('setpriv') ? ['setpriv', '--pdeathsig', 'KILL', ...argv] : argv;
  const started = Date.now();
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  live.set(child, dir);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    // A test that fails or times out may leave its guest running: end it with the process.
    process.on('exit', () => {
      for (const [c, d] of live) {
        c.kill('SIGKILL');
        rmSync(d, { recursive: true, force: true });
      }
    });
  }

  const lines: string[] = [];
  let cursor = 0;
  let boots = 0;
  let exitCode: number | null = null;
  let bootMs: number | null = null;
  let error: string | undefined;
  let timedOut = false;
  let ended = false;
  let graceTimer: NodeJS.Timeout | undefined;
  let qmp: Promise<QmpClient> | undefined;
  const waiters = new Set<{ pattern: string | RegExp; resolve: (line: string) => void; reject: (e: Error) => void }>();

  const matches = (line: string, pattern: string | RegExp) =>
    typeof pattern === 'string' ? line.includes(pattern) : pattern.test(line);
  const fail = (why: string) => {
    error ??= why;
    child.kill('SIGKILL');
  };

  const onLine = (line: string) => {
    lines.push(line);
    opts.onOutput?.(line);
    let m: RegExpExecArray | null;
    if (line.includes(BOOT_MARKER)) {
      boots += 1;
      // QEMU read the initrd into memory at startup and reuses that copy on reset: the
      // 30 MB file can go now, so even a run whose node process is SIGKILLed leaves little.
      if (boots === 1) void rm(join(dir, 'initrd.img'), { force: true });
      if (boots > maxBoots) fail(`the guest booted ${boots} times; the run allows ${maxBoots}`);
      else child.stdin?.write(`${boots}\n`);
    } else if (bootMs === null && START_MARKER.test(line)) {
      bootMs = Date.now() - started;
    } else if ((m = EXIT_MARKER.exec(line)) !== null) {
      exitCode = Number(m[1]);
      graceTimer ??= setTimeout(() => fail('QEMU did not exit after the guest powered off'), POWEROFF_GRACE_MS);
    } else if ((m = ERROR_MARKER.exec(line) ?? PANIC.exec(line)) !== null) {
      error ??= m[1] ?? m[0];
    }
    for (const w of waiters) {
      if (matches(line, w.pattern)) {
        waiters.delete(w);
        cursor = lines.length;
        w.resolve(line);
        break;
      }
    }
  };
  splitLines(child.stdout!, (line) => onLine(line.replace(/\r/g, '')));
  splitLines(child.stderr!, (line) => onLine(`qemu: ${line}`));
  // The guest may have powered off before a send(); the write then fails with EPIPE.
  child.stdin!.on('error', () => {});

  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, opts.timeoutMs ?? 120_000);

  const done = new Promise<GuestResult>((resolve) => {
    const finish = (status: number | null, spawnError?: Error) => {
      if (ended) return;
      ended = true;
      live.delete(child);
      clearTimeout(timer);
      clearTimeout(graceTimer);
      void qmp?.then((c) => c.close(), () => {});
      if (spawnError !== undefined) error ??= `cannot start QEMU: ${spawnError.message}`;
      else if (exitCode === null && !timedOut && error === undefined) error = `QEMU exited with status ${status}`;
      const result: GuestResult = { exitCode, output: lines.join('\n'), timedOut, boots, bootMs };
      if (error !== undefined) result.error = error;
      for (const w of waiters) w.reject(new Error(`the guest ended before printing ${w.pattern}\n${tail(lines)}`));
      waiters.clear();
      void rm(dir, { recursive: true, force: true }).then(() => resolve(result));
    };
    child.on('error', (e) => finish(null, e));
    child.on('close', (status) => finish(status));
  });

  return {
    pid: child.pid ?? -1,
    qmpSocket,
    argv,
    done,
    output: () => lines.join('\n'),
    waitFor(pattern, timeoutMs = 60_000) {
      for (let i = cursor; i < lines.length; i++) {
        if (matches(lines[i], pattern)) {
          cursor = i + 1;
          return Promise.resolve(lines[i]);
        }
      }
      if (ended) return Promise.reject(new Error(`the guest ended before printing ${pattern}\n${tail(lines)}`));
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => {
          waiters.delete(w);
          reject(new Error(`no console line matched ${pattern} within ${timeoutMs} ms\n${tail(lines)}`));
        }, timeoutMs);
        const w = {
          pattern,
          resolve: (line: string) => { clearTimeout(t); resolve(line); },
          reject: (e: Error) => { clearTimeout(t); reject(e); },
        };
        waiters.add(w);
      });
    },
    send(line) {
      child.stdin?.write(`${line}\n`);
    },
    async qmp(command, args) {
      qmp ??= QmpClient.connect(qmpSocket, () => ended);
      return (await qmp).execute(command, args);
    },
    async kill() {
      child.kill('SIGKILL');
      return done;
    },
  };
}

function tail(lines: string[]): string {
  return lines.slice(-20).join('\n');
}

function splitLines(stream: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  let partial = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk: string) => {
    const parts = (partial + chunk).split('\n');
    partial = parts.pop() ?? '';
    for (const p of parts) onLine(p);
  });
  stream.on('end', () => {
    if (partial !== '') onLine(partial);
    partial = '';
  });
}

// ---- the per-test archive ---------------------------------------------------------------

/**
 * A cpio "newc" archive holding /test.sh (and /test.N.sh for a multi-boot run), the
 * format the kernel unpacks into the initramfs next to the base archive.
 */
function scriptArchive(scripts: string[]): Buffer {
  const files: [string, string][] =
    scripts.length === 1
      ? [['test.sh', scripts[0]]]
      : [
          ['test.sh', 'exec sh "/test.$VBLK_BOOT.sh"\n'],
          ...scripts.map((s, i): [string, string] => [`test.${i + 1}.sh`, s]),
        ];
  const parts: Buffer[] = [];
  let ino = 1;
  const entry = (name: string, mode: number, data: Buffer) => {
    const fields = [ino++, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, name.length + 1, 0];
    const header = '070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join('');
    parts.push(pad4(Buffer.from(`${header}${name}\0`, 'latin1')), pad4(data));
  };
  for (const [name, text] of files) entry(name, 0o100755, Buffer.from(text, 'utf8'));
  entry('TRAILER!!!', 0, Buffer.alloc(0));
  return Buffer.concat(parts);
}

function pad4(b: Buffer): Buffer {
  return b.length % 4 === 0 ? b : Buffer.concat([b, Buffer.alloc(4 - (b.length % 4))]);
}

// ---- QMP --------------------------------------------------------------------------------

type Pending = { resolve: (v: unknown) => void; reject: (e: Error) => void };

/** A minimal QMP client: one JSON object per line, replies matched by id, events ignored. */
class QmpClient {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('close', () => {
      for (const p of this.pending.values()) p.reject(new Error('QMP connection closed'));
      this.pending.clear();
    });
    socket.on('error', () => {});
  }

  /** Connects, retrying while QEMU is still creating the socket, and enables commands. */
  static async connect(path: string, gone: () => boolean): Promise<QmpClient> {
    for (let attempt = 0; ; attempt++) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = createConnection(path, () => resolve(s));
          s.once('error', reject);
        });
        const client = new QmpClient(socket);
        await client.execute('qmp_capabilities');
        return client;
      } catch (err) {
        if (gone() || attempt >= 50) throw err;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.write(`${JSON.stringify({ execute: command, arguments: args, id })}\n`);
    });
  }

  close(): void {
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const text = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (text === '') continue;
      const msg = JSON.parse(text) as { id?: number; return?: unknown; error?: { class: string; desc: string } };
      const p = msg.id === undefined ? undefined : this.pending.get(msg.id);
      if (p === undefined) continue; // the greeting and asynchronous events
      this.pending.delete(msg.id!);
      if (msg.error !== undefined) p.reject(new Error(`QMP: ${msg.error.class}: ${msg.error.desc}`));
      else p.resolve(msg.return);
    }
  }
}
