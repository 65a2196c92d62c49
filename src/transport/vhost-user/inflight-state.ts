/**
 * What a backend session keeps where a backend restarted under a running frontend can
 * find it again: the inflight buffer the frontend shares (INFLIGHT_SHMFD, one log per
 * queue, `perQueue` bytes apart) and, after the logs when the buffer has room for it, the
 * record of the config space as the frontend holds it (config-record.ts). QEMU keeps the
 * buffer across our restarts and hands it to the next backend with SET_INFLIGHT_FD.
 */
import { CONFIG_RECORD_BYTES, readConfigRecord, writeConfigRecord } from './config-record.js';
import { VHOST_USER_MAX_CONFIG_SIZE } from '../../spec/vhost-user.js';
import type { BackendIo, RegionMapping } from './backend.js';

/** The shape of an inflight buffer: queues, their size, and the log bytes of each. */
export interface InflightShape {
  readonly numQueues: number;
  readonly queueSize: number;
  readonly perQueue: number;
}

interface InflightBuffer extends InflightShape {
  readonly mapping: RegionMapping;
}

export class InflightState {
  private buffer: InflightBuffer | null = null;
  /**
   * The config space as the frontend holds it (QEMU keeps a copy and never reads ours
   * again), or null while unknown.
   */
  private config: Uint8Array | null = null;

  constructor(private readonly io: BackendIo) {}

  /** The frontend's copy of the config space, or null while unknown. */
  get frontendConfig(): Uint8Array | null {
    return this.config;
  }

  /** Takes `view` (VHOST_USER_MAX_CONFIG_SIZE bytes) as the frontend's copy and records it. */
  setFrontendConfig(view: Uint8Array): void {
    this.config = view;
    this.record();
  }

  /** GET_INFLIGHT_FD: a fresh, zeroed buffer of `shape` with room for the record; its fd and size. */
  create(shape: InflightShape): { fd: number; mmapSize: number } {
    const mmapSize = shape.perQueue * shape.numQueues + CONFIG_RECORD_BYTES;
    const { fd, mapping } = this.io.createSharedMemory(mmapSize);
    this.replace({ mapping, ...shape });
    this.record();
    return { fd, mmapSize };
  }

  /**
   * SET_INFLIGHT_FD: maps the buffer (possibly left by a backend that died), and takes
   * the frontend's config from its record, or records ours when it has none. Throws what
   * {@link BackendIo.mapRegion} throws; the fd is the caller's to close.
   */
  adopt(fd: number, mmapSize: number, mmapOffset: number, shape: InflightShape): void {
    const mapping = this.io.mapRegion(fd, mmapSize, mmapOffset);
    this.replace({ mapping, ...shape });
    const area = this.recordArea();
    const recorded = area && readConfigRecord(area);
    if (!recorded) {
      this.record();
      return;
    }
    const view = new Uint8Array(VHOST_USER_MAX_CONFIG_SIZE);
    view.set(recorded);
    this.config = view;
  }

  /** Queue `index`'s log in the buffer, or null (a buffer may span windows only past 4 GiB: never for a log). */
  logOf(index: number, queueSize: number): Uint8Array | null {
    const b = this.buffer;
    if (!b || index >= b.numQueues || queueSize !== b.queueSize) return null;
    const chunk = b.mapping.chunks[0];
    const at = index * b.perQueue;
    return at + b.perQueue <= chunk.length ? chunk.subarray(at, at + b.perQueue) : null;
  }

  /** Unmaps the buffer (session end). */
  close(): void {
    this.replace(null);
  }

  /** Where the config record lives in the buffer, or null when it has no room for one. */
  private recordArea(): Uint8Array | null {
    const b = this.buffer;
    if (!b) return null;
    const at = b.perQueue * b.numQueues;
    const chunk = b.mapping.chunks[0];
    return at + CONFIG_RECORD_BYTES <= chunk.length ? chunk.subarray(at, at + CONFIG_RECORD_BYTES) : null;
  }

  private record(): void {
    const area = this.recordArea();
    if (area && this.config) writeConfigRecord(area, this.config);
  }

  private replace(next: InflightBuffer | null): void {
    this.buffer?.mapping.unmap();
    this.buffer = next;
  }
}
