/**
 * A vhost-user-blk backend (VhostUserServer + BlkDevice over a MemoryBackend) in a
 * process of its own, for the hostile-frontend catalogue and the fuzzer: a crash
 * (SIGBUS, an uncaught exception) kills only this process, where the parent sees it as
 * an exit, and the parent counts this process's fds in /proc/<pid>/fd.
 *
 *   node dist/test/support/serve-child.js --socket PATH [--size BYTES] [--queues N]
 *        [--queue-size N] [--socket-mode OCTAL] [--allow-unsealed-memory] [--slow-io MS]
 *        [--no-dirty-log]
 *
 * `--slow-io MS` delays every read and write by MS milliseconds, so a test can hold
 * requests in flight while a frontend goes away.
 * Every server log line goes to stderr; "listening on PATH" says it is ready. SIGTERM
 * closes the server and exits 0. With `--exit-with-parent` it also exits when its stdin
 * (a pipe from the parent) ends, so a test runner killed by a timeout leaves no server
 * behind.
 */
import { parseArgs } from 'node:util';
import { MemoryBackend } from '../../src/backends/memory-backend.js';
import { BlkDevice } from '../../src/blk/device.js';
import { VhostUserServer } from '../../src/node/vhost-user-server.js';
import { VHOST_USER_PROTOCOL_F } from '../../src/spec/vhost-user.js';
import { BACKEND_PROTOCOL_FEATURES } from '../../src/transport/vhost-user/backend.js';

const { values } = parseArgs({
  options: {
    socket: { type: 'string' },
    size: { type: 'string', default: String(16 << 20) },
    queues: { type: 'string', default: '2' },
    'queue-size': { type: 'string', default: '256' },
    'socket-mode': { type: 'string' },
    'allow-unsealed-memory': { type: 'boolean', default: false },
    'no-dirty-log': { type: 'boolean', default: false },
    'slow-io': { type: 'string', default: '0' },
    'exit-with-parent': { type: 'boolean', default: false },
  },
});
if (values.socket === undefined) {
  process.stderr.write('serve-child: --socket PATH is required\n');
  process.exit(2);
}

const log = (line: string): void => {
  process.stderr.write(`${line}\n`);
};
/** A memory backend whose reads and writes complete `delayMs` later. */
class SlowMemoryBackend extends MemoryBackend {
  constructor(size: number, private readonly delayMs: number) {
    super({ size });
  }

  override read(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    return new Promise((resolve) => setTimeout(resolve, this.delayMs)).then(() => super.read(offset, buffers));
  }

  override write(offset: number, buffers: readonly Uint8Array[]): Promise<void> {
    return new Promise((resolve) => setTimeout(resolve, this.delayMs)).then(() => super.write(offset, buffers));
  }
}

const slowMs = Number(values['slow-io']);
const device = new BlkDevice({
  backend: slowMs > 0 ? new SlowMemoryBackend(Number(values.size), slowMs) : new MemoryBackend({ size: Number(values.size) }),
  numQueues: Number(values.queues),
  queueSize: Number(values['queue-size']),
  serial: 'hostile',
});
const server = VhostUserServer.listen({
  socketPath: values.socket,
  device,
  log,
  allowUnsealedMemory: values['allow-unsealed-memory'],
  ...(values['no-dirty-log'] ? { protocolFeatures: BACKEND_PROTOCOL_FEATURES & ~(1n << BigInt(VHOST_USER_PROTOCOL_F.LOG_SHMFD)) } : {}),
  ...(values['socket-mode'] !== undefined ? { socketMode: parseInt(values['socket-mode'], 8) } : {}),
});
if (values['exit-with-parent']) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.resume();
}
process.on('SIGTERM', () => {
  server.close().then(() => process.exit(0), (e: unknown) => {
    log(`close failed: ${(e as Error).message}`);
    process.exit(1);
  });
});
// Last: once a parent reads this, connecting works and SIGTERM stops us cleanly.
log(`listening on ${values.socket}`);
