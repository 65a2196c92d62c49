/** `vblk read --socket PATH --offset N --length N [--output FILE]`: bytes from a vhost-user-blk device. */
import { createWriteStream } from 'node:fs';
import type { Writable } from 'node:stream';
import { once } from 'node:events';
import { CliUsageError } from './args.js';
import { defineCommand } from './command.js';
import { RECONNECT_TIMEOUT_OPTION, openSocketDriver, reconnectTimeoutMs } from './socket-driver.js';
import { CHUNK_BYTES, checkRange, progress, sectorOf } from './transfer.js';

export const command = defineCommand({
  name: 'read',
  summary: 'read bytes from a vhost-user-blk device to a file or standard output',
  usage: '--socket PATH --offset N --length N [--output FILE] [--reconnect-timeout SECONDS]',
  options: {
    socket: { kind: 'string', valueName: 'PATH', description: "the device's vhost-user socket (required)" },
    'reconnect-timeout': RECONNECT_TIMEOUT_OPTION,
    offset: { kind: 'size', valueName: 'N', min: 0, description: 'byte offset, a multiple of the logical block size (required)' },
    length: { kind: 'size', valueName: 'N', min: 0, description: 'bytes to read, a multiple of the logical block size (required)' },
    output: { kind: 'string', valueName: 'FILE', description: 'write to FILE instead of standard output' },
  },
  async run({ options }, io) {
    if (options.socket === undefined) throw new CliUsageError('vblk read: --socket PATH is required');
    if (options.offset === undefined) throw new CliUsageError('vblk read: --offset N is required');
    if (options.length === undefined) throw new CliUsageError('vblk read: --length N is required');
    const { driver, close } = await openSocketDriver(options.socket, { reconnectTimeoutMs: reconnectTimeoutMs(options['reconnect-timeout']) });
    try {
      checkRange('read', driver, options.offset, options.length);
      const out: Writable = options.output === undefined ? process.stdout : createWriteStream(options.output);
      const show = progress(io, 'read', options.length);
      for (let done = 0; done < options.length;) {
        const n = Math.min(CHUNK_BYTES, options.length - done);
        // A fresh buffer per chunk: the stream may still hold the previous one.
        const buf = new Uint8Array(n);
        await driver.read(sectorOf(options.offset + done), [buf]);
        if (!out.write(buf)) await once(out, 'drain');
        done += n;
        show.update(done);
      }
      show.finish();
      if (out !== process.stdout) {
        out.end();
        await once(out, 'finish');
      }
    } finally {
      await close();
    }
  },
});
