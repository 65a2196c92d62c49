// A whole backend in 20 lines: a disk in memory. Compile it, then serve it to a guest:
//   vblk serve --backend ./ram-disk.js --backend-opt size=67108864 --socket /tmp/vblk.sock
import { BackendError, checkRange, totalLength, type BlockBackend } from 'vblk';

export default function ramDisk(options: Readonly<Record<string, string>>): BlockBackend {
  let bytes: Uint8Array | null = new Uint8Array(Number(options.size ?? 64 << 20));
  const at = (offset: number, length: number): Uint8Array => {
    if (bytes === null) throw new BackendError('CLOSED', 'the RAM disk is closed');
    checkRange(bytes.length, offset, length); // a range past the end fails, never half-served
    return bytes.subarray(offset, offset + length);
  };
  const each = (buffers: readonly Uint8Array[], f: (b: Uint8Array, o: number) => void): void => {
    for (let o = 0, i = 0; i < buffers.length; o += buffers[i++].length) f(buffers[i], o);
  };
  return {
    size: bytes.length, readOnly: false, canFlush: false, canDiscard: true, canWriteZeroes: true,
    read: (offset, buffers) => { const d = at(offset, totalLength(buffers)); each(buffers, (b, o) => b.set(d.subarray(o, o + b.length))); },
    write: (offset, buffers) => { const d = at(offset, totalLength(buffers)); each(buffers, (b, o) => d.set(b, o)); },
    flush: () => void at(0, 0), // fails once closed, like every call
    discard: (offset, length) => void at(offset, length).fill(0),
    writeZeroes: (offset, length) => void at(offset, length).fill(0),
    close: () => { bytes = null; },
  };
}
