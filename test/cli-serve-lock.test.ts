// The image lock of `vblk serve`, between real processes: two writers refuse to share an
// image, readers share one, --force-share overrides, the lock goes with the process; and
// QEMU's own tools (qemu-storage-daemon, qemu-io) and vblk see each other's locks.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeer } from '../scripts/guest/guest.js';
import { connect } from '../src/node/connect.js';
import { pattern } from './support/pattern.js';
import { waitUntil } from './support/wait.js';
import { runCli, scratchDir, startServe, type Served } from './e2e/serve-helpers.js';
import { startQsd, type Qsd } from './e2e/qsd-helpers.js';

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-serve-lock-');
});
after(() => scratch.cleanup());

let images = 0;
function newImage(): string {
  const image = join(scratch.dir, `disk${++images}.img`);
  writeFileSync(image, '');
  truncateSync(image, 1 << 20);
  return image;
}
const sock = (name: string): string => join(scratch.dir, `${name}.sock`);

/** Runs `body` with `vblk serve` processes started one after another; every one must stop cleanly. */
async function withServes(starts: [string, string, string[]][], body: (s: Served[]) => Promise<void>): Promise<void> {
  const served: Served[] = [];
  try {
    for (const [image, socket, extra] of starts) served.push(await startServe(image, socket, extra));
    await body(served);
  } finally {
    for (const s of served) assert.equal(await s.stop(), 0, s.log());
  }
}

function lockedLine(image: string, doing: string): string {
  return `vblk serve: image ${image} is in use: another process (vblk serve, QEMU, qemu-storage-daemon …) ${doing}; --force-share serves it anyway\n`;
}

async function refused(args: string[], line: string): Promise<void> {
  const r = await runCli(['serve', ...args]);
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.stderr, line);
}

test('a second writable serve of one image refuses with one line naming the image and --force-share, and exit status 1', async () => {
  const image = newImage();
  await withServes([[image, sock('w1'), []]], async () => {
    await refused([image, '--socket', sock('w2')], lockedLine(image, 'writes to it'));
    await refused([image, '--socket', sock('w2'), '--read-only'], lockedLine(image, 'writes to it'));
  });
});

