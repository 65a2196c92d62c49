/**
 * Human-readable sizes exactly as Linux's `string_get_size` of the seed's era prints them
 * (lib/string_helpers.c, 2.6.29 … 3.x): the seed logs its "new size" line with it.
 *
 * The algorithm, as facts: divide by 1000 (STRING_UNITS_10) or 1024 (STRING_UNITS_2)
 * while the value is at least the divisor, keeping the remainder of the *last* division
 * only; then show three significant figures — two decimals below 10, one below 100, none
 * from 100 up — where the decimals are `remainder × 1000 / divisor` printed as three
 * digits and *truncated* (never rounded). Below the divisor the size is printed as whole
 * bytes. Hence 1 GiB is "1.07 GB" and "1.00 GiB", and 1999 bytes is "1.99 kB".
 */

/** Which powers the units are (the names of Linux's `enum string_size_units`). */
export const STRING_UNITS = {
  /** Powers of 1000: B, kB, MB, … */
  STRING_UNITS_10: 'STRING_UNITS_10',
  /** Powers of 1024: B, KiB, MiB, … */
  STRING_UNITS_2: 'STRING_UNITS_2',
} as const;
export type StringUnits = (typeof STRING_UNITS)[keyof typeof STRING_UNITS];

const UNIT_NAMES: Readonly<Record<StringUnits, readonly string[]>> = {
  STRING_UNITS_10: ['B', 'kB', 'MB', 'GB', 'TB', 'PB', 'EB', 'ZB', 'YB'],
  STRING_UNITS_2: ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB', 'ZiB', 'YiB'],
};
const DIVISOR: Readonly<Record<StringUnits, bigint>> = { STRING_UNITS_10: 1000n, STRING_UNITS_2: 1024n };
/** Three significant figures: scale the integer part until it reaches 100. */
const SIGNIFICANT_LIMIT = 100n;
const DECIMAL_SCALE = 1000n;
const DECIMAL_DIGITS = 3;

/**
 * `size` bytes as `string_get_size(size, units, …)` formats it. Takes a bigint or a
 * safe integer: disk sizes in bytes (sectors × 512) can exceed 2^53. Control path only.
 */
export function stringGetSize(size: bigint | number, units: StringUnits): string {
  let value = BigInt(size);
  if (value < 0n) throw new RangeError(`size ${value} is negative`);
  const divisor = DIVISOR[units];
  const names = UNIT_NAMES[units];
  let remainder = 0n;
  let i = 0;
  while (value >= divisor && i < names.length - 1) {
    remainder = value % divisor;
    value /= divisor;
    i++;
  }
  let decimals = '';
  if (i > 0) {
    let digits = 0;
    for (let scaled = value; scaled < SIGNIFICANT_LIMIT; scaled *= 10n) digits++;
    if (digits > 0) {
      const fraction = ((remainder * DECIMAL_SCALE) / divisor).toString().padStart(DECIMAL_DIGITS, '0');
      decimals = `.${fraction.slice(0, digits)}`;
    }
  }
  return `${value}${decimals} ${names[i]}`;
}
