/**
 * The config space as the frontend last saw it, recorded in the inflight buffer past the
 * queues' logs, so that it outlives a backend process.
 *
 * QEMU 7.2 reads a vhost-user-blk device's config space once, when the device is
 * realized, and keeps its own copy for the guest: a guest's write reaches the backend
 * (SET_CONFIG) only when it differs from that copy, and it never reads the config again
 * after a guest reset or a reconnect to a restarted backend (a later GET_CONFIG, after a
 * resize, updates only the capacity). Traced with a Linux 6.1 guest; proved by
 * test/e2e/reconnect.test.ts. A restarted backend must therefore learn what the guest chose —
 * virtio-blk's cache mode above all — from somewhere the frontend keeps for it: the
 * inflight buffer, which the frontend hands to every backend of a running device and whose
 * layout is the backend's own business (vhost-user.rst, "Inflight I/O tracking").
 *
 * Layout: {u32 magic "vblk", u16 version 1, u16 length} then `length` config bytes.
 * The buffer is frontend memory: a record is outside input, checked before use.
 */
import { VHOST_USER_MAX_CONFIG_SIZE } from '../../spec/vhost-user.js';

const MAGIC = 0x6b6c6276; // "vblk", little-endian
const VERSION = 1;
const HEADER = 8;

/** Bytes the record takes in the inflight buffer, rounded up to 64 like the queue logs. */
export const CONFIG_RECORD_BYTES = Math.ceil((HEADER + VHOST_USER_MAX_CONFIG_SIZE) / 64) * 64;

/** Writes `config` (at most VHOST_USER_MAX_CONFIG_SIZE bytes) as a record at the start of `area`. */
export function writeConfigRecord(area: Uint8Array, config: Uint8Array): void {
  if (area.length < CONFIG_RECORD_BYTES || config.length > VHOST_USER_MAX_CONFIG_SIZE) {
    throw new RangeError(`a config record of ${config.length} bytes does not fit ${area.length} bytes`);
  }
  const v = new DataView(area.buffer, area.byteOffset, HEADER);
  area.set(config, HEADER);
  v.setUint16(4, VERSION, true);
  v.setUint16(6, config.length, true);
  // The magic last: a record is valid only once its contents are in place.
  v.setUint32(0, MAGIC, true);
}

/** The config bytes recorded at the start of `area`, or null when it holds no valid record. */
export function readConfigRecord(area: Uint8Array): Uint8Array | null {
  if (area.length < CONFIG_RECORD_BYTES) return null;
  const v = new DataView(area.buffer, area.byteOffset, HEADER);
  const length = v.getUint16(6, true);
  if (v.getUint32(0, true) !== MAGIC || v.getUint16(4, true) !== VERSION || length > VHOST_USER_MAX_CONFIG_SIZE) return null;
  return area.slice(HEADER, HEADER + length);
}
