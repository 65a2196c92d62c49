import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BackendShapeError, checkBackend, openCheckedBackend } from './checked-backend.js';
import { MemoryBackend } from './memory-backend.js';

/** A plain-object backend whose methods return whatever `result` says. */
function shaped(result: () => unknown = () => undefined): Record<string, unknown> {
  return {
    size: 1 << 20, readOnly: false, canFlush: true, canDiscard: false, canWriteZeroes: true,
    read: result, write: result, flush: result, discard: result, writeZeroes: result, close: result,
  };
}

function refused(value: unknown, message: RegExp): void {
  assert.throws(() => checkBackend(value), (e: unknown) => {
    assert.ok(e instanceof BackendShapeError, String(e));
    assert.equal(e.code, 'NOT_A_BACKEND');
    assert.ok(!e.message.includes('\n'), e.message);
    assert.match(e.message, message);
    return true;
  });
}

test('a backend class instance and a plain object pass; capabilities and size come through', async () => {
  const memory = new MemoryBackend({ size: 1 << 20 });
  const checked = checkBackend(memory);
  assert.equal(checked.size, 1 << 20);
  assert.deepEqual([checked.readOnly, checked.canFlush, checked.canDiscard, checked.canWriteZeroes], [false, true, true, true]);
  await checked.write(512, [new Uint8Array(512).fill(7)]);
  const back = new Uint8Array(512);
  await checked.read(512, [back]);
  assert.deepEqual(back, new Uint8Array(512).fill(7));
  assert.ok(checked.resize, 'resize is kept when the backend has it');
  await checked.resize(2 << 20);
  assert.equal(checked.size, 2 << 20, 'size follows the backend');
  assert.equal(checkBackend(shaped()).resize, undefined, 'and absent when it has not');
  assert.equal(checkBackend(shaped()).canDiscard, false);
});

test('each missing or mistyped member is named in one line', () => {
  refused(null, /the backend is null, not an object/);
  refused(42, /the backend is a number/);
  refused(undefined, /the backend is undefined/);
  refused({ ...shaped(), size: 1000 }, /size must be a positive multiple of 512 bytes, got 1000/);
  refused({ ...shaped(), size: 0 }, /got 0/);
  refused({ ...shaped(), size: 2 ** 60 }, /size must be/);
  refused({ ...shaped(), size: '1M' }, /got a string/);
  refused({ ...shaped(), readOnly: 'no' }, /readOnly must be a boolean, got a string/);
  refused({ ...shaped(), canWriteZeroes: undefined }, /canWriteZeroes must be a boolean, got undefined/);
  refused({ ...shaped(), flush: undefined }, /flush must be a method, got undefined/);
  refused({ ...shaped(), close: {} }, /close must be a method, got an object/);
  refused({ ...shaped(), resize: 5 }, /resize must be a method when present, got a number/);
  const getterThrows = Object.defineProperty(shaped(), 'size', { get() { throw new Error('no\nsize'); } });
  refused(getterThrows, /reading the backend's size threw: no size/);
});

test('results: undefined and plain values complete at once; promises and thenables are awaited; a throwing then rejects', async () => {
  for (const value of [undefined, null, 0, 4096, 'done', true]) {
    assert.equal(checkBackend(shaped(() => value)).read(0, []), undefined, String(value));
  }
  const p = Promise.resolve();
  assert.equal(checkBackend(shaped(() => p)).flush(), p, 'a promise is handed on as it is');
  await checkBackend(shaped(() => ({ then: (ok: () => void) => ok() }))).flush();
  await checkBackend(shaped(() => ({ not: 'a thenable' }))).flush();
  const badThen = Object.defineProperty({}, 'then', { get() { throw new Error('then getter'); } });
  await assert.rejects(async () => checkBackend(shaped(() => badThen)).write(0, []), /then getter/);
  await assert.rejects(async () => checkBackend(shaped(() => ({ then() { throw new Error('then call'); } }))).discard(0, 512), /then call/);
  assert.throws(() => checkBackend(shaped(() => { throw new Error('sync'); })).writeZeroes(0, 512, false), /sync/, 'a throw passes through: the device turns it into IOERR');
});

test('methods are called on the backend, with their arguments', () => {
  const calls: unknown[][] = [];
  const backend = {
    ...shaped(),
    marker: 'mine',
    read(this: { marker: string }, ...args: unknown[]) {
      calls.push([this.marker, ...args]);
    },
  };
  const buffers = [new Uint8Array(512)];
  checkBackend(backend).read(1024, buffers);
  assert.deepEqual(calls, [['mine', 1024, buffers]]);
});

test('property: any value is either a backend whose every method returns undefined or a promise, or one BackendShapeError line', () => {
  const member = fc.constantFrom('size', 'readOnly', 'canFlush', 'canDiscard', 'canWriteZeroes', 'read', 'write', 'flush', 'discard', 'writeZeroes', 'close', 'resize');
  const mutated = fc.tuple(fc.dictionary(member, fc.anything()), fc.anything()).map(([changes, result]) => ({ ...shaped(() => result), ...changes }));
  fc.assert(fc.property(fc.oneof(fc.anything(), mutated), (value) => {
    let checked;
    try {
      checked = checkBackend(value);
    } catch (e) {
      assert.ok(e instanceof BackendShapeError, String(e));
      assert.ok(!e.message.includes('\n'));
      return;
    }
    for (const r of [checked.read(0, []), checked.write(0, []), checked.flush(), checked.discard(0, 0), checked.writeZeroes(0, 0, false), checked.close()]) {
      assert.ok(r === undefined || r instanceof Promise);
      if (r instanceof Promise) r.catch(() => undefined);
    }
  }), { numRuns: 3000 });
});

test('the optional members come through checked: extents, block size hints, concurrency', async () => {
  const memory = new MemoryBackend({ size: 1 << 20 });
  await memory.write(0, [new Uint8Array(4096).fill(1)]);
  const checked = checkBackend(memory);
  assert.ok(checked.extents, 'extents are kept when the backend has them');
  const runs = await checked.extents(0, 1 << 20);
  assert.equal(runs[0].kind, 'data');
  const hinted = checkBackend({ ...shaped(), blockSize: { minimum: 4096, preferred: 65536, maximum: 1 << 20 }, concurrency: 'serial' });
  assert.deepEqual(hinted.blockSize, { minimum: 4096, preferred: 65536, maximum: 1 << 20 });
  assert.equal(hinted.concurrency, 'serial');
  refused({ ...shaped(), concurrency: 'threads' }, /concurrency must be 'parallel' or 'serial'.*'threads'/);
  refused({ ...shaped(), blockSize: { minimum: '4K', preferred: 1, maximum: 1 } }, /blockSize\.minimum must be a number/);
  refused({ ...shaped(), extents: 5 }, /extents must be a method/);
});

test('a backend with an open step is opened first: its size and capabilities are read after it', async () => {
  const lazy = { ...shaped(), size: 0, opened: 0, open() { this.opened++; this.size = 2 << 20; } };
  refused(lazy, /open step/);
  const checked = await openCheckedBackend(lazy);
  assert.equal(lazy.opened, 1);
  assert.equal(checked.size, 2 << 20);
  assert.equal((checked as { open?: unknown }).open, undefined, 'opened once: the guard has no open of its own');
  await assert.rejects(openCheckedBackend({ ...shaped(), open: () => Promise.reject(new Error('no route to the storage')) }),
    (e: unknown) => e instanceof BackendShapeError && /open failed: .*no route to the storage/.test(e.message));
  await assert.rejects(openCheckedBackend({ ...shaped(), size: 0, open() {} }), /size must be a positive multiple of 512/);
});
