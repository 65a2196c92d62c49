// A RAM disk that outlives `vblk serve`: a guest's flush (fsync, sync, a journal commit)
// saves it to a file that the next start loads; until then writes are volatile (canFlush).
//   vblk serve --backend ./custom-backend.js --backend-opt file=ram.img --backend-opt size=67108864 --socket S
import { existsSync, readFileSync } from 'node:fs';
import { open, rename } from 'node:fs/promises';
import { BackendError, checkDiskSize, checkRange, totalLength, type BlockBackend } from 'vblk';

export class SnapshotRamDisk implements BlockBackend {
  readonly readOnly = false;
  readonly canFlush = true;
  readonly canDiscard = true;
  readonly canWriteZeroes = true;
  private closed = false;
  constructor(private readonly bytes: Uint8Array, private readonly file?: string) {
    checkDiskSize(bytes.length);
  }
  get size(): number { return this.bytes.length; }
  read(offset: number, buffers: readonly Uint8Array[]): void {
    this.check(offset, totalLength(buffers));
    for (const b of buffers) { b.set(this.bytes.subarray(offset, offset + b.length)); offset += b.length; }
  }
  write(offset: number, buffers: readonly Uint8Array[]): void {
    this.check(offset, totalLength(buffers));
    for (const b of buffers) { this.bytes.set(b, offset); offset += b.length; }
  }
  discard(offset: number, length: number): void { this.writeZeroes(offset, length); }
  writeZeroes(offset: number, length: number): void { this.check(offset, length); this.bytes.fill(0, offset, offset + length); }
  async flush(): Promise<void> {
    this.check(0, 0);
    if (this.file === undefined) return;
    // A new file, synced, renamed over the old: a crash mid-save keeps the last snapshot.
    const f = await open(`${this.file}.new`, 'w');
    await f.writeFile(this.bytes).then(() => f.sync()).finally(() => f.close());
    await rename(`${this.file}.new`, this.file);
  }
  close(): void { this.closed = true; }
  private check(offset: number, length: number): void {
    if (this.closed) throw new BackendError('CLOSED', 'the RAM disk is closed');
    checkRange(this.size, offset, length);
  }
}

/** `--backend-opt file=PATH` (loaded when it exists, else created at the first flush), `size=BYTES` (default 64 MiB). */
export default function ({ file, size = String(64 << 20) }: Readonly<Record<string, string>>): SnapshotRamDisk {
  if (file !== undefined && existsSync(file)) return new SnapshotRamDisk(readFileSync(file), file);
  checkDiskSize(Number(size));
  return new SnapshotRamDisk(new Uint8Array(Number(size)), file);
}
