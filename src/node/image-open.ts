/**
 * Opening a disk image file as a {@link BlockBackend}: a raw image, or a qcow2 image with
 * its chain of backing files (each raw or qcow2), as `vblk serve IMAGE` and `vblk image`
 * need it.
 *
 * The chain is walked before anything is served, one open file per level, so that every
 * check applies to the file that is then used: a relative backing name resolves against
 * the directory of the image that names it (as QEMU does; an absolute name is kept), the
 * backing format stated in the header is used as stated and probed only when absent,
 * every backing level is opened read-only, a chain is at most {@link MAX_BACKING_DEPTH}
 * backing files deep, and one file met twice (same device and inode) is a loop.
 *
 * Why stating formats matters: a raw disk's guest can write anything into its first
 * sector, qcow2's magic and a backing file name such as /etc/shadow included. Probing
 * such a disk would turn the guest's bytes into instructions to open host files. So
 * `format` is never second-guessed, a stated backing format is never probed, and a top
 * image that was probed as raw refuses guest writes that would put the qcow2 magic at
 * its start (QEMU restricts a probed raw image's first sector the same way).
 */
import { fstatSync, statfsSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { BackendError, type BlockBackend } from '../backends/backend.js';
import type { ImageFile } from '../backends/qcow2/image-file.js';
import { QCOW2_MAGIC, Qcow2Error, parseHeader, type Qcow2Header } from '../backends/qcow2/header.js';
import { openQcow2 as openQcow2Driver } from '../backends/qcow2/qcow2.js';
import { VblkError } from '../errors.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../spec/virtio-blk.js';
import { nodeDecompressors, type ClusterDecompressor } from './decompress.js';
import { FileBackend, FileBackendError, openFileBackend, type FileIoMode } from './file-backend.js';
import { openImageFile, type ImageFileIoMode, type NodeImageFile } from './image-file.js';
import * as native from './native.js';

/** The image formats vblk reads and writes. */
export type ImageFormat = 'raw' | 'qcow2';
/** The formats, for option parsing and messages. */
export const IMAGE_FORMATS: readonly ImageFormat[] = ['raw', 'qcow2'];

/** Backing files below the top image at most: deeper chains are refused (and are a sign of a loop through names). */
export const MAX_BACKING_DEPTH = 16;
/** Bytes read to probe a format and parse a qcow2 header: the largest cluster holds the whole header area. */
const HEADER_READ_BYTES = 2 * 1024 * 1024;

/** The stable codes of {@link ImageOpenError}. */
export type ImageOpenErrorCode =
  | 'BACKING_MISSING' | 'BACKING_UNREADABLE' | 'BACKING_LOOP' | 'BACKING_TOO_DEEP' | 'BACKING_UNSUPPORTED' | 'FORMAT_OPTION';

/** Why an image or its backing chain cannot be opened; one line naming the files. */
export class ImageOpenError extends VblkError {
  declare readonly code: ImageOpenErrorCode;
  constructor(code: ImageOpenErrorCode, message: string) {
    super(code, message);
  }
}

/** How a level's format was decided: given by the caller, stated in the header above, or probed from the magic. */
export type FormatSource = 'given' | 'stated' | 'probed';

/** One file of a chain, top first. */
export interface ChainLevel {
  /** The path it was opened by (the top as given; a backing file resolved as described above). */
  readonly path: string;
  /** The name as the image above stores it (undefined for the top). */
  readonly storedName?: string;
  readonly format: ImageFormat;
  readonly formatSource: FormatSource;
  /** The parsed header of a qcow2 level. */
  readonly header?: Qcow2Header;
  /** The open file (read-only below the top); owned by whoever holds the chain. */
  readonly file: NodeImageFile;
}

/** The qcow2 driver's open call (the core's `openQcow2`), injectable for tests. */
export type Qcow2Opener = (file: ImageFile, options: {
  readonly readOnly: boolean;
  readonly backing?: BlockBackend;
  readonly decompressors: { readonly zlib?: ClusterDecompressor; readonly zstd?: ClusterDecompressor };
}) => Promise<BlockBackend>;

/** How {@link openImage} opens an image. */
export interface OpenImageOptions {
  /** The top image's format; probed from its first bytes when absent. */
  readonly format?: ImageFormat;
  /** Open the top image read-only (backing files always are). */
  readonly readOnly?: boolean;
  /** How the top image's reads and writes run (`mmap` for raw images only). Default `sync`. */
  readonly io?: FileIoMode;
  /** Raw only: create the image when missing, or grow it, to this many bytes (see {@link openFileBackend}). */
  readonly size?: number;
  /** @internal The qcow2 driver; the built-in one by default (tests pass a stand-in). */
  readonly openQcow2?: Qcow2Opener;
}

/** One backing file of an {@link OpenedImage}. */
export interface BackingLevel {
  /** Where its name resolved. */
  readonly path: string;
  /** Its format. */
  readonly format: ImageFormat;
  /** How the format was decided. */
  readonly formatSource: FormatSource;
}

/** An open image: the backend to serve and the chain it was made of, top first. */
export interface OpenedImage {
  /** Closing it closes every file of the chain. */
  readonly backend: BlockBackend;
  /** The top image's format. */
  readonly format: ImageFormat;
  /** Backing files, top image excluded, top first: what the startup line shows. */
  readonly backing: readonly BackingLevel[];
}

/**
 * Opens the image at `path` with its backing chain. Throws {@link ImageOpenError}, a
 * {@link FileBackendError} for a file that cannot be opened, or the qcow2 driver's
 * error for a malformed image, each one line naming the file.
 */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<OpenedImage> {
  const readOnly = options.readOnly ?? false;
  const io = options.io ?? 'sync';
  const format = options.format ?? probeTop(path, options.size);
  if (format === 'raw') {
    const backend = openFileBackend(path, { readOnly, io, size: options.size });
    // A probed raw image could be turned into a qcow2 one by its own guest: see the module comment.
    return { backend: options.format === undefined && !readOnly ? guardProbedRaw(backend) : backend, format, backing: [] };
  }
  if (options.size !== undefined) {
    throw new ImageOpenError('FORMAT_OPTION', `image ${path} is qcow2: a size creates or grows raw images only (use vblk image create)`);
  }
  if (io === 'mmap') throw new ImageOpenError('FORMAT_OPTION', `image ${path} is qcow2: I/O mode mmap serves raw images only (use auto, sync or async)`);
  const openQcow2 = options.openQcow2 ?? openQcow2Driver;
  const chain = resolveChain(path, { format, readOnly, io });
  const backend = await openChain(chain, openQcow2);
  return {
    backend, format,
    backing: chain.slice(1).map((l) => ({ path: l.path, format: l.format, formatSource: l.formatSource })),
  };
}

/**
 * Walks the chain from `path` down, opening each file once (the top as asked, the rest
 * read-only) and parsing each qcow2 header. Nothing is served yet; the caller owns the
 * files ({@link closeChain}). Throws on the first problem, closing what it opened.
 */
export function resolveChain(path: string, options: ChainOptions = {}): ChainLevel[] {
  const { levels, error } = walkChain(path, options);
  if (error !== undefined) {
    closeChain(levels);
    throw error;
  }
  return levels;
}

/** How {@link resolveChain} and {@link walkChain} open the top image. */
export interface ChainOptions {
  /** The top image's format; probed when absent. */
  readonly format?: ImageFormat;
  readonly readOnly?: boolean;
  readonly io?: ImageFileIoMode;
}

/**
 * {@link resolveChain} that stops at a problem below the top instead of throwing: the
 * levels opened so far, and what stopped the walk (`vblk image info` shows both). A
 * problem with the top image itself still throws.
 */
export function walkChain(path: string, options: ChainOptions = {}): { levels: ChainLevel[]; error?: Error } {
  const chain: ChainLevel[] = [];
  const seen = new Map<string, string>();
  let next: { path: string; storedName?: string; format?: ImageFormat; formatSource: FormatSource; namedBy?: string } =
    { path, format: options.format, formatSource: 'given' };
  try {
    for (;;) {
      let file: NodeImageFile;
      try {
        file = openImageFile(next.path, { readOnly: chain.length > 0 || (options.readOnly ?? false), io: options.io });
      } catch (e) {
        if (next.namedBy === undefined || !(e instanceof FileBackendError)) throw e;
        if (e.code === 'IMAGE_MISSING') throw new ImageOpenError('BACKING_MISSING', `backing file ${next.path} of ${next.namedBy} does not exist`);
        throw new ImageOpenError('BACKING_UNREADABLE', `backing file of ${next.namedBy}: ${e.message}`);
      }
      if (next.namedBy !== undefined) refusePseudoFile(next.path, next.namedBy, file);
      const st = fstatSync(file.fd, { bigint: true });
      const identity = `${st.dev}:${st.ino}`;
      const again = seen.get(identity);
      if (again !== undefined) {
        file.close();
        throw new ImageOpenError('BACKING_LOOP', `backing chain of ${path} loops: ${next.path} (named by ${next.namedBy}) is ${again} again`);
      }
      seen.set(identity, next.path);
      const first = readStart(file);
      const format = next.format ?? (hasQcow2Magic(first) ? 'qcow2' : 'raw');
      const formatSource = next.format === undefined ? 'probed' : next.formatSource;
      if (format === 'raw') {
        chain.push({ path: next.path, storedName: next.storedName, format, formatSource, file });
        return { levels: chain };
      }
      let header: Qcow2Header;
      try {
        header = parseHeader(first, file.size);
      } catch (e) {
        file.close();
        if (e instanceof Qcow2Error) throw new Qcow2Error(e.code, `${next.path}: ${e.message}`);
        throw e;
      }
      chain.push({ path: next.path, storedName: next.storedName, format, formatSource, header, file });
      if (header.backingFile === undefined) return { levels: chain };
      if (chain.length > MAX_BACKING_DEPTH) {
        throw new ImageOpenError('BACKING_TOO_DEEP', `backing chain of ${path} is more than ${MAX_BACKING_DEPTH} files deep (at ${next.path})`);
      }
      next = {
        path: backingPath(next.path, header.backingFile), storedName: header.backingFile, namedBy: next.path,
        ...backingFormat(next.path, header),
      };
    }
  } catch (e) {
    if (chain.length === 0) throw e;
    return { levels: chain, error: e as Error };
  }
}

/**
 * Kernel filesystems whose "regular files" hold the host's state (procfs, sysfs,
 * debugfs, tracefs, securityfs, configfs; statfs(2) magic numbers). A name in an image
 * is the image's author's choice: none may make the guest read /proc/self/environ.
 */
const PSEUDO_FILESYSTEMS: ReadonlyMap<number, string> = new Map([
  [0x9fa0, 'procfs'], [0x62656572, 'sysfs'], [0x64626720, 'debugfs'], [0x74726163, 'tracefs'],
  [0x73636673, 'securityfs'], [0x62656570, 'configfs'],
]);

/** Closes `file` and throws when the backing file at `path` lies on a kernel pseudo filesystem. */
function refusePseudoFile(path: string, namedBy: string, file: NodeImageFile): void {
  const kind = PSEUDO_FILESYSTEMS.get(Number(statfsSync(path).type));
  if (kind === undefined) return;
  file.close();
  throw new ImageOpenError('BACKING_UNSUPPORTED', `backing file ${path} of ${namedBy} is on ${kind}, not a disk image`);
}

/** Closes every file of a chain that {@link resolveChain} opened (idempotent). */
export function closeChain(chain: readonly ChainLevel[]): void {
  for (const level of chain) level.file.close();
}

/**
 * Where a backing file named `name` by the image at `imagePath` is: an absolute name as
 * is, a relative one against the directory of the naming image (not the working
 * directory). Protocol names (`nbd://`, `json:`) are refused: this opener reads files.
 */
export function backingPath(imagePath: string, name: string): string {
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !name.startsWith('./')) {
    throw new ImageOpenError('BACKING_UNSUPPORTED', `backing file '${name}' of ${imagePath} is not a file name (protocols are not supported)`);
  }
  if (name.includes('\0')) throw new ImageOpenError('BACKING_UNSUPPORTED', `backing file name of ${imagePath} holds a NUL byte`);
  return isAbsolute(name) ? name : resolve(dirname(imagePath), name);
}

