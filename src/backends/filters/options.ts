/**
 * Filter options as text: the `KEY=VALUE` pairs of `--filter NAME:KEY=VALUE,...`, and
 * the value syntaxes the filters share. This is outside input (a command line, a config
 * file): everything is checked, and every refusal is a {@link FilterSpecError} whose
 * message is one line naming the filter, the key and the offending text.
 *
 * Value syntaxes:
 * - count: a non-negative decimal integer (`5`).
 * - number: a non-negative decimal (`1500`, `0.5`).
 * - size: bytes, a decimal integer with an optional K, M, G or T suffix, powers of 1024
 *   (`64K`, `10M`), as the CLI's sizes.
 * - duration: a non-negative decimal with an optional unit `us`, `ms` (the default) or
 *   `s` (`5`, `250us`, `1.5s`); held in milliseconds.
 * - fraction: a decimal from 0 to 1, or a percentage (`0.01`, `1%`).
 * - list: items joined by `+` (`read+write`), since `,` separates the pairs.
 * - sector ranges: a list of `FIRST-LAST` or `SECTOR` items, 512-byte sectors, both ends
 *   included (`0-7+2048`).
 */
import { UsageError } from '../../errors.js';

/** Why a filter spec or one of its values is refused. */
export type FilterSpecErrorCode =
  | 'BAD_FILTER_SPEC' | 'UNKNOWN_FILTER' | 'UNKNOWN_FILTER_KEY' | 'DUPLICATE_FILTER_KEY' | 'BAD_FILTER_VALUE'
  | 'FILTER_UNAVAILABLE';

/** A filter spec or option the filters refuse; the message is one line. */
export class FilterSpecError extends UsageError {
  declare readonly code: FilterSpecErrorCode;
  constructor(code: FilterSpecErrorCode, message: string) {
    super(code, message);
  }
}

/** `text` quoted for a one-line message: control characters and newlines escaped. */
export function quote(text: string): string {
  return JSON.stringify(text);
}

/** An inclusive range of 512-byte sectors. */
export interface SectorSpan {
  /** The first sector of the range. */
  readonly first: number;
  /** The last sector of the range, included; at least `first`. */
  readonly last: number;
}

/** The operations a filter can tell apart; `zero` is write-zeroes. */
export const FILTER_OPS = ['read', 'write', 'flush', 'discard', 'zero'] as const;
/** One of {@link FILTER_OPS}. */
export type FilterOp = (typeof FILTER_OPS)[number];

const SIZE_SUFFIX: Readonly<Record<string, number>> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };
const US_PER_MS = 1000;
const MS_PER_S = 1000;
const PERCENT = 100;
const DECIMAL = /^(\d+(?:\.\d+)?)$/;

/**
 * The options of one filter, checked key by key as the filter reads them. Built with the
 * keys the filter knows: any other key is refused before the filter reads a value.
 */
export class FilterOptionReader {
  /**
   * @param filter The filter's name, for messages.
   * @param pairs The options as given.
   * @param keys The keys the filter accepts.
   */
  constructor(
    private readonly filter: string,
    private readonly pairs: ReadonlyMap<string, string>,
    keys: readonly string[],
  ) {
    for (const key of pairs.keys()) {
      if (!keys.includes(key)) {
        const known = keys.length > 0 ? `: it takes ${keys.join(', ')}` : ': it takes no options';
        throw new FilterSpecError('UNKNOWN_FILTER_KEY', `filter ${filter}: unknown option ${quote(key)}${known}`);
      }
    }
  }

  /** The value given for `key`, as text. */
  text(key: string): string | undefined {
    return this.pairs.get(key);
  }

  /** A count from `min` to `max` (both included). */
  count(key: string, min = 0, max = Number.MAX_SAFE_INTEGER): number | undefined {
    return this.read(key, `an integer from ${min} to ${max}`, (t) => {
      if (!/^\d+$/.test(t)) return null;
      const n = Number(t);
      return Number.isSafeInteger(n) && n >= min && n <= max ? n : null;
    });
  }

  /** A number above 0 (`positive`) or from 0. */
  number(key: string, positive: boolean): number | undefined {
    return this.read(key, positive ? 'a number above 0' : 'a number', (t) => {
      const n = DECIMAL.test(t) ? Number(t) : Number.NaN;
      return Number.isFinite(n) && (positive ? n > 0 : n >= 0) ? n : null;
    });
  }

  /** A size in bytes of at least `min`. */
  size(key: string, min = 0): number | undefined {
    return this.read(key, `a size in bytes (digits with an optional K, M, G or T suffix)${min > 0 ? ` of at least ${min}` : ''}`, (t) => {
      const m = /^(\d+)([KMGT]?)$/i.exec(t);
      if (!m) return null;
      const n = Number(m[1]) * SIZE_SUFFIX[m[2].toUpperCase()];
      return Number.isSafeInteger(n) && n >= min ? n : null;
    });
  }

