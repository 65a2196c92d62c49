import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pattern, rig } from './blk-driver-harness.js';

test('smoke: write then read back through loopback', async () => {
  const r = await rig({ device: { serial: 'hello' } });
  try {
    assert.equal(r.driver.name, 'vda');
    const data = pattern(8192, 1);
    await r.driver.write(8, [data]);
    const back = new Uint8Array(8192);
    await r.driver.read(8, [back]);
    assert.deepEqual(back, data);
    assert.equal(await r.driver.getId(), 'hello');
    await r.driver.flush();
  } finally {
    await r.close();
  }
});
