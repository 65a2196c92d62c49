import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SUBCOMMANDS, main } from './main.js';
import type { Command } from './command.js';

/** dist/src, compiled: this test is dist/src/cli/main.test.js. */
const DIST_SRC = join(dirname(fileURLToPath(import.meta.url)), '..');

function capture() {
  const out: string[] = [];
  const err: string[] = [];
  return { io: { stdout: (t: string) => void out.push(t), stderr: (t: string) => void err.push(t) }, out, err };
}

test('no command, an unknown command and an unknown option are one-line errors with status 2', async () => {
  for (const argv of [[], ['frobnicate'], ['bench', '--frob']]) {
    const c = capture();
    assert.equal(await main(argv, c.io), 2, argv.join(' '));
    assert.equal(c.out.join(''), '');
    const text = c.err.join('');
    assert.equal(text.split('\n').filter(Boolean).length, 1, text);
    assert.match(text, /^vblk/);
  }
});

test('vblk --help lists every subcommand', async () => {
  const c = capture();
  assert.equal(await main(['--help'], c.io), 0);
  for (const name of SUBCOMMANDS) assert.match(c.out.join(''), new RegExp(`^  ${name} `, 'm'));
});

test('every available subcommand\'s --help lists every one of its options', async () => {
  for (const name of SUBCOMMANDS) {
    let command: Command | undefined;
    try {
      command = ((await import(`./${name}.js`)) as { command: Command }).command;
    } catch {
      continue;
    }
    const c = capture();
    assert.equal(await main([name, '--help'], c.io), 0, name);
    const help = c.out.join('');
    assert.match(help, new RegExp(`^Usage: vblk ${name} `));
    for (const option of Object.keys(command.options)) assert.match(help, new RegExp(`--${option}\\b`), `${name} --${option}`);
    const again = capture();
    assert.equal(await main(['help', name], again.io), 0);
    assert.equal(again.out.join(''), help);
  }
});

test('vblk --version and -V print the version of the package.json at the repository root', async () => {
  // npm runs tests from the package root; the CLI finds package.json from its own location.
  const { version } = JSON.parse(readFileSync(join(process.cwd(), 'package.json'), 'utf8')) as { version: string };
  for (const flag of ['--version', '-V']) {
    const c = capture();
    assert.equal(await main([flag], c.io), 0, flag);
    assert.equal(c.out.join(''), `vblk ${version}\n`);
    assert.equal(c.err.join(''), '');
  }
  const help = capture();
  await main(['--help'], help.io);
  assert.match(help.out.join(''), /^ {2}-V, --version +print the version$/m);
});

test('vblk --version works when installed as a package and run through its bin symlink from elsewhere', () => {
  const root = mkdtempSync(join(tmpdir(), 'vblk-installed-'));
  try {
    const pkg = join(root, 'node_modules', 'vblk');
    cpSync(DIST_SRC, join(pkg, 'dist', 'src'), { recursive: true, filter: (from) => !from.endsWith('.map') });
    writeFileSync(join(pkg, 'package.json'), JSON.stringify({ name: 'vblk', version: '9.8.7-installed', type: 'module' }));
    mkdirSync(join(root, 'node_modules', '.bin'));
    const bin = join(root, 'node_modules', '.bin', 'vblk');
    symlinkSync('../vblk/dist/src/cli/main.js', bin);
    const out = execFileSync(process.execPath, [bin, '--version'], { cwd: tmpdir(), encoding: 'utf8' });
    assert.equal(out, 'vblk 9.8.7-installed\n');
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});
