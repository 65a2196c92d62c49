/**
 * `vblk image check IMAGE [--repair] [--json]`: the refcount consistency check of a qcow2
 * image (../backends/qcow2/check.ts) and its repair (repair.ts, as `qemu-img check -r
 * all`), reported and exited as `qemu-img check` does, so scripts written for one work
 * with the other.
 */
import { CliUsageError } from './args.js';
import { checkQcow2, type Qcow2CheckResult } from '../backends/qcow2/check.js';
import { repairQcow2, type Qcow2RepairResult } from '../backends/qcow2/repair.js';
import { closeChain, walkChain } from '../node/image-open.js';
import { defineCommand, type CliIo } from './command.js';
import { lockImage, type ImageLock } from '../node/image-lock.js';
import { existsSync } from 'node:fs';

/**
 * Exit statuses of `qemu-img check` (verified against qemu-img 7.2 on hand-made leaky and
 * corrupt images): clean; the check could not complete; corruptions found (leaks or not);
 * only leaks found; the format has no check (raw).
 */
export const CHECK_CLEAN = 0;
export const CHECK_INCOMPLETE = 1;
export const CHECK_CORRUPT = 2;
export const CHECK_LEAKS = 3;
export const CHECK_UNSUPPORTED = 63;

export const command = defineCommand({
  name: 'image check',
  summary: 'check a qcow2 image\'s refcounts and copied flags, as qemu-img check does',
  usage: 'IMAGE [--repair] [--json] [--force-share]',
  // A script reads 2 as "corruptions found": a bad command line is a check that could not run.
  usageStatus: CHECK_INCOMPLETE,
  details: [
    'Exit status as qemu-img check\'s: 0 clean, 1 the check could not complete (a bad command',
    'line too), 2 corruptions, 3 leaked clusters only, 63 the image is raw (nothing to check);',
    'after --repair, of the check that follows the repair. Problems are listed on stderr, one per line; on a terminal',
    'a progress line shows how far it is. The image is locked as vblk serve and QEMU lock',
    'theirs: a check refuses an image another process writes, a repair one that any other',
    'process uses (exit status 1).',
  ],
  options: {
    repair: { kind: 'boolean', description: 'rebuild the refcounts from the metadata that uses clusters (frees leaks, fixes under-counted clusters and copied flags, clears the dirty and corrupt bits), as qemu-img check -r all' },
    json: { kind: 'boolean', description: 'print the counts as one JSON object on one line' },
    'force-share': { kind: 'boolean', description: 'check an image another process writes (as qemu-img check -U): the counts may be wrong while it writes; not with --repair' },
  },
  async run({ options, positionals }, io) {
    if (positionals.length !== 1) throw new CliUsageError(`vblk image check: expected one IMAGE, got ${positionals.length} arguments`);
    const path = positionals[0];
    if (options.repair && options['force-share']) {
      throw new CliUsageError('vblk image check: --force-share cannot go with --repair: repairing an image another process uses corrupts it');
    }
    // A missing image is left to the check, which says so in its own words.
    const lock = existsSync(path) ? lockFor(path, options.repair, options['force-share']) : null;
    try {
      return await checkImage(path, options, io);
    } finally {
      lock?.release();
    }
  },
});

/** The lock a check (reading) or a repair (writing) takes on the image, as serve takes one. */
function lockFor(path: string, repair: boolean, share: boolean): ImageLock {
  return lockImage(path, { readOnly: !repair, share, overrideHint: repair ? undefined : '--force-share checks it anyway' });
}

