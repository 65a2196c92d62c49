/**
 * Child process of test/blk-driver-callbacks.test.ts: a submitRead completion throws;
 * prints what surfaced as uncaught and whether the driver still serves requests after.
 */
import { BlkDriver } from '../../src/blk/driver.js';
import { BlkDevice } from '../../src/blk/device.js';
import { MemoryBackend } from '../../src/backends/memory-backend.js';
import { LoopbackTransport } from '../../src/transport/loopback.js';

const uncaught: string[] = [];
process.on('uncaughtException', (e) => uncaught.push(e.message));

const transport = new LoopbackTransport(new BlkDevice({ backend: new MemoryBackend({ size: 1 << 20 }) }));
const driver = await BlkDriver.probe(transport);
const data = new Uint8Array(4096).fill(0x5a);
await driver.write(0, [data]);
// Several at once, so the throwing one (the second) completes in the middle of a reap.
let completions = 0;
const reads = [0, 1, 2].map(() => new Promise<void>((resolve) => {
  driver.submitRead(0, [new Uint8Array(4096)], () => {
    resolve();
    if (++completions === 2) throw new Error('boom from a completion');
  });
}));
await Promise.all(reads);
await new Promise((resolve) => setTimeout(resolve, 10));
const back = new Uint8Array(4096);
await driver.read(0, [back]);
await driver.flush();
process.stdout.write(JSON.stringify({ uncaught, afterwards: 'ok', dataRight: back.every((b) => b === 0x5a) }));
await driver.remove();
await transport.close();
