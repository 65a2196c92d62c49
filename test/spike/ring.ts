/**
 * The shared-memory ring of the ordering spike: one producer and one consumer in two
 * processes over the same memfd, the way a driver and a device share a virtqueue.
 *
 * The producer writes a whole payload slot with plain stores, then publishes its index
 * with `Atomics.store` on a 16-bit view (as `avail.idx` / `used.idx` are published). The
 * consumer polls that index with `Atomics.load`, reads the slot with plain loads, checks
 * it, and publishes its own index the same way; the producer reuses a slot only once
 * the consumer's index has passed it. If either direction of ordering failed, the
 * consumer would see a slot that is torn (words from two writes), stale (the previous
 * lap's payload) or ahead (already overwritten by the next lap).
 *
 * The views are over a plain (non-shared) ArrayBuffer made by mmap, as guest memory is.
 */

/** Slots in the ring: a power of two dividing 2^16, so 16-bit indices wrap cleanly. */
export const RING_SLOTS = 1024;
/** 32-bit words per slot: 64 bytes, a cache line, so a torn read is possible at all. */
export const SLOT_WORDS = 16;
/** u16 index of the producer's published index (byte 0). */
const PRODUCED = 0;
/** u16 index of the consumer's published index (byte 64: its own cache line). */
const CONSUMED = 32;
/** Slots start on the second page. */
const SLOTS_BYTE_OFFSET = 4096;
/** Bytes the ring needs. */
export const RING_BYTES = SLOTS_BYTE_OFFSET + RING_SLOTS * SLOT_WORDS * 4;

/** Typed views of a ring. */
export interface RingViews {
  readonly indices: Uint16Array;
  readonly slots: Uint32Array;
}

export function ringViews(buffer: ArrayBuffer): RingViews {
  return {
    indices: new Uint16Array(buffer, 0, 64),
    slots: new Uint32Array(buffer, SLOTS_BYTE_OFFSET, RING_SLOTS * SLOT_WORDS),
  };
}

/** Word i of the payload for sequence number seq; word 0 is seq itself. */
export function payloadWord(seq: number, i: number): number {
  return i === 0 ? seq : (Math.imul(seq + 1, 0x9e3779b1) ^ Math.imul(i, 0x01000193)) >>> 0;
}

/** What the consumer saw. */
export interface ConsumeResult {
  readonly received: number;
  /** Slots whose words came from different writes. */
  readonly torn: number;
  /** Consistent slots from an earlier lap: the index became visible before the payload. */
  readonly stale: number;
  /** Consistent slots from a later lap: the producer overwrote a slot still being read. */
  readonly ahead: number;
}

/** How many spins between deadline checks (Date.now() is too slow to call every spin). */
const SPINS_PER_CHECK = 1 << 16;

function checkDeadline(deadline: number, what: string): void {
  if (Date.now() > deadline) throw new Error(`ring spike: timed out while ${what}`);
}

/**
 * Produces `count` payloads. With `publishFirst` it publishes each index before writing
 * the payload: the wrong order, to show that the consumer's check notices.
 */
export function produce(v: RingViews, count: number, deadline: number, publishFirst = false): void {
  const { indices, slots } = v;
  let spins = 0;
  for (let seq = 0; seq < count; seq++) {
    // Ring full: wait for the consumer to release the slot this payload goes into.
    while (((seq - Atomics.load(indices, CONSUMED)) & 0xffff) >= RING_SLOTS) {
      if (++spins % SPINS_PER_CHECK === 0) checkDeadline(deadline, `producing #${seq} (ring full)`);
    }
    const base = (seq % RING_SLOTS) * SLOT_WORDS;
    if (publishFirst) Atomics.store(indices, PRODUCED, (seq + 1) & 0xffff);
    for (let i = 0; i < SLOT_WORDS; i++) slots[base + i] = payloadWord(seq, i);
    if (!publishFirst) Atomics.store(indices, PRODUCED, (seq + 1) & 0xffff);
  }
}

/** Consumes `count` payloads, checking each; publishes its index after each batch. */
export function consume(v: RingViews, count: number, deadline: number): ConsumeResult {
  const { indices, slots } = v;
  let torn = 0;
  let stale = 0;
  let ahead = 0;
  let spins = 0;
  let seq = 0;
  while (seq < count) {
    const produced = Atomics.load(indices, PRODUCED);
    const available = (produced - seq) & 0xffff;
    if (available === 0) {
      if (++spins % SPINS_PER_CHECK === 0) checkDeadline(deadline, `waiting for #${seq}`);
      continue;
    }
    for (let k = 0; k < available; k++, seq++) {
      const base = (seq % RING_SLOTS) * SLOT_WORDS;
      const got = slots[base];
      let consistent = true;
      for (let i = 1; i < SLOT_WORDS; i++) {
        if (slots[base + i] !== payloadWord(got, i)) consistent = false;
      }
      if (!consistent) torn++;
      else if (got < seq) stale++;
      else if (got > seq) ahead++;
    }
    Atomics.store(indices, CONSUMED, seq & 0xffff);
  }
  return { received: seq, torn, stale, ahead };
}
