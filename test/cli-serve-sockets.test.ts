// `vblk serve IMAGE --socket A --socket B` — the real CLI in a child process — serves the
// one image to two frontends at the same time, each on its own socket with its own
// device: what one writes the other reads, a resize reaches both, stats and metrics name
// each socket, either can reconnect while the other stays, and SIGTERM stops both.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ResizeEvent } from '../src/blk/driver.js';
import { connect, type ConnectedDisk } from '../src/node/connect.js';
import { pattern } from './support/pattern.js';
import { waitUntil } from './support/wait.js';
import { runCli, scratchDir, startServe, type Served } from './e2e/serve-helpers.js';

const MiB = 1 << 20;
const SECTORS_PER_MIB = MiB / 512;

let scratch: { dir: string; cleanup(): void };
before(() => {
  scratch = scratchDir('vblk-serve-sockets-');
});
after(() => scratch.cleanup());

/** A fresh 8 MiB image served on sockets `name-a.sock` and `name-b.sock`; stopped cleanly at the end. */
async function withTwoSockets(name: string, extra: string[], body: (s: Served, a: string, b: string) => Promise<void>): Promise<void> {
  const image = join(scratch.dir, `${name}.img`);
  writeFileSync(image, '');
  truncateSync(image, 8 * MiB);
  const a = join(scratch.dir, `${name}-a.sock`);
  const b = join(scratch.dir, `${name}-b.sock`);
  const s = await startServe(image, a, ['--socket', b, ...extra]);
  try {
    await body(s, a, b);
  } finally {
    assert.equal(await s.stop(), 0, s.log());
  }
}

async function closeAll(disks: (ConnectedDisk | undefined)[]): Promise<void> {
  await Promise.all(disks.map((d) => d?.close()));
}

test('the startup line names every socket, and two drivers are connected at once without waiting', async () => {
  await withTwoSockets('both', [], async (s, a, b) => {
    assert.match(s.log(), new RegExp(`serving .* on ${a}, ${b}$`, 'm'));
    const [da, db] = await Promise.all([connect(a), connect(b)]);
    try {
      await s.waitForLog(new RegExp(`^vblk serve: ${a}: frontend 1 connected$`));
      await s.waitForLog(new RegExp(`^vblk serve: ${b}: frontend 1 connected$`));
      assert.equal(da.driver.sizeBytes, 8 * MiB);
      assert.equal(db.driver.sizeBytes, 8 * MiB);
      assert.doesNotMatch(s.log(), /waiting/);
    } finally {
      await closeAll([da, db]);
    }
  });
});

test('two drivers write different regions at the same time through two sockets, and each reads what the other wrote', async () => {
  await withTwoSockets('data', [], async (_s, a, b) => {
    const [da, db] = await Promise.all([connect(a), connect(b)]);
    try {
      // 64 writes of 16 KiB per driver, all in flight together, interleaved over the disk:
      // A takes the even 16 KiB blocks of the first 2 MiB, B the odd ones.
      const BLOCK = 16 * 1024;
      const blocks = (first: number): number[] => Array.from({ length: 64 }, (_, i) => (2 * i + first) * (BLOCK / 512));
      const data = (sector: number): Uint8Array => pattern(BLOCK, sector + 1);
      await Promise.all([
        ...blocks(0).map((sector) => da.driver.write(sector, [data(sector)])),
        ...blocks(1).map((sector) => db.driver.write(sector, [data(sector)])),
      ]);
      const readThrough = async (d: ConnectedDisk, sectors: number[]): Promise<void> => {
        for (const sector of sectors) {
          const back = new Uint8Array(BLOCK);
          await d.driver.read(sector, [back]);
          assert.deepEqual(back, data(sector), `sector ${sector}`);
        }
      };
      await Promise.all([readThrough(db, blocks(0)), readThrough(da, blocks(1))]);
      // And a write through one after the other connected is seen through the other.
      const late = pattern(4096, 99);
      await db.driver.write(4 * SECTORS_PER_MIB, [late]);
      const back = new Uint8Array(4096);
      await da.driver.read(4 * SECTORS_PER_MIB, [back]);
      assert.deepEqual(back, late);
    } finally {
      await closeAll([da, db]);
    }
  });
});

