// Our driver drives a real vhost-user-blk device: qemu-storage-daemon (written by QEMU's
// team, not us), and the same suite against our own `vblk serve` — both ends ours, over
// real sockets and real shared memory. Users' checks: what `vblk info` reports, the bytes
// in the image file, error messages and exit codes.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, statSync, truncateSync, writeFileSync, writeSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeer } from '../../scripts/guest/guest.js';
import { BlkDriver, type BlkLogger } from '../../src/blk/driver.js';
import { QueueBrokenError, ReadOnlyError } from '../../src/blk/driver-errors.js';
import { connectVhostUser } from '../../src/node/vhost-user-client.js';
import { VIRTIO_BLK_F } from '../../src/spec/virtio-blk.js';
import type { DriverTransport } from '../../src/virtqueue/device.js';
import type { SplitDriverQueue } from '../../src/virtqueue/split-driver.js';
import { runCli, scratchDir, startServe } from './serve-helpers.js';
import { startQsd } from './qsd-helpers.js';

const MiB = 1024 * 1024;
const DISK = 64 * MiB;

/** A device under test: started on an image, stopped after. */
interface Peer {
  readonly name: string;
  start(image: string, socket: string, opts: { numQueues: number; readOnly?: boolean }): Promise<{ stop(): Promise<void>; kill(): Promise<void> }>;
  /** Grows the disk; returns whether a live connection is notified. */
  resize(size: number): Promise<boolean>;
  /** What a user must do, once no frontend is connected, for new connections to see the new size. */
  publishResize(): Promise<void>;
}

