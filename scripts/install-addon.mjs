#!/usr/bin/env node
// `npm install`'s build of the native addon (binding.gyp) with node-gyp, in this
// repository and in every project that installs the vblk package. It first looks for
// what node-gyp needs on Linux, so that a missing tool is one line naming it rather than
// a page of gyp output: Python, make, a C compiler, and a C++ compiler (gyp links with
// $(CXX) even when every source is C).
//
// VBLK_SKIP_ADDON=1 installs without the addon: the core (`vblk`) needs none, and
// `vblk/node` and the CLI then fail at first use with a line saying how to build it.
import { accessSync, constants, existsSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { delimiter, dirname, isAbsolute, join, resolve } from 'node:path';

const SKIP = 'or set VBLK_SKIP_ADDON=1 to install without it (vblk/node and the CLI need it)';

function fail(why) {
  process.stderr.write(`vblk: cannot build the native addon: ${why}\n`);
  process.exit(1);
}

/** Whether `command` (a name looked up on PATH, or a path) is an executable. */
function found(command) {
  const candidates = isAbsolute(command) || command.includes('/')
    ? [command]
    : (process.env.PATH ?? '').split(delimiter).filter(Boolean).map((dir) => join(dir, command));
  return candidates.some((file) => {
    try {
      accessSync(file, constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

/** The program of a command-line variable such as CC="ccache gcc": its first word. */
function programOf(variable, fallback) {
  return process.env[variable]?.trim().split(/\s+/)[0] || fallback;
}

/**
 * Where this Node.js keeps its own headers (distributions and the official tarballs
 * install them under the prefix), when they are this version's. Pointing node-gyp there
 * spares a download of the same headers from nodejs.org, which fails offline.
 */
function localNodeDir() {
  const prefix = resolve(dirname(process.execPath), '..');
  const header = join(prefix, 'include', 'node', 'node_version.h');
  if (!existsSync(header)) return null;
  const text = readFileSync(header, 'utf8');
  const part = (name) => new RegExp(`#define NODE_${name}_VERSION (\\d+)`).exec(text)?.[1];
  return `${part('MAJOR')}.${part('MINOR')}.${part('PATCH')}` === process.versions.node ? prefix : null;
}

if (process.env.VBLK_SKIP_ADDON === '1') {
  process.stderr.write('vblk: VBLK_SKIP_ADDON=1: the native addon is not built; vblk/node and the CLI will not work\n');
  process.exit(0);
}
if (process.platform !== 'linux') fail(`it needs Linux (memfd, eventfd), this is ${process.platform}; ${SKIP}`);

const python = process.env.npm_config_python || process.env.PYTHON;
if (python ? !found(python) : !found('python3') && !found('python')) {
  fail(`no Python (${python ?? 'python3'}) on PATH, which node-gyp runs; install it (Debian: apt-get install python3), ${SKIP}`);
}
const make = programOf('MAKE', 'make');
if (!found(make)) fail(`no ${make} on PATH; install it (Debian: apt-get install make), ${SKIP}`);
const cc = programOf('CC', 'cc');
if (!found(cc)) fail(`no C compiler (${cc}) on PATH; install one (Debian: apt-get install gcc) or set CC, ${SKIP}`);
const cxx = programOf('CXX', 'g++');
if (!found(cxx)) fail(`no C++ compiler (${cxx}) on PATH, which gyp links with; install one (Debian: apt-get install g++) or set CXX, ${SKIP}`);

// npm names its bundled node-gyp in npm_config_node_gyp when it runs install scripts.
const nodeGyp = process.env.npm_config_node_gyp;
if (!nodeGyp && !found('node-gyp')) fail(`node-gyp not found; run this through npm install, which bundles it, ${SKIP}`);
const args = ['rebuild'];
const nodeDir = process.env.npm_config_nodedir ? null : localNodeDir();
if (nodeDir !== null) args.push(`--nodedir=${nodeDir}`);
const r = nodeGyp
  ? spawnSync(process.execPath, [nodeGyp, ...args], { stdio: 'inherit' })
  : spawnSync('node-gyp', args, { stdio: 'inherit' });
if (r.status !== 0) fail(`node-gyp ${args.join(' ')} failed (${r.error?.message ?? `exit ${r.status ?? r.signal}`}); its output is above`);