test('vblk resize reaches the driver on each socket, and vblk stats reports each socket apart', async () => {
  const control = join(scratch.dir, 'resize.ctl');
  await withTwoSockets('resize', ['--control', control], async (_s, a, b) => {
    const [da, db] = await Promise.all([connect(a), connect(b)]);
    try {
      const seen: ResizeEvent[][] = [[], []];
      da.driver.on('resize', (e) => seen[0].push(e));
      db.driver.on('resize', (e) => seen[1].push(e));
      const r = await runCli(['resize', '--control', control, '12M']);
      assert.equal(r.code, 0, r.stderr);
      await waitUntil(() => seen[0].length > 0 && seen[1].length > 0, { what: 'both drivers to see the resize' });
      assert.equal(da.driver.sizeBytes, 12 * MiB);
      assert.equal(db.driver.sizeBytes, 12 * MiB);
      // Each socket can use the new space, and sees what the other wrote there.
      const tail = pattern(4096, 7);
      await da.driver.write(11 * SECTORS_PER_MIB, [tail]);
      const back = new Uint8Array(4096);
      await db.driver.read(11 * SECTORS_PER_MIB, [back]);
      assert.deepEqual(back, tail);

      const st = await runCli(['stats', '--control', control, '--json']);
      assert.equal(st.code, 0, st.stderr);
      const report = JSON.parse(st.stdout.toString()) as { sockets: { socket: string; disk_size_bytes: number; connected: boolean }[] };
      assert.deepEqual(report.sockets.map((x) => [x.socket, x.disk_size_bytes, x.connected]), [[a, 12 * MiB, true], [b, 12 * MiB, true]]);
    } finally {
      await closeAll([da, db]);
    }
  });
});

test('--metrics labels every series with its socket', async () => {
  await withTwoSockets('metrics', ['--metrics', '127.0.0.1:0'], async (s, a, b) => {
    const url = /metrics on (http:\/\/\S+)/.exec(await s.waitForLog(/metrics on http/))![1];
    const da = await connect(a);
    try {
      await da.driver.write(0, [pattern(4096, 1)]);
      const text = await (await fetch(url)).text();
      assert.match(text, new RegExp(`^vblk_frontend_connected\\{socket="${a}"\\} 1$`, 'm'));
      assert.match(text, new RegExp(`^vblk_frontend_connected\\{socket="${b}"\\} 0$`, 'm'));
      assert.match(text, new RegExp(`^vblk_bytes_total\\{socket="${a}",queue="0",direction="write"\\} 4096$`, 'm'));
      assert.match(text, new RegExp(`^vblk_bytes_total\\{socket="${b}",queue="0",direction="write"\\} 0$`, 'm'));
    } finally {
      await da.close();
    }
  });
});

test('either frontend reconnects while the other stays connected and keeps working', async () => {
  await withTwoSockets('reconnect', [], async (s, a, b) => {
    const db = await connect(b);
    let da: ConnectedDisk | undefined;
    try {
      for (let round = 1; round <= 3; round++) {
        da = await connect(a);
        const block = pattern(4096, round);
        await da.driver.write(8 * round, [block]);
        const back = new Uint8Array(4096);
        await db.driver.read(8 * round, [back]);
        assert.deepEqual(back, block, `round ${round}`);
        await da.close();
        da = undefined;
        await s.waitForLog(new RegExp(`^vblk serve: ${a}: frontend ${round} disconnected`));
      }
      // B never dropped: it is still its first frontend.
      assert.doesNotMatch(s.log(), new RegExp(`${b}: frontend 1 disconnected`));
      await db.driver.flush();
    } finally {
      await closeAll([da, db]);
    }
  });
});

test('a socket given twice, and a second socket already served by a live process, are refused', async () => {
  const image = join(scratch.dir, 'refuse.img');
  writeFileSync(image, '');
  truncateSync(image, MiB);
  const a = join(scratch.dir, 'refuse-a.sock');
  const dup = await runCli(['serve', image, '--socket', a, '--socket', a]);
  assert.equal(dup.code, 2);
  assert.equal(dup.stderr, `vblk serve: --socket ${a} is given twice\n`);

  const busy = join(scratch.dir, 'refuse-busy.sock');
  const other = join(scratch.dir, 'refuse-other.img');
  writeFileSync(other, '');
  truncateSync(other, MiB);
  const first = await startServe(other, busy);
  try {
    const r = await runCli(['serve', image, '--socket', a, '--socket', busy]);
    assert.equal(r.code, 1);
    const lines = r.stderr.trimEnd().split('\n');
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0], /^vblk serve: .*(address already in use|EADDRINUSE)/i);
  } finally {
    assert.equal(await first.stop(), 0);
  }
});
