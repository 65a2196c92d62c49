/**
 * The backend's side of vhost-user live migration's dirty log (vhost-user.rst,
 * "Migration", SET_LOG_BASE, SET_LOG_FD): the log memory the frontend shares, checked and
 * mapped, and the one {@link DirtyLog} every queue marks in. QEMU 7.2's sequence when a
 * migration starts, with rings running: SET_LOG_BASE (a sealed memfd, offset 0, sized for
 * all guest memory; QEMU waits for our u64 reply), SET_FEATURES with VHOST_F_LOG_ALL
 * (REPLY_ACK asked), then SET_VRING_ADDR on each running ring with VHOST_VRING_F_LOG and
 * the used ring's guest-physical address in `log`. A larger log may replace the first
 * while guest memory grows; SET_FEATURES without LOG_ALL ends it when migration fails.
 */
import { VblkError } from '../../errors.js';
import { DirtyLog, logBytesFor } from '../../memory/dirty-log.js';
import type { BackendIo, RegionMapping } from './backend.js';

/**
 * Largest log accepted: 256 MiB of bits covers 8 TiB of guest memory, and bounds what a
 * frontend can make us map.
 */
export const MAX_LOG_BYTES = 256 * 1024 * 1024;

/** A log the frontend described that cannot be used. */
export class MigrationLogError extends VblkError {
  declare readonly code: 'BAD_LOG';
  constructor(message: string) {
    super('BAD_LOG', message);
  }
}

export class MigrationLog {
  /** What queues mark in; its bitmap comes and goes with SET_LOG_BASE. */
  readonly dirty = new DirtyLog();
  private mapping: RegionMapping | null = null;
  private logFd: number | null = null;

  constructor(private readonly io: BackendIo) {}

  /**
   * SET_LOG_BASE: maps `size` bytes of `fd` from `offset` as the new log once they are
   * known to cover guest memory up to `memoryEnd` (the highest guest-physical address of
   * the memory table), then unmaps the old log. The fd is closed either way (the mapping
   * keeps the memory). Throws {@link MigrationLogError}; the old log stays on failure.
   */
  setBase(fd: number, size: number, offset: number, memoryEnd: number): void {
    try {
      if (size === 0 || size > MAX_LOG_BYTES) throw new MigrationLogError(`log of ${size} bytes: expected 1 to ${MAX_LOG_BYTES}`);
      const needed = logBytesFor(memoryEnd);
      if (size < needed) {
        throw new MigrationLogError(`log of ${size} bytes covers ${size * 8} pages, but guest memory reaches 0x${memoryEnd.toString(16)} (${needed} bytes of log)`);
      }
      let mapping: RegionMapping;
      try {
        mapping = this.io.mapRegion(fd, size, offset);
      } catch (e) {
        throw new MigrationLogError(`cannot map the log: ${e instanceof Error ? e.message : String(e)}`);
      }
      // MAX_LOG_BYTES is below one mapping window (4 GiB): one chunk.
      const bits = mapping.chunks[0];
      if (mapping.chunks.length !== 1 || bits.length !== size) {
        mapping.unmap();
        throw new MigrationLogError(`the log of ${size} bytes was not mapped as one piece`);
      }
      this.dirty.replace(bits);
      this.mapping?.unmap();
      this.mapping = mapping;
    } finally {
      this.io.closeFd(fd);
    }
  }

  /**
   * Whether the log still covers memory up to `memoryEnd` after a memory table change.
   * QEMU sends a larger log when memory grows during migration; until it does, writes past
   * the log cannot be marked, which the caller reports.
   */
  covers(memoryEnd: number): boolean {
    return !this.dirty.active || this.dirty.size >= logBytesFor(memoryEnd);
  }

  /**
   * SET_LOG_FD: the spec's optional eventfd by which a backend "may" tell the frontend
   * that the log changed. It is kept and closed at the end, never signalled: QEMU reads
   * the log when it syncs, not on a signal (and 7.2 never sends SET_LOG_FD). The caller
   * checked it is an eventfd.
   */
  setFd(fd: number): void {
    if (this.logFd !== null && this.logFd !== fd) this.io.closeFd(this.logFd);
    this.logFd = fd;
  }

  /** Unmaps the log and closes the log fd (session end). */
  close(): void {
    this.dirty.replace(null);
    this.mapping?.unmap();
    this.mapping = null;
    if (this.logFd !== null) this.io.closeFd(this.logFd);
    this.logFd = null;
  }
}
