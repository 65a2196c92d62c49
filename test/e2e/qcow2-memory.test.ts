// Resident memory of `vblk serve` on a sparse 1 TiB qcow2 image (64 KiB clusters: 2048
// L2 tables' worth of disk) under 4 KiB random reads and writes spread over the whole
// disk, a fixed number of requests from our driver: the L2 and refcount caches must stay
// bounded, whatever the image's size. Memory is what /proc/PID/status says (VmRSS now,
// VmHWM the peak). Every write is read back at the end, and qemu-img check is clean.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeer } from '../../scripts/guest/guest.js';
import { VIRTIO_BLK_SECTOR_SIZE as SECTOR } from '../../src/spec/virtio-blk.js';
import { Rng } from '../support/fuzz-prng.js';
import { pattern } from '../support/pattern.js';
import { openDisk, QEMU_TOOLS, qemuImg, qemuImgCheck } from './qcow2-helpers.js';
import { scratchDir, startServe } from './serve-helpers.js';

const TiB = 2 ** 40;
const BLOCK = 4096;
const REQUESTS = 12_000;
const IODEPTH = 16;
const LIMIT_MIB = 150;

function memory(pid: number): { rss: number; hwm: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kib = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
  return { rss: kib('VmRSS') / 1024, hwm: kib('VmHWM') / 1024 };
}

test(`vblk serve on a sparse 1 TiB qcow2 stays under ${LIMIT_MIB} MiB resident through ${REQUESTS} random 4 KiB reads and writes over the whole disk`,
  { skip: requirePeer(...QEMU_TOOLS), timeout: 600_000 }, async (t) => {
    const scratch = scratchDir('vblk-qcow2-memory-');
    const image = join(scratch.dir, 'big.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', image, '1T');
    const serve = await startServe(image, join(scratch.dir, 'vblk.sock'), ['--format', 'qcow2', '--queues', '1']);
    const pid = serve.proc.pid as number;
    const seed = (Math.random() * 0x1_0000_0000) >>> 0;
    t.diagnostic(`seed ${seed}`);
    const rng = new Rng(seed);
    /** Block number → the pattern seed last written there. */
    const written = new Map<number, number>();
    const blocks = TiB / BLOCK;
    try {
      const disk = await openDisk(serve.socket, { queueSize: 64 });
      const start = memory(pid);
      try {
        let issued = 0;
        let reads = 0;
        /** Blocks with a request in flight: no second request may overlap one. */
        const inFlight = new Set<number>();
        const writtenList: number[] = [];
        const pick = (): number => {
          let block = rng.below(blocks);
          while (inFlight.has(block)) block = rng.below(blocks);
          return block;
        };
        const lane = async (): Promise<void> => {
          const buf = new Uint8Array(BLOCK);
          while (issued < REQUESTS) {
            issued++;
            if (rng.chance(0.5)) {
              const block = pick();
              const s = rng.u32();
              inFlight.add(block);
              await disk.driver.write((block * BLOCK) / SECTOR, [pattern(BLOCK, s)]);
              inFlight.delete(block);
              if (!written.has(block)) writtenList.push(block);
              written.set(block, s);
            } else {
              // Half the reads land on written blocks, half anywhere (mostly holes).
              const known = writtenList.length > 0 && rng.chance(0.5) ? writtenList[rng.below(writtenList.length)] : -1;
              const block = known >= 0 && !inFlight.has(known) ? known : pick();
              await disk.driver.read((block * BLOCK) / SECTOR, [buf]);
              reads++;
            }
          }
        };
        await Promise.all(Array.from({ length: IODEPTH }, lane));
        await disk.driver.flush();
        const loaded = memory(pid);
        // Everything written reads back.
        const buf = new Uint8Array(BLOCK);
        for (const [block, s] of written) {
          await disk.driver.read((block * BLOCK) / SECTOR, [buf]);
          assert.equal(Buffer.compare(buf, pattern(BLOCK, s)), 0, `block ${block} (byte ${block * BLOCK}) reads other than written`);
        }
        const end = memory(pid);
        t.diagnostic(`${REQUESTS} requests (${written.size} blocks written, ${reads} reads), iodepth ${IODEPTH}: ` +
          `VmRSS ${start.rss.toFixed(1)} MiB after connecting, ${loaded.rss.toFixed(1)} after the workload, ${end.rss.toFixed(1)} after reading back; VmHWM ${end.hwm.toFixed(1)} MiB`);
        assert.ok(end.hwm < LIMIT_MIB, `vblk serve peaked at ${end.hwm.toFixed(1)} MiB resident (VmHWM), the limit is ${LIMIT_MIB}`);
      } finally {
        await disk.close();
      }
    } finally {
      assert.equal(await serve.stop(), 0, `vblk serve did not exit cleanly:\n${serve.log()}`);
    }
    try {
      const check = qemuImgCheck(image);
      assert.deepEqual({ corruptions: check.corruptions, leaks: check.leaks, checkErrors: check.checkErrors }, { corruptions: 0, leaks: 0, checkErrors: 0 }, check.text);
      t.diagnostic(`image file ${(qemuImg('info', '--output=json', image).match(/"actual-size": (\d+)/)?.[1] ?? '?')} bytes allocated; qemu-img check clean`);
      assert.ok(written.size > REQUESTS / 3, `only ${written.size} writes`);
    } finally {
      scratch.cleanup();
    }
  });
