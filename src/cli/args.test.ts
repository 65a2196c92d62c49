import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CliUsageError, formatOptions, formatSizeValue, parseCommandLine, parseSizeValue, type OptionSpecs } from './args.js';

const SPECS = {
  socket: { kind: 'string', valueName: 'PATH', description: 'socket' },
  json: { kind: 'boolean', description: 'json' },
  iodepth: { kind: 'integer', default: 32, description: 'depth' },
  offset: { kind: 'integer', min: 0, description: 'offset' },
  bs: { kind: 'size', min: 512, default: 4096, description: 'block size' },
  runtime: { kind: 'number', default: 5, description: 'seconds' },
  timeout: { kind: 'number', allowZero: true, description: 'seconds' },
  rw: { kind: 'choice', choices: ['randread', 'write'], default: 'randread', description: 'pattern' },
  opt: { kind: 'list', valueName: 'KEY=VALUE', description: 'options' },
} as const satisfies OptionSpecs;

function parse(...argv: string[]) {
  return parseCommandLine('bench', SPECS, argv);
}

function usageError(message: string) {
  return (e: unknown) => e instanceof CliUsageError && e.message === message;
}

test('--flag value and --flag=value both work; absent options take their defaults', () => {
  const { options, positionals } = parse('--socket', '/tmp/s', '--iodepth=8', 'IMAGE', '--json');
  assert.equal(options.socket, '/tmp/s');
  assert.equal(options.iodepth, 8);
  assert.equal(options.json, true);
  assert.equal(options.bs, 4096);
  assert.equal(options.rw, 'randread');
  assert.equal(options.offset, undefined);
  assert.equal(options.timeout, undefined);
  assert.deepEqual(positionals, ['IMAGE']);
});

test('sizes take K/M/G/T suffixes as powers of 1024, either case', () => {
  assert.equal(parse('--bs', '4k').options.bs, 4096);
  assert.equal(parse('--bs=64M').options.bs, 64 << 20);
  assert.equal(parse('--bs', '1G').options.bs, 2 ** 30);
  assert.equal(parse('--bs', '2t').options.bs, 2 * 2 ** 40);
  assert.equal(parse('--bs', '1536').options.bs, 1536);
  for (const bad of ['4kb', '1.5M', '-4k', '', 'k', '99999999999T']) assert.equal(parseSizeValue(bad), null, bad);
  assert.throws(() => parse('--bs', '4q'), usageError("vblk bench: --bs must be a size in bytes (digits with an optional K, M, G or T suffix) of at least 512, got '4q'"));
  assert.throws(() => parse('--bs', '256'), CliUsageError);
});

test('integers and numbers are checked with one-line messages naming the option', () => {
  assert.throws(() => parse('--iodepth', 'x'), usageError("vblk bench: --iodepth must be a positive integer, got 'x'"));
  assert.throws(() => parse('--iodepth', '0'), usageError("vblk bench: --iodepth must be a positive integer, got '0'"));
  assert.throws(() => parse('--iodepth', '1.5'), CliUsageError);
  assert.equal(parse('--offset', '0').options.offset, 0);
  assert.throws(() => parse('--offset', '-1'), usageError("vblk bench: --offset must be a non-negative integer, got '-1'"));
  assert.equal(parse('--runtime', '0.5').options.runtime, 0.5);
  assert.throws(() => parse('--runtime', '0'), usageError("vblk bench: --runtime must be a positive number, got '0'"));
  assert.equal(parse('--timeout', '0').options.timeout, 0);
  assert.throws(() => parse('--rw', 'randwrite'), usageError("vblk bench: --rw must be one of randread, write, got 'randwrite'"));
});

test('unknown, repeated, valueless and value-taking-boolean options are errors', () => {
  assert.throws(() => parse('--iodepht', '4'), usageError('vblk bench: unknown option --iodepht (see vblk bench --help)'));
  assert.throws(() => parse('-x'), usageError('vblk bench: unknown option -x (see vblk bench --help)'));
  assert.throws(() => parse('--iodepth', '4', '--iodepth', '8'), usageError('vblk bench: --iodepth is given more than once'));
  assert.throws(() => parse('--socket'), usageError('vblk bench: --socket needs a value'));
  assert.throws(() => parse('--json=yes'), usageError('vblk bench: --json takes no value'));
  assert.throws(() => parse('--constructor', 'x'), CliUsageError);
});

test('a list option collects every value in order, and is empty when absent', () => {
  assert.deepEqual(parse().options.opt, []);
  const { options } = parse('--opt', 'a=1', '--iodepth', '2', '--opt=b=2', '--opt', '');
  assert.deepEqual(options.opt, ['a=1', 'b=2', '']);
  assert.throws(() => parse('--opt'), usageError('vblk bench: --opt needs a value'));
  assert.ok(formatOptions(SPECS).some((l) => l.includes('--opt KEY=VALUE') && l.includes('(may be repeated)')));
});

test('-- ends the options', () => {
  assert.deepEqual(parse('--json', '--', '--iodepth', 'x').positionals, ['--iodepth', 'x']);
});

test('help lists every option with its value name and default', () => {
  const lines = formatOptions(SPECS);
  for (const name of Object.keys(SPECS)) assert.ok(lines.some((l) => l.includes(`--${name}`)), name);
  assert.ok(lines.some((l) => l.includes('--socket PATH')));
  assert.ok(lines.some((l) => l.includes('--bs SIZE') && l.includes('(default 4K)')));
  assert.ok(lines.some((l) => l.includes('[randread|write]')));
  assert.ok(lines.some((l) => l.includes('-h, --help')));
  assert.equal(formatSizeValue(64 << 20), '64M');
  assert.equal(formatSizeValue(1536), '1536');
});
