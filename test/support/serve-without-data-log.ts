/**
 * `vblk serve` with its dirty logging deliberately broken, for the migration test's
 * negative case: the guest pages a request's data lands in are never marked (used-ring
 * writes and status bytes still are). The migration e2e test runs its read-during-migration
 * probe against this and expects the destination to see stale data, which is how it shows
 * that the probe can catch a backend that forgets to log.
 *
 *   node dist/test/support/serve-without-data-log.js serve SOURCE --socket PATH ...
 *
 * The break is a patch of the shipped class from outside, so production code carries no
 * test switch.
 */
import { main } from '../../src/cli/main.js';
import { DirtyLog } from '../../src/memory/dirty-log.js';

const mark = DirtyLog.prototype.mark;
// Ring writes are 2 (an index, flags, avail_event) or 8 bytes (a used element), a status
// byte is 1; data buffers are whole sectors.
DirtyLog.prototype.mark = function markRingsOnly(this: DirtyLog, addr: number, length: number): void {
  if (length <= 8) mark.call(this, addr, length);
};

process.exitCode = await main(process.argv.slice(2));
