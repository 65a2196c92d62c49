// The qcow2 acceptance tests' oracle: QEMU's own tools (qemu-img, qemu-io) make the
// images, say what every byte of them reads as (`qemu-img convert -O raw`) and whether
// their metadata is sound (`qemu-img check`); our driver reads and writes them through a
// real `vblk serve` socket.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, openSync, readSync, statSync } from 'node:fs';
import { BlkDriver, type BlkDriverOptions } from '../../src/blk/driver.js';
import { connectVhostUser, type ConnectOptions } from '../../src/node/vhost-user-client.js';
import { VIRTIO_BLK_SECTOR_SIZE as SECTOR } from '../../src/spec/virtio-blk.js';

/** The QEMU tools every qcow2 acceptance test needs. */
export const QEMU_TOOLS = ['qemu-img', 'qemu-io'] as const;

/** Runs qemu-img and returns its stdout; throws with its stderr when it fails. */
export function qemuImg(...args: string[]): string {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')} exited with ${r.status}: ${r.stderr.trim() || r.stdout.trim()}`);
  return r.stdout;
}

/** Runs each command with qemu-io on `image` (opened once, as `format`). */
export function qemuIo(image: string, format: 'raw' | 'qcow2', commands: readonly string[]): void {
  const args = ['-f', format, ...commands.flatMap((c) => ['-c', c]), image];
  const out = execFileSync('qemu-io', args, { encoding: 'utf8' });
  // qemu-io prints a failed command's error and still exits 0.
  const failed = out.split('\n').find((l) => /error|failed|cannot|invalid/i.test(l));
  if (failed !== undefined) throw new Error(`qemu-io ${args.join(' ')}: ${failed}`);
}

/** What `qemu-img check --output=json` reports (absent counts are 0). */
export interface CheckResult {
  readonly corruptions: number;
  readonly leaks: number;
  readonly checkErrors: number;
  readonly text: string;
}

/** `qemu-img check` of a qcow2 image: exits 2 on corruption and 3 on leaks, with JSON either way. */
export function qemuImgCheck(image: string): CheckResult {
  const r = spawnSync('qemu-img', ['check', '--output=json', '-f', 'qcow2', image], { encoding: 'utf8' });
  const start = r.stdout.indexOf('{');
  if (start < 0) throw new Error(`qemu-img check ${image} exited with ${r.status} and no report: ${r.stderr.trim()}`);
  const j = JSON.parse(r.stdout.slice(start)) as Record<string, number | undefined>;
  return { corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, checkErrors: j['check-errors'] ?? 0, text: `${r.stdout}${r.stderr}` };
}

/** `qemu-img compare` of two images: identical or the first difference it names. */
export function qemuImgCompare(a: string, aFormat: string, b: string, bFormat: string): { identical: boolean; text: string } {
  const r = spawnSync('qemu-img', ['compare', '-f', aFormat, '-F', bFormat, a, b], { encoding: 'utf8' });
  if (r.status !== 0 && r.status !== 1) throw new Error(`qemu-img compare exited with ${r.status}: ${r.stderr.trim()}`);
  return { identical: r.status === 0, text: (r.stdout + r.stderr).trim() };
}

/** SHA-256 of a file's bytes. */
export function sha256File(path: string): string {
  const hash = createHash('sha256');
  const buf = new Uint8Array(1 << 20);
  const fd = openSync(path, 'r');
  try {
    for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0;) hash.update(buf.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}

/** Bytes allocated to a file (st_blocks), what `du` shows. */
export function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

const CONNECT: ConnectOptions = { memorySize: 32 << 20, replyTimeoutMs: 10_000 };

/** Our driver on a vhost-user socket (`vblk serve`), with a way to let go of it. */
export async function openDisk(socket: string, options: BlkDriverOptions = {}): Promise<{ driver: BlkDriver; close(): Promise<void> }> {
  const transport = await connectVhostUser(socket, CONNECT);
  const driver = await BlkDriver.probe(transport, { queues: 1, timeoutMs: 60_000, ...options });
  return {
    driver,
    close: async () => {
      // The device may be dead (a killed serve): removal then fails and the transport still closes.
      await driver.remove().catch(() => {});
      await transport.close();
    },
  };
}

/** The chunk the whole-disk comparisons read at a time. */
const COMPARE_CHUNK = 1 << 20;

/**
 * Reads the whole disk through the driver and compares it with a raw file of the same
 * size, chunk by chunk; fails naming the first differing byte and what each side holds.
 * Returns the SHA-256 of what the driver read.
 */
export async function assertDiskEqualsRaw(driver: BlkDriver, raw: string, what: string): Promise<string> {
  const size = statSync(raw).size;
  if (driver.capacity * SECTOR !== size) throw new Error(`${what}: the disk has ${driver.capacity * SECTOR} bytes, the raw image ${size}`);
  const hash = createHash('sha256');
  const got = new Uint8Array(COMPARE_CHUNK);
  const want = new Uint8Array(COMPARE_CHUNK);
  const fd = openSync(raw, 'r');
  try {
    for (let at = 0; at < size; at += COMPARE_CHUNK) {
      const n = Math.min(COMPARE_CHUNK, size - at);
      await driver.read(at / SECTOR, [got.subarray(0, n)]);
      readSync(fd, want, 0, n, at);
      hash.update(got.subarray(0, n));
      if (Buffer.compare(got.subarray(0, n), want.subarray(0, n)) !== 0) {
        let i = 0;
        while (got[i] === want[i]) i++;
        throw new Error(`${what}: byte ${at + i} (cluster of 64 KiB ${Math.floor((at + i) / 65536)}) reads 0x${got[i].toString(16)} through vblk, ` +
          `0x${want[i].toString(16)} through qemu-img convert`);
      }
    }
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}