  /** A duration, in milliseconds. */
  duration(key: string): number | undefined {
    return this.read(key, 'a duration (a number with an optional unit us, ms or s; ms by default)', (t) => {
      const m = /^(\d+(?:\.\d+)?)(us|ms|s)?$/.exec(t);
      if (!m) return null;
      const n = Number(m[1]);
      // Divided rather than multiplied by 0.001: 938us is then exactly 938 / 1000 ms.
      const ms = m[2] === 'us' ? n / US_PER_MS : m[2] === 's' ? n * MS_PER_S : n;
      return Number.isFinite(ms) ? ms : null;
    });
  }

  /** A fraction from 0 to 1, given as such or as a percentage. */
  fraction(key: string): number | undefined {
    return this.read(key, 'a fraction from 0 to 1, or a percentage', (t) => {
      const percent = t.endsWith('%');
      const digits = percent ? t.slice(0, -1) : t;
      if (!DECIMAL.test(digits)) return null;
      const n = Number(digits) / (percent ? PERCENT : 1);
      return n >= 0 && n <= 1 ? n : null;
    });
  }

  /** One of `allowed`. */
  choice<T extends string>(key: string, allowed: readonly T[]): T | undefined {
    return this.read(key, `one of ${allowed.join(', ')}`, (t) => (allowed as readonly string[]).includes(t) ? t as T : null);
  }

  /** Items of `allowed` joined by `+`, each at most once. */
  list<T extends string>(key: string, allowed: readonly T[]): T[] | undefined {
    return this.read(key, `items of ${allowed.join(', ')} joined by +`, (t) => {
      const items = t.split('+');
      const ok = items.every((i, at) => (allowed as readonly string[]).includes(i) && items.indexOf(i) === at);
      return ok ? items as T[] : null;
    });
  }

  /** Sector ranges joined by `+`: `FIRST-LAST` or `SECTOR`, first ≤ last. */
  sectorRanges(key: string): SectorSpan[] | undefined {
    return this.read(key, 'sector ranges FIRST-LAST or SECTOR joined by + (512-byte sectors, both ends included)', (t) => {
      const spans: SectorSpan[] = [];
      for (const item of t.split('+')) {
        const m = /^(\d+)(?:-(\d+))?$/.exec(item);
        if (!m) return null;
        const first = Number(m[1]);
        const last = m[2] === undefined ? first : Number(m[2]);
        if (!Number.isSafeInteger(first) || !Number.isSafeInteger(last) || last < first) return null;
        spans.push({ first, last });
      }
      return spans;
    });
  }

  /** Parses the value of `key` (when given) with `parse`, which answers null for a bad value. */
  private read<T>(key: string, expected: string, parse: (text: string) => T | null): T | undefined {
    const text = this.pairs.get(key);
    if (text === undefined) return undefined;
    const value = parse(text);
    if (value === null) {
      throw new FilterSpecError('BAD_FILTER_VALUE', `filter ${this.filter}: ${key} must be ${expected}, got ${quote(text)}`);
    }
    return value;
  }
}

/**
 * Splits `NAME[:KEY=VALUE,...]` into the name and its pairs, checking the syntax only:
 * a name of lowercase letters, digits and dashes; each pair a non-empty key of the same
 * alphabet, `=`, and a value (everything up to the next `,`, possibly empty, `=` allowed);
 * no key twice.
 */
export function splitFilterSpec(text: string): { readonly name: string; readonly pairs: Map<string, string> } {
  const colon = text.indexOf(':');
  const name = colon < 0 ? text : text.slice(0, colon);
  if (!/^[a-z][a-z0-9-]*$/.test(name)) {
    throw new FilterSpecError('BAD_FILTER_SPEC', `filter spec ${quote(text)}: expected NAME or NAME:KEY=VALUE,... with a name of lowercase letters, digits and dashes`);
  }
  const pairs = new Map<string, string>();
  if (colon < 0) return { name, pairs };
  for (const pair of text.slice(colon + 1).split(',')) {
    const eq = pair.indexOf('=');
    const key = eq < 0 ? pair : pair.slice(0, eq);
    if (eq < 0 || !/^[a-z][a-z0-9-]*$/.test(key)) {
      throw new FilterSpecError('BAD_FILTER_SPEC', `filter ${name}: expected KEY=VALUE, got ${quote(pair)}`);
    }
    if (pairs.has(key)) throw new FilterSpecError('DUPLICATE_FILTER_KEY', `filter ${name}: option ${key} is given twice`);
    pairs.set(key, pair.slice(eq + 1));
  }
  return { name, pairs };
}
