import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { VHOST_USER_MAX_CONFIG_SIZE } from '../../spec/vhost-user.js';
import { CONFIG_RECORD_BYTES, readConfigRecord, writeConfigRecord } from './config-record.js';

test('a written record reads back as the same bytes', () => {
  fc.assert(fc.property(fc.uint8Array({ maxLength: VHOST_USER_MAX_CONFIG_SIZE }), fc.nat(64), (config, slack) => {
    const area = new Uint8Array(CONFIG_RECORD_BYTES + slack);
    writeConfigRecord(area, config);
    assert.deepEqual(readConfigRecord(area), config);
  }));
});

test('any bytes a frontend leaves there read as no record or at most a full config, never an exception', () => {
  fc.assert(fc.property(fc.uint8Array({ maxLength: CONFIG_RECORD_BYTES + 8 }), (area) => {
    const r = readConfigRecord(area);
    assert.ok(r === null || r.length <= VHOST_USER_MAX_CONFIG_SIZE);
  }));
});

test('a zeroed area (a buffer from a backend that records nothing) and a short one hold no record', () => {
  assert.equal(readConfigRecord(new Uint8Array(CONFIG_RECORD_BYTES)), null);
  const area = new Uint8Array(CONFIG_RECORD_BYTES);
  writeConfigRecord(area, new Uint8Array([1, 2, 3]));
  assert.equal(readConfigRecord(area.subarray(0, CONFIG_RECORD_BYTES - 1)), null);
  area[7] = 1; // length 0x103: past the largest config
  assert.equal(readConfigRecord(area), null);
});