/** Checks (or repairs) the image at `path`, reports, and returns qemu-img check's exit status. */
async function checkImage(path: string, options: { repair: boolean; json: boolean }, io: CliIo): Promise<number> {
  // The image alone matters (a check reads no backing file, and a missing one does not
  // stop it). Its format is probed, which is safe: the check only reads.
  const chain = walkChain(path, { readOnly: !options.repair }).levels;
  const top = chain[0];
  let result: Qcow2CheckResult;
  let repaired: Qcow2RepairResult | undefined;
  try {
    if (top.format === 'raw') {
      io.stderr(`vblk image check: ${path} is a raw image: it has no metadata to check\n`);
      return CHECK_UNSUPPORTED;
    }
    const progress = progressReporter(process.stderr.isTTY === true, (t) => io.stderr(t));
    try {
      if (options.repair) {
        repaired = await repairQcow2(top.file, { onProgress: progress.update });
        result = repaired.after;
      } else {
        result = await checkQcow2(top.file, { onProgress: progress.update });
      }
    } finally {
      progress.done();
    }
  } finally {
    closeChain(chain);
  }
  if (repaired !== undefined) {
    for (const m of repaired.before.messages) io.stderr(`${m}\n`);
    if (!options.json) io.stdout(formatRepair(repaired));
  }
  for (const m of result.messages) io.stderr(`${m}\n`);
  const json = {
    filename: path, format: 'qcow2', ...summary(result),
    ...(repaired === undefined ? {} : {
      repaired: { leaks: repaired.leaksFixed, corruptions: repaired.corruptionsFixed, rebuilt: repaired.rebuilt }, before: summary(repaired.before),
    }),
  };
  io.stdout(options.json ? `${JSON.stringify(json)}\n` : formatCheck(path, result));
  return checkStatus(result);
}

/** The counts of a result, without its message list (printed apart). */
function summary(r: Qcow2CheckResult): Omit<Qcow2CheckResult, 'messages'> {
  const { messages: _messages, ...counts } = r;
  return counts;
}

/** qemu-img check's exit status for a result. */
export function checkStatus(r: Qcow2CheckResult): number {
  if (r.checkErrors > 0) return CHECK_INCOMPLETE;
  if (r.corruptions > 0) return CHECK_CORRUPT;
  if (r.leaks > 0) return CHECK_LEAKS;
  return CHECK_CLEAN;
}

/** What a repair did, before the report of the check after it. */
export function formatRepair(r: Qcow2RepairResult): string {
  if (!r.rebuilt && r.leaksFixed === 0 && r.corruptionsFixed === 0) return 'nothing to repair\n';
  return `repaired ${r.leaksFixed} leaked cluster${r.leaksFixed === 1 ? '' : 's'} and ${r.corruptionsFixed} corruption${r.corruptionsFixed === 1 ? '' : 's'}` +
    `${r.rebuilt ? ' (refcounts rebuilt)' : ''}; checked again:\n`;
}

/** The text report. */
export function formatCheck(path: string, r: Qcow2CheckResult): string {
  const plural = (n: number, one: string, many: string) => `${n} ${n === 1 ? one : many}`;
  const lines: string[] = [];
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0) lines.push(`${path}: no corruptions, no leaked clusters`);
  else {
    lines.push(`${path}: ${plural(r.corruptions, 'corruption', 'corruptions')}, ${plural(r.leaks, 'leaked cluster', 'leaked clusters')}, ${plural(r.checkErrors, 'check error', 'check errors')}`);
    if (r.corruptions > 0) lines.push('corruptions put data at risk: repair before writing to the image again (qemu-img check -r all)');
    else if (r.leaks > 0) lines.push('leaked clusters only waste space: the data is intact (qemu-img check -r leaks frees them)');
  }
  if (r.dirty) lines.push('the image is marked dirty (lazy refcounts were not written back)');
  const pct = (n: number) => (r.totalClusters === 0 ? 0 : (100 * n) / r.totalClusters).toFixed(2);
  lines.push(
    `${r.allocatedClusters}/${r.totalClusters} clusters allocated (${pct(r.allocatedClusters)}%), ` +
    `${pct(r.fragmentedClusters)}% fragmented, ${pct(r.compressedClusters)}% compressed`,
    `image end offset: ${r.imageEndOffset}`,
  );
  return `${lines.join('\n')}\n`;
}

/**
 * A progress line on stderr for a long check, only on a terminal (a log or a pipe gets
 * none): rewritten in place when the whole percentage changes, erased when done.
 */
export function progressReporter(isTty: boolean, write: (text: string) => void): { update(fraction: number): void; done(): void } {
  let shown = -1;
  return {
    update(fraction) {
      if (!isTty) return;
      const pct = Math.max(0, Math.min(100, Math.floor(fraction * 100)));
      if (pct === shown) return;
      shown = pct;
      write(`\rchecking: ${pct}%`);
    },
    done() {
      if (isTty && shown >= 0) write('\r\x1b[K');
    },
  };
}
