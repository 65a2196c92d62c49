/** `vblk resize --control PATH SIZE`: grows the disk of a running `vblk serve`; the guest sees it live. */
import { controlResize } from '../node/control.js';
import { CliUsageError, parseSizeValue } from './args.js';
import { defineCommand } from './command.js';

export const command = defineCommand({
  name: 'resize',
  summary: 'grow the disk of a running `vblk serve` and notify the connected guest',
  usage: '--control PATH SIZE',
  options: {
    control: { kind: 'string', valueName: 'PATH', description: "the serve process's --control socket (required)" },
  },
  async run({ options, positionals }, io) {
    if (options.control === undefined) throw new CliUsageError('vblk resize: --control PATH is required');
    if (positionals.length !== 1) throw new CliUsageError('vblk resize: expected one SIZE (bytes, or with a K/M/G/T suffix)');
    const size = parseSizeValue(positionals[0]);
    if (size === null || size <= 0) throw new CliUsageError(`vblk resize: SIZE must be bytes or a number with K/M/G/T, got '${positionals[0]}'`);
    const now = await controlResize(options.control, size);
    io.stdout(`${now}\n`);
  },
});
