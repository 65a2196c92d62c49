/**
 * `vblk serve (SOURCE | --backend MODULE) --socket PATH`: the virtio-blk device on a raw
 * image, an NBD export, or the backend a user's module makes, as a vhost-user backend for
 * QEMU (`-device vhost-user-blk-pci`). Each `--socket` serves one frontend at a time and
 * keeps serving across disconnects (the next frontend waits in the listen backlog); several
 * `--socket`s serve the one disk to several frontends at once. SIGINT/SIGTERM stop it
 * cleanly after the requests in flight complete and the backend is flushed.
 */
import { existsSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import type { BlockBackend } from '../backends/backend.js';
import { nbdDeviceHints, type NbdDeviceHints } from '../backends/nbd/device-hints.js';
import { looksLikeNbdUri } from '../backends/nbd/uri.js';
import { FILTER_HELP, FilterSpecError, applyFilters, parseFilterSpec, type FilterSpec } from '../backends/filters/index.js';
import type { LogSink } from '../log.js';
import { loadBackendModule } from '../node/backend-module.js';
import { listenControl } from '../node/control.js';
import { openFileBackend } from '../node/file-backend.js';
import { IMAGE_FORMATS, openImage, type OpenedImage } from '../node/image-open.js';
import { lockImage, type ImageLock } from '../node/image-lock.js';
import { listenMetrics, metricsRegistry, type MetricsEndpoint } from '../node/metrics.js';
import { openNbdBackend, type NbdExportBackend } from '../node/nbd-backend.js';
import { serve, type ServedDisk } from '../node/serve.js';
import { MAX_READ_TIMEOUT_MS } from '../node/unix-socket.js';
import { DEFAULT_MESSAGE_TIMEOUT_MS } from '../node/vhost-user-server.js';
import { CliUsageError } from './args.js';
import { defineCommand, type CliIo } from './command.js';
import { parseKeyValues } from './key-values.js';

export const command = defineCommand({
  name: 'serve',
  summary: 'serve a raw or qcow2 image, an NBD export or your own backend as a vhost-user-blk device (for QEMU and other vhost-user frontends)',
  usage: '(SOURCE | --backend MODULE) --socket PATH [--socket PATH ...] [options]',
  details: [
    'SOURCE is an image file (raw or qcow2 with its backing chain; the format is probed from the',
    'first bytes unless --format states it: state it for a raw image whose guest could write a',
    'qcow2 header), or an NBD URI: nbd://HOST[:PORT]/EXPORT,',
    'nbd+unix:///EXPORT?socket=PATH, nbds://... and nbds+unix://... (TLS). An export\'s size,',
    'read-only flag, flush/trim/write-zeroes support and block sizes make the disk.',
    '',
    'QEMU connects with:',
    '  -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem',
    '  -chardev socket,id=c0,path=PATH -device vhost-user-blk-pci,chardev=c0,num-queues=N',
    '',
    "MODULE is an ES module whose default export makes a BlockBackend (import type { BlockBackend } from 'vblk'):",
    '  export default (options) => backend   (or a promise of one; options holds the --backend-opt pairs)',
    'A request the backend fails (it throws or rejects) completes with an I/O error and a log line.',
    '',
    'Filters (--filter NAME[:KEY=VALUE,...], repeatable; the first is nearest the guest; lists in a value join with +):',
    ...Object.entries(FILTER_HELP).map(([name, help]) => `  ${name.padEnd(9)}${help}`),
    '',
    'One frontend at a time on each socket: one that connects while another is connected (or',
    'still being cleaned up after hanging up) waits, and is served once the other is gone.',
    'An IMAGE is locked as QEMU locks its images (vblk serve, QEMU and qemu-storage-daemon see',
    'each other): a writer refuses to start while another process writes the image or keeps',
    'writers out (as readers do), and a --read-only serve while another process writes it;',
    '--read-only serves share it. Backing files are locked as a --read-only serve locks its',
    'image. --force-share overrides the lock.',
    '',
    'Several --socket serve the one disk to a frontend each, at the same time (each socket',
    'its own device and queues): a live migration\'s destination QEMU connects to a second',
    'socket while the source QEMU still runs on the first. `vblk resize` reaches every',
    'frontend; --metrics and `vblk stats` report each socket apart (a socket label).',
    'QEMU can live-migrate the guest (the dirty log is offered): see the README\'s',
    '"Live migration".',
  ],
  options: {
    socket: { kind: 'list', valueName: 'PATH', description: 'unix socket to listen on (required; several serve the disk to a frontend each, at once)' },
    backend: { kind: 'string', valueName: 'MODULE', description: 'serve the backend made by MODULE (a path with ./ or /, or a package name) instead of an IMAGE' },
    'backend-opt': { kind: 'list', valueName: 'KEY=VALUE', description: 'an option for the backend module\'s factory' },
    filter: { kind: 'list', valueName: 'NAME[:KEY=VALUE,...]', description: 'a filter in front of the image or backend (cow, error, delay, throttle, stats: see below)' },
    format: { kind: 'choice', choices: IMAGE_FORMATS, valueName: 'FORMAT', description: 'the image file\'s format (probed from its first bytes when absent; a probed raw image refuses guest writes of the qcow2 magic to its start)' },
    'read-only': { kind: 'boolean', description: 'offer a read-only disk (and open the IMAGE read-only, sharing its lock with other readers)' },
    'force-share': {
      kind: 'boolean',
      description: 'serve the IMAGE even when another process holds its lock, and let others take it (a migration between two processes on shared storage); two writers that do not take turns corrupt the disk',
    },
    serial: { kind: 'string', valueName: 'STR', description: 'disk serial (GET_ID), at most 20 bytes', default: 'vblk' },
    queues: { kind: 'integer', valueName: 'N', min: 1, max: 64, default: 16, description: 'request queues offered (the frontend uses as many as it wants: QEMU one per vCPU unless num-queues says)' },
    'queue-size': { kind: 'integer', valueName: 'N', min: 2, max: 32768, default: 256, description: 'largest queue size (a power of two)' },
    'block-size': { kind: 'choice', choices: ['512', '4096'], description: 'logical block size in bytes (default 512; for an NBD export, the smallest its minimum block allows)' },
    size: { kind: 'size', valueName: 'SIZE', description: 'create the image, or grow it, to SIZE bytes (K/M/G/T suffixes; a raw image file only: vblk image create makes qcow2 images)' },
    control: { kind: 'string', valueName: 'PATH', description: 'control socket for `vblk resize` and `vblk stats`' },
    'socket-mode': { kind: 'string', valueName: 'MODE', default: '600', description: 'file mode of the socket, in octal' },
    cache: { kind: 'choice', choices: ['writeback', 'writethrough'], default: 'writeback', description: 'initial cache mode the guest sees (it may change it)' },
    io: {
      kind: 'choice', choices: ['auto', 'sync', 'async', 'mmap'], default: 'auto',
      description: 'image I/O (IMAGE only): auto serves page-cache hits at once and the rest on the thread pool; sync blocks on the disk; async always uses the thread pool; mmap reads through a mapping of the image (raw only; fastest when it is in the page cache, blocks on the disk otherwise)',
    },
    'log-format': { kind: 'choice', choices: ['text', 'json'], default: 'text', description: 'log lines for people (text), or JSON lines with time, level, msg, socket, frontend and queue keys for log shippers' },
    metrics: { kind: 'string', valueName: 'HOST:PORT', description: 'serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port, logged)' },
    'message-timeout': {
      kind: 'number', valueName: 'SECONDS', default: DEFAULT_MESSAGE_TIMEOUT_MS / 1000,
      description: 'drop a frontend that begins a vhost-user message and does not finish it within SECONDS (time between messages is not limited)',
    },
    'nbd-connections': {
      kind: 'integer', valueName: 'N', min: 1, max: 64,
      description: 'connections to an NBD server that advertises multi-conn (default: --queues, at most 4)',
    },
    'nbd-reconnect-timeout': {
      kind: 'number', valueName: 'SECONDS', default: 60,
      description: 'when the NBD server is lost, how long requests wait for a reconnection before they fail with an I/O error',
    },
    'nbd-tls-certificates': {
      kind: 'string', valueName: 'DIR',
      description: 'TLS credentials for nbds:// (ca-cert.pem, client-cert.pem, client-key.pem, as for qemu-nbd and nbdkit)',
    },
    'allow-unsealed-memory': {
      kind: 'boolean',
      description: 'map guest memory not sealed against shrinking (memory-backend-file); dangerous: a frontend that shrinks it kills vblk with SIGBUS',
    },
  },
  async run({ options, positionals }, io) {
    const backendModule = options.backend;
    if (backendModule === undefined && positionals.length !== 1) {
      throw new CliUsageError(`vblk serve: expected one SOURCE (an image or an NBD URI) or --backend MODULE, got ${positionals.length} arguments`);
    }
    if (backendModule !== undefined && positionals.length > 0) throw new CliUsageError('vblk serve: give a SOURCE or --backend MODULE, not both');
    if (backendModule === undefined && options['backend-opt'].length > 0) throw new CliUsageError('vblk serve: --backend-opt needs --backend MODULE');
    if (options.format !== undefined && (backendModule !== undefined || looksLikeNbdUri(positionals[0] ?? ''))) {
      throw new CliUsageError('vblk serve: --format is for image files (an NBD export or a backend module has no format)');
    }
    if (options.format === 'qcow2' && options.size !== undefined) {
      throw new CliUsageError('vblk serve: --size creates or grows raw images; make a qcow2 image with vblk image create');
    }
    if (options.format === 'qcow2' && options.io === 'mmap') {
      throw new CliUsageError('vblk serve: --io mmap serves raw images only; use auto, sync or async with qcow2');
    }
    if (options['force-share'] && (backendModule !== undefined || looksLikeNbdUri(positionals[0]))) {
      throw new CliUsageError('vblk serve: --force-share is for an image file; an NBD export or a backend module has no lock of ours');
    }
    if (backendModule !== undefined && options.size !== undefined) {
      throw new CliUsageError('vblk serve: --size creates or grows an image; a backend module sizes its own disk (--backend-opt)');
    }
    const factoryOptions = parseKeyValues('vblk serve: --backend-opt', options['backend-opt']);
    const sockets = options.socket;
    if (sockets.length === 0) throw new CliUsageError('vblk serve: --socket PATH is required');
    const twice = sockets.find((p, i) => sockets.indexOf(p) !== i);
    if (twice !== undefined) throw new CliUsageError(`vblk serve: --socket ${twice} is given twice`);
    const queueSize = options['queue-size'];
    if ((queueSize & (queueSize - 1)) !== 0) throw new CliUsageError(`vblk serve: --queue-size must be a power of two, got ${queueSize}`);
    if (!/^[0-7]{3,4}$/.test(options['socket-mode'])) throw new CliUsageError(`vblk serve: --socket-mode must be octal like 600, got '${options['socket-mode']}'`);
    if (Buffer.byteLength(options.serial) > 20) throw new CliUsageError('vblk serve: --serial is at most 20 bytes');
    const messageTimeoutMs = Math.max(1, Math.round(options['message-timeout'] * 1000));
    if (messageTimeoutMs > MAX_READ_TIMEOUT_MS) {
      throw new CliUsageError(`vblk serve: --message-timeout is at most ${Math.floor(MAX_READ_TIMEOUT_MS / 1000)} seconds`);
    }
    const log = logSink(options['log-format'], sockets, io);
    const metricsAt = options.metrics === undefined ? null : parseHostPort(options.metrics);

    const filters = options.filter.map(parseFilter);
    const requestedBlock = options['block-size'] === undefined ? undefined : options['block-size'] === '4096' ? 4096 : 512;
    let base: BlockBackend;
    // The IMAGE's lock. Failures that end the process drop it with the process.
    let lock: ImageLock | null = null;
    let hints: NbdDeviceHints | null = null;
    let image: OpenedImage | null = null;
    if (backendModule !== undefined) {
      base = await loadBackendModule(backendModule, factoryOptions);
    } else if (looksLikeNbdUri(positionals[0])) {
      if (options.size !== undefined) throw new CliUsageError('vblk serve: --size is for image files; an NBD export has its own size');
      const nbd = await openNbdBackend({
        uri: positionals[0], readOnly: options['read-only'], log,
        connections: options['nbd-connections'] ?? Math.min(4, options.queues),
        reconnectTimeoutMs: Math.round(options['nbd-reconnect-timeout'] * 1000),
        tlsCertificates: options['nbd-tls-certificates'],
      });
      try {
        hints = nbdDeviceHints(nbd.blockSizes, requestedBlock);
      } catch (e) {
        await nbd.close();
        throw new CliUsageError(`vblk serve: ${(e as Error).message}`);
      }
      base = nbd;
      log(`${nbd.uriText}: ${nbd.size} bytes, ${nbd.connectionsUp} connection${nbd.connectionsUp === 1 ? '' : 's'}, ` +
        `flags ${describeNbd(nbd)}, blocks ${nbd.blockSizes.minimum}/${nbd.blockSizes.preferred}/${nbd.blockSizes.maximum}`);
    } else {
      const path = positionals[0];
      const take = (): ImageLock => lockSource(path, options['read-only'], options['force-share']);
      // Locked before the image is opened (and perhaps grown by --size); a new one once it exists.
      lock = existsSync(path) ? take() : null;
      try {
        image = await openImage(path, { format: options.format, readOnly: options['read-only'], size: options.size, io: options.io });
      } catch (e) {
        // Dropped now, not with the process: a program that runs the CLI in-process goes on.
        lock?.release();
        throw e;
      }
      base = image.backend;
      try {
        // Backing files are read, and what is read must not change: other readers share
        // them, writers are kept out (as QEMU does with the backing files of its images).
        lock = lockChain(lock ?? take(), image.backing, options['force-share']);
      } catch (e) {
        await base.close();
        throw e;
      }
      if (options['force-share']) log(`--force-share: other processes may use ${path} at the same time`, { level: 'warn' });
    }
    const backend = applyFilters(base, filters, { openOverlayFile: (path, size) => openFileBackend(path, { size }) });
    let served: ServedDisk;
    try {
      served = await serve({
        backend,
        socketPath: sockets, socketMode: parseInt(options['socket-mode'], 8), log,
        allowUnsealedMemory: options['allow-unsealed-memory'], messageTimeoutMs,
        device: {
          serial: options.serial,
          numQueues: options.queues,
          queueSize,
          blockSize: hints?.blockSize ?? requestedBlock ?? 512,
          topology: hints?.topology,
          readOnly: options['read-only'],
          cache: options.cache,
          // Statistics cost a clock read per batch: kept when something can read them.
          statsClock: metricsAt !== null || options.control !== undefined ? () => performance.now() : undefined,
        },
      });
    } catch (e) {
      await backend.close();
      lock?.release();
      throw e;
    }
    const control = options.control === undefined ? null : await listenControl(options.control, {
      resize: async (size) => {
        await served.resize(size);
        log(`resized to ${size} bytes`);
        return size;
      },
      stats: () => ({
        time: performance.now(),
        sockets: served.sockets.map(({ socketPath, device, server }) => ({
          socket: socketPath, diskSizeBytes: device.capacity * 512, connected: server.isConnected, connections: server.connectionCount,
          resubmitted: server.resubmittedRequests, queues: (device.stats ?? []).map((q) => q.snapshot()),
        })),
      }),
    });
    let metrics: MetricsEndpoint | null = null;
    if (metricsAt !== null) {
      try {
        metrics = await listenMetrics(metricsAt.host, metricsAt.port, metricsRegistry(served.sockets.map((s) => ({ socket: s.socketPath, device: s.device, frontends: s.server }))));
      } catch (e) {
        await closeAll([() => control?.close(), () => served.close(), () => backend.close(), () => lock?.release()]);
        throw e;
      }
      log(`metrics on ${metrics.url}`);
    }
    const source = backendModule === undefined ? positionals[0] : `backend module ${backendModule}`;
    const format = image === null ? '' : `${describeImage(image)}, `;
    const readOnly = options['read-only'] || backend.readOnly;
    const through = filters.length ? ` through ${filters.map((f) => f.text).join(' → ')}` : '';
    // The handlers go in before the line that says we serve: a script that stops us as soon
    // as it reads it would otherwise race them, and a signal with no handler kills the
    // process without the flush.
    const stopped = new Promise<void>((resolve) => {
      const stop = (signal: string): void => {
        log(`${signal}: stopping`);
        process.off('SIGINT', onInt);
        process.off('SIGTERM', onTerm);
        resolve();
      };
      const onInt = (): void => stop('SIGINT');
      const onTerm = (): void => stop('SIGTERM');
      process.on('SIGINT', onInt);
      process.on('SIGTERM', onTerm);
    });
    log(`serving ${source}${through} (${format}${backend.size} bytes${readOnly ? ', read-only' : ''}) on ${sockets.join(', ')}`);
    await stopped;
    await closeAll([() => control?.close(), () => metrics?.close(), () => served.close(), () => backend.close(), () => lock?.release()]);
    log('stopped');
  },
});

/**
 * Runs every step in order, each even when one before it failed (a failed final flush
 * must still close the image and release its lock), then throws the first failure.
 */
async function closeAll(steps: readonly (() => unknown)[]): Promise<void> {
  let first: { error: unknown } | null = null;
  for (const step of steps) {
    try {
      await step();
    } catch (e) {
      first ??= { error: e };
    }
  }
  if (first !== null) throw first.error;
}

/** `HOST:PORT` (an IPv6 host in brackets) → its parts; a one-line error otherwise. */
export function parseHostPort(value: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(value);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new CliUsageError(`vblk serve: --metrics wants HOST:PORT (e.g. 127.0.0.1:9100, [::1]:9100), got '${value}'`);
  return { host: m[1] ?? m[2], port };
}

/**
 * The log of `vblk serve` on stderr: `vblk serve: MESSAGE` lines for people, or one JSON
 * object per line with stable keys (`time`, `level`, `msg`, `socket`, and `frontend`,
 * `queue` where they apply) for log shippers. With one socket every line names it; with
 * several, a line about one socket names it (text: `vblk serve: SOCKET: MESSAGE`) and a
 * line about the whole process has no `socket`.
 */
export function logSink(format: 'text' | 'json', sockets: readonly string[], io: CliIo): LogSink {
  const only = sockets.length === 1 ? sockets[0] : undefined;
  if (format === 'text') {
    return (message, context = {}) => {
      const about = only === undefined && context.socket !== undefined ? `${context.socket}: ` : '';
      io.stderr(`vblk serve: ${about}${message}\n`);
    };
  }
  return (message, context = {}) => {
    const line: Record<string, string | number> = { time: new Date().toISOString(), level: context.level ?? 'info', msg: message };
    const socket = context.socket ?? only;
    if (socket !== undefined) line.socket = socket;
    if (context.frontend !== undefined) line.frontend = context.frontend;
    if (context.queue !== undefined) line.queue = context.queue;
    io.stderr(`${JSON.stringify(line)}\n`);
  };
}

/** "qcow2, backing /d/mid.qcow2 (qcow2) → /d/base.raw (raw, probed)": an image's format and chain, for the startup line. */
export function describeImage(image: OpenedImage): string {
  const chain = image.backing.map((b) => `${b.path} (${b.format}${b.formatSource === 'probed' ? ', probed' : ''})`);
  return `${image.format}${chain.length ? `, backing ${chain.join(' → ')}` : ''}`;
}

/** The IMAGE's lock; a conflict's one line names the image and the option that overrides it. */
function lockSource(image: string, readOnly: boolean, share: boolean): ImageLock {
  return lockImage(image, { readOnly, share, overrideHint: '--force-share serves it anyway' });
}

/**
 * `top`'s lock with a reader's lock on each backing file, released together. When one
 * cannot be taken, every lock taken so far, `top`'s included, is released before the
 * error goes on.
 */
function lockChain(top: ImageLock, backing: readonly { readonly path: string }[], share: boolean): ImageLock {
  const held = [top];
  try {
    for (const b of backing) held.push(lockSource(b.path, true, share));
  } catch (e) {
    for (const l of held) l.release();
    throw e;
  }
  return { release: () => held.forEach((l) => l.release()) };
}

/** One `--filter` value; a bad one is a usage error naming what to fix. */
function parseFilter(text: string): FilterSpec {
  try {
    return parseFilterSpec(text);
  } catch (e) {
    if (e instanceof FilterSpecError) throw new CliUsageError(`vblk serve: --filter ${e.message}`);
    throw e;
  }
}

/** "flush, fua, trim, zeroes": what an export offers, for the log. */
function describeNbd(b: NbdExportBackend): string {
  const on: string[] = [];
  if (b.readOnly) on.push('read-only');
  if (b.canFlush) on.push('flush');
  if (b.canFua) on.push('fua');
  if (b.canDiscard) on.push('trim');
  if (b.canWriteZeroes) on.push('zeroes');
  if (b.rotational) on.push('rotational (not expressible in virtio-blk)');
  return on.length > 0 ? on.join(', ') : 'none';
}
