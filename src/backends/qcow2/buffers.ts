/**
 * Small helpers of the qcow2 driver's request path: views of part of a buffer list, and
 * a mutex for its asynchronous metadata sections.
 */

/** Views of `[start, start + length)` of a buffer list. */
export function sliceBuffers(buffers: readonly Uint8Array[], start: number, length: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let skip = start, left = length;
  for (const b of buffers) {
    if (left === 0) break;
    if (skip >= b.length) { skip -= b.length; continue; }
    const n = Math.min(b.length - skip, left);
    out.push(b.subarray(skip, skip + n));
    left -= n;
    skip = 0;
  }
  return out;
}

/** Copies `data` into a buffer list, in order. */
export function copyInto(bufs: readonly Uint8Array[], data: Uint8Array): void {
  let at = 0;
  for (const b of bufs) { b.set(data.subarray(at, at + b.length)); at += b.length; }
}

/** A promise-chain mutex: one async section at a time, in arrival order. */
export class Mutex {
  #tail: Promise<void> = Promise.resolve();
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.#tail;
    let release!: () => void;
    this.#tail = new Promise((r) => { release = r; });
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
