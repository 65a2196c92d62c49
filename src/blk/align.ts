/**
 * Whether `n`, a non-negative safe integer, is a multiple of `powerOfTwo` (at most
 * 2^31): a mask on its low 32 bits, which every such power of two divides. A `%` by a
 * divisor the compiler cannot see is an integer division, and the request paths check
 * alignment on both sides of every request.
 */
export function isAligned(n: number, powerOfTwo: number): boolean {
  return ((n >>> 0) & (powerOfTwo - 1)) === 0;
}
