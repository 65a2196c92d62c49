/**
 * Inflight I/O tracking for a split queue (vhost-user.rst, "Inflight I/O tracking"): a
 * per-queue log in memory that outlives the backend process (the frontend keeps it), so a
 * restarted backend can resubmit the requests the dead one had taken from the ring but
 * not completed. Layout: a 16-byte head {u64 features, u16 version, u16 desc_num,
 * u16 last_batch_head, u16 used_idx} and one 16-byte state per descriptor
 * {u8 inflight, u8 pad[5], u16 next, u64 counter}.
 *
 * We complete requests in batches (many used elements, one used.idx store), so one
 * `last_batch_head` cannot say which requests a crash after the store had finished.
 * Recovery therefore reads the used ring itself: every id published between the log's
 * `used_idx` and the ring's `used.idx` is complete. The order of our writes makes that
 * true: used elements, then used.idx, then the log's flags, then the log's `used_idx`.
 */
import {
  VHOST_USER_INFLIGHT_DESC_STATE_SPLIT as DESC, VHOST_USER_INFLIGHT_QUEUE_REGION_SPLIT as HEAD, VHOST_USER_INFLIGHT_VERSION,
} from '../spec/vhost-user.js';

/** Bytes one queue's log needs, rounded up to 64 as libvhost-user places them. */
export function inflightQueueBytes(queueSize: number): number {
  return Math.ceil((HEAD.size + DESC.size * queueSize) / 64) * 64;
}

export interface InflightRecovery {
  /** Heads to process again, oldest first. */
  readonly resubmit: number[];
  /** Next available index: everything before it was completed or is in `resubmit`. */
  readonly nextAvail: number;
  /** Why the log was discarded instead of used, if it was. */
  readonly discarded: string | null;
}

export class InflightLog {
  private readonly view: DataView;
  private counter = 1;

  /** A log over `bytes` (at least {@link inflightQueueBytes}) for a queue of `queueSize`. */
  constructor(bytes: Uint8Array, private readonly queueSize: number) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, inflightQueueBytes(queueSize));
  }

  /**
   * Reads what a previous backend left. `usedIdx` is the ring's used.idx now and
   * `usedId(k)` the id in used ring slot `k % size`. A fresh (all-zero) log is set up;
   * a log that does not fit this queue is reset and reported, since its contents come
   * from outside and a wrong resubmission would complete a request twice.
   */
  recover(usedIdx: number, usedId: (slot: number) => number, availBase: number): InflightRecovery {
    const v = this.view;
    const size = this.queueSize;
    const version = v.getUint16(HEAD.fields.version.offset, true);
    const descNum = v.getUint16(HEAD.fields.descNum.offset, true);
    if (version === 0) {
      this.reset(usedIdx);
      return { resubmit: [], nextAvail: availBase, discarded: null };
    }
    if (version !== VHOST_USER_INFLIGHT_VERSION || descNum !== (size & 0xffff)) {
      this.reset(usedIdx);
      return { resubmit: [], nextAvail: availBase, discarded: `inflight log version ${version} for ${descNum} descriptors does not fit a queue of ${size}` };
    }
    const logged = v.getUint16(HEAD.fields.usedIdx.offset, true);
    const published = (usedIdx - logged) & 0xffff;
    if (published > size) {
      this.reset(usedIdx);
      return { resubmit: [], nextAvail: availBase, discarded: `inflight log is ${published} completions behind the used ring` };
    }
    for (let k = 0; k < published; k++) {
      const id = usedId((logged + k) & 0xffff);
      if (id < size) v.setUint8(this.at(id) + DESC.fields.inflight.offset, 0);
    }
    v.setUint16(HEAD.fields.usedIdx.offset, usedIdx, true);
    const pending: { head: number; counter: number }[] = [];
    for (let i = 0; i < size; i++) {
      if (v.getUint8(this.at(i) + DESC.fields.inflight.offset) !== 0) pending.push({ head: i, counter: this.counterOf(i) });
    }
    pending.sort((a, b) => a.counter - b.counter);
    this.counter = pending.length ? pending[pending.length - 1].counter + 1 : 1;
    return { resubmit: pending.map((p) => p.head), nextAvail: (usedIdx + pending.length) & 0xffff, discarded: null };
  }

  private reset(usedIdx: number): void {
    new Uint8Array(this.view.buffer, this.view.byteOffset, this.view.byteLength).fill(0);
    this.view.setUint16(HEAD.fields.version.offset, VHOST_USER_INFLIGHT_VERSION, true);
    this.view.setUint16(HEAD.fields.descNum.offset, this.queueSize & 0xffff, true);
    this.view.setUint16(HEAD.fields.usedIdx.offset, usedIdx, true);
    this.counter = 1;
  }

  private at(head: number): number {
    return HEAD.size + head * DESC.size;
  }

  private counterOf(head: number): number {
    const at = this.at(head) + DESC.fields.counter.offset;
    return this.view.getUint32(at + 4, true) * 0x1_0000_0000 + this.view.getUint32(at, true);
  }

  /** Chain `head` was taken from the ring. */
  popped(head: number): void {
    const at = this.at(head);
    const c = this.counter++;
    this.view.setUint32(at + DESC.fields.counter.offset, c % 0x1_0000_0000, true);
    this.view.setUint32(at + DESC.fields.counter.offset + 4, Math.floor(c / 0x1_0000_0000), true);
    this.view.setUint8(at + DESC.fields.inflight.offset, 1);
  }

  /** `heads` were published in the used ring, which now has index `usedIdx`. */
  published(heads: readonly number[], usedIdx: number): void {
    for (let i = 0; i < heads.length; i++) this.view.setUint8(this.at(heads[i]) + DESC.fields.inflight.offset, 0);
    this.view.setUint16(HEAD.fields.lastBatchHead.offset, heads.length ? heads[heads.length - 1] : 0, true);
    this.view.setUint16(HEAD.fields.usedIdx.offset, usedIdx, true);
  }
}