function readAt(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

function writeAt(path: string, offset: number, data: Uint8Array): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

const skip = requirePeer('qemu-storage-daemon');

/**
 * The transport as the driver sees it, keeping each queue the driver sets up so a test
 * can read the queues' available indexes: what the driver has put on the rings.
 */
function watchQueues(transport: DriverTransport): { transport: DriverTransport; availIndexes(): number[] } {
  const queues: SplitDriverQueue<unknown>[] = [];
  const watched = new Proxy(transport, {
    get(target, prop, receiver) {
      if (prop === 'setupQueue') {
        return async (...args: Parameters<DriverTransport['setupQueue']>) => {
          const binding = await target.setupQueue(...args);
          queues.push(binding.queue as SplitDriverQueue<unknown>);
          return binding;
        };
      }
      const v = Reflect.get(target, prop, receiver) as unknown;
      return typeof v === 'function' ? v.bind(target) : v;
    },
  });
  return { transport: watched, availIndexes: () => queues.map((q) => q.nextAvail) };
}

for (const kind of ['qemu-storage-daemon', 'vblk serve', 'vblk serve --io mmap'] as const) {
  describe(`the vblk driver against ${kind}`, { skip }, () => {
    let scratch: { dir: string; cleanup(): void };
    let n = 0;
    let lastResize: (size: number) => Promise<boolean> = async () => false;
    let lastPublish: () => Promise<void> = async () => {};

    const peer: Peer = kind === 'qemu-storage-daemon'
      ? {
          name: kind,
          async start(image, socket, opts) {
            const qsd = await startQsd(image, socket, `${socket}.qmp`, { numQueues: opts.numQueues, writable: !opts.readOnly, unmap: true });
            lastResize = async (size) => {
              await qsd.qmp('block_resize', { 'node-name': 'd', size });
              return false; // QEMU 7.2's daemon does not notify live connections (NOTES)
            };
            // The 7.2 daemon keeps the capacity it exported with, for new connections
            // too (checked here; VHOST-USER-NOTES.md says otherwise): re-export the node.
            lastPublish = async () => {
              await qsd.qmp('block-export-del', { id: 'e' });
              // The export goes once its last connection has; a bound, then a clear failure.
              const deadline = Date.now() + 60_000;
              while (((await qsd.qmp('query-block-exports')) as unknown[]).length > 0) {
                if (Date.now() > deadline) throw new Error('qemu-storage-daemon still lists export e 60 s after block-export-del');
                await new Promise((r) => setTimeout(r, 50));
              }
              await qsd.qmp('block-export-add', {
                type: 'vhost-user-blk', id: 'e', 'node-name': 'd', addr: { type: 'unix', path: socket }, writable: true, 'num-queues': opts.numQueues,
              });
            };
            return {
              stop: () => qsd.stop(),
              kill: async () => {
                qsd.proc.kill('SIGKILL');
                await qsd.stop();
              },
            };
          },
          resize: (size) => lastResize(size),
          publishResize: () => lastPublish(),
        }
      : {
          name: kind,
          async start(image, socket, opts) {
            const control = `${socket}.ctl`;
            const args = ['--queues', String(opts.numQueues), '--control', control];
            if (opts.readOnly) args.push('--read-only');
            if (kind === 'vblk serve --io mmap') args.push('--io', 'mmap');
            const s = await startServe(image, socket, args);
            lastResize = async (size) => {
              const r = await runCli(['resize', '--control', control, String(size)]);
              assert.equal(r.code, 0, r.stderr);
              return true;
            };
            return {
              stop: async () => void (await s.stop()),
              kill: async () => {
                s.proc.kill('SIGKILL');
                await s.exited;
              },
            };
          },
          resize: (size) => lastResize(size),
          publishResize: async () => {},
        };

    before(() => {
      scratch = scratchDir('vblk-frontend-e2e-');
    });
    after(() => scratch.cleanup());

    /** A fresh image with the device on it, for one test. */
    async function withDevice(
      opts: { numQueues?: number; readOnly?: boolean },
      body: (socket: string, image: string) => Promise<void>,
    ): Promise<void> {
      const id = n++;
      const image = join(scratch.dir, `disk${id}.img`);
      writeFileSync(image, '');
      truncateSync(image, DISK);
      const socket = join(scratch.dir, `s${id}.sock`);
      const dev = await peer.start(image, socket, { numQueues: opts.numQueues ?? 2, readOnly: opts.readOnly });
      try {
        await body(socket, image);
      } finally {
        await dev.stop();
      }
    }

    it('vblk info reports the export size, block size, queue count, serial, geometry and segment limits', async () => {
      await withDevice({ numQueues: 2 }, async (socket) => {
        const r = await runCli(['info', '--socket', socket, '--json']);
        assert.equal(r.code, 0, r.stderr);
        const lines = r.stdout.toString().trim().split('\n');
        assert.equal(lines.length, 1, 'one line of JSON');
        const info = JSON.parse(lines[0]) as Record<string, unknown>;
        assert.equal(info.capacity_sectors, DISK / 512);
        assert.equal(info.size_bytes, DISK);
        assert.equal(info.logical_block_size, 512);
        assert.equal(info.physical_block_size, 512);
        assert.equal(info.num_queues, 2);
        assert.equal(info.read_only, false);
        // The daemon's GET_ID is always `vhost_user_blk` (VHOST-USER-NOTES.md); `vblk
        // serve`'s is its --serial, by default `vblk`.
        assert.equal(info.serial, kind === 'qemu-storage-daemon' ? 'vhost_user_blk' : 'vblk');
        // seg_max: the daemon's 126 (NOTES); vblk serve's default queue of 256 less the
        // header and status. Neither limits a segment's size (the daemon's size_max is 0).
        assert.equal(info.seg_max, kind === 'qemu-storage-daemon' ? 126 : 254);
        assert.equal(info.size_max, 0xffff_ffff);
        // Neither offers VIRTIO_BLK_F_GEOMETRY, so the driver reports the seed's fallback:
        // 64 heads, 32 sectors, and capacity / (64 × 32) cylinders.
        assert.ok(!(info.features as string[]).includes('VIRTIO_BLK_F_GEOMETRY'));
        assert.deepEqual(info.geometry, { cylinders: DISK / 512 / (64 * 32), heads: 64, sectors: 32 });
        assert.ok((info.features as string[]).includes('VIRTIO_F_VERSION_1'));
        assert.ok((info.features as string[]).includes('VIRTIO_BLK_F_FLUSH'));
        const human = await runCli(['info', '--socket', socket]);
        assert.equal(human.code, 0, human.stderr);
        assert.match(human.stdout.toString(), /^vd[a-z]+: 131072 512-byte logical blocks \(67\.1 MB\/64\.0 MiB\)/);
      });
    });

    it('bytes written with vblk write land in the image, and planted bytes come back from vblk read', async () => {
      await withDevice({}, async (socket, image) => {
        for (const offset of [0, 512, DISK / 2 + 4096, DISK - 512, DISK - 8192]) {
          const data = randomBytes(offset === DISK - 512 ? 512 : 8192);
          const input = join(scratch.dir, 'in.bin');
          writeFileSync(input, data);
          const w = await runCli(['write', '--socket', socket, '--offset', String(offset), '--input', input]);
          assert.equal(w.code, 0, w.stderr);
          assert.deepEqual(readAt(image, offset, data.length), data, `image bytes at ${offset}`);

          const planted = randomBytes(data.length);
          writeAt(image, offset, planted);
          const r = await runCli(['read', '--socket', socket, '--offset', String(offset), '--length', String(planted.length)]);
          assert.equal(r.code, 0, r.stderr);
          assert.deepEqual(r.stdout, planted, `vblk read at ${offset}`);
        }
        // Standard input works too, and a length not a multiple of 512 is refused.
        const stdinData = randomBytes(4096);
        const w = await runCli(['write', '--socket', socket, '--offset', '1M'], stdinData);
        assert.equal(w.code, 0, w.stderr);
        assert.deepEqual(readAt(image, MiB, 4096), stdinData);
        const bad = await runCli(['read', '--socket', socket, '--offset', '100', '--length', '512']);
        assert.notEqual(bad.code, 0);
        assert.match(bad.stderr, /^vblk read: --offset 100 is not a multiple of the logical block size 512\n$/);
        const past = await runCli(['read', '--socket', socket, '--offset', String(DISK), '--length', '512']);
        assert.notEqual(past.code, 0);
        assert.match(past.stderr, /past the end/);
      });
    });

    it('flush, discard and write-zeroes through the library', async () => {
      await withDevice({}, async (socket, image) => {
        const transport = await connectVhostUser(socket);
        const driver = await BlkDriver.probe(transport, { timeoutMs: 10_000 });
        try {
          assert.ok(driver.has(VIRTIO_BLK_F.DISCARD) && driver.has(VIRTIO_BLK_F.WRITE_ZEROES), `${kind} offers discard and write-zeroes`);
          const data = new Uint8Array(64 * 1024).fill(0x77);
          await driver.write(2048, [data]);
          await driver.flush();
          assert.deepEqual(readAt(image, 2048 * 512, data.length), Buffer.from(data));
          await driver.writeZeroes([{ sector: 2048, sectors: 64 }]);
          await driver.flush();
          assert.deepEqual(readAt(image, 2048 * 512, 64 * 512), Buffer.alloc(64 * 512));
          const back = new Uint8Array(64 * 512).fill(1);
          await driver.read(2048, [back]);
          assert.ok(back.every((b) => b === 0), 'zeroes read back');
          // Discard need not zero, but on a raw image file it deallocates: the second half
          // of the data, written above, gives its 32 KiB (whole 4 KiB file-system blocks)
          // back to the file system. st_blocks counts 512-byte units.
          const allocated = statSync(image).blocks;
          await driver.discard([{ sector: 2048 + 64, sectors: 64 }]);
          await driver.flush();
          const freed = allocated - statSync(image).blocks;
          assert.ok(freed >= 64, `the discard freed ${freed} 512-byte blocks of the image, not 64`);
        } finally {
          await driver.remove();
          await transport.close();
        }
      });
    });

    it('two queues are used at once', async () => {
      await withDevice({ numQueues: 2 }, async (socket, image) => {
        const transport = await connectVhostUser(socket);
        const driver = await BlkDriver.probe(transport, { queues: 2, timeoutMs: 10_000 });
        try {
          assert.equal(driver.numQueues, 2);
          const blocks = Array.from({ length: 64 }, (_, i) => new Uint8Array(4096).fill(i + 1));
          // Half of the requests on each queue, all in flight together.
          await Promise.all(blocks.map((b, i) => driver.write(i * 8, [b], { queue: i % 2 })));
          const back = blocks.map(() => new Uint8Array(4096));
          await Promise.all(back.map((b, i) => driver.read(i * 8, [b], { queue: (i + 1) % 2 })));
          back.forEach((b, i) => assert.deepEqual(b, blocks[i], `block ${i}`));
          await driver.flush();
          for (let i = 0; i < blocks.length; i++) assert.equal(readAt(image, i * 4096, 1)[0], i + 1);
        } finally {
          await driver.remove();
          await transport.close();
        }
      });
    });

    it('a read-only export refuses writes with a clear error, before the ring', async () => {
      await withDevice({ readOnly: true }, async (socket, image) => {
        const before = readFileSync(image);
        const input = join(scratch.dir, 'ro.bin');
        writeFileSync(input, randomBytes(4096));
        const w = await runCli(['write', '--socket', socket, '--offset', '0', '--input', input]);
        assert.notEqual(w.code, 0);
        assert.match(w.stderr, /^vblk write: .*read-only/);
        const info = JSON.parse((await runCli(['info', '--socket', socket, '--json'])).stdout.toString()) as { read_only: boolean };
        assert.equal(info.read_only, true);

        const transport = await connectVhostUser(socket);
        const spy = watchQueues(transport);
        const driver = await BlkDriver.probe(spy.transport, { timeoutMs: 10_000 });
        try {
          const availBefore = spy.availIndexes();
          await assert.rejects(driver.write(0, [new Uint8Array(512)]), (e) => e instanceof ReadOnlyError);
          await assert.rejects(driver.discard([{ sector: 0, sectors: 8 }]), (e) => e instanceof ReadOnlyError);
          assert.deepEqual(spy.availIndexes(), availBefore, 'no request reached the ring');
          const r = new Uint8Array(4096);
          await driver.read(0, [r]);
        } finally {
          await driver.remove();
          await transport.close();
        }
        assert.deepEqual(readFileSync(image), before, 'image unchanged');
      });
    });

    it('a resized disk shows its new capacity', async () => {
      await withDevice({}, async (socket) => {
        const notices: string[] = [];
        const logger: BlkLogger = { notice: (_disk, m) => notices.push(m), warn: () => {} };
        const transport = await connectVhostUser(socket);
        const driver = await BlkDriver.probe(transport, { timeoutMs: 10_000, logger });
        try {
          const resized = new Promise<number>((resolve) => driver.on('resize', (e) => resolve(e.capacity)));
          const live = await peer.resize(96 * MiB);
          if (live) {
            assert.equal(await resized, 96 * MiB / 512, 'the resize event carries the new capacity');
            assert.equal(driver.capacity, 96 * MiB / 512);
            assert.ok(notices.includes('new size: 196608 512-byte logical blocks (100 MB/96.0 MiB)'), `notices: ${notices.join(' | ')}`);
          }
        } finally {
          await driver.remove();
          await transport.close();
        }
        // A new connection sees the new capacity whether or not the live one was told.
        await peer.publishResize();
        const info = JSON.parse((await runCli(['info', '--socket', socket, '--json'])).stdout.toString()) as { capacity_sectors: number };
        assert.equal(info.capacity_sectors, 96 * MiB / 512);
      });
    });

    it('a device that dies mid-request fails the requests at once, not at their timeout', async () => {
      const id = n++;
      const image = join(scratch.dir, `dies${id}.img`);
      writeFileSync(image, '');
      truncateSync(image, DISK);
      const socket = join(scratch.dir, `dies${id}.sock`);
      const dev = await peer.start(image, socket, { numQueues: 1 });
      const transport = await connectVhostUser(socket);
      const driver = await BlkDriver.probe(transport, { timeoutMs: 60_000 });
      try {
        let stop = false;
        const outcomes: unknown[] = [];
        const lanes = Array.from({ length: 16 }, async (_, lane) => {
          const buf = new Uint8Array(4096);
          for (let i = 0; !stop; i++) {
            try {
              await driver.read(((lane * 997 + i * 31) % 4096) * 8, [buf]);
            } catch (e) {
              outcomes.push(e);
              return;
            }
          }
        });
        await new Promise((r) => setTimeout(r, 300));
        const killedAt = Date.now();
        await dev.kill();
        await Promise.race([Promise.all(lanes), new Promise((r) => setTimeout(r, 10_000))]);
        stop = true;
        assert.equal(outcomes.length, 16, 'every lane saw its request fail');
        assert.ok(Date.now() - killedAt < 10_000);
        for (const e of outcomes) assert.ok(e instanceof QueueBrokenError, String(e));
        await assert.rejects(driver.read(0, [new Uint8Array(512)]), (e) => e instanceof QueueBrokenError);
      } finally {
        await driver.remove().catch(() => {});
        await transport.close();
        await dev.stop();
      }
    });

    it('a socket that is not a vhost-user device gets a one-line error', async () => {
      const { createServer } = await import('node:net');
      const path = join(scratch.dir, `mute${n++}.sock`);
      const server = createServer((s) => {
        s.on('error', () => {});
        s.on('data', () => s.write('HTTP/1.0 400 Bad Request\r\n\r\n'));
      });
      await new Promise<void>((r) => server.listen(path, r));
      try {
        const r = await runCli(['info', '--socket', path]);
        assert.notEqual(r.code, 0);
        assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
        assert.match(r.stderr, /^vblk info: /);
      } finally {
        server.close();
      }
    });
  });
}
