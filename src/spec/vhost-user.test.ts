import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  VHOST_USER,
  VHOST_USER_BACKEND,
  VHOST_USER_CONFIG,
  VHOST_USER_HEADER,
  VHOST_USER_INFLIGHT,
  VHOST_USER_INFLIGHT_DESC_STATE_SPLIT,
  VHOST_USER_INFLIGHT_QUEUE_REGION_SPLIT,
  VHOST_USER_LOG,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_USER_MAX_MEM_REGIONS,
  VHOST_USER_MAX_PAYLOAD_SIZE,
  VHOST_USER_MEM_REG,
  VHOST_USER_MEMORY,
  VHOST_USER_MEMORY_REGION,
  VHOST_USER_PROTOCOL_F,
  VHOST_USER_U64,
  VHOST_USER_VRING_ADDR,
  VHOST_USER_VRING_STATE,
  type WireStruct,
} from './vhost-user.js';

const structs: Record<string, [WireStruct, number]> = {
  VHOST_USER_HEADER: [VHOST_USER_HEADER, 12],
  VHOST_USER_U64: [VHOST_USER_U64, 8],
  VHOST_USER_VRING_STATE: [VHOST_USER_VRING_STATE, 8],
  VHOST_USER_VRING_ADDR: [VHOST_USER_VRING_ADDR, 40],
  VHOST_USER_MEMORY: [VHOST_USER_MEMORY, 8],
  VHOST_USER_MEMORY_REGION: [VHOST_USER_MEMORY_REGION, 32],
  VHOST_USER_MEM_REG: [VHOST_USER_MEM_REG, 40],
  VHOST_USER_LOG: [VHOST_USER_LOG, 16],
  VHOST_USER_CONFIG: [VHOST_USER_CONFIG, 12],
  VHOST_USER_INFLIGHT: [VHOST_USER_INFLIGHT, 24],
  VHOST_USER_INFLIGHT_QUEUE_REGION_SPLIT: [VHOST_USER_INFLIGHT_QUEUE_REGION_SPLIT, 16],
  VHOST_USER_INFLIGHT_DESC_STATE_SPLIT: [VHOST_USER_INFLIGHT_DESC_STATE_SPLIT, 16],
};

for (const [name, [struct, size]] of Object.entries(structs)) {
  test(`${name} is ${size} bytes, its fields tiling it without gaps or overlaps`, () => {
    assert.equal(struct.size, size);
    const fields = Object.values(struct.fields).sort((a, b) => a.offset - b.offset);
    let end = 0;
    for (const f of fields) {
      assert.equal(f.offset, end, `${name}: field at ${f.offset} should start at ${end}`);
      end = f.offset + f.size;
    }
    assert.equal(end, struct.size);
  });
}

test('every field of 2, 4 or 8 bytes is naturally aligned, as in the C structs', () => {
  for (const [name, [struct]] of Object.entries(structs)) {
    for (const [field, f] of Object.entries(struct.fields)) {
      if (f.size === 2 || f.size === 4 || f.size === 8) assert.equal(f.offset % f.size, 0, `${name}.${field}`);
    }
  }
});

test('the vring address fields are in the order desc, used, avail', () => {
  const f = VHOST_USER_VRING_ADDR.fields;
  assert.ok(f.desc.offset < f.used.offset && f.used.offset < f.avail.offset && f.avail.offset < f.log.offset);
});

test('request numbers are distinct in each direction', () => {
  for (const table of [VHOST_USER, VHOST_USER_BACKEND, VHOST_USER_PROTOCOL_F]) {
    const numbers = Object.values(table);
    assert.equal(new Set(numbers).size, numbers.length);
  }
});

test('the numbers QEMU 7.2 and the notes rely on', () => {
  assert.equal(VHOST_USER.GET_FEATURES, 1);
  assert.equal(VHOST_USER.SET_BACKEND_REQ_FD, 21);
  assert.equal(VHOST_USER.GET_CONFIG, 24);
  assert.equal(VHOST_USER.REM_MEM_REG, 38);
  assert.equal(VHOST_USER.GET_STATUS, 40);
  assert.equal(VHOST_USER_BACKEND.CONFIG_CHANGE_MSG, 2);
  assert.equal(VHOST_USER_PROTOCOL_F.CONFIG, 9);
  assert.equal(VHOST_USER_PROTOCOL_F.CONFIGURE_MEM_SLOTS, 15);
});

test('the payload bound holds the largest message either side sends', () => {
  const memTable = VHOST_USER_MEMORY.size + VHOST_USER_MAX_MEM_REGIONS * VHOST_USER_MEMORY_REGION.size;
  const config = VHOST_USER_CONFIG.size + VHOST_USER_MAX_CONFIG_SIZE;
  assert.equal(memTable, 264);
  assert.equal(config, 268);
  assert.ok(Math.max(memTable, config) <= VHOST_USER_MAX_PAYLOAD_SIZE);
});

test('the module speaks of front-end and back-end only', () => {
  const source = readFileSync(fileURLToPath(new URL('../../../src/spec/vhost-user.ts', import.meta.url)), 'utf8');
  // Quoting the spec's former names would defeat the point; the pattern is assembled.
  assert.doesNotMatch(source, new RegExp(['mas', 'ter|sla', 've'].join(''), 'i'));
});
