import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import * as native from './native.js';
import { isNativeError } from './native.js';

// The collector, for the finalizer test (node --test passes no --expose-gc).
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

function throwsCode(fn: () => unknown, code: string, message?: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(isNativeError(e, code), `expected code ${code}, got ${String(e)} (${(e as { code?: string }).code})`);
    if (message !== undefined) assert.match((e as Error).message, message);
    return true;
  });
}

test('a failing syscall throws an Error whose code is the errno name and whose message names the call', () => {
  const [a, b] = native.socketpair();
  native.close(a);
  native.close(b);
  throwsCode(() => native.recvmsg(a, new Uint8Array(4), 0), 'EBADF', /^recvmsg: Bad file descriptor \(EBADF\)$/);
  assert.throws(() => native.close(a), (e: unknown) => isNativeError(e, 'EBADF') && e.syscall === 'close' && e.errno === 9);
});

test('wrong argument types and ranges throw TypeError / RangeError with Node-style codes', () => {
  throwsCode(() => native.eventfdRead('3' as unknown as number), 'ERR_INVALID_ARG_TYPE', /eventfdRead: fd must be a number/);
  throwsCode(() => native.eventfdRead(-1), 'ERR_OUT_OF_RANGE', /fd must be an integer/);
  throwsCode(() => native.eventfdRead(1.5), 'ERR_OUT_OF_RANGE');
  throwsCode(() => native.sendmsg(0, new Uint16Array(2) as unknown as Uint8Array), 'ERR_INVALID_ARG_TYPE', /data must be a Uint8Array/);
  throwsCode(() => (native.recvmsg as unknown as () => void)(), 'ERR_INVALID_ARG_TYPE', /expected at least 3 arguments, got 0/);
  throwsCode(() => native.memfdCreate('a\0b', 1), 'ERR_INVALID_ARG_TYPE', /NUL/);
  throwsCode(() => native.listen('x'.repeat(200), 1), 'ERR_OUT_OF_RANGE', /at most 107/);
  assert.throws(() => native.eventfdRead(-1), RangeError);
});

test('socketError reads (and clears) a socket\'s pending error: ECONNRESET once its peer closed with data unread', () => {
  const [a, b] = native.socketpair();
  const efd = native.eventfd();
  try {
    assert.equal(native.socketError(a), null);
    native.sendmsg(a, new Uint8Array([1]));
    native.close(b); // b never read that byte
    const e = native.socketError(a);
    assert.ok(isNativeError(e, 'ECONNRESET'), String(e));
    assert.equal(e.message, 'socket: Connection reset by peer (ECONNRESET)');
    assert.equal(native.socketError(a), null);
    throwsCode(() => native.socketError(efd), 'ENOTSOCK');
  } finally {
    [a, efd].forEach((fd) => native.close(fd));
  }
});

test('memfdCreate sizes the file and seals it on request', () => {
  const plain = native.memfdCreate('vblk-test', 12345);
  const sealed = native.memfdCreate('vblk-test-sealed', 8192, { seal: true });
  try {
    assert.equal(native.fstatSize(plain), 12345);
    assert.equal(native.getSeals(plain), 0);
    assert.equal(native.fstatSize(sealed), 8192);
    assert.equal(native.getSeals(sealed), native.F_SEAL_SEAL | native.F_SEAL_SHRINK | native.F_SEAL_GROW);
  } finally {
    native.close(plain);
    native.close(sealed);
  }
});

test('dup gives a second fd for the same file', () => {
  const fd = native.memfdCreate('vblk-dup', 4096);
  const copy = native.dup(fd);
  assert.notEqual(copy, fd);
  native.close(fd);
  assert.equal(native.fstatSize(copy), 4096);
  native.close(copy);
});

test('two mappings of one memfd see each other\'s writes', () => {
  const fd = native.memfdCreate('vblk-mmap', 2 * native.PAGE_SIZE);
  const a = native.mmap(fd, 2 * native.PAGE_SIZE, 0, true);
  const b = native.mmap(fd, native.PAGE_SIZE, native.PAGE_SIZE, false);
  native.close(fd); // the mappings keep the memory
  try {
    assert.notEqual(a.address, b.address);
    new Uint8Array(a.buffer).set([1, 2, 3], native.PAGE_SIZE);
    assert.deepEqual([...new Uint8Array(b.buffer, 0, 3)], [1, 2, 3]);
  } finally {
    native.munmap(a.buffer);
    native.munmap(b.buffer);
  }
});

