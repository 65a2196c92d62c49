/**
 * A hand-driven split ring for tests: writes descriptors and ring entries exactly as
 * told — including broken ones — into a guest memory surrounded by guard bytes, so a
 * test can check that nothing outside the region was written.
 */
import { GuestMemory } from '../memory/guest-memory.js';
import { contiguousRingLayout, VIRTQ_DESC_SIZE, availEventOffset, usedEventOffset } from '../spec/split-ring.js';
import type { SplitQueueConfig } from './ring-views.js';

export const GUARD_BYTE = 0xa5;

export class RawRing {
  readonly memory: GuestMemory;
  readonly config: SplitQueueConfig;
  /** Guest address where free data space starts (after the rings). */
  readonly dataBase: number;
  readonly regionEnd: number;
  private readonly whole: Uint8Array;
  private readonly region: Uint8Array;
  private readonly view: DataView;
  private availIdx = 0;

  constructor(
    readonly size: number,
    opts: { eventIdx?: boolean; indirect?: boolean; regionSize?: number; guard?: number; base?: number } = {},
  ) {
    const regionSize = opts.regionSize ?? 1 << 20;
    const guard = opts.guard ?? 4096;
    const base = opts.base ?? 0x10000;
    this.whole = new Uint8Array(guard + regionSize + guard).fill(GUARD_BYTE);
    this.region = this.whole.subarray(guard, guard + regionSize);
    this.region.fill(0);
    this.view = new DataView(this.region.buffer, this.region.byteOffset, this.region.byteLength);
    this.memory = new GuestMemory([{ guestAddress: base, bytes: this.region }]);
    const layout = contiguousRingLayout(size);
    this.config = {
      size, desc: base + layout.desc, avail: base + layout.avail, used: base + layout.used,
      eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? false,
    };
    this.dataBase = base + Math.ceil(layout.total / 4096) * 4096;
    this.regionEnd = base + regionSize;
  }

  private off(addr: number): number {
    return addr - this.memory.regions[0].guestAddress;
  }

  /** Writes descriptor `i` of a table at `table` (default: the ring's own table). */
  desc(i: number, addr: number, len: number, flags: number, next = 0, table = this.config.desc): void {
    const at = this.off(table) + i * VIRTQ_DESC_SIZE;
    this.view.setUint32(at, addr % 2 ** 32, true);
    this.view.setUint32(at + 4, Math.floor(addr / 2 ** 32), true);
    this.view.setUint32(at + 8, len, true);
    this.view.setUint16(at + 12, flags, true);
    this.view.setUint16(at + 14, next, true);
  }

  /** Puts `head` in the next avail slot and publishes the new index. */
  publish(head: number): void {
    this.view.setUint16(this.off(this.config.avail) + 4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.setAvailIdx(this.availIdx);
  }

  setAvailIdx(idx: number): void {
    this.view.setUint16(this.off(this.config.avail) + 2, idx, true);
  }

  usedIdx(): number {
    return this.view.getUint16(this.off(this.config.used) + 2, true);
  }

  usedElem(slot: number): { id: number; len: number } {
    const at = this.off(this.config.used) + 4 + 8 * (slot % this.size);
    return { id: this.view.getUint32(at, true), len: this.view.getUint32(at + 4, true) };
  }

  usedFlags(): number {
    return this.view.getUint16(this.off(this.config.used), true);
  }

  availEvent(): number {
    return this.view.getUint16(this.off(this.config.used) + availEventOffset(this.size), true);
  }

  setUsedEvent(v: number): void {
    this.view.setUint16(this.off(this.config.avail) + usedEventOffset(this.size), v, true);
  }

  setAvailFlags(v: number): void {
    this.view.setUint16(this.off(this.config.avail), v, true);
  }

  fill(addr: number, len: number, byte: number): void {
    this.region.fill(byte, this.off(addr), this.off(addr) + len);
  }

  /** True when every guard byte around the region still holds its pattern. */
  guardsIntact(): boolean {
    const g = this.whole.length - this.region.length;
    const head = this.region.byteOffset - this.whole.byteOffset;
    for (let i = 0; i < head; i++) if (this.whole[i] !== GUARD_BYTE) return false;
    for (let i = head + this.region.length; i < head + this.region.length + (g - head); i++) {
      if (this.whole[i] !== GUARD_BYTE) return false;
    }
    return true;
  }

  /** Whether a view lies inside the region (views are never outside if translation is right). */
  isInRegion(v: Uint8Array): boolean {
    return v.buffer === this.region.buffer && v.byteOffset >= this.region.byteOffset &&
      v.byteOffset + v.length <= this.region.byteOffset + this.region.length;
  }
}
