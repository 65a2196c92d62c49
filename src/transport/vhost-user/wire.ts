/**
 * Little-endian field access for the vhost-user wire structs of `spec/vhost-user.ts`.
 * Each accessor takes a field declaration whose width is part of its type, so a u32
 * reader cannot be pointed at a u64 field. Reads are unchecked (the codec checks sizes
 * first); writes check their value, since a DataView silently wraps out-of-range numbers.
 */
import { UsageError } from '../../errors.js';
import { getU64, setU64 } from '../../spec/u64.js';
import type { WireField } from '../../spec/vhost-user.js';

const U64_LIMIT = 1n << 64n;

/** A view over the whole of `bytes`. */
export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Reads a u16 field of the struct at `base`. */
export function getU16(view: DataView, base: number, field: WireField<2>): number {
  return view.getUint16(base + field.offset, true);
}

/** Reads a u32 field of the struct at `base`. */
export function getU32(view: DataView, base: number, field: WireField<4>): number {
  return view.getUint32(base + field.offset, true);
}

/** A u64 that is a bit set (feature words): as a bigint, which is fine on the control path. */
export function getU64Bits(view: DataView, base: number, field: WireField<8>): bigint {
  return view.getBigUint64(base + field.offset, true);
}

/**
 * The one checked u64 → number conversion: the value, or undefined when it is above
 * 2^53-1 and a JS number would round it. Read as two u32 halves, so no BigInt.
 */
export function getSafeU64(view: DataView, base: number, field: WireField<8>): number | undefined {
  const value = getU64(view, base + field.offset);
  return value < 0 ? undefined : value;
}

/** Whether a u64 field is zero (REPLY_ACK: 0 is success, anything else failure). */
export function isU64Zero(view: DataView, base: number, field: WireField<8>): boolean {
  return view.getUint32(base + field.offset, true) === 0 && view.getUint32(base + field.offset + 4, true) === 0;
}

/** Throws a {@link UsageError} unless `value` is an integer from 0 to `max`. */
export function checkUint(what: string, value: number, max: number): void {
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new UsageError('BAD_ARGUMENT', `${what} must be an integer from 0 to ${max}, got ${value}`);
  }
}

/** Writes a u16 field; throws {@link UsageError} when `value` does not fit. */
export function setU16(view: DataView, base: number, field: WireField<2>, value: number, what: string): void {
  checkUint(what, value, 0xffff);
  view.setUint16(base + field.offset, value, true);
}

/** Writes a u32 field; throws {@link UsageError} when `value` does not fit. */
export function setU32(view: DataView, base: number, field: WireField<4>, value: number, what: string): void {
  checkUint(what, value, 0xffff_ffff);
  view.setUint32(base + field.offset, value, true);
}

/** Writes a bit-set u64 (feature words); throws {@link UsageError} outside 0 to 2^64-1. */
export function setU64Bits(view: DataView, base: number, field: WireField<8>, value: bigint, what: string): void {
  if (value < 0n || value >= U64_LIMIT) {
    throw new UsageError('BAD_ARGUMENT', `${what} must fit in 64 bits, got 0x${value.toString(16)}`);
  }
  view.setBigUint64(base + field.offset, value, true);
}

/** Writes a number that must be a safe integer as a u64, as two u32 halves. */
export function setSafeU64(view: DataView, base: number, field: WireField<8>, value: number, what: string): void {
  checkUint(what, value, Number.MAX_SAFE_INTEGER);
  setU64(view, base + field.offset, value);
}