/** The backing format stated in `header`, or none (then probed). */
function backingFormat(imagePath: string, header: Qcow2Header): { format?: ImageFormat; formatSource: FormatSource } {
  const stated = header.backingFormat;
  if (stated === undefined || stated === '') return { formatSource: 'probed' };
  if (stated === 'raw' || stated === 'qcow2') return { format: stated, formatSource: 'stated' };
  throw new ImageOpenError('BACKING_UNSUPPORTED', `backing format '${stated.slice(0, 64)}' of ${imagePath} is not supported (raw or qcow2)`);
}

/** The first bytes of `file`, enough for a qcow2 header area (zeroes past its end). */
function readStart(file: NodeImageFile): Uint8Array {
  const bytes = new Uint8Array(Math.min(HEADER_READ_BYTES, Math.max(file.size, 8)));
  // Read synchronously whatever the file's I/O mode: opening is not a hot path. A short
  // read leaves the fresh buffer's zeroes past the end of the file.
  native.preadv(file.fd, [bytes], 0);
  return bytes;
}

function hasQcow2Magic(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && ((bytes[0] << 24 | bytes[1] << 16 | bytes[2] << 8 | bytes[3]) >>> 0) === QCOW2_MAGIC;
}

/** The top image's format from its first bytes; a missing image that `size` will create is raw. */
function probeTop(path: string, size: number | undefined): ImageFormat {
  let file: NodeImageFile;
  try {
    file = openImageFile(path, { readOnly: true });
  } catch (e) {
    if (size !== undefined && (e as { code?: unknown }).code === 'IMAGE_MISSING') return 'raw';
    throw e;
  }
  try {
    const head = new Uint8Array(4);
    file.read(0, [head]);
    return hasQcow2Magic(head) ? 'qcow2' : 'raw';
  } finally {
    file.close();
  }
}

