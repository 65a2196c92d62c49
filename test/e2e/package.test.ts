// vblk as a package: `npm pack`, then an empty project installs the tarball and uses it
// as a stranger would. npm builds the addon on install (scripts/install-addon.mjs); a
// TypeScript backend type-checks against the exported BlockBackend with no Node.js
// types; vblk/node and vblk/testing work from a program, and so does an NBD export
// served from one; the exported compliance suite runs on the backend with `node --test`;
// `npx vblk serve --backend ./my-backend.js` serves it and `npx vblk read` returns its bytes.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { requirePeer } from '../../scripts/guest/guest.js';
import { startQemuNbd } from '../support/nbd-servers.js';
import { launchServe, scratchDir } from './serve-helpers.js';

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const TSC = join(REPO, 'node_modules/typescript/bin/tsc');
const run = promisify(execFile);

/** What a user of the package writes: a RAM disk against the exported types, and the factory `vblk serve --backend` calls. */
const MY_BACKEND = `import { BackendError, checkDiskSize, checkRange, totalLength, type BlockBackend } from 'vblk';

export class RamDisk implements BlockBackend {
  readonly readOnly = false;
  readonly canFlush = false;
  readonly canDiscard = true;
  readonly canWriteZeroes = true;
  private readonly bytes: Uint8Array;
  private closed = false;
  constructor(readonly size: number) {
    checkDiskSize(size);
    this.bytes = new Uint8Array(size);
  }
  read(offset: number, buffers: readonly Uint8Array[]): void {
    this.check(offset, totalLength(buffers));
    for (const b of buffers) { b.set(this.bytes.subarray(offset, offset + b.length)); offset += b.length; }
  }
  write(offset: number, buffers: readonly Uint8Array[]): void {
    this.check(offset, totalLength(buffers));
    for (const b of buffers) { this.bytes.set(b, offset); offset += b.length; }
  }
  flush(): void { this.check(0, 0); }
  discard(offset: number, length: number): void { this.writeZeroes(offset, length); }
  writeZeroes(offset: number, length: number): void { this.check(offset, length); this.bytes.fill(0, offset, offset + length); }
  close(): void { this.closed = true; }
  private check(offset: number, length: number): void {
    if (this.closed) throw new BackendError('CLOSED', 'closed');
    checkRange(this.size, offset, length);
  }
}

export const GREETING = 'hello from my-backend';

export default function (options: Readonly<Record<string, string>>): BlockBackend {
  const disk = new RamDisk(Number(options.size ?? 1 << 20));
  disk.write(0, [Uint8Array.from(GREETING, (c) => c.charCodeAt(0))]);
  return disk;
}
`;

/** A program on vblk/node and vblk/testing: a loopback disk, then serve() and connect() over a socket. */
const PROGRAM = `import { MemoryBackend, VIRTIO_BLK_SECTOR_SIZE } from 'vblk';
import { connect, serve } from 'vblk/node';
import { openLoopbackDisk } from 'vblk/testing';

const socketPath = process.argv[2];
const backend = new MemoryBackend({ size: 1 << 20 });
const loop = await openLoopbackDisk(backend);
await loop.driver.write(1, [new Uint8Array(VIRTIO_BLK_SECTOR_SIZE).fill(1)]);
await loop.close();
const served = await serve({ backend, socketPath });
const disk = await connect(socketPath);
const back = new Uint8Array(VIRTIO_BLK_SECTOR_SIZE);
await disk.driver.read(1, [back]);
await disk.close();
await served.close();
await backend.close();
console.log(back.every((b) => b === 1) ? 'ROUND-TRIP-OK' : 'ROUND-TRIP-BAD');
`;

