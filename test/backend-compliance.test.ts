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
import { backendComplianceSuite } from '../src/testing/backend-compliance.js';

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
