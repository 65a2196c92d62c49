import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pageAlignedBytes, WASM_PAGE_SIZE } from './page-aligned.js';

const global = globalThis as Record<string, unknown>;

test('an array of exactly the size asked for, zeroed, writable to its last byte', () => {
  for (const size of [1, 4096, WASM_PAGE_SIZE, WASM_PAGE_SIZE + 512, 3 * WASM_PAGE_SIZE]) {
    const bytes = pageAlignedBytes(size);
    assert.equal(bytes.length, size);
    assert.equal(bytes.byteOffset, 0, 'the array starts where its buffer starts');
    assert.ok(bytes.every((b) => b === 0));
    bytes[size - 1] = 0xa5;
    assert.equal(bytes[size - 1], 0xa5);
  }
});

/** Runs `body` with `WebAssembly` replaced by `replacement` (absent when undefined). */
function withWebAssembly(replacement: unknown, body: () => void): void {
  const saved = global.WebAssembly;
  if (replacement === undefined) delete global.WebAssembly;
  else global.WebAssembly = replacement;
  try {
    body();
  } finally {
    global.WebAssembly = saved;
  }
}

test('asks WebAssembly for whole pages, fixed in size, and uses the front of them', () => {
  const asked: unknown[] = [];
  class Memory {
    readonly buffer: ArrayBuffer;
    constructor(descriptor: { initial: number; maximum: number }) {
      asked.push(descriptor);
      this.buffer = new ArrayBuffer(descriptor.initial * WASM_PAGE_SIZE);
    }
  }
  withWebAssembly({ Memory }, () => {
    const bytes = pageAlignedBytes(WASM_PAGE_SIZE + 1);
    assert.equal(bytes.length, WASM_PAGE_SIZE + 1);
    assert.equal(bytes.buffer.byteLength, 2 * WASM_PAGE_SIZE);
  });
  assert.deepEqual(asked, [{ initial: 2, maximum: 2 }]);
});

test('without WebAssembly, or when it refuses, the array is an ordinary one', () => {
  const refusing = {
    Memory: class {
      constructor() {
        throw new RangeError('WebAssembly.Memory(): could not allocate memory');
      }
    },
  };
  for (const replacement of [undefined, refusing]) {
    withWebAssembly(replacement, () => {
      const bytes = pageAlignedBytes(4096);
      assert.equal(bytes.length, 4096);
      assert.equal(bytes.buffer.byteLength, 4096, 'not rounded up to WebAssembly pages');
    });
  }
});
