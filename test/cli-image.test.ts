// `vblk image create | info` and the image options of `vblk serve`: what a user sees,
// checked in process through main() (stdout, stderr, exit status), and against qemu-img
// where it is the reference (skipped locally without it, failing with CI=true).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { main } from '../src/cli/main.js';
import type { ImageInfo } from '../src/cli/image-info.js';
import { progressReporter } from '../src/cli/image-check.js';
import { requirePeer } from '../scripts/guest/guest.js';
import { scratchDir } from './e2e/serve-helpers.js';

const qemuSkip = requirePeer('qemu-img');

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-cli-image-');
});
after(() => scratch.cleanup());

async function vblk(...argv: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const status = await main(argv, { stdout: (t) => void out.push(t), stderr: (t) => void err.push(t) });
  return { status, stdout: out.join(''), stderr: err.join('') };
}

async function fails(status: number, pattern: RegExp, ...argv: string[]): Promise<void> {
  const r = await vblk(...argv);
  assert.equal(r.status, status, `vblk ${argv.join(' ')}: ${r.stderr}`);
  assert.equal(r.stdout, '');
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line, got:\n${r.stderr}`);
  assert.match(lines[0], pattern);
}

function file(name: string): string {
  return join(scratch.dir, name);
}

async function info(path: string, ...extra: string[]): Promise<ImageInfo> {
  const r = await vblk('image', 'info', path, '--json', ...extra);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trimEnd().split('\n').length, 1, 'one line of JSON');
  return JSON.parse(r.stdout) as ImageInfo;
}

test('vblk image without a subcommand, or with an unknown one, is a usage error (status 2)', async () => {
  await fails(2, /^vblk image: missing subcommand \(one of create, info/, 'image');
  await fails(2, /^vblk image: unknown subcommand 'frob'/, 'image', 'frob');
  const help = await vblk('image', '--help');
  assert.equal(help.status, 0);
  for (const option of ['--format', '--backing', '--backing-format', '--cluster-size', '--json']) assert.match(help.stdout, new RegExp(`${option}\\b`));
  const sub = await vblk('image', 'create', '--help');
  assert.match(sub.stdout, /^Usage: vblk image create /);
});

test('image create --format raw makes a sparse file of SIZE bytes, with K/M/G/T suffixes', async () => {
  const path = file('sparse.raw');
  const r = await vblk('image', 'create', '--format', 'raw', path, '1G');
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^created .*sparse\.raw: raw, 1G \(1073741824 bytes\), sparse\n$/);
  assert.equal(statSync(path).size, 2 ** 30);
  assert.ok(statSync(path).blocks * 512 < 1 << 20, 'sparse');
  assert.equal(statSync(path).mode & 0o777, 0o600);
  const i = await info(path);
  assert.equal(i.format, 'raw');
  assert.equal(i.virtualSize, 2 ** 30);
  assert.deepEqual(i.backingChain, []);
});

test('image create refuses what cannot work, in one line each', async () => {
  const base = file('refuse-base.raw');
  writeFileSync(base, new Uint8Array(65536));
  await fails(1, /exists already/, 'image', 'create', base, '1M');
  await fails(2, /SIZE is required without --backing/, 'image', 'create', file('r1.qcow2'));
  await fails(2, /SIZE must be a positive multiple of 512/, 'image', 'create', file('r2.qcow2'), '1000');
  await fails(2, /--backing needs --format qcow2/, 'image', 'create', '--format', 'raw', '--backing', base, file('r3.raw'), '1M');
  await fails(2, /--cluster-size is for qcow2/, 'image', 'create', '--format', 'raw', '--cluster-size', '4k', file('r4.raw'), '1M');
  await fails(2, /--cluster-size must be a power of two/, 'image', 'create', '--cluster-size', '3k', file('r5.qcow2'), '1M');
  await fails(2, /--backing-format needs --backing/, 'image', 'create', '--backing-format', 'raw', file('r6.qcow2'), '1M');
  await fails(2, /--backing needs --backing-format \(refuse-base\.raw looks like raw\)/, 'image', 'create', '--backing', 'refuse-base.raw', file('r7.qcow2'));
  await fails(1, /^vblk image create: image .*nowhere\.qcow2 does not exist/, 'image', 'create', '--backing', 'nowhere.qcow2', '--backing-format', 'qcow2', file('r8.qcow2'));
});

test('image create over a backing file: SIZE defaults to the backing size, the name is stored as given, info shows the chain', async () => {
  const base = file('chain-base.qcow2');
  assert.equal((await vblk('image', 'create', base, '3M')).status, 0);
  const top = file('chain-top.qcow2');
  const r = await vblk('image', 'create', '--backing', 'chain-base.qcow2', '--backing-format', 'qcow2', top);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /qcow2, 3M .*backing chain-base\.qcow2 \(qcow2\)/);
  const i = await info(top);
  assert.equal(i.virtualSize, 3 << 20);
  assert.deepEqual(i.backingChain, [{ name: 'chain-base.qcow2', filename: base, format: 'qcow2', formatSource: 'stated', virtualSize: 3 << 20 }]);
  const text = await vblk('image', 'info', top);
  assert.match(text.stdout, /^backing chain:\n {2}chain-base\.qcow2 \(.*chain-base\.qcow2\): qcow2 \(stated\), 3 MiB$/m);
});

test('image info shows a broken chain as far as it goes, and says what broke it', async () => {
  const base = file('gone-base.raw');
  writeFileSync(base, new Uint8Array(65536));
  const top = file('gone-top.qcow2');
  assert.equal((await vblk('image', 'create', '--backing', base, '--backing-format', 'raw', top)).status, 0);
  rmSync(base);
  const i = await info(top);
  assert.deepEqual(i.backingChain, []);
  assert.equal(i.backingError, `backing file ${base} of ${top} does not exist`);
  await fails(1, /^vblk image info: .*missing\.qcow2 does not exist/, 'image', 'info', file('missing.qcow2'));
});

test('image info --format raw reads a raw image holding the qcow2 magic as raw', async () => {
  const path = file('magic.raw');
  const bytes = new Uint8Array(65536);
  bytes.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
  writeFileSync(path, bytes);
  assert.equal((await info(path, '--format', 'raw')).format, 'raw');
  await fails(1, /^vblk image info: .*magic\.raw: /, 'image', 'info', path);
});

test('image create makes what qemu-img accepts; image info agrees with qemu-img info', { skip: qemuSkip }, async () => {
  const base = file('q-base.raw');
  assert.equal((await vblk('image', 'create', '--format', 'raw', base, '2M')).status, 0);
  const top = file('q-top.qcow2');
  assert.equal((await vblk('image', 'create', '--cluster-size', '4k', '--backing', 'q-base.raw', '--backing-format', 'raw', top, '8M')).status, 0);
  const check = spawnSync('qemu-img', ['check', top], { encoding: 'utf8' });
  assert.equal(check.status, 0, check.stdout + check.stderr);
  const q = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', top], { encoding: 'utf8' })) as Record<string, unknown>;
  assert.equal(q['cluster-size'], 4096);
  assert.equal(q['virtual-size'], 8 << 20);
  assert.equal(q['backing-filename'], 'q-base.raw');
  assert.equal(q['backing-filename-format'], 'raw');
  assert.equal(q['full-backing-filename'], base);
  // Images qemu-img makes, with the fields image info reports.
  const cases: [string[], Partial<ImageInfo>][] = [
    [['-o', 'compat=0.10'], { compat: '0.10', refcountBits: 16, compressionType: 'zlib' }],
    [['-o', 'refcount_bits=1,lazy_refcounts=on,cluster_size=512'], { compat: '1.1', refcountBits: 1, lazyRefcounts: true, clusterSize: 512 }],
    [['-o', 'compression_type=zstd,extended_l2=on,cluster_size=128k'], { compressionType: 'zstd', extendedL2: true, clusterSize: 131072 }],
  ];
  for (const [i, [opts, want]] of cases.entries()) {
    const path = file(`q-${i}.qcow2`);
    execFileSync('qemu-img', ['create', '-f', 'qcow2', ...opts, path, '5M'], { stdio: 'pipe' });
    const got = await info(path);
    assert.equal(got.virtualSize, 5 << 20);
    assert.equal(got.dirty, false);
    assert.equal(got.corrupt, false);
    assert.equal(got.snapshots, 0);
    for (const [key, value] of Object.entries(want)) assert.equal(got[key as keyof ImageInfo], value, `${opts.join(' ')}: ${key}`);
  }
});

test('serve: --format is for image files; qcow2 refuses --size and --io mmap; a bad format is named', async () => {
  const img = file('serve.qcow2');
  await fails(2, /^vblk serve: --format is for image files/, 'serve', 'nbd://127.0.0.1/x', '--format', 'raw', '--socket', file('s1'));
  await fails(2, /^vblk serve: --format is for image files/, 'serve', '--backend', './m.js', '--format', 'qcow2', '--socket', file('s2'));
  await fails(2, /^vblk serve: --size creates or grows raw images/, 'serve', img, '--format', 'qcow2', '--size', '1M', '--socket', file('s3'));
  await fails(2, /^vblk serve: --io mmap serves raw images only/, 'serve', img, '--format', 'qcow2', '--io', 'mmap', '--socket', file('s4'));
  await fails(2, /^vblk serve: --format must be one of raw, qcow2, got 'vmdk'/, 'serve', img, '--format', 'vmdk', '--socket', file('s5'));
  // A probed qcow2 image refuses the raw-only options too, naming the image.
  assert.equal((await vblk('image', 'create', img, '1M')).status, 0);
  await fails(1, /^vblk serve: image .*serve\.qcow2 is qcow2: a size creates or grows raw images only/, 'serve', img, '--size', '2M', '--socket', file('s6'));
  await fails(1, /^vblk serve: image .*serve\.qcow2 is qcow2: I\/O mode mmap serves raw images only/, 'serve', img, '--io', 'mmap', '--socket', file('s7'));
});

/** Sets the stored refcount of `cluster` in a fresh 16-bit-refcount image (its first refcount block). */
function setRefcount(path: string, cluster: number, value: number): void {
  const bytes = readFileSync(path);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const table = Number(view.getBigUint64(48));
  const block = Number(view.getBigUint64(table));
  view.setUint16(block + 2 * cluster, value);
  writeFileSync(path, bytes);
}

test('image check: exit 0 clean, 3 leaks only, 2 corruptions, 63 raw — as qemu-img check; problems on stderr', async () => {
  const clean = file('ck-clean.qcow2');
  assert.equal((await vblk('image', 'create', clean, '10M')).status, 0);
  const leaky = file('ck-leak.qcow2');
  assert.equal((await vblk('image', 'create', leaky, '10M')).status, 0);
  setRefcount(leaky, 3, 2);
  const corrupt = file('ck-corrupt.qcow2');
  assert.equal((await vblk('image', 'create', corrupt, '10M')).status, 0);
  setRefcount(corrupt, 0, 0);
  const raw = file('ck.raw');
  writeFileSync(raw, new Uint8Array(65536));

  const ok = await vblk('image', 'check', clean);
  assert.equal(ok.status, 0, ok.stderr);
  assert.equal(ok.stderr, '');
  assert.match(ok.stdout, /no corruptions, no leaked clusters/);
  const leak = await vblk('image', 'check', leaky);
  assert.equal(leak.status, 3);
  assert.match(leak.stdout, /0 corruptions, 1 leaked cluster,/);
  assert.match(leak.stderr, /cluster 3/);
  const bad = await vblk('image', 'check', '--json', corrupt);
  assert.equal(bad.status, 2);
  const counts = JSON.parse(bad.stdout) as Record<string, unknown>;
  assert.equal(counts.corruptions, 1);
  assert.equal(counts.leaks, 0);
  assert.equal(counts.format, 'qcow2');
  await fails(63, /ck\.raw is a raw image/, 'image', 'check', raw);
  await fails(1, /missing\.qcow2 does not exist/, 'image', 'check', file('missing.qcow2'));
  // A bad command line is 1 too, never qemu-img's 2 ("corruptions found"); other commands keep 2.
  await fails(1, /^vblk image check: expected one IMAGE, got 2 arguments/, 'image', 'check', clean, leaky);
  await fails(1, /^vblk image check: .*--bogus/, 'image', 'check', '--bogus', clean);
  await fails(2, /^vblk image info: /, 'image', 'info', '--bogus', clean);
  if (!qemuSkip) {
    for (const [path, status] of [[clean, 0], [leaky, 3], [corrupt, 2], [raw, 63]] as const) {
      assert.equal(spawnSync('qemu-img', ['check', path]).status, status, `qemu-img check ${path}`);
    }
  }
});

test('the check progress line appears only on a terminal, once per percent, and is erased at the end', () => {
  const written: string[] = [];
  const tty = progressReporter(true, (t) => written.push(t));
  for (const f of [0, 0.001, 0.5, 0.502, 1]) tty.update(f);
  tty.done();
  assert.deepEqual(written, ['\rchecking: 0%', '\rchecking: 50%', '\rchecking: 100%', '\r\x1b[K']);
  const none: string[] = [];
  const pipe = progressReporter(false, (t) => none.push(t));
  pipe.update(0.5);
  pipe.done();
  assert.deepEqual(none, []);
});

test('image check --repair fixes leaks and corruptions: exit 0, the counts fixed in the JSON, qemu-img check clean after', async () => {
  const leaky = file('rp-leak.qcow2');
  assert.equal((await vblk('image', 'create', leaky, '10M')).status, 0);
  setRefcount(leaky, 3, 2);
  const corrupt = file('rp-corrupt.qcow2');
  assert.equal((await vblk('image', 'create', corrupt, '10M')).status, 0);
  setRefcount(corrupt, 0, 0);
  const fixed = await vblk('image', 'check', '--repair', leaky);
  assert.equal(fixed.status, 0, fixed.stderr);
  assert.match(fixed.stdout, /^repaired 1 leaked cluster and 0 corruptions .*\n.*no corruptions, no leaked clusters/);
  const json = await vblk('image', 'check', '--repair', '--json', corrupt);
  assert.equal(json.status, 0, json.stderr);
  const report = JSON.parse(json.stdout) as { corruptions: number; repaired: { corruptions: number }; before: { corruptions: number } };
  assert.equal(report.corruptions, 0);
  assert.equal(report.before.corruptions, 1);
  assert.equal(report.repaired.corruptions, 1);
  assert.equal((await vblk('image', 'check', corrupt)).status, 0);
  const again = await vblk('image', 'check', '--repair', corrupt);
  assert.match(again.stdout, /^nothing to repair\n/);
  if (!qemuSkip) {
    for (const path of [leaky, corrupt]) assert.equal(spawnSync('qemu-img', ['check', path]).status, 0, `qemu-img check ${path}`);
  }
});