/** A program that serves an NBD export (argv[2]) over vhost-user, reads sector 1 through it and copies it to sector 2. */
const NBD_PROGRAM = `import { VIRTIO_BLK_SECTOR_SIZE } from 'vblk';
import { connect, openNbdBackend, serve } from 'vblk/node';

const [uri, socketPath] = process.argv.slice(2);
const backend = await openNbdBackend({ uri });
const served = await serve({ backend, socketPath });
const disk = await connect(socketPath);
const sector = new Uint8Array(VIRTIO_BLK_SECTOR_SIZE);
await disk.driver.read(1, [sector]);
await disk.driver.write(2, [sector]);
await disk.driver.flush();
await disk.close();
await served.close();
await backend.close();
console.log(new TextDecoder().decode(sector).replace(/\\0+$/, ''));
`;

const COMPLIANCE = `import { backendComplianceSuite } from 'vblk/testing';
import { RamDisk } from './my-backend.js';

backendComplianceSuite('my-backend RamDisk', (size) => ({ backend: new RamDisk(size) }));
`;

function tsconfig(files: string[], types: string[]): string {
  return JSON.stringify({
    compilerOptions: {
      target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', lib: ['ES2022'], strict: true,
      // The package's own declarations are checked too, not skipped.
      skipLibCheck: false, types, typeRoots: [join(REPO, 'node_modules/@types')],
    },
    files,
  });
}

