// The compliance suite (src/testing/backend-compliance.ts) run against the built-in
// backends: the memory backend and the file backend in each of its I/O modes. The
// filters run it too, beside their code (src/backends/filters/compliance.test.ts); here,
// the copy-on-write filter with its overlay in a file.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { CowFilter } from '../src/backends/filters/cow.js';
import { openFileBackend, type FileIoMode } from '../src/node/file-backend.js';
import { backendComplianceSuite, type ComplianceFactory } from '../src/testing/backend-compliance.js';
import { openNbdBackend } from '../src/node/nbd-backend.js';
import { requirePeer } from '../scripts/guest/guest.js';
import { startNbdkit, startQemuNbd, type NbdServer } from './support/nbd-servers.js';
import { execFileSync } from 'node:child_process';

// The built-in backends refuse with BackendError's codes; the suite holds them to it.
const strict = { expectCodes: true };

backendComplianceSuite('memory backend', (size) => ({
  backend: new MemoryBackend({ size }),
  readOnly: () => ({ backend: new MemoryBackend({ size, readOnly: true }), sameData: false }),
}), strict);

for (const io of ['sync', 'async', 'auto', 'mmap'] as FileIoMode[]) {
  backendComplianceSuite(`file backend (${io})`, (size) => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-compliance-'));
    const path = join(dir, 'disk.img');
    return {
      backend: openFileBackend(path, { size, io }),
      // Called after the writable backend is closed: the same image, reopened.
      readOnly: () => ({ backend: openFileBackend(path, { readOnly: true, io }), sameData: true }),
      cleanup: () => rmSync(dir, { recursive: true, force: true }),
    };
  }, strict);
}

for (const io of ['sync', 'async'] as FileIoMode[]) {
  backendComplianceSuite(`cow filter, overlay in a file (${io})`, (size) => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-compliance-'));
    return {
      backend: new CowFilter(new MemoryBackend({ size }), { overlay: openFileBackend(join(dir, 'overlay.img'), { size, io }) }),
      cleanup: () => rmSync(dir, { recursive: true, force: true }),
    };
  }, strict);
}

// The NBD backend in front of real servers whose trim reads back as zeroes (a raw image
// punches a hole, nbdkit's memory plugin drops the pages); a qcow2 export may keep the
// data of a partly trimmed cluster, so test/nbd-backend.test.ts checks it against
// qemu-img compare instead.
function nbdSubject(start: (dir: string, size: number) => Promise<NbdServer>): ComplianceFactory {
  return async (size) => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-compliance-nbd-'));
    const server = await start(dir, size);
    const backend = await openNbdBackend({ uri: server.uri });
    return {
      backend,
      readOnly: async () => ({ backend: await openNbdBackend({ uri: server.uri, readOnly: true }), sameData: true }),
      cleanup: () => void server.stop().then(() => rmSync(dir, { recursive: true, force: true })),
    };
  };
}

if (requirePeer('qemu-nbd', 'qemu-img') === false) {
  backendComplianceSuite('NBD backend, qemu-nbd raw', nbdSubject((dir, size) => {
    const image = join(dir, 'disk.img');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', image, String(size)]);
    return startQemuNbd(image, join(dir, 'nbd.sock'));
  }));
}
if (requirePeer('nbdkit') === false) {
  backendComplianceSuite('NBD backend, nbdkit memory', nbdSubject((dir, size) => startNbdkit(['memory', String(size)], join(dir, 'nbd.sock'))));
}
