// Helpers for the qcow2 create/check tests: qemu-img and qemu-io on images written to a
// temporary directory.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryImageFile } from '../../src/backends/qcow2/memory-image-file.js';
import { requirePeer } from '../../scripts/guest/guest.js';

/** Skip message when qemu-img/qemu-io are missing (throws with CI=true), else false. */
export const qemuSkip = requirePeer('qemu-img', 'qemu-io');

export interface TempDir {
  readonly path: string;
  file(name: string): string;
  remove(): void;
}

export function tempDir(): TempDir {
  const path = mkdtempSync(join(tmpdir(), 'vblk-qcow2-'));
  return { path, file: (name) => join(path, name), remove: () => rmSync(path, { recursive: true, force: true }) };
}

export function writeImage(path: string, file: MemoryImageFile): void {
  writeFileSync(path, file.bytes());
}

export function readImage(path: string): MemoryImageFile {
  return new MemoryImageFile(new Uint8Array(readFileSync(path)));
}

/** `qemu-img check --output=json`: its report, whatever the exit status (2: corruptions, 3: leaks). */
export function qemuCheck(path: string, repair?: 'leaks' | 'all'): Record<string, number | string> {
  const args = ['check', '--output=json', ...(repair ? ['-r', repair] : []), path];
  const result = spawnSync('qemu-img', args, { encoding: 'utf8' });
  if (!result.stdout.trim()) throw new Error(`qemu-img check printed nothing (status ${result.status}): ${result.stderr}`);
  return JSON.parse(result.stdout) as Record<string, number | string>;
}

export function qemuInfo(path: string): Record<string, unknown> {
  return JSON.parse(execFileSync('qemu-img', ['info', '--output=json', path], { encoding: 'utf8' })) as Record<string, unknown>;
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

export function qemuIo(path: string, ...commands: string[]): string {
  return execFileSync('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), path], { encoding: 'utf8' });
}

/** sha256 of the image's guest-visible contents (`qemu-img convert -O raw`). */
export function rawDigest(path: string, dir: TempDir): string {
  const raw = dir.file(`raw-${Math.random().toString(36).slice(2)}`);
  execFileSync('qemu-img', ['convert', '-O', 'raw', path, raw]);
  const digest = execFileSync('sha256sum', [raw], { encoding: 'utf8' }).split(' ')[0];
  rmSync(raw);
  return digest;
}
