import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  VIRTIO_BLK_CONFIG, VIRTIO_BLK_CONFIG_BASE_SIZE, VIRTIO_BLK_CONFIG_SIZE, VIRTIO_BLK_F, virtioBlkConfigSize,
} from './virtio-blk.js';
import { VIRTIO_F, features } from './virtio.js';

test('the config sizes end where the spec structure does: 60 bytes before secure erase, 72 after it', () => {
  const F = VIRTIO_BLK_CONFIG;
  // write_zeroes_may_unmap is followed by u8 unused1[3] (5.2.4).
  assert.equal(VIRTIO_BLK_CONFIG_BASE_SIZE, F.write_zeroes_may_unmap.offset + F.write_zeroes_may_unmap.size + 3);
  assert.equal(VIRTIO_BLK_CONFIG_BASE_SIZE, 60);
  assert.equal(VIRTIO_BLK_CONFIG_SIZE, F.secure_erase_sector_alignment.offset + F.secure_erase_sector_alignment.size);
});

test('virtioBlkConfigSize: the secure-erase fields only with VIRTIO_BLK_F_SECURE_ERASE', () => {
  const rest = features(VIRTIO_F.VERSION_1, VIRTIO_BLK_F.DISCARD, VIRTIO_BLK_F.WRITE_ZEROES, VIRTIO_BLK_F.MQ, VIRTIO_BLK_F.TOPOLOGY);
  assert.equal(virtioBlkConfigSize(0n), 60);
  assert.equal(virtioBlkConfigSize(rest), 60);
  assert.equal(virtioBlkConfigSize(rest | features(VIRTIO_BLK_F.SECURE_ERASE)), 72);
});
