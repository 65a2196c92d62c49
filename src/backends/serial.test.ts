import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BackendError, type BackendResult, type Extent } from './backend.js';
import { MEMORY_CHUNK_SIZE, MemoryBackend } from './memory-backend.js';
import { SerialBackend } from './serial.js';

/** A memory backend whose operations wait until the test releases them, one by one. */
class Held extends MemoryBackend {
  readonly log: string[] = [];
  readonly held: (() => void)[] = [];
  sync = false;

  private hold(name: string, body: () => void): BackendResult {
    this.log.push(`start ${name}`);
    if (name === 'read 1048576') throw new BackendError('OUT_OF_RANGE', 'past the end');
    if (this.sync) {
      body();
      this.log.push(`end ${name}`);
      return;
    }
    return new Promise<void>((resolve) => this.held.push(() => {
      body();
      this.log.push(`end ${name}`);
      resolve();
    }));
  }
  override read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.hold(`read ${offset}`, () => super.read(offset, buffers));
  }
  override write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return this.hold(`write ${offset}`, () => super.write(offset, buffers));
  }
  override flush(): BackendResult {
    return this.hold('flush', () => super.flush());
  }
  override extents(offset: number, length: number): Extent[] {
    this.log.push('extents');
    return super.extents(offset, length);
  }
}

async function turn(): Promise<void> {
  await new Promise((r) => setImmediate(r));
}

test('operations start one at a time, in the order they came', async () => {
  const inner = new Held({ size: 1 << 20 });
  const gate = new SerialBackend(inner);
  const done: Promise<void>[] = [
    gate.write(0, [new Uint8Array(512).fill(1)]) as Promise<void>,
    gate.read(0, [new Uint8Array(512)]) as Promise<void>,
    gate.flush() as Promise<void>,
    gate.write(512, [new Uint8Array(512)]) as Promise<void>,
  ];
  assert.deepEqual(inner.log, ['start write 0']);
  while (inner.held.length > 0) {
    assert.equal(inner.held.length, 1, 'never two at once');
    inner.held.shift()?.();
    await turn();
  }
  await Promise.all(done);
  assert.deepEqual(inner.log, [
    'start write 0', 'end write 0', 'start read 0', 'end read 0', 'start flush', 'end flush', 'start write 512', 'end write 512',
  ]);
});

test('a synchronous backend is called straight through: nothing queued, no promise', () => {
  const inner = new Held({ size: 1 << 20 });
  inner.sync = true;
  const gate = new SerialBackend(inner);
  assert.equal(gate.write(0, [new Uint8Array(512)]), undefined);
  assert.equal(gate.read(0, [new Uint8Array(512)]), undefined);
  assert.deepEqual(gate.extents?.(0, 512), [{ length: 512, kind: 'data' }]);
});

test('a failure reaches its caller and the queue goes on', async () => {
  const inner = new Held({ size: 1 << 20 });
  const gate = new SerialBackend(inner);
  const first = gate.flush() as Promise<void>;
  const failing = gate.read(1 << 20, [new Uint8Array(512)]) as Promise<void>;
  const after = gate.read(0, [new Uint8Array(512)]) as Promise<void>;
  inner.held.shift()?.();
  await first;
  await assert.rejects(failing, { code: 'OUT_OF_RANGE' });
  await turn();
  inner.held.shift()?.();
  await after;
});

test('extents, resize and close wait their turn', async () => {
  const inner = new Held({ size: 1 << 20 });
  const gate = new SerialBackend(inner);
  const w = gate.write(0, [new Uint8Array(512)]) as Promise<void>;
  const e = gate.extents?.(0, 1 << 20) as Promise<Extent[]>;
  const r = gate.resize?.(2 << 20) as Promise<void>;
  assert.ok(e instanceof Promise && r instanceof Promise);
  assert.equal(inner.size, 1 << 20);
  assert.deepEqual(inner.log, ['start write 0']);
  inner.held.shift()?.();
  await w;
  assert.deepEqual(await e, [{ length: MEMORY_CHUNK_SIZE, kind: 'data' }, { length: (1 << 20) - MEMORY_CHUNK_SIZE, kind: 'hole' }]);
  await r;
  assert.equal(gate.size, 2 << 20);
  assert.equal(gate.concurrency, 'parallel');
});

test('a backend with FUA keeps it behind the queue: canFua, and the flag of each write, started at once or queued', async () => {
  class FuaHeld extends Held {
    readonly canFua = true;
    readonly flags: (boolean | undefined)[] = [];
    override write(offset: number, buffers: readonly Uint8Array[], fua?: boolean): BackendResult {
      this.flags.push(fua);
      return super.write(offset, buffers);
    }
  }
  const inner = new FuaHeld({ size: 1 << 20 });
  const s = new SerialBackend(inner);
  assert.equal(s.canFua, true);
  const first = s.write(0, [new Uint8Array(512)], true);
  const queued = s.write(512, [new Uint8Array(512)], true);
  const plain = s.write(1024, [new Uint8Array(512)], false);
  while (inner.held.length > 0 || inner.flags.length < 3) {
    inner.held.shift()?.();
    await new Promise((r) => setImmediate(r));
  }
  await Promise.all([first, queued, plain]);
  assert.deepEqual(inner.flags, [true, true, false]);
  assert.equal(new SerialBackend(new MemoryBackend({ size: 1 << 20 })).canFua, false);
});
