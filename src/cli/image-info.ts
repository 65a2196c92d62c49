/**
 * `vblk image info IMAGE [--format raw|qcow2] [--json] [--force-share]`: what an image is
 * (format, sizes, qcow2 header fields, flags) and its backing chain, read from the headers
 * only: no data is read, nothing is written, and a broken chain is shown as far as it goes.
 */
import { existsSync, fstatSync } from 'node:fs';
import { COMPAT, INCOMPAT } from '../backends/qcow2/header.js';
import { lockImage } from '../node/image-lock.js';
import { IMAGE_FORMATS, closeChain, walkChain, type ChainLevel } from '../node/image-open.js';
import { CliUsageError } from './args.js';
import { defineCommand } from './command.js';

/** `vblk image info --json`: one object, sizes in bytes. */
export interface ImageInfo {
  readonly filename: string;
  readonly format: 'raw' | 'qcow2';
  readonly virtualSize: number;
  readonly fileSize: number;
  /** Bytes the host filesystem allocated for the file (st_blocks × 512). */
  readonly allocatedBytes: number;
  /** qcow2 only, as the other fields below. */
  readonly clusterSize?: number;
  /** "0.10" (version 2) or "1.1" (version 3), as qemu-img names them. */
  readonly compat?: string;
  readonly refcountBits?: number;
  readonly compressionType?: string;
  readonly lazyRefcounts?: boolean;
  readonly extendedL2?: boolean;
  readonly dirty?: boolean;
  readonly corrupt?: boolean;
  readonly snapshots?: number;
  /** Below the image, top first. */
  readonly backingChain: readonly BackingInfo[];
  /** What stopped the walk down the chain (a missing backing file …), if anything. */
  readonly backingError?: string;
}

/** One backing file of {@link ImageInfo.backingChain}. */
export interface BackingInfo {
  /** The name as the image above stores it. */
  readonly name: string;
  /** Where that name resolved. */
  readonly filename: string;
  readonly format: 'raw' | 'qcow2';
  /** `stated` in the image above, or `probed` from the file's first bytes. */
  readonly formatSource: string;
  readonly virtualSize: number;
}

export const command = defineCommand({
  name: 'image info',
  summary: 'show an image\'s format, sizes, qcow2 header fields and backing chain',
  usage: 'IMAGE [--format raw|qcow2] [--json] [--force-share]',
  details: [
    'The image is locked for reading as qemu-img info locks it: an image another process',
    'writes (vblk serve, a running QEMU) is refused, since its header may change under the read.',
  ],
  options: {
    format: { kind: 'choice', choices: IMAGE_FORMATS, valueName: 'FORMAT', description: 'the image\'s format (probed from its first bytes when absent)' },
    json: { kind: 'boolean', description: 'print one JSON object on one line' },
    'force-share': { kind: 'boolean', description: 'show an image another process writes (as qemu-img info -U): the dirty flag and sizes may be stale' },
  },
  async run({ options, positionals }, io) {
    if (positionals.length !== 1) throw new CliUsageError(`vblk image info: expected one IMAGE, got ${positionals.length} arguments`);
    const path = positionals[0];
    // A missing image is left to imageInfo, which says so in its own words.
    const lock = existsSync(path)
      ? lockImage(path, { readOnly: true, share: options['force-share'], overrideHint: '--force-share shows it anyway' })
      : null;
    try {
      const info = imageInfo(path, options.format);
      io.stdout(options.json ? `${JSON.stringify(info)}\n` : formatInfo(info));
    } finally {
      lock?.release();
    }
  },
});

/** Reads the headers of `path` and its backing chain (read-only). */
export function imageInfo(path: string, format?: 'raw' | 'qcow2'): ImageInfo {
  const { levels, error } = walkChain(path, { format, readOnly: true });
  try {
    const top = levels[0];
    const st = fstatSync(top.file.fd);
    const h = top.header;
    const qcow2 = h === undefined ? {} : {
      clusterSize: 2 ** h.clusterBits,
      compat: h.version === 2 ? '0.10' : '1.1',
      refcountBits: 2 ** h.refcountOrder,
      compressionType: h.compressionType,
      lazyRefcounts: (h.compatibleFeatures & COMPAT.LAZY_REFCOUNTS) !== 0,
      extendedL2: (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0,
      dirty: (h.incompatibleFeatures & INCOMPAT.DIRTY) !== 0,
      corrupt: (h.incompatibleFeatures & INCOMPAT.CORRUPT) !== 0,
      snapshots: h.nbSnapshots,
    };
    return {
      filename: path, format: top.format, virtualSize: virtualSize(top), fileSize: st.size, allocatedBytes: st.blocks * 512,
      ...qcow2,
      backingChain: levels.slice(1).map((l) => ({
        name: l.storedName ?? l.path, filename: l.path, format: l.format, formatSource: l.formatSource, virtualSize: virtualSize(l),
      })),
      ...(error === undefined ? {} : { backingError: error.message }),
    };
  } finally {
    closeChain(levels);
  }
}

function virtualSize(level: ChainLevel): number {
  return level.header?.size ?? level.file.size;
}

/** The text form, one `key: value` per line, like qemu-img info. */
export function formatInfo(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `format: ${info.format}`,
    `virtual size: ${human(info.virtualSize)} (${info.virtualSize} bytes)`,
    `file size: ${human(info.fileSize)} (${info.fileSize} bytes)`,
    `allocated on host: ${human(info.allocatedBytes)} (${info.allocatedBytes} bytes)`,
  ];
  if (info.clusterSize !== undefined) {
    lines.push(
      `cluster size: ${info.clusterSize}`,
      `compat: ${info.compat}`,
      `refcount bits: ${info.refcountBits}`,
      `compression type: ${info.compressionType}`,
      `lazy refcounts: ${info.lazyRefcounts}`,
      `extended l2: ${info.extendedL2}`,
      `dirty: ${info.dirty}`,
      `corrupt: ${info.corrupt}`,
      `snapshots: ${info.snapshots}`,
    );
  }
  if (info.backingChain.length > 0 || info.backingError !== undefined) {
    lines.push('backing chain:');
    for (const b of info.backingChain) {
      const where = b.filename === b.name ? '' : ` (${b.filename})`;
      lines.push(`  ${b.name}${where}: ${b.format} (${b.formatSource}), ${human(b.virtualSize)}`);
    }
    if (info.backingError !== undefined) lines.push(`  error: ${info.backingError}`);
  }
  return `${lines.join('\n')}\n`;
}

const UNITS = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** Bytes in the largest binary unit it reaches, three significant figures ("1.5 GiB"). */
export function human(bytes: number): string {
  let unit = 0;
  let value = bytes;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : Number(value.toPrecision(3))} ${UNITS[unit]}`;
}
