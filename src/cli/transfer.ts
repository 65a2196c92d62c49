/**
 * What `vblk read` and `vblk write` share: checking a byte range against the disk's
 * logical block size, the chunk size, and progress on a terminal.
 */
import type { BlkDriver } from '../blk/driver.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../spec/virtio-blk.js';
import { CliUsageError } from './args.js';
import type { CliIo } from './command.js';

/** Bytes per driver call: the driver splits it into chains that are in flight together. */
export const CHUNK_BYTES = 4 * 1024 * 1024;

/** Refuses a range that is not block-aligned or does not fit the disk, with a line that says how to fix it. */
export function checkRange(command: string, driver: BlkDriver, offset: number, length: number): void {
  const lbs = driver.logicalBlockSize;
  if (offset % lbs !== 0) throw new CliUsageError(`vblk ${command}: --offset ${offset} is not a multiple of the logical block size ${lbs}`);
  if (length % lbs !== 0) throw new CliUsageError(`vblk ${command}: length ${length} is not a multiple of the logical block size ${lbs}`);
  if (offset + length > driver.sizeBytes) {
    throw new CliUsageError(`vblk ${command}: ${length} bytes at offset ${offset} reach past the end of the ${driver.sizeBytes}-byte disk`);
  }
}

export function sectorOf(offset: number): number {
  return offset / VIRTIO_BLK_SECTOR_SIZE;
}

/** Progress on stderr, only when it is a terminal and the transfer takes a while. */
export function progress(io: CliIo, verb: string, total: number | null): { update(done: number): void; finish(): void } {
  const started = Date.now();
  let last = 0;
  let shown = false;
  const line = (done: number): string => {
    const mib = `${verb} ${(done / 1048576).toFixed(1)} MiB`;
    return total === null || total === 0 ? mib : `${mib} (${Math.floor((done / total) * 100)}%)`;
  };
  let latest = 0;
  return {
    update(done) {
      latest = done;
      const now = Date.now();
      if (!process.stderr.isTTY || now - started < 1000 || now - last < 250) return;
      last = now;
      shown = true;
      io.stderr(`\r${line(done)}`);
    },
    finish() {
      if (shown) io.stderr(`\r${line(latest)}\n`);
    },
  };
}
