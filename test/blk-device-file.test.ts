// The device over a real image file, with synchronous and thread-pool I/O: requests
// reach the file through guest-memory views, discard punches holes, flush syncs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openFileBackend, type FileIoMode } from '../src/node/file-backend.js';
import { VIRTIO_BLK_CONFIG, VIRTIO_BLK_S, VIRTIO_BLK_T } from '../src/spec/virtio-blk.js';
import { framed, pattern, segments, setup } from './blk-device-harness.js';

const MiB = 1 << 20;
const T = VIRTIO_BLK_T;

for (const io of ['sync', 'async', 'auto'] as FileIoMode[]) {
  test(`a device over an image file serves every request type (${io} I/O)`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'vblk-devfile-'));
    const path = join(dir, 'disk.img');
    const backend = openFileBackend(path, { size: 8 * MiB, io });
    try {
      const { h, device } = setup({ backend, numQueues: 2 });
      const data = pattern(4 * MiB, 11);
      // 4 MiB in 64 KiB writes spread over both queues, all in flight at once.
      const writes = [];
      for (let i = 0; i < 64; i++) {
        const q = i % 2;
        writes.push(h.run(q, framed(T.OUT, i * 128, { out: data.subarray(i * 65536, (i + 1) * 65536) })));
      }
      for (const w of await Promise.all(writes)) assert.equal(w.status, VIRTIO_BLK_S.OK);
      assert.equal((await h.run(0, framed(T.FLUSH, 0))).status, VIRTIO_BLK_S.OK);
      const r = await h.run(1, framed(T.IN, 2048, { inLen: 65536 }));
      assert.deepEqual(r.data, data.subarray(2048 * 512, 2048 * 512 + 65536));
      const before = statSync(path).blocks;
      const d = await h.run(0, framed(T.DISCARD, 0, { out: segments([{ sector: 0, numSectors: 2048 }, { sector: 4096, numSectors: 2048 }]) }));
      assert.equal(d.status, VIRTIO_BLK_S.OK);
      assert.ok(before - statSync(path).blocks >= 4096 - 64, 'the discarded 2 MiB were deallocated');
      const z = await h.run(1, framed(T.IN, 0, { inLen: 4096 }));
      assert.deepEqual(z.data, new Uint8Array(4096));
      // Writethrough: a write is followed by a flush before it completes.
      device.writeConfig(VIRTIO_BLK_CONFIG.writeback.offset, new Uint8Array([0]));
      assert.equal((await h.run(0, framed(T.OUT, 0, { out: pattern(4096, 12) }))).status, VIRTIO_BLK_S.OK);
      assert.equal((await h.run(0, framed(T.IN, 16383, { inLen: 1024 }))).status, VIRTIO_BLK_S.IOERR);
      assert.equal(statSync(path).size, 8 * MiB);
    } finally {
      backend.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
