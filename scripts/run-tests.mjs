#!/usr/bin/env node
// Runs the compiled tests with node's built-in runner: unit and cross-layer tests in
// parallel, then the end-to-end tests against real peers one at a time (each boots QEMU
// or starts qemu-storage-daemon; two cores cannot run them side by side).
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';

function find(dir, out = []) {
  let entries;
  try { entries = readdirSync(dir); } catch { return out; }
  for (const name of entries) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) find(p, out);
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

const unitOnly = process.argv.includes('--unit');
const all = [...find('dist/src'), ...find('dist/test'), ...find('dist/bench')].sort();
const e2e = all.filter((f) => f.includes('/e2e/'));
const unit = all.filter((f) => !f.includes('/e2e/'));

function run(files, concurrency) {
  if (files.length === 0) return 0;
  const r = spawnSync(process.execPath, ['--test', `--test-concurrency=${concurrency}`, ...files], { stdio: 'inherit' });
  return r.status ?? 1;
}

let status = run(unit, 2);
if (!unitOnly) status = run(e2e, 1) || status;
process.exit(status);
