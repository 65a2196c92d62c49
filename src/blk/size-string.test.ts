import { test } from 'node:test';
import assert from 'node:assert/strict';
import { STRING_UNITS, stringGetSize } from './size-string.js';

const { STRING_UNITS_10: U10, STRING_UNITS_2: U2 } = STRING_UNITS;

// Expected values worked out by hand from string_get_size's algorithm (see size-string.ts).
const CASES: [bigint | number, string, string][] = [
  [0, '0 B', '0 B'],
  [1, '1 B', '1 B'],
  [512, '512 B', '512 B'],
  [999, '999 B', '999 B'],
  [1000, '1.00 kB', '1000 B'],
  [1023, '1.02 kB', '1023 B'],
  [1024, '1.02 kB', '1.00 KiB'],
  [1999, '1.99 kB', '1.95 KiB'],
  [4096, '4.09 kB', '4.00 KiB'],
  [65_536, '65.5 kB', '64.0 KiB'],
  [1_048_576, '1.04 MB', '1.00 MiB'],
  [8_388_608, '8.38 MB', '8.00 MiB'],
  [104_857_600, '104 MB', '100 MiB'],
  [1_073_741_824, '1.07 GB', '1.00 GiB'],
  [1_000_000_000_000, '1.00 TB', '931 GiB'],
  [1_099_511_627_776, '1.09 TB', '1.00 TiB'],
  [2_000_398_934_016, '2.00 TB', '1.81 TiB'],
  [512 * 12_345_679, '6.32 GB', '5.88 GiB'],
  [2n ** 62n, '4.61 EB', '4.00 EiB'],
];

for (const [size, ten, two] of CASES) {
  test(`string_get_size(${size}) is "${ten}" and "${two}"`, () => {
    assert.equal(stringGetSize(size, U10), ten);
    assert.equal(stringGetSize(size, U2), two);
  });
}

test('decimals are truncated, never rounded (only the last remainder counts)', () => {
  // 1,999,999 B: 1999 kB r 999 → 1 MB r 999 → "1.99 MB", not "2.00 MB".
  assert.equal(stringGetSize(1_999_999, U10), '1.99 MB');
  // 1,000,999 B: the lost 999 of the first division does not show.
  assert.equal(stringGetSize(1_000_999, U10), '1.00 MB');
});

test('negative sizes are refused', () => {
  assert.throws(() => stringGetSize(-1, U10), RangeError);
});
