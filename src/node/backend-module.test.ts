import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { BackendModuleError, loadBackendModule, type BackendModuleErrorCode } from './backend-module.js';

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'vblk-backend-module-'));
});
after(() => rmSync(dir, { recursive: true, force: true }));

/** A backend as plain JavaScript, for modules written to disk. */
const BACKEND = `{
  size: SIZE, readOnly: false, canFlush: false, canDiscard: false, canWriteZeroes: false,
  read(offset, buffers) { for (const b of buffers) b.fill(7); },
  write() {}, flush() {}, discard() {}, writeZeroes() {}, close() {},
}`;

let n = 0;
/** Writes `source` as an ES module in the scratch directory; returns its file name. */
function moduleFile(source: string, ext = '.mjs'): string {
  const name = `m${n++}${ext}`;
  writeFileSync(join(dir, name), source);
  return name;
}

async function fails(specifier: string, code: BackendModuleErrorCode, message: RegExp, options: Record<string, string> = {}): Promise<void> {
  await assert.rejects(loadBackendModule(specifier, options, { cwd: dir }), (e: unknown) => {
    assert.ok(e instanceof BackendModuleError, String(e));
    assert.equal(e.code, code, e.message);
    assert.ok(!e.message.includes('\n'), e.message);
    assert.ok(e.message.startsWith(`backend module ${specifier}`), e.message);
    assert.match(e.message, message);
    return true;
  });
}

test('the default export is called with the options; its backend (or a promise of one) is returned, guarded', async () => {
  const sync = moduleFile(`export default (o) => (${BACKEND.replace('SIZE', 'Number(o.size)')});`);
  const backend = await loadBackendModule(`./${sync}`, { size: '8192' }, { cwd: dir });
  assert.equal(backend.size, 8192);
  const buf = new Uint8Array(512);
  assert.equal(backend.read(0, [buf]), undefined);
  assert.equal(buf[511], 7);

  const asynchronous = moduleFile(`export default async function (o) { await null; return ${BACKEND.replace('SIZE', '1024')}; }`);
  assert.equal((await loadBackendModule(join(dir, asynchronous), {})).size, 1024, 'an absolute path needs no cwd');
  assert.equal((await loadBackendModule(pathToFileURL(join(dir, asynchronous)).href)).size, 1024, 'nor a file: URL');
});

test('a module that is missing or will not load is one line saying so', async () => {
  await fails('./nowhere.mjs', 'MODULE_NOT_FOUND', /no such file .*nowhere\.mjs/);
  const bare = moduleFile('export default () => null;');
  await fails(bare, 'MODULE_NOT_FOUND', new RegExp(`a path needs ./ or / \\(--backend ./${bare}\\)`));
  await fails('vblk-no-such-package', 'MODULE_FAILED', /failed to load: Cannot find package 'vblk-no-such-package'/);
  await fails(`./${moduleFile('export default (;')}`, 'MODULE_FAILED', /failed to load: /);
  await fails(`./${moduleFile("throw new Error('top-level\\nfailure');")}`, 'MODULE_FAILED', /failed to load: top-level failure$/);
  await fails(`./${moduleFile('throw 42;')}`, 'MODULE_FAILED', /failed to load: 42$/);
  await fails(`./${moduleFile('export default () => null;', '.ts')}`, 'MODULE_FAILED', /compile TypeScript to JavaScript first/);
});

test('a default export that is not a factory, a failing factory, and a result that is not a backend', async () => {
  await fails(`./${moduleFile('export const backend = {};')}`, 'NO_FACTORY', /default export must be a function .*got undefined/);
  await fails(`./${moduleFile('export default { size: 512 };')}`, 'NO_FACTORY', /got object/);
  await fails(`./${moduleFile('export default null;')}`, 'NO_FACTORY', /got null/);
  await fails(`./${moduleFile("export default () => { throw new Error('no url given'); };")}`, 'FACTORY_FAILED', /its factory failed: no url given$/);
  await fails(`./${moduleFile("export default async () => { throw new TypeError('bad\\nsize'); };")}`, 'FACTORY_FAILED', /its factory failed: bad size$/);
  await fails(`./${moduleFile('export default () => Promise.reject(undefined);')}`, 'FACTORY_FAILED', /its factory failed: undefined$/);
  await fails(`./${moduleFile('export default () => 5;')}`, 'NOT_A_BACKEND', /the backend is a number, not an object/);
  await fails(`./${moduleFile(`export default () => (${BACKEND.replace('SIZE', '1000')});`)}`, 'NOT_A_BACKEND', /size must be a positive multiple of 512 bytes, got 1000/);
  await fails(`./${moduleFile(`export default () => ({ ...${BACKEND.replace('SIZE', '512')}, read: undefined });`)}`, 'NOT_A_BACKEND', /read must be a method/);
});

test('a package name is imported as vblk resolves its own imports, and checked like a file', async () => {
  // fast-check is a package this project has; its default export is no factory of backends.
  await fails('fast-check', 'NO_FACTORY', /default export must be a function .*got object/);
});
