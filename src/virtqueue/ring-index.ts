/**
 * Memory ordering for split rings: the one module through which ring indices and event
 * indices (avail.idx, used.idx, used_event, avail_event) and the ring flags are read and
 * published. The other side may be another process writing the same shared memory
 * (vhost-user) while our ArrayBuffer over it is not a SharedArrayBuffer.
 *
 * - Loads go through `Atomics.load`: the JIT may not hoist or merge them, so a polling
 *   loop really re-reads memory, and later plain loads of ring entries and descriptors
 *   are not moved above them (x86 is TSO: loads are not reordered with older loads).
 * - Stores go through `Atomics.store`, which is sequentially consistent: on x86 it
 *   compiles to XCHG, a full fence. So "write the index, then read the other side's
 *   event index" (2.7.7.2: the check must see memory after the publish) needs no extra
 *   barrier, and every ring entry written before it is visible before the index.
 *
 * All of that is for another thread or process working the same rings at the same time.
 * Memory nothing else can touch while we run (a loopback's own: `GuestMemory`'s
 * `exclusive`) is accessed plainly instead (`ordered` false): one thread sees its own
 * accesses in program order, and the fences are not free — each waits for every store
 * before it to land, a 4 KiB copy's included. Without them the loopback spends 4% less
 * CPU per request, 9% less with a backend that copies nothing (fresh processes,
 * interleaved rounds, as bench/ab.ts measures).
 *
 * Ring memory is little-endian and so are typed arrays on every platform Node runs on
 * that has this addon; {@link assertLittleEndian} refuses the rest loudly.
 */

/** Reads a ring index or flag word. */
export function loadIndex(view: Uint16Array, at: number, ordered: boolean): number {
  return ordered ? Atomics.load(view, at) : view[at];
}

/** Publishes a ring index or event index; when `ordered`, also a full fence (see module comment). */
export function publishIndex(view: Uint16Array, at: number, value: number, ordered: boolean): void {
  if (ordered) Atomics.store(view, at, value & 0xffff);
  else view[at] = value;
}

export function assertLittleEndian(): void {
  if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
    throw new Error('vblk needs a little-endian host: virtio rings are little-endian and are accessed through typed arrays');
  }
}

assertLittleEndian();
