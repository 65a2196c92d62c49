import { test } from 'node:test';
import assert from 'node:assert/strict';
import { StatusError, StatusMachine } from './status.js';
import { VIRTIO_CONFIG_S as S, VIRTIO_F, features } from '../spec/virtio.js';

const offered = features(VIRTIO_F.VERSION_1, VIRTIO_F.RING_EVENT_IDX, 9);

function code(e: StatusError | null): string | null {
  return e ? e.code : null;
}

test('the 3.1.1 sequence is accepted and records the features', () => {
  const m = new StatusMachine(offered);
  assert.equal(m.write(S.ACKNOWLEDGE), null);
  assert.equal(m.write(S.ACKNOWLEDGE | S.DRIVER), null);
  assert.equal(m.setFeatures(features(VIRTIO_F.VERSION_1, 9)), null);
  assert.equal(m.write(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK), null);
  assert.equal(m.write(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK), null);
  assert.equal(m.isDriverOk, true);
  assert.equal(m.negotiated, features(VIRTIO_F.VERSION_1, 9));
});

test('DRIVER_OK before FEATURES_OK is refused', () => {
  const m = new StatusMachine(offered);
  m.write(S.ACKNOWLEDGE | S.DRIVER);
  assert.equal(code(m.write(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK)), 'ILLEGAL_STATUS');
});

test('features cannot change after FEATURES_OK, nor before DRIVER', () => {
  const m = new StatusMachine(offered);
  assert.equal(code(m.setFeatures(0n)), 'FEATURES_LOCKED');
  m.write(S.ACKNOWLEDGE | S.DRIVER);
  m.setFeatures(features(VIRTIO_F.VERSION_1));
  m.write(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
  assert.equal(code(m.setFeatures(features(VIRTIO_F.VERSION_1, 9))), 'FEATURES_LOCKED');
});

test('features the device did not offer are refused', () => {
  const m = new StatusMachine(offered);
  m.write(S.ACKNOWLEDGE | S.DRIVER);
  assert.equal(code(m.setFeatures(features(VIRTIO_F.VERSION_1, 5))), 'FEATURES_NOT_OFFERED');
});

test('bits cannot be cleared except by reset, and the order is enforced', () => {
  const m = new StatusMachine(offered);
  assert.equal(code(m.write(S.DRIVER)), 'ILLEGAL_STATUS', 'DRIVER without ACKNOWLEDGE');
  m.write(S.ACKNOWLEDGE | S.DRIVER);
  assert.equal(code(m.write(S.ACKNOWLEDGE)), 'ILLEGAL_STATUS', 'clearing DRIVER');
  assert.equal(code(m.write(S.ACKNOWLEDGE | S.DRIVER | S.NEEDS_RESET)), 'ILLEGAL_STATUS');
  assert.equal(m.write(0), null);
  assert.equal(m.status, 0);
});

test('NEEDS_RESET is set by the device only once the driver is live', () => {
  const m = new StatusMachine(offered);
  m.markNeedsReset();
  assert.equal(m.status, 0);
  m.write(S.ACKNOWLEDGE | S.DRIVER);
  m.setFeatures(features(VIRTIO_F.VERSION_1));
  m.write(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
  m.write(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
  m.markNeedsReset();
  assert.ok(m.status & S.NEEDS_RESET);
});
