/** `vblk write --socket PATH --offset N [--input FILE]`: bytes from a file or standard input to a vhost-user-blk device. */
import { createReadStream, statSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { VIRTIO_BLK_F } from '../spec/virtio-blk.js';
import { CliUsageError } from './args.js';
import { defineCommand } from './command.js';
import { RECONNECT_TIMEOUT_OPTION, openSocketDriver, reconnectTimeoutMs } from './socket-driver.js';
import { CHUNK_BYTES, checkRange, progress, sectorOf } from './transfer.js';

export const command = defineCommand({
  name: 'write',
  summary: 'write a file or standard input to a vhost-user-blk device',
  usage: '--socket PATH --offset N [--input FILE] [--reconnect-timeout SECONDS]',
  details: ['The input length must be a multiple of the logical block size. Writes are flushed before exit.'],
  options: {
    socket: { kind: 'string', valueName: 'PATH', description: "the device's vhost-user socket (required)" },
    'reconnect-timeout': RECONNECT_TIMEOUT_OPTION,
    offset: { kind: 'size', valueName: 'N', min: 0, description: 'byte offset, a multiple of the logical block size (required)' },
    input: { kind: 'string', valueName: 'FILE', description: 'read from FILE instead of standard input' },
  },
  async run({ options }, io) {
    if (options.socket === undefined) throw new CliUsageError('vblk write: --socket PATH is required');
    if (options.offset === undefined) throw new CliUsageError('vblk write: --offset N is required');
    const knownLength = options.input === undefined ? null : statSync(options.input).size;
    const { driver, close } = await openSocketDriver(options.socket, { reconnectTimeoutMs: reconnectTimeoutMs(options['reconnect-timeout']) });
    try {
      if (driver.readOnly) throw new CliUsageError('vblk write: the device is read-only');
      if (knownLength !== null) checkRange('write', driver, options.offset, knownLength);
      const input: Readable = options.input === undefined ? process.stdin : createReadStream(options.input, { highWaterMark: CHUNK_BYTES });
      const show = progress(io, 'wrote', knownLength);
      const lbs = driver.logicalBlockSize;
      let pending = new Uint8Array(0);
      let done = 0;
      const writeOut = async (bytes: Uint8Array): Promise<void> => {
        checkRange('write', driver, options.offset! + done, bytes.length);
        await driver.write(sectorOf(options.offset! + done), [bytes]);
        done += bytes.length;
        show.update(done);
      };
      for await (const chunk of input as AsyncIterable<Uint8Array>) {
        const joined = new Uint8Array(pending.length + chunk.length);
        joined.set(pending);
        joined.set(chunk, pending.length);
        const whole = joined.length - (joined.length % lbs);
        for (let at = 0; at < whole; at += CHUNK_BYTES) await writeOut(joined.subarray(at, Math.min(whole, at + CHUNK_BYTES)));
        pending = joined.slice(whole);
      }
      if (pending.length !== 0) {
        throw new CliUsageError(`vblk write: input length ${done + pending.length} is not a multiple of the logical block size ${lbs}; ${done} bytes were written`);
      }
      if (driver.has(VIRTIO_BLK_F.FLUSH)) await driver.flush();
      show.finish();
    } finally {
      await close();
    }
  },
});
