import { test } from 'node:test';
import assert from 'node:assert/strict';
import { main } from './main.js';
import { logSink } from './serve.js';

function capture() {
  const out: string[] = [];
  const err: string[] = [];
  return { io: { stdout: (t: string) => void out.push(t), stderr: (t: string) => void err.push(t) }, out, err };
}

test('--socket may be given several times, and --help says so', async () => {
  const c = capture();
  assert.equal(await main(['serve', '--help'], c.io), 0);
  const help = c.out.join('');
  assert.match(help, /^Usage: vblk serve \(SOURCE \| --backend MODULE\) --socket PATH \[--socket PATH \.\.\.\]/);
  assert.match(help, /--socket PATH +unix socket to listen on \(required; several serve the disk to a frontend each, at once\) \(may be repeated\)/);
  assert.match(help, /Several --socket serve the one disk to a frontend each, at the same time/);
});

test('no --socket, and one --socket given twice, are usage errors (status 2) before anything is opened', async () => {
  for (const [argv, message] of [
    [['serve', '/nonexistent/disk.img'], 'vblk serve: --socket PATH is required\n'],
    [['serve', '/nonexistent/disk.img', '--socket', 'a.sock', '--socket', 'b.sock', '--socket', 'a.sock'], 'vblk serve: --socket a.sock is given twice\n'],
  ] as const) {
    const c = capture();
    assert.equal(await main([...argv], c.io), 2, argv.join(' '));
    assert.equal(c.err.join(''), message);
  }
});

test('the text log names the socket of a line only when there are several', () => {
  const one = capture();
  logSink('text', ['a.sock'], one.io)('frontend 1 connected', { socket: 'a.sock', frontend: 1 });
  assert.deepEqual(one.err, ['vblk serve: frontend 1 connected\n']);
  const two = capture();
  const log = logSink('text', ['a.sock', 'b.sock'], two.io);
  log('frontend 1 connected', { socket: 'b.sock', frontend: 1 });
  log('SIGTERM: stopping');
  assert.deepEqual(two.err, ['vblk serve: b.sock: frontend 1 connected\n', 'vblk serve: SIGTERM: stopping\n']);
});

test('the JSON log has a socket key on every line with one socket, and on the lines about one socket with several', () => {
  const parse = (lines: string[]): Record<string, unknown>[] => lines.map((l) => JSON.parse(l) as Record<string, unknown>);
  const one = capture();
  const log1 = logSink('json', ['a.sock'], one.io);
  log1('serving');
  log1('ring 0: too long', { socket: 'a.sock', queue: 0, level: 'warn' });
  assert.deepEqual(parse(one.err).map(({ time: _, ...rest }) => rest), [
    { level: 'info', msg: 'serving', socket: 'a.sock' },
    { level: 'warn', msg: 'ring 0: too long', socket: 'a.sock', queue: 0 },
  ]);
  const two = capture();
  const log2 = logSink('json', ['a.sock', 'b.sock'], two.io);
  log2('serving');
  log2('frontend 2 connected', { socket: 'b.sock', frontend: 2 });
  assert.deepEqual(parse(two.err).map(({ time: _, ...rest }) => rest), [
    { level: 'info', msg: 'serving' },
    { level: 'info', msg: 'frontend 2 connected', socket: 'b.sock', frontend: 2 },
  ]);
});
