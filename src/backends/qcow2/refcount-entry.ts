/**
 * One refcount entry inside a refcount block (docs/interop/qcow2.txt, "Host cluster
 * management"): `refcount_bits = 1 << refcount_order` bits per entry. Entries of 8 bits
 * and more are big-endian; narrower ones are packed into bytes from the least significant
 * bit up (entry 0 of a 1-bit block is bit 0 of byte 0).
 */

/** Entries per refcount block of `clusterBits`/`refcountOrder`: a power of two. */
export function refcountBlockEntries(clusterBits: number, refcountOrder: number): number {
  return 2 ** (clusterBits + 3 - refcountOrder);
}

/** The largest refcount an entry of `refcountOrder` holds, capped at 2^53 - 1 (a 64-bit entry holds more than a number can). */
export function maxRefcount(refcountOrder: number): number {
  return refcountOrder >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << refcountOrder) - 1;
}

/** Entry `index` of `block`. A 64-bit entry above 2^53 - 1 reads as 2^53 - 1 (any such count is a leak anyway). */
export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 0: case 1: case 2: {
      const bits = 1 << refcountOrder;
      const perByte = 8 >> refcountOrder;
      return (block[Math.floor(index / perByte)] >> ((index % perByte) * bits)) & ((1 << bits) - 1);
    }
    case 3: return block[index];
    case 4: return (block[index * 2] << 8) | block[index * 2 + 1];
    case 5: return new DataView(block.buffer, block.byteOffset, block.byteLength).getUint32(index * 4);
    default: {
      const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
      const hi = view.getUint32(index * 8);
      const lo = view.getUint32(index * 8 + 4);
      return hi >= 0x20_0000 ? Number.MAX_SAFE_INTEGER : hi * 2 ** 32 + lo;
    }
  }
}

/** Sets entry `index` of `block` to `value`, which must be at most {@link maxRefcount}. */
export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  switch (refcountOrder) {
    case 0: case 1: case 2: {
      const bits = 1 << refcountOrder;
      const perByte = 8 >> refcountOrder;
      const byte = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = (block[byte] & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3: block[index] = value; return;
    case 4: block[index * 2] = value >>> 8; block[index * 2 + 1] = value & 0xff; return;
    case 5: new DataView(block.buffer, block.byteOffset, block.byteLength).setUint32(index * 4, value); return;
    default: {
      const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
      view.setUint32(index * 8, Math.floor(value / 2 ** 32));
      view.setUint32(index * 8 + 4, value >>> 0);
    }
  }
}