test('with --force-share a second serve starts, warns, and both serve the same bytes', async () => {
  const image = newImage();
  await withServes([[image, sock('f1'), []], [image, sock('f2'), ['--force-share']]], async ([, second]) => {
    assert.match(second.log(), new RegExp(`^vblk serve: --force-share: other processes may use ${image} at the same time$`, 'm'));
    const [a, b] = await Promise.all([connect(sock('f1')), connect(sock('f2'))]);
    try {
      const block = pattern(4096, 5);
      await a.driver.write(8, [block]);
      await a.driver.flush();
      const back = new Uint8Array(4096);
      await b.driver.read(8, [back]);
      assert.deepEqual(back, block);
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });
});

test('read-only serves share an image, and keep a writer out', async () => {
  const image = newImage();
  await withServes([[image, sock('r1'), ['--read-only']], [image, sock('r2'), ['--read-only']]], async () => {
    await refused([image, '--socket', sock('r3')], lockedLine(image, 'lets no other process write to it'));
  });
});

test('the lock goes with the process: after SIGTERM, and after SIGKILL, the next writer starts', async () => {
  const image = newImage();
  const first = await startServe(image, sock('k1'));
  assert.equal(await first.stop(), 0);
  const second = await startServe(image, sock('k2'));
  second.proc.kill('SIGKILL');
  await second.exited;
  await withServes([[image, sock('k3'), []]], async () => {});
});

test('an image that --size creates is locked as well', async () => {
  const image = join(scratch.dir, 'created.img');
  await withServes([[image, sock('c1'), ['--size', '1M']]], async () => {
    await refused([image, '--socket', sock('c2')], lockedLine(image, 'writes to it'));
  });
});

/** A qcow2 overlay over a new raw image: [overlay, its backing file]. */
async function newOverlay(): Promise<[string, string]> {
  const base = newImage();
  const overlay = `${base}.qcow2`;
  const r = await runCli(['image', 'create', '--backing', base, '--backing-format', 'raw', overlay]);
  assert.equal(r.code, 0, r.stderr);
  return [overlay, base];
}

test('the backing file of a served overlay is locked for reading: a writer refuses, a reader shares it, --force-share lets a writer in', async () => {
  const [overlay, base] = await newOverlay();
  await withServes([[overlay, sock('b1'), []]], async () => {
    await refused([base, '--socket', sock('b2')], lockedLine(base, 'lets no other process write to it'));
    await withServes([[base, sock('b2'), ['--read-only']]], async () => {});
    await withServes([[base, sock('b5'), ['--force-share']]], async () => {});
  });
  // And the other way round: an overlay whose backing file another process writes.
  await withServes([[base, sock('b3'), []]], async () => {
    await refused([overlay, '--socket', sock('b4')], lockedLine(base, 'writes to it'));
    await withServes([[overlay, sock('b4'), ['--force-share']]], async () => {});
  });
});

test('vblk image check refuses an image vblk serve writes (--force-share checks it anyway), and --repair any image in use', async () => {
  const [overlay] = await newOverlay();
  const check = (...args: string[]) => runCli(['image', 'check', overlay, ...args]);
  await withServes([[overlay, sock('c1'), []]], async () => {
    const r = await check();
    assert.equal(r.code, 1, r.stderr);
    assert.equal(r.stderr, `vblk image check: image ${overlay} is in use: another process (vblk serve, QEMU, qemu-storage-daemon …) writes to it; --force-share checks it anyway\n`);
    const shared = await check('--force-share');
    assert.equal(shared.code, 0, shared.stderr);
    const repair = await check('--repair');
    assert.equal(repair.code, 1, repair.stderr);
    assert.match(repair.stderr, /^vblk image check: image .* is in use: another process .* writes to it\n$/);
    const both = await check('--repair', '--force-share');
    assert.equal(both.code, 1, 'a bad command line: the check could not run');
    assert.match(both.stderr, /^vblk image check: --force-share cannot go with --repair/);
  });
  await withServes([[overlay, sock('c2'), ['--read-only']]], async () => {
    assert.equal((await check()).code, 0, 'a check shares the image with readers');
    const repair = await check('--repair');
    assert.equal(repair.code, 1, 'a repair needs it to itself');
    assert.match(repair.stderr, /keeps writers out|lets no other process write to it/);
  });
  assert.equal((await check('--repair')).code, 0, 'free again');
});

test('--force-share with an NBD source is a usage error', async () => {
  const r = await runCli(['serve', 'nbd://localhost/x', '--socket', sock('nbd'), '--force-share']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /^vblk serve: --force-share is for an image file/);
});

/** Runs one of QEMU's tools to its end: its exit status and all it printed. */
function qemuTool(tool: string, args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    execFile(tool, args, { timeout: 30_000, encoding: 'utf8' }, (e, stdout, stderr) => {
      resolve({ code: e === null ? 0 : typeof e.code === 'number' ? e.code : -1, output: stdout + stderr });
    });
  });
}

function qemuIo(image: string, command: string, readOnly = false): Promise<{ code: number; output: string }> {
  return qemuTool('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), '-c', command, image]);
}

/** A stopped QEMU (-S, no guest) with `image` as a virtio -drive, holding its locks. */
async function withQemuDrive(image: string, drive: string, body: () => Promise<void>): Promise<void> {
  const args = ['-accel', 'tcg', '-nodefaults', '-display', 'none', '-S', '-drive', `file=${image},format=raw,if=virtio${drive}`];
  const qemu = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  qemu.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => qemu.on('close', () => resolve()));
  try {
    const ino = statSync(image).ino;
    // Its lock on byte 100, taken as the drive opens, says QEMU is ready.
    await waitUntil(() => qemu.exitCode !== null || readFileSync('/proc/locks', 'utf8').split('\n').some((l) => l.includes(`:${ino} 100 `)), {
      what: 'QEMU to lock its -drive', timeoutMs: 30_000,
    });
    assert.equal(qemu.exitCode, null, stderr);
    await body();
  } finally {
    qemu.kill('SIGKILL');
    await exited;
  }
}

