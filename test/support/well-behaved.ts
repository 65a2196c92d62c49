/**
 * The well-behaved frontend that must work after every hostile case: our vhost-user
 * frontend (`connectVhostUser`) with one split ring driven by hand — write a block,
 * read it back, compare — then a clean shutdown. Everything is bounded by a deadline, so
 * a wedged server fails the check instead of hanging the run.
 */
import { randomFillSync } from 'node:crypto';
import { connectVhostUser } from '../../src/node/vhost-user-client.js';
import { VIRTIO_BLK_REQ_HEADER, VIRTIO_BLK_S, VIRTIO_BLK_T } from '../../src/spec/virtio-blk.js';
import { VIRTIO_CONFIG_S, VIRTIO_F } from '../../src/spec/virtio.js';
import type { VhostUserFrontend } from '../../src/transport/vhost-user/frontend.js';
import type { DriverQueueBinding } from '../../src/virtqueue/device.js';

const BLOCK = 4096;

/** Runs `p`, failing with `what` after `ms`. */
async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`wedged: ${what} took more than ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** One request on the ring: header, data, status; resolves with the status byte. */
async function blkRequest(f: VhostUserFrontend, q: DriverQueueBinding<number>, waitUsed: () => Promise<void>, type: number, sector: number, data: Uint8Array): Promise<number> {
  const header = f.dma.alloc(VIRTIO_BLK_REQ_HEADER.size + 1);
  const buf = f.dma.alloc(data.length);
  try {
    const h = f.memory.view(header, VIRTIO_BLK_REQ_HEADER.size + 1);
    const b = f.memory.view(buf, data.length);
    if (!h || !b) throw new Error('DMA memory outside the frontend memory');
    const hv = new DataView(h.buffer, h.byteOffset, h.length);
    hv.setUint32(VIRTIO_BLK_REQ_HEADER.type, type, true);
    hv.setUint32(VIRTIO_BLK_REQ_HEADER.reserved, 0, true);
    hv.setBigUint64(VIRTIO_BLK_REQ_HEADER.sector, BigInt(sector), true);
    h[VIRTIO_BLK_REQ_HEADER.size] = 0xff;
    const isOut = type === VIRTIO_BLK_T.OUT;
    if (isOut) b.set(data);
    const status = { addr: header + VIRTIO_BLK_REQ_HEADER.size, len: 1 };
    const out = [{ addr: header, len: VIRTIO_BLK_REQ_HEADER.size }, ...(isOut ? [{ addr: buf, len: data.length }] : [])];
    const inp = [...(isOut ? [] : [{ addr: buf, len: data.length }]), status];
    if (!q.queue.add(out, inp, sector)) throw new Error('ring full');
    if (q.queue.kickPrepare()) q.notify();
    for (;;) {
      const used = q.queue.getUsed();
      if (used instanceof Error) throw used;
      if (used !== null) break;
      await waitUsed();
    }
    if (!isOut) data.set(b);
    return h[VIRTIO_BLK_REQ_HEADER.size];
  } finally {
    f.dma.release(header);
    f.dma.release(buf);
  }
}

/**
 * Connects to `socketPath`, writes a random block at `sector`, reads it back and checks
 * it, within `timeoutMs` overall. Throws what went wrong.
 */
export async function wellBehavedRoundTrip(socketPath: string, sector = 0, timeoutMs = 5000): Promise<void> {
  const f = await within(timeoutMs, 'connecting and the handshake', connectVhostUser(socketPath, { memorySize: 1 << 20, replyTimeoutMs: timeoutMs }));
  try {
    await within(timeoutMs, 'the round trip', (async () => {
      const offered = await f.getDeviceFeatures();
      await f.setDriverFeatures(offered & (1n << BigInt(VIRTIO_F.VERSION_1)));
      await f.setStatus(VIRTIO_CONFIG_S.ACKNOWLEDGE | VIRTIO_CONFIG_S.DRIVER | VIRTIO_CONFIG_S.FEATURES_OK);
      let wake: (() => void) | null = null;
      const q = await f.setupQueue<number>(0, 16, 0, () => {
        const w = wake;
        wake = null;
        w?.();
      });
      await f.setStatus(VIRTIO_CONFIG_S.ACKNOWLEDGE | VIRTIO_CONFIG_S.DRIVER | VIRTIO_CONFIG_S.FEATURES_OK | VIRTIO_CONFIG_S.DRIVER_OK);
      // A used-buffer notification may land between getUsed() and here; a short poll
      // interval covers it without racing.
      const waitUsed = (): Promise<void> => new Promise((resolve) => {
        const t = setTimeout(resolve, 5);
        wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      const written = randomFillSync(new Uint8Array(BLOCK));
      const ws = await blkRequest(f, q, waitUsed, VIRTIO_BLK_T.OUT, sector, written);
      if (ws !== VIRTIO_BLK_S.OK) throw new Error(`write at sector ${sector} completed with status ${ws}`);
      const read = new Uint8Array(BLOCK);
      const rs = await blkRequest(f, q, waitUsed, VIRTIO_BLK_T.IN, sector, read);
      if (rs !== VIRTIO_BLK_S.OK) throw new Error(`read at sector ${sector} completed with status ${rs}`);
      if (!Buffer.from(read).equals(Buffer.from(written))) throw new Error(`read at sector ${sector} returned other bytes than were written`);
    })());
  } finally {
    await within(timeoutMs, 'closing', f.close());
  }
}
