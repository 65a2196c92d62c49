import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ImageLockError, lockImage, type ImageLock } from './image-lock.js';

// OFD locks belong to an open file, not a process: two locks taken in this one process
// conflict exactly as two processes' would, so the rules are testable here.

function withImage(body: (path: string) => void): void {
  const dir = mkdtempSync(join(tmpdir(), 'vblk-image-lock-'));
  const path = join(dir, 'disk.img');
  writeFileSync(path, Buffer.alloc(4096));
  try {
    body(path);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The bytes of `path` under a lock, as /proc/locks lists them: "OFDLCK READ 100-101" (the
 * kernel merges one open file's adjacent ranges, for QEMU's locks as for ours).
 */
function locksOn(path: string): string[] {
  const ino = statSync(path).ino;
  return readFileSync('/proc/locks', 'utf8').split('\n')
    .map((l) => l.replace(/^\d+:\s+(->\s+)?/, '').split(/\s+/))
    .filter((f) => f.length >= 7 && f[4].endsWith(`:${ino}`))
    .map((f) => `${f[0]} ${f[2]} ${f[5]}-${f[6]}`)
    .sort();
}

test('a writer holds QEMU\'s bytes for reading and writing and for sharing no write (100, 101, 201), as a QEMU -drive does', () => {
  withImage((path) => {
    const lock = lockImage(path, { readOnly: false });
    // What a QEMU 7.2 guest's writable -drive shows in /proc/locks.
    assert.deepEqual(locksOn(path), ['OFDLCK READ 100-101', 'OFDLCK READ 201-201']);
    lock.release();
    assert.deepEqual(locksOn(path), []);
  });
});

test('a reader holds 100 and 201; with share, a writer holds 100 and 101 only, as a qemu-storage-daemon export does', () => {
  withImage((path) => {
    const reader = lockImage(path, { readOnly: true });
    assert.deepEqual(locksOn(path), ['OFDLCK READ 100-100', 'OFDLCK READ 201-201']);
    reader.release();
    const sharing = lockImage(path, { readOnly: false, share: true });
    // What a writable qemu-storage-daemon 7.2 export shows.
    assert.deepEqual(locksOn(path), ['OFDLCK READ 100-101']);
    sharing.release();
  });
});

test('a second writer, a reader beside a writer and a writer beside a reader are refused with one line naming the image', () => {
  withImage((path) => {
    const refused = (first: { readOnly: boolean }, second: { readOnly: boolean }, doing: string): void => {
      const held = lockImage(path, first);
      try {
        assert.throws(() => lockImage(path, second), (e: unknown) => {
          assert.ok(e instanceof ImageLockError);
          assert.equal(e.code, 'IMAGE_LOCKED');
          assert.equal(e.message, `image ${path} is in use: another process (vblk serve, QEMU, qemu-storage-daemon …) ${doing}`);
          return true;
        });
      } finally {
        held.release();
      }
    };
    refused({ readOnly: false }, { readOnly: false }, 'writes to it');
    refused({ readOnly: false }, { readOnly: true }, 'writes to it');
    refused({ readOnly: true }, { readOnly: false }, 'lets no other process write to it');
    // A refusal leaves nothing behind: the first's locks only, and then none.
    assert.deepEqual(locksOn(path), []);
  });
});

test('readers share the image, and release lets a writer in', () => {
  withImage((path) => {
    const readers: ImageLock[] = [lockImage(path, { readOnly: true }), lockImage(path, { readOnly: true })];
    assert.throws(() => lockImage(path, { readOnly: false }), ImageLockError);
    readers.forEach((r) => r.release());
    lockImage(path, { readOnly: false }).release();
  });
});

test('share takes an image held by another writer, and still keeps out a later process that shares nothing', () => {
  withImage((path) => {
    const first = lockImage(path, { readOnly: false });
    const second = lockImage(path, { readOnly: false, share: true });
    first.release();
    assert.throws(() => lockImage(path, { readOnly: true }), /writes to it/);
    second.release();
    second.release();
  });
});