/**
 * Builds the backends bottom-up. Each level's backend takes its file over; on failure the
 * backends built so far are closed, and the files not yet handed over. The returned
 * backend closes the whole chain.
 */
async function openChain(chain: readonly ChainLevel[], openQcow2: Qcow2Opener): Promise<BlockBackend> {
  let below: BlockBackend | undefined;
  const opened: BlockBackend[] = [];
  let i = chain.length - 1;
  try {
    for (; i >= 0; i--) {
      const level = chain[i];
      let backend: BlockBackend;
      if (level.format === 'raw') {
        // A raw backing file of any length: the backend rounds it up to whole sectors
        // (reads past its end give zeroes; an empty file stays empty) and never writes it.
        // It takes the fd over, and reads in the chain's I/O mode.
        const size = Math.ceil(level.file.size / VIRTIO_BLK_SECTOR_SIZE) * VIRTIO_BLK_SECTOR_SIZE;
        backend = new FileBackend(level.file.fd, size, { readOnly: true, io: level.file.io });
      } else {
        backend = await openQcow2(level.file, { readOnly: i > 0 || level.file.readOnly, backing: below, decompressors: nodeDecompressors });
      }
      opened.push(backend);
      below = backend;
    }
  } catch (e) {
    for (const b of opened) await b.close();
    closeChain(chain.slice(0, i + 1));
    // The driver's messages say what is wrong, not with which file of the chain.
    if (e instanceof Qcow2Error) throw new Qcow2Error(e.code, `${chain[i].path}: ${e.message}`);
    throw e;
  }
  const top = below as BlockBackend;
  const lower = opened.slice(0, -1).reverse();
  // The top owns the chain: closing it closes every backing level too, whatever the
  // driver does with its own backing (closes are idempotent).
  const closeTop = top.close.bind(top);
  top.close = async () => {
    await closeTop();
    for (const b of lower) await b.close();
  };
  return top;
}

/** qcow2's magic at the start of a write at offset 0. */
function writesQcow2Magic(offset: number, buffers: readonly Uint8Array[]): boolean {
  if (offset !== 0) return false;
  const head = new Uint8Array(4);
  let n = 0;
  for (const b of buffers) {
    for (let i = 0; i < b.length && n < 4; i++) head[n++] = b[i];
    if (n === 4) break;
  }
  return n === 4 && hasQcow2Magic(head);
}

/** A probed raw image that refuses writes putting the qcow2 magic at its start (the module comment says why). */
function guardProbedRaw(backend: FileBackend): FileBackend {
  const write = backend.write.bind(backend);
  backend.write = (offset, buffers) => {
    if (writesQcow2Magic(offset, buffers)) {
      throw new BackendError('IO_ERROR', 'refused: writing the qcow2 magic to the start of an image probed as raw (serve it with --format raw to allow it)');
    }
    return write(offset, buffers);
  };
  return backend;
}
