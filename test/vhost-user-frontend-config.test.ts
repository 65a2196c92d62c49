// How much config space the vhost-user frontend asks for: what the negotiated features
// define (VIRTIO 1.2 5.2.4), and never more than 60 bytes without SECURE_ERASE, since
// qemu-storage-daemon 7.2 refuses GET_CONFIG above that (VHOST-USER-NOTES.md). A scripted
// backend stands in for the socket; the real-socket cases are in serve-frontend.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlkDriver } from '../src/blk/driver.js';
import { encodeBlkConfig } from '../src/blk/config.js';
import { VIRTIO_BLK_F } from '../src/spec/virtio-blk.js';
import { VIRTIO_F, features } from '../src/spec/virtio.js';
import { VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_PROTOCOL_F } from '../src/spec/vhost-user.js';
import { VhostUserFrontend, type FrontendIo, type Notifier } from '../src/transport/vhost-user/frontend.js';
import type { BackendReply, FrontendRequest } from '../src/transport/vhost-user/messages.js';

const MEMORY = 1 << 20;

const CONFIG = encodeBlkConfig({
  capacity: 2048, sizeMax: 0, segMax: 126,
  geometry: { cylinders: 0, heads: 0, sectors: 0 }, blkSize: 512,
  topology: { physicalBlockExp: 0, alignmentOffset: 0, minIoSize: 0, optIoSize: 0 },
  writeback: 1, numQueues: 1,
  maxDiscardSectors: 32768, maxDiscardSeg: 1, discardSectorAlignment: 1,
  maxWriteZeroesSectors: 32768, maxWriteZeroesSeg: 1, writeZeroesMayUnmap: 1,
  maxSecureEraseSectors: 4096, maxSecureEraseSeg: 4, secureEraseSectorAlignment: 8,
});

/**
 * A backend that answers the handshake, offers `offered`, and answers GET_CONFIG of at
 * most `maxConfig` bytes (more gets the empty reply, as libvhost-user gives).
 */
function scriptedBackend(offered: bigint, maxConfig: number): { io: FrontendIo; configSizes: number[] } {
  const configSizes: number[] = [];
  const reply = (req: FrontendRequest): BackendReply | null => {
    switch (req.request) {
      case 'GET_FEATURES':
        return { request: req.request, features: offered | features(VHOST_USER_F_PROTOCOL_FEATURES) };
      case 'GET_PROTOCOL_FEATURES':
        return { request: req.request, features: features(VHOST_USER_PROTOCOL_F.CONFIG) };
      case 'GET_CONFIG':
        configSizes.push(req.size);
        return { request: req.request, config: req.size > maxConfig ? null : { offset: req.offset, flags: 0, data: CONFIG.slice(req.offset, req.offset + req.size) } };
      case 'GET_VRING_BASE':
        return { request: req.request, index: req.index, num: 0 };
      default:
        return null;
    }
  };
  const notifier = (): Notifier => ({ fd: -1, signal: () => {}, watch: () => ({ stop: () => {} }), close: () => {} });
  const io: FrontendIo = {
    channel: { call: async (req) => reply(req), onLost: () => {}, close: () => {} },
    createNotifier: notifier,
    createSharedMemory: (size) => ({ fd: -1, address: MEMORY, bytes: new Uint8Array(size), release: () => {} }),
    openBackendChannel: () => ({ fd: -1, close: () => {} }),
  };
  return { io, configSizes };
}

const QSD_FEATURES = features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.DISCARD, VIRTIO_BLK_F.WRITE_ZEROES, VIRTIO_BLK_F.FLUSH);

test('without SECURE_ERASE the frontend asks for 60 config bytes, which qemu-storage-daemon 7.2 answers', async () => {
  const b = scriptedBackend(QSD_FEATURES, 60);
  const transport = await VhostUserFrontend.open(b.io, { memorySize: MEMORY });
  const driver = await BlkDriver.probe(transport);
  try {
    assert.deepEqual(b.configSizes, [60]);
    assert.equal(driver.config.maxDiscardSectors, 32768);
    assert.equal(driver.config.maxSecureEraseSectors, 0, 'bytes 60-71 are neither asked for nor meaningful');
  } finally {
    await driver.remove();
    await transport.close();
  }
});

test('with SECURE_ERASE negotiated the frontend reads 72 bytes: the secure-erase limits arrive', async () => {
  const b = scriptedBackend(QSD_FEATURES | features(VIRTIO_BLK_F.SECURE_ERASE), 256);
  const transport = await VhostUserFrontend.open(b.io, { memorySize: MEMORY });
  const driver = await BlkDriver.probe(transport);
  try {
    assert.ok(driver.has(VIRTIO_BLK_F.SECURE_ERASE));
    assert.deepEqual(b.configSizes, [72]);
    assert.equal(driver.config.maxSecureEraseSectors, 4096);
    assert.equal(driver.config.maxSecureEraseSeg, 4);
    assert.equal(driver.config.secureEraseSectorAlignment, 8);
  } finally {
    await driver.remove();
    await transport.close();
  }
});

test('a backend that offers SECURE_ERASE but refuses its 72 config bytes fails the probe with CONFIG_REFUSED', async () => {
  const b = scriptedBackend(QSD_FEATURES | features(VIRTIO_BLK_F.SECURE_ERASE), 60);
  const transport = await VhostUserFrontend.open(b.io, { memorySize: MEMORY });
  try {
    await assert.rejects(BlkDriver.probe(transport), (e: Error & { code?: string; cause?: unknown }) => {
      assert.equal(e.code, 'BAD_CONFIG');
      assert.match(e.message, /72 bytes of config space.*VIRTIO_BLK_F_SECURE_ERASE/);
      assert.equal((e.cause as { code?: string }).code, 'CONFIG_REFUSED');
      return true;
    });
  } finally {
    await transport.close();
  }
});
