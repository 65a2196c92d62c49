/** The median and range of a figure over the rounds of a bench section. */
export interface Spread {
  readonly median: number;
  readonly min: number;
  readonly max: number;
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

const r3 = (n: number): number => Math.round(n * 1000) / 1000;

/** Median, least and most of `values`, to three decimals. */
export function spread(values: readonly number[]): Spread {
  return { median: r3(median(values)), min: r3(Math.min(...values)), max: r3(Math.max(...values)) };
}