test('munmap detaches the buffer: views read as empty, a second munmap returns false', () => {
  const fd = native.memfdCreate('vblk-munmap', native.PAGE_SIZE);
  const m = native.mmap(fd, native.PAGE_SIZE, 0, true);
  native.close(fd);
  const view = new Uint32Array(m.buffer);
  view[0] = 42;
  const before = native.mappingCount();
  assert.equal(native.munmap(m.buffer), true);
  assert.equal(native.mappingCount(), before - 1);
  assert.equal(m.buffer.byteLength, 0);
  assert.equal(view.length, 0);
  assert.equal(view[0], undefined);
  assert.equal(native.munmap(m.buffer), false);
});

test('munmap refuses a buffer that mmap did not make', () => {
  throwsCode(() => native.munmap(new ArrayBuffer(16)), 'ERR_INVALID_ARG_TYPE', /returned by mmap/);
  throwsCode(() => native.munmap(new Uint8Array(4) as unknown as ArrayBuffer), 'ERR_INVALID_ARG_TYPE');
});

test('mmap refuses ranges beyond the end of the file, unaligned offsets and lengths above 4 GiB', () => {
  const fd = native.memfdCreate('vblk-eof', native.PAGE_SIZE);
  try {
    throwsCode(() => native.mmap(fd, 2 * native.PAGE_SIZE, 0, false), 'ERR_OUT_OF_RANGE', /beyond the end of the file/);
    throwsCode(() => native.mmap(fd, 1, 1, false), 'ERR_OUT_OF_RANGE', /multiple of the page size/);
    throwsCode(() => native.mmap(fd, native.MMAP_MAX_LENGTH + 1, 0, false), 'ERR_OUT_OF_RANGE');
    throwsCode(() => native.mmap(fd, 0, 0, false), 'ERR_OUT_OF_RANGE');
  } finally {
    native.close(fd);
  }
});

test('a mapping that is never unmapped is unmapped when its buffer is collected', async () => {
  const fd = native.memfdCreate('vblk-gc', native.PAGE_SIZE);
  const before = native.mappingCount();
  (() => {
    new Uint8Array(native.mmap(fd, native.PAGE_SIZE, 0, true).buffer)[0] = 1;
  })();
  native.close(fd);
  assert.equal(native.mappingCount(), before + 1);
  // The finalizer runs from a setImmediate after the collection.
  for (let i = 0; i < 20 && native.mappingCount() > before; i++) {
    gc();
    await new Promise((resolve) => setImmediate(resolve));
  }
  assert.equal(native.mappingCount(), before);
});

test('the finalizer of an explicitly unmapped buffer does not unmap a second time', async () => {
  const fd = native.memfdCreate('vblk-gc2', native.PAGE_SIZE);
  (() => {
    const m = native.mmap(fd, native.PAGE_SIZE, 0, true);
    native.munmap(m.buffer);
  })();
  const before = native.mappingCount();
  // A new mapping may reuse the address: the old finalizer must leave it alone.
  const fresh = native.mmap(fd, native.PAGE_SIZE, 0, true);
  native.close(fd);
  for (let i = 0; i < 5; i++) {
    gc();
    await new Promise((resolve) => setImmediate(resolve));
  }
  assert.equal(native.mappingCount(), before + 1);
  new Uint8Array(fresh.buffer)[0] = 7; // would fault if unmapped
  assert.equal(native.munmap(fresh.buffer), true);
});

test('the SIGBUS guard of mappedRead leaves every other SIGBUS deadly, as before it was installed', () => {
  // In a child: a guarded read past a truncated file's end fails with EIO, then a plain
  // access to a truncated mapping (an ArrayBuffer from mmap) must still kill the process.
  const script = `
    import * as native from ${JSON.stringify(new URL('./native.js', import.meta.url).href)};
    import { openSync, ftruncateSync } from 'node:fs';
    const fd = openSync(process.argv[1], 'w+');
    ftruncateSync(fd, 65536);
    const map = native.mapFile(fd, 65536);
    const plain = native.mmap(fd, 65536, 0, false);
    ftruncateSync(fd, 4096);
    try { native.mappedRead(map, 0, [new Uint8Array(65536)]); } catch (e) { console.log('guarded', e.code); }
    console.log('plain', new Uint8Array(plain.buffer)[32768]);
  `;
  const dir = mkdtempSync(join(tmpdir(), 'vblk-sigbus-'));
  try {
    const child = spawnSync(process.execPath, ['--input-type=module', '-e', script, join(dir, 'f')], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(child.stdout.trim(), 'guarded EIO');
    assert.equal(child.signal, 'SIGBUS', `the child ended with ${child.signal ?? child.status}: ${child.stderr}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
