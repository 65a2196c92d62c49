import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SUBCOMMANDS, main } from './main.js';
import type { Command } from './command.js';

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
