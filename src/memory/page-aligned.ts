/**
 * Zeroed byte arrays that start on a page. A 4 KiB block copied between page-aligned
 * buffers touches one page on each side; from the 16-byte offset at which malloc hands
 * out large arrays it touches two on each side, and on this project's machines such a
 * copy runs at 0.8 of the page-aligned rate, at 0.75 with only the destination aligned
 * (`node dist/bench/page-aligned-copy.js`). JavaScript cannot choose where an
 * ArrayBuffer starts, but a WebAssembly.Memory always starts on a page, so memory that
 * blocks are copied in and out of (loopback guest memory, the memory backend's chunks)
 * comes from one when the engine has WebAssembly.
 *
 * Costs: the size is rounded up to whole 64 KiB WebAssembly pages, and V8 reserves about
 * 10 GiB of address space (not memory) per WebAssembly.Memory, so callers allocate a few
 * large arrays, not many small ones. Where WebAssembly is missing (V8 in jitless mode)
 * or the allocation fails, the array is an ordinary one.
 */

/** Bytes per WebAssembly page: the unit (and alignment) of a WebAssembly.Memory. */
export const WASM_PAGE_SIZE = 65536;
/** WebAssembly pages a (32-bit) WebAssembly.Memory can hold: 4 GiB. */
const MAX_WASM_PAGES = 65536;

/** The part of the WebAssembly API used here (the ES library types do not include it). */
interface WasmApi {
  readonly Memory: new (descriptor: { initial: number; maximum: number }) => { readonly buffer: ArrayBuffer };
}

/** A zeroed array of `size` bytes whose first byte starts a page when the engine allows. */
export function pageAlignedBytes(size: number): Uint8Array {
  const pages = Math.ceil(size / WASM_PAGE_SIZE);
  const wasm = (globalThis as { WebAssembly?: WasmApi }).WebAssembly;
  if (wasm !== undefined && size > 0 && pages <= MAX_WASM_PAGES) {
    try {
      const memory = new wasm.Memory({ initial: pages, maximum: pages });
      return new Uint8Array(memory.buffer, 0, size);
    } catch {
      // Out of address space or memory for WebAssembly: an ordinary array still works.
    }
  }
  return new Uint8Array(size);
}
