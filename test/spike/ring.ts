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
/**
 * Control words, as i32 indices, each on its own cache line: the consumer says it is
 * running (READY), the producer says it has stopped (ENDED) after how many payloads
 * (FINAL), so the handoffs can run for a stated time rather than a fixed count.
 */
const READY = 32;
const ENDED = 48;
const FINAL = 49;
/** Slots start on the second page. */
const SLOTS_BYTE_OFFSET = 4096;
/** Bytes the ring needs. */
export const RING_BYTES = SLOTS_BYTE_OFFSET + RING_SLOTS * SLOT_WORDS * 4;

/** Typed views of a ring. */
export interface RingViews {
  readonly indices: Uint16Array;
  readonly control: Int32Array;
  readonly slots: Uint32Array;
}

export function ringViews(buffer: ArrayBuffer): RingViews {
  return {
    indices: new Uint16Array(buffer, 0, 64),
    control: new Int32Array(buffer, 0, 64),
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
/** How many payloads between checks of the producer's time budget. */
const PAYLOADS_PER_CHECK = 256;

function checkDeadline(deadline: number, what: string): void {
  if (Date.now() > deadline) throw new Error(`ring spike: timed out while ${what} (a hang guard: the peer stopped or never started)`);
}

/** How long the producer runs: a stated time, never a count raced against a clock. */
export interface ProduceLimits {
  /** Payloads it always produces (a few laps of the ring), however slow the machine. */
  readonly min: number;
  /** Payloads after which it stops early (a fast machine is done sooner). */
  readonly max: number;
  /** Time it produces for once the consumer runs (beyond `min`). */
  readonly budgetMs: number;
  /** Epoch ms after which waiting for the other side throws: a hang guard, far beyond the budget. */
  readonly deadline: number;
}

/**
 * Produces payloads from when the consumer says it runs, for `budgetMs` (at least `min`,
 * at most `max` of them), then tells the consumer how many; returns that count. With
 * `publishFirst` it publishes each index before writing the payload: the wrong order,
 * to show that the consumer's check notices.
 */
export function produce(v: RingViews, limits: ProduceLimits, publishFirst = false): number {
  const { indices, control, slots } = v;
  let spins = 0;
  while (Atomics.load(control, READY) === 0) {
    if (++spins % SPINS_PER_CHECK === 0) checkDeadline(limits.deadline, 'waiting for the consumer to start');
  }
  const stopAt = Date.now() + limits.budgetMs;
  let seq = 0;
  for (; seq < limits.max; seq++) {
    if (seq >= limits.min && seq % PAYLOADS_PER_CHECK === 0 && Date.now() > stopAt) break;
    // Ring full: wait for the consumer to release the slot this payload goes into.
    while (((seq - Atomics.load(indices, CONSUMED)) & 0xffff) >= RING_SLOTS) {
      if (++spins % SPINS_PER_CHECK === 0) checkDeadline(limits.deadline, `producing #${seq} (ring full)`);
    }
    const base = (seq % RING_SLOTS) * SLOT_WORDS;
    if (publishFirst) Atomics.store(indices, PRODUCED, (seq + 1) & 0xffff);
    for (let i = 0; i < SLOT_WORDS; i++) slots[base + i] = payloadWord(seq, i);
    if (!publishFirst) Atomics.store(indices, PRODUCED, (seq + 1) & 0xffff);
  }
  Atomics.store(control, FINAL, seq);
  Atomics.store(control, ENDED, 1);
  return seq;
}

/**
 * Consumes payloads, checking each, until the producer has stopped and every payload it
 * produced was received; publishes its index after each batch.
 */
export function consume(v: RingViews, deadline: number): ConsumeResult {
  const { indices, control, slots } = v;
  let torn = 0;
  let stale = 0;
  let ahead = 0;
  let spins = 0;
  let seq = 0;
  Atomics.store(control, READY, 1);
  for (;;) {
    const produced = Atomics.load(indices, PRODUCED);
    const available = (produced - seq) & 0xffff;
    if (available === 0) {
      // The producer publishes its last index before FINAL and ENDED: nothing is left.
      if (Atomics.load(control, ENDED) === 1 && seq === Atomics.load(control, FINAL)) break;
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