describe('the packed package in an empty project', { timeout: 240_000 }, () => {
  let scratch: { dir: string; cleanup(): void };
  let project: string;
  let files: string[];

  before(async () => {
    scratch = scratchDir('vblk-package-');
    // Without scripts: the tarball takes the dist/ this test run was compiled to (a plain
    // `npm pack` runs prepare, which compiles the same sources again).
    const pack = await run('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', scratch.dir], { cwd: REPO });
    const [info] = JSON.parse(pack.stdout) as { filename: string; files: { path: string }[] }[];
    files = info.files.map((f) => f.path);
    project = join(scratch.dir, 'project');
    mkdirSync(project);
    // npm 11 wants a project to allow a dependency's install scripts (older npm runs them anyway).
    writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module', allowScripts: { vblk: true } }));
    await run('npm', ['install', '--no-audit', '--no-fund', join(scratch.dir, info.filename)], { cwd: project });
    writeFileSync(join(project, 'my-backend.ts'), MY_BACKEND);
    writeFileSync(join(project, 'program.ts'), PROGRAM);
    writeFileSync(join(project, 'nbd-program.ts'), NBD_PROGRAM);
    writeFileSync(join(project, 'compliance.test.mjs'), COMPLIANCE);
  });
  after(() => scratch.cleanup());

  it('the tarball holds the library with its types, the addon sources and the install script, and no tests', () => {
    for (const f of ['dist/src/index.js', 'dist/src/index.d.ts', 'dist/src/node/index.d.ts', 'dist/src/testing/index.d.ts',
      'dist/src/cli/main.js', 'binding.gyp', 'addon/vblk_native.c', 'scripts/install-addon.mjs', 'README.md']) {
      assert.ok(files.includes(f), f);
    }
    assert.deepEqual(files.filter((f) => /\.test\.|\.map$|^(test|bench|examples|src)\//.test(f)), []);
  });

  it('npm install built the addon, and npx vblk --help runs', async () => {
    assert.ok(existsSync(join(project, 'node_modules/vblk/build/Release/vblk_native.node')));
    const help = await run('npx', ['vblk', '--help'], { cwd: project });
    assert.match(help.stdout, /^Usage: vblk <command>/);
    assert.match(help.stdout, /serve .*your own backend/);
  });

  it('a TypeScript backend type-checks against the exported BlockBackend, with no Node.js types', async () => {
    writeFileSync(join(project, 'tsconfig.json'), tsconfig(['my-backend.ts'], []));
    await run(process.execPath, [TSC, '-p', 'tsconfig.json'], { cwd: project });
    assert.ok(existsSync(join(project, 'my-backend.js')));
    // And a type error is one: the check is real.
    writeFileSync(join(project, 'wrong.ts'), "import type { BlockBackend } from 'vblk';\nexport const b: BlockBackend = { size: 512 };\n");
    writeFileSync(join(project, 'tsconfig.wrong.json'), tsconfig(['wrong.ts'], []));
    await assert.rejects(run(process.execPath, [TSC, '-p', 'tsconfig.wrong.json', '--noEmit'], { cwd: project }),
      (e: { stdout?: string }) => /is missing the following properties from type 'BlockBackend'/.test(e.stdout ?? ''));
  });

  it('vblk/node and vblk/testing work from a program: a loopback disk, serve() and connect()', async () => {
    writeFileSync(join(project, 'tsconfig.program.json'), tsconfig(['program.ts'], ['node']));
    await run(process.execPath, [TSC, '-p', 'tsconfig.program.json'], { cwd: project });
    const r = await run(process.execPath, ['program.js', join(scratch.dir, 'program.sock')], { cwd: project, timeout: 30_000 });
    assert.equal(r.stdout.trim(), 'ROUND-TRIP-OK');
  });

  it('vblk/node serves an NBD export from a program: qemu-nbd\'s image read and written through openNbdBackend, serve() and connect()',
    { skip: requirePeer('qemu-nbd') }, async () => {
      const image = join(scratch.dir, 'nbd.img');
      const bytes = Buffer.alloc(1 << 20);
      bytes.write('hello over NBD', 512, 'latin1');
      writeFileSync(image, bytes);
      const nbd = await startQemuNbd(image, join(scratch.dir, 'nbd.sock'));
      try {
        writeFileSync(join(project, 'tsconfig.nbd.json'), tsconfig(['nbd-program.ts'], ['node']));
        await run(process.execPath, [TSC, '-p', 'tsconfig.nbd.json'], { cwd: project });
        const r = await run(process.execPath, ['nbd-program.js', nbd.uri, join(scratch.dir, 'nbd-program.sock')], { cwd: project, timeout: 30_000 });
        assert.equal(r.stdout.trim(), 'hello over NBD');
      } finally {
        await nbd.stop();
      }
      assert.equal(readFileSync(image).subarray(1024, 1024 + 14).toString('latin1'), 'hello over NBD');
    });

  it('the exported compliance suite runs on the backend with node --test', async (t) => {
    const probe = await run(process.execPath, ['--input-type=module', '-e', "const m = await import('vblk/testing'); console.log(typeof m.backendComplianceSuite);"], { cwd: project });
    if (probe.stdout.trim() !== 'function') {
      t.skip('this build of vblk/testing has no backendComplianceSuite');
      return;
    }
    assert.ok(existsSync(join(project, 'my-backend.js')), 'compiled by the type-check test');
    // A runner of its own, not a subtest of this one: without the context node --test sets.
    const env = { ...process.env };
    delete env.NODE_TEST_CONTEXT;
    const r = await run(process.execPath, ['--test', '--test-reporter=tap', 'compliance.test.mjs'], { cwd: project, env, timeout: 120_000 });
    assert.match(r.stdout, /^# fail 0$/m);
    assert.doesNotMatch(r.stdout, /^# pass 0$/m);
  });

  it('npx vblk serve --backend ./my-backend.js serves it, and npx vblk read returns its bytes', async () => {
    assert.ok(existsSync(join(project, 'my-backend.js')), 'compiled by the type-check test');
    const socket = join(scratch.dir, 'my.sock');
    const served = await launchServe('npx', ['vblk', 'serve', '--backend', './my-backend.js', '--backend-opt', 'size=65536', '--socket', socket],
      socket, { cwd: project, processGroup: true });
    try {
      assert.match(served.log(), /serving backend module \.\/my-backend\.js \(65536 bytes\)/);
      const read = await run('npx', ['vblk', 'read', '--socket', socket, '--offset', '0', '--length', '512'], { cwd: project, encoding: 'buffer' });
      const expected = Buffer.alloc(512);
      expected.write('hello from my-backend', 'latin1');
      assert.deepEqual(read.stdout, expected);
    } finally {
      await served.stop();
      await served.waitForLog(/stopped/);
    }
  });
});
