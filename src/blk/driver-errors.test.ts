import { test } from 'node:test';
import assert from 'node:assert/strict';
import { IoError, NotSupportedError, statusToError } from './driver-errors.js';
import { VIRTIO_BLK_S } from '../spec/virtio-blk.js';

test('VIRTIO_BLK_S_OK is success', () => {
  assert.equal(statusToError(VIRTIO_BLK_S.OK, 'vda: read'), null);
});

test('VIRTIO_BLK_S_UNSUPP is NotSupported (the seed\'s -ENOTTY)', () => {
  const e = statusToError(VIRTIO_BLK_S.UNSUPP, 'vda: flush');
  assert.ok(e instanceof NotSupportedError);
  assert.equal(e.code, 'NOT_SUPPORTED');
  assert.match(e.message, /^vda: flush: /);
});

test('VIRTIO_BLK_S_IOERR and any undefined status are I/O errors (the seed\'s -EIO)', () => {
  for (const status of [VIRTIO_BLK_S.IOERR, 3, 0x7f, 0xff]) {
    const e = statusToError(status, 'vda: write');
    assert.ok(e instanceof IoError, `status ${status}`);
    assert.equal(e.code, 'IO_ERROR');
    assert.equal(e.status, status);
  }
});