describe('vblk and QEMU 7.2 see each other\'s image locks', { skip: requirePeer('qemu-storage-daemon', 'qemu-io', 'qemu-img', 'qemu-system-x86_64') }, () => {
  const withQsd = async (image: string, writable: boolean, body: (q: Qsd) => Promise<void>): Promise<void> => {
    const name = `qsd${images}${writable ? 'w' : 'r'}`;
    const q = await startQsd(image, sock(name), sock(`${name}-qmp`), { writable });
    try {
      await body(q);
    } finally {
      await q.stop();
    }
  };

  test('vblk serve refuses an image a writable qemu-storage-daemon export holds, and starts beside it with --force-share', async () => {
    const image = newImage();
    await withQsd(image, true, async () => {
      await refused([image, '--socket', sock('q1')], lockedLine(image, 'writes to it'));
      await refused([image, '--socket', sock('q1'), '--read-only'], lockedLine(image, 'writes to it'));
      await withServes([[image, sock('q1'), ['--force-share']]], async () => {});
    });
  });

  test('qemu-storage-daemon and qemu-io refuse to write an image vblk serve holds, even a read-only one', async () => {
    for (const extra of [[], ['--read-only']]) {
      const image = newImage();
      await withServes([[image, sock('q2'), extra]], async () => {
        await assert.rejects(withQsd(image, true, async () => {}), /Failed to get "write" lock/);
        const w = await qemuIo(image, 'write 0 512');
        assert.notEqual(w.code, 0, w.output);
        assert.match(w.output, /Failed to get "write" lock/);
      });
    }
  });

  test('QEMU refuses a -drive on an image vblk serve holds, and vblk serve one a QEMU -drive holds (a read-only one too)', async () => {
    const image = newImage();
    await withServes([[image, sock('d1'), []]], async () => {
      const r = await new Promise<string>((resolve) => {
        execFile('qemu-system-x86_64', ['-accel', 'tcg', '-nodefaults', '-display', 'none', '-S', '-drive', `file=${image},format=raw,if=virtio`],
          { timeout: 30_000 }, (_e, _out, err) => resolve(err));
      });
      assert.match(r, /Failed to get "write" lock/);
    });
    await withQemuDrive(image, '', async () => {
      await refused([image, '--socket', sock('d2')], lockedLine(image, 'writes to it'));
    });
    await withQemuDrive(image, ',readonly=on', async () => {
      await refused([image, '--socket', sock('d3')], lockedLine(image, 'lets no other process write to it'));
      await withServes([[image, sock('d3'), ['--read-only']]], async () => {});
    });
  });

  test('qemu-io refuses to write the backing file of an overlay vblk serve holds', async () => {
    const [overlay, base] = await newOverlay();
    await withServes([[overlay, sock('q5'), []]], async () => {
      const w = await qemuIo(base, 'write 0 512');
      assert.notEqual(w.code, 0, w.output);
      assert.match(w.output, /Failed to get "write" lock/);
      const r = await qemuIo(base, 'read 0 512', true);
      assert.equal(r.code, 0, r.output);
    });
  });

  test('vblk image info refuses an image vblk serve writes as qemu-img info does, and both show it with --force-share (-U) or when the serve only reads', async () => {
    const [overlay] = await newOverlay();
    const qemuImgInfo = (...args: string[]) => qemuTool('qemu-img', ['info', ...args, overlay]);
    const info = (...args: string[]) => runCli(['image', 'info', overlay, ...args]);
    await withServes([[overlay, sock('i1'), []]], async () => {
      const q = await qemuImgInfo();
      assert.equal(q.code, 1, q.output);
      assert.match(q.output, /Failed to get shared "write" lock/);
      const r = await info();
      assert.equal(r.code, 1, r.stderr);
      assert.equal(r.stderr, `vblk image info: image ${overlay} is in use: another process (vblk serve, QEMU, qemu-storage-daemon …) writes to it; --force-share shows it anyway\n`);
      assert.equal((await qemuImgInfo('-U')).code, 0);
      const shared = await info('--force-share', '--json');
      assert.equal(shared.code, 0, shared.stderr);
      assert.equal(JSON.parse(shared.stdout.toString()).format, 'qcow2');
    });
    await withServes([[overlay, sock('i2'), ['--read-only']]], async () => {
      assert.equal((await qemuImgInfo()).code, 0);
      assert.equal((await info()).code, 0);
    });
  });

  test('a read-only qemu-storage-daemon export and a read-only vblk serve share an image, in either order', async () => {
    const image = newImage();
    await withQsd(image, false, async () => {
      await withServes([[image, sock('q3'), ['--read-only']]], async () => {});
    });
    await withServes([[image, sock('q4'), ['--read-only']]], async () => {
      await withQsd(image, false, async () => {});
    });
  });
});
