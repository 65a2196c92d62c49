/**
 * A vhost-user-blk backend (VhostUserServer + BlkDevice over a MemoryBackend) in a
 * process of its own, for the hostile-frontend catalogue and the fuzzer: a crash
 * (SIGBUS, an uncaught exception) kills only this process, where the parent sees it as
 * an exit, and the parent counts this process's fds in /proc/<pid>/fd.
 *
 *   node dist/test/support/serve-child.js --socket PATH [--size BYTES] [--queues N]
 *        [--queue-size N] [--socket-mode OCTAL] [--allow-unsealed-memory]
 *
 * Every server log line goes to stderr; "listening on PATH" says it is ready. SIGTERM
 * closes the server and exits 0.
 */
import { parseArgs } from 'node:util';
import { MemoryBackend } from '../../src/backends/memory-backend.js';
import { BlkDevice } from '../../src/blk/device.js';
import { VhostUserServer } from '../../src/node/vhost-user-server.js';

const { values } = parseArgs({
  options: {
    socket: { type: 'string' },
    size: { type: 'string', default: String(16 << 20) },
    queues: { type: 'string', default: '2' },
    'queue-size': { type: 'string', default: '256' },
    'socket-mode': { type: 'string' },
    'allow-unsealed-memory': { type: 'boolean', default: false },
  },
});
if (values.socket === undefined) {
  process.stderr.write('serve-child: --socket PATH is required\n');
  process.exit(2);
}

const log = (line: string): void => {
  process.stderr.write(`${line}\n`);
};
const device = new BlkDevice({
  backend: new MemoryBackend({ size: Number(values.size) }),
  numQueues: Number(values.queues),
  queueSize: Number(values['queue-size']),
  serial: 'hostile',
});
const server = VhostUserServer.listen({
  socketPath: values.socket,
  device,
  log,
  allowUnsealedMemory: values['allow-unsealed-memory'],
  ...(values['socket-mode'] !== undefined ? { socketMode: parseInt(values['socket-mode'], 8) } : {}),
});
log(`listening on ${values.socket}`);
process.on('SIGTERM', () => {
  server.close().then(() => process.exit(0), (e: unknown) => {
    log(`close failed: ${(e as Error).message}`);
    process.exit(1);
  });
});
