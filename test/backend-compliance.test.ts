// The compliance suite (src/testing/backend-compliance.ts) run against the built-in
// backends: the memory backend and the file backend in each of its I/O modes. The
// filters run it too, beside their code (src/backends/filters/compliance.test.ts).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBackend } from '../src/backends/memory-backend.js';
import { openFileBackend, type FileIoMode } from '../src/node/file-backend.js';
import { backendComplianceSuite } from '../src/testing/backend-compliance.js';

backendComplianceSuite('memory backend', (size) => ({
  backend: new MemoryBackend({ size }),
  readOnly: () => ({ backend: new MemoryBackend({ size, readOnly: true }), sameData: false }),
}));

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
  });
}
