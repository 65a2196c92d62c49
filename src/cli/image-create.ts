/**
 * `vblk image create [--format qcow2|raw] [--backing FILE --backing-format FMT]
 * [--cluster-size N] IMAGE [SIZE]`: a new, empty image. A raw image is a sparse file; a
 * qcow2 image gets the layout `qemu-img create` makes (../backends/qcow2/create.ts).
 */
import { constants, closeSync, openSync, ftruncateSync, rmSync } from 'node:fs';
import { createQcow2 } from '../backends/qcow2/create.js';
import { openImageFile } from '../node/image-file.js';
import { IMAGE_FORMATS, backingPath, closeChain, resolveChain, type ImageFormat } from '../node/image-open.js';
import { CliUsageError, formatSizeValue, parseSizeValue } from './args.js';
import { defineCommand } from './command.js';

/** New image files are private: a disk image holds whatever its guest writes. */
const IMAGE_MODE = 0o600;

export const command = defineCommand({
  name: 'image create',
  summary: 'create an empty image: a sparse raw file, or a qcow2 image (optionally over a backing file)',
  usage: '[--format qcow2|raw] [--backing FILE --backing-format raw|qcow2] [--cluster-size N] IMAGE [SIZE]',
  details: [
    'SIZE takes K/M/G/T suffixes; with --backing it defaults to the backing file\'s size.',
    'A relative --backing name is stored as given and resolved against IMAGE\'s directory (as QEMU does).',
    'IMAGE must not exist yet.',
  ],
  options: {
    format: { kind: 'choice', choices: ['qcow2', 'raw'], valueName: 'FORMAT', default: 'qcow2', description: 'image format' },
    backing: { kind: 'string', valueName: 'FILE', description: 'qcow2 only: reads of clusters the image does not hold come from FILE (never written)' },
    'backing-format': {
      kind: 'choice', choices: IMAGE_FORMATS, valueName: 'FMT',
      description: 'format of the backing file, stored in the image (required with --backing: never guessed from a file a guest may have written)',
    },
    'cluster-size': { kind: 'size', min: 512, valueName: 'N', description: 'qcow2 only: bytes per cluster, a power of two from 512 to 2M (default 64K)' },
  },
  async run({ options, positionals }, io) {
    const fail = (why: string): never => {
      throw new CliUsageError(`vblk image create: ${why}`);
    };
    if (positionals.length < 1 || positionals.length > 2) fail(`expected IMAGE [SIZE], got ${positionals.length} arguments`);
    const [image, sizeText] = positionals;
    const format: ImageFormat = options.format;
    if (format === 'raw' && options.backing !== undefined) fail('--backing needs --format qcow2 (a raw image has no backing file)');
    if (format === 'raw' && options['cluster-size'] !== undefined) fail('--cluster-size is for qcow2 images');
    if (options['backing-format'] !== undefined && options.backing === undefined) fail('--backing-format needs --backing FILE');
    const clusterSize = options['cluster-size'];
    if (clusterSize !== undefined && ((clusterSize & (clusterSize - 1)) !== 0 || clusterSize > 2 * 1024 * 1024)) {
      fail(`--cluster-size must be a power of two from 512 to 2M, got ${clusterSize}`);
    }
    let size: number | undefined;
    if (sizeText !== undefined) {
      size = parseSizeValue(sizeText) ?? undefined;
      if (size === undefined || size < 512 || size % 512 !== 0) fail(`SIZE must be a positive multiple of 512 bytes (K/M/G/T suffixes allowed), got '${sizeText}'`);
    }
    let backingFormat: ImageFormat | undefined;
    if (options.backing !== undefined) {
      const path = backingPath(image, options.backing);
      // Opening the backing chain checks the name, the format and the chain below it now,
      // not when the image is first served.
      const chain = resolveChain(path, { format: options['backing-format'], readOnly: true });
      const base = chain[0];
      const backingSize = base.header?.size ?? Math.ceil(base.file.size / 512) * 512;
      closeChain(chain);
      if (options['backing-format'] === undefined) {
        fail(`--backing needs --backing-format (${options.backing} looks like ${base.format}): a stated format is never guessed from data a guest wrote`);
      }
      backingFormat = options['backing-format'];
      size ??= backingSize;
    }
    if (size === undefined) fail('SIZE is required without --backing');
    const virtualSize = size as number;

    let fd: number;
    try {
      fd = openSync(image, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, IMAGE_MODE);
    } catch (e) {
      const code = (e as { code?: unknown }).code;
      if (code === 'EEXIST') throw new Error(`image ${image} exists already (remove it first, or pick another name)`);
      throw new Error(`cannot create image ${image}: ${(e as Error).message}`);
    }
    try {
      if (format === 'raw') {
        ftruncateSync(fd, virtualSize);
        closeSync(fd);
      } else {
        closeSync(fd);
        const file = openImageFile(image);
        try {
          await createQcow2(file, { size: virtualSize, clusterSize, backingFile: options.backing, backingFormat });
          await file.flush();
        } finally {
          file.close();
        }
      }
    } catch (e) {
      rmSync(image, { force: true });
      throw e;
    }
    const details = format === 'qcow2' ? `, ${formatSizeValue(clusterSize ?? 65536)} clusters` : ', sparse';
    const backing = options.backing === undefined ? '' : `, backing ${options.backing} (${backingFormat})`;
    io.stdout(`created ${image}: ${format}, ${formatSizeValue(virtualSize)} (${virtualSize} bytes)${details}${backing}\n`);
  },
});
