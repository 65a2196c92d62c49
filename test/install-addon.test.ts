// scripts/install-addon.mjs, npm install's build of the addon: a missing build tool is
// one line that names it, and node-gyp runs only when every tool is there. The tools are
// stand-ins on a PATH of our own, so nothing is compiled here (test/e2e/package.test.ts
// builds the addon for real from the packed tarball).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { scratchDir } from './e2e/serve-helpers.js';

const SCRIPT = resolve(dirname(fileURLToPath(import.meta.url)), '../../scripts/install-addon.mjs');

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-install-addon-');
});
after(() => scratch.cleanup());

/** A directory holding executables named `tools` that succeed and do nothing. */
function toolDir(name: string, tools: string[]): string {
  const dir = join(scratch.dir, name);
  mkdirSync(dir);
  for (const t of tools) {
    writeFileSync(join(dir, t), '#!/bin/sh\nexit 0\n');
    chmodSync(join(dir, t), 0o755);
  }
  return dir;
}

/** Runs the script with exactly `env` (no inherited npm_config_*, PYTHON, CC …). */
function install(env: Record<string, string>): { status: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [SCRIPT], { cwd: scratch.dir, env, encoding: 'utf8' });
  return { status: r.status, stderr: r.stderr };
}

function failsNaming(env: Record<string, string>, pattern: RegExp): void {
  const r = install(env);
  assert.equal(r.status, 1, r.stderr);
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line, got:\n${r.stderr}`);
  assert.match(lines[0], /^vblk: cannot build the native addon: /);
  assert.match(lines[0], pattern);
  assert.match(lines[0], /VBLK_SKIP_ADDON=1/);
}

test('each missing build tool is one line naming it, in the order node-gyp needs them', () => {
  failsNaming({ PATH: toolDir('none', []) }, /no Python \(python3\)/);
  failsNaming({ PATH: toolDir('py', ['python3']) }, /no make on PATH/);
  failsNaming({ PATH: toolDir('py-make', ['python3', 'make']) }, /no C compiler \(cc\)/);
  failsNaming({ PATH: toolDir('no-cxx', ['python3', 'make', 'cc']) }, /no C\+\+ compiler \(g\+\+\)/);
  failsNaming({ PATH: toolDir('no-gyp', ['python3', 'make', 'cc', 'g++']) }, /node-gyp not found/);
});

test('PYTHON, MAKE, CC and CXX name the tools to look for (CC may carry arguments)', () => {
  const dir = toolDir('named', ['python3', 'make', 'cc', 'g++', 'clang']);
  failsNaming({ PATH: dir, PYTHON: '/nowhere/python3.11' }, /no Python \(\/nowhere\/python3\.11\)/);
  failsNaming({ PATH: dir, MAKE: 'gmake' }, /no gmake on PATH/);
  failsNaming({ PATH: dir, CC: 'ccache gcc' }, /no C compiler \(ccache\)/);
  failsNaming({ PATH: dir, CC: 'clang -O2', CXX: 'clang++' }, /no C\+\+ compiler \(clang\+\+\)/);
});

test('with every tool present it runs npm\'s node-gyp rebuild, and reports its failure in one closing line', () => {
  const dir = toolDir('all', ['python3', 'make', 'cc', 'g++']);
  const record = join(scratch.dir, 'node-gyp-args.json');
  const fakeGyp = join(scratch.dir, 'node-gyp.js');
  writeFileSync(fakeGyp, `require('fs').writeFileSync(${JSON.stringify(record)}, JSON.stringify(process.argv.slice(2)));\n` +
    'process.exit(Number(process.env.FAKE_STATUS));\n');
  const ok = install({ PATH: dir, npm_config_node_gyp: fakeGyp, FAKE_STATUS: '0', npm_config_nodedir: '/opt/node' });
  assert.equal(ok.status, 0, ok.stderr);
  assert.equal(ok.stderr, '');
  // npm's own nodedir wins: the script adds none.
  assert.deepEqual(JSON.parse(readFileSync(record, 'utf8')), ['rebuild']);

  const bad = install({ PATH: dir, npm_config_node_gyp: fakeGyp, FAKE_STATUS: '3', npm_config_nodedir: '/opt/node' });
  assert.equal(bad.status, 1);
  assert.equal(bad.stderr, 'vblk: cannot build the native addon: node-gyp rebuild failed (exit 3); its output is above\n');
});

test('without a configured nodedir, the headers beside this Node.js are used when they are its version', () => {
  const dir = toolDir('headers', ['python3', 'make', 'cc', 'g++']);
  const record = join(scratch.dir, 'node-gyp-args2.json');
  const fakeGyp = join(scratch.dir, 'node-gyp2.js');
  writeFileSync(fakeGyp, `require('fs').writeFileSync(${JSON.stringify(record)}, JSON.stringify(process.argv.slice(2)));\n`);
  assert.equal(install({ PATH: dir, npm_config_node_gyp: fakeGyp }).status, 0);
  const prefix = resolve(dirname(process.execPath), '..');
  const header = join(prefix, 'include/node/node_version.h');
  const [major, minor, patch] = process.versions.node.split('.');
  const text = existsSync(header) ? readFileSync(header, 'utf8') : '';
  const matches = [`MAJOR_VERSION ${major}\n`, `MINOR_VERSION ${minor}\n`, `PATCH_VERSION ${patch}\n`].every((d) => text.includes(`#define NODE_${d}`));
  assert.deepEqual(JSON.parse(readFileSync(record, 'utf8')), matches ? ['rebuild', `--nodedir=${prefix}`] : ['rebuild']);
});

test('VBLK_SKIP_ADDON=1 installs without building, saying so in one line', () => {
  const r = install({ PATH: toolDir('skip', []), VBLK_SKIP_ADDON: '1' });
  assert.equal(r.status, 0);
  assert.match(r.stderr, /^vblk: VBLK_SKIP_ADDON=1: the native addon is not built; [^\n]*\n$/);
});
