/**
 * The advisory lock `vblk serve` holds on an image file, so that two processes never
 * write one disk unawares. It is QEMU's own scheme, so vblk, QEMU and
 * qemu-storage-daemon see each other's locks: shared open-file-description (OFD) locks
 * on single bytes of the image, one byte per permission. As QEMU 7.2 (block/file-posix)
 * does it, checked against it here with /proc/locks:
 *
 * - byte 100 + n is locked by every user that holds permission n,
 * - byte 200 + n by every user that lets nobody else hold permission n,
 *
 * with n = 0 for reading consistent data and n = 1 for writing. A user may start when no
 * other holds a byte 200 + n of a permission n it wants, and none holds a byte 100 + n of
 * a permission n it does not share. A QEMU guest's writable `-drive` locks 100, 101 and
 * 201; a writable qemu-storage-daemon export 100 and 101 (it shares everything); a
 * read-only export 100.
 *
 * The locks are shared (F_RDLCK), so two holders of one byte never conflict by
 * themselves: a conflict is found by asking whether an exclusive lock could be set
 * (F_OFD_GETLK), after taking our own — two processes starting at the same moment may
 * then both refuse, never both start. They live on a file descriptor of their own, which
 * no other part of the process closes, and go with it (at {@link ImageLock.release}, or
 * when the process ends however it ends).
 */
import { closeSync, constants, openSync } from 'node:fs';
import { VblkError } from '../errors.js';
import * as native from './native.js';

/** First of QEMU's "holds permission n" bytes. */
const PERM_BYTE = 100;
/** First of QEMU's "lets nobody else hold permission n" bytes. */
const UNSHARED_BYTE = 200;
/** QEMU's permission numbers: BLK_PERM_CONSISTENT_READ is bit 0, BLK_PERM_WRITE bit 1. */
const CONSISTENT_READ = 0;
const WRITE = 1;

/** How {@link lockImage} locks. */
export interface ImageLockOptions {
  /** Only read the image: other readers may share it, writers may not. */
  readonly readOnly: boolean;
  /**
   * Take the image even when another process holds it, and let any other take it too.
   * Our own use is still announced: a later process that shares nothing refuses.
   */
  readonly share?: boolean;
  /** What a refusal's message ends with: how the user overrides it (`--force-share …`). */
  readonly overrideHint?: string;
}

/** The image is locked by another process in a way ours conflicts with. */
export class ImageLockError extends VblkError {
  declare readonly code: 'IMAGE_LOCKED';
  constructor(
    /** The image whose lock was refused. */
    readonly path: string,
    message: string,
  ) {
    super('IMAGE_LOCKED', message);
  }
}

/** A held lock on an image file. */
export interface ImageLock {
  /** Drops the lock (closes its file descriptor); later calls do nothing. */
  release(): void;
}

/** What another holder of each byte is doing, for the message. */
const HOLDER_OF: Readonly<Record<number, string>> = {
  [PERM_BYTE + WRITE]: 'writes to it',
  [UNSHARED_BYTE + WRITE]: 'lets no other process write to it',
  [UNSHARED_BYTE + CONSISTENT_READ]: 'lets no other process read it',
};

/**
 * Locks the image at `path` for reading (and writing unless `readOnly`). Throws
 * {@link ImageLockError} when another process's lock is in the way, and the file
 * system's error when the file cannot be opened or locked at all.
 */
export function lockImage(path: string, options: ImageLockOptions): ImageLock {
  const fd = openSync(path, constants.O_RDONLY);
  try {
    const hold = [PERM_BYTE + CONSISTENT_READ];
    if (!options.readOnly) hold.push(PERM_BYTE + WRITE);
    // A reader too keeps writers out: what it reads would change under it.
    if (!options.share) hold.push(UNSHARED_BYTE + WRITE);
    // Others' locks on what we hold only matter through the checks below: ours are shared.
    const refused = hold.find((byte) => !native.ofdLock(fd, byte, 1, 'read'));
    // Only an exclusive lock refuses a shared one: nobody's scheme we know, it still keeps us out.
    if (refused !== undefined) throw lockedError(path, `holds an exclusive lock on byte ${refused}`, options.overrideHint);
    if (!options.share) {
      const check = [UNSHARED_BYTE + CONSISTENT_READ, PERM_BYTE + WRITE];
      if (!options.readOnly) check.push(UNSHARED_BYTE + WRITE);
      const conflict = check.find((byte) => native.ofdTestLock(fd, byte, 1, 'write') !== null);
      if (conflict !== undefined) throw lockedError(path, HOLDER_OF[conflict], options.overrideHint);
    }
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  let held = true;
  return {
    release() {
      if (!held) return;
      held = false;
      closeSync(fd);
    },
  };
}

function lockedError(path: string, doing: string, hint: string | undefined): ImageLockError {
  return new ImageLockError(path, `image ${path} is in use: another process (vblk serve, QEMU, qemu-storage-daemon …) ${doing}${hint ? `; ${hint}` : ''}`);
}
