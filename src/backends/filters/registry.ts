/**
 * Filters by name, from text: what `vblk serve --filter NAME[:KEY=VALUE,...]` (repeatable)
 * turns into. {@link parseFilterSpec} checks a spec completely, values included, so a
 * command line is refused before anything is opened; {@link applyFilters} stacks the
 * parsed filters over a backend.
 *
 * | filter   | keys |
 * |----------|------|
 * | cow      | `block=SIZE` (granularity, default 64K), `file=PATH` (overlay in a file; default memory) |
 * | error    | `ops=LIST` (read+write+flush+discard+zero; default all), `sectors=RANGES`, `nth=N`, `rate=FRACTION`, `seed=N`, `status=ioerr\|unsupp` |
 * | delay    | `read=`, `write=`, `flush=`, `discard=`, `zero=` DURATION |
 * | throttle | `iops=`, `read-iops=`, `write-iops=` N; `bps=`, `read-bps=`, `write-bps=` SIZE; `burst=DURATION` |
 * | stats    | none |
 *
 * Value syntaxes (SIZE, DURATION, FRACTION, LIST, RANGES) are in options.ts.
 */
import type { BlockBackend } from '../backend.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../../spec/virtio-blk.js';
import { CowFilter, MAX_COW_GRANULARITY } from './cow.js';
import { DelayFilter, type DelayOptions } from './delay.js';
import { ErrorFilter, type ErrorOptions } from './error.js';
import { FilterBackend, type FilterClock } from './filter.js';
import {
  FILTER_OPS, FilterOptionReader, FilterSpecError, quote, splitFilterSpec,
} from './options.js';
import { StatsFilter } from './stats.js';
import { ThrottleFilter, type ThrottleOptions } from './throttle.js';

/** The copy-on-write filter's options as text gives them (the overlay file is opened when applied). */
export interface CowSpecOptions {
  /** Bytes per copy-on-write block (`block=SIZE`); see {@link CowOptions.granularity}. */
  readonly granularity?: number;
  /** Keep the overlay in this file rather than in memory. */
  readonly file?: string;
}

/** A parsed, checked filter spec. `text` is what it was parsed from, for logs. */
export type FilterSpec =
  | {
    /** Copy-on-write. */
    readonly name: 'cow';
    /** The spec as written. */
    readonly text: string;
    /** The overlay's block size and file. */
    readonly options: CowSpecOptions;
  }
  | {
    /** Error injection. */
    readonly name: 'error';
    /** The spec as written. */
    readonly text: string;
    /** Which operations fail, where, and how often. */
    readonly options: ErrorOptions;
  }
  | {
    /** Added latency. */
    readonly name: 'delay';
    /** The spec as written. */
    readonly text: string;
    /** Milliseconds to wait per kind of operation. */
    readonly options: DelayOptions;
  }
  | {
    /** Rate limits. */
    readonly name: 'throttle';
    /** The spec as written. */
    readonly text: string;
    /** The limits. */
    readonly options: ThrottleOptions;
  }
  | {
    /** Operation counts. */
    readonly name: 'stats';
    /** The spec as written. */
    readonly text: string;
    /** None: the stats filter takes no options. */
    readonly options: Record<string, never>;
  };

/** The filter names, in the order of the table above. */
export type FilterName = FilterSpec['name'];

/** What filters need from their surroundings when applied; all optional. */
export interface FilterEnvironment {
  /** Time and timers for delay and throttle; the system's by default. */
  readonly clock?: FilterClock;
  /**
   * Opens the overlay file of `cow:file=PATH` as a writable backend of at least `size`
   * bytes (the base's, known when the filter is built or, for a base with an open step,
   * when it opens). The CLI passes one built on src/node's file backend; without it,
   * `file=` is refused (this layer runs in browsers and has no files).
   */
  readonly openOverlayFile?: (path: string, size: number) => BlockBackend;
}

/** One line of help per filter: its keys and their values. */
export const FILTER_HELP: Readonly<Record<FilterName, string>> = {
  cow: 'copy-on-write overlay, the base never written: block=SIZE (default 64K), file=PATH (default in memory)',
  error: 'fail chosen operations: ops=read+write+flush+discard+zero, sectors=FIRST-LAST+..., nth=N, rate=FRACTION, seed=N, status=ioerr|unsupp',
  delay: 'hold operations: read=, write=, flush=, discard=, zero= DURATION (e.g. 5ms, 250us, 1s)',
  throttle: 'limit rates: iops=, read-iops=, write-iops= N; bps=, read-bps=, write-bps= SIZE per second; burst=DURATION (default 100ms)',
  stats: 'count operations, bytes and errors (no options)',
};

const MS_PER_S = 1000;
const U32_MAX = 0xffff_ffff;

/** Each filter's keys and how its options are read from them. */
const PARSERS: { readonly [N in FilterName]: { readonly keys: readonly string[]; parse(o: FilterOptionReader): Extract<FilterSpec, { name: N }>['options'] } } = {
  cow: {
    keys: ['block', 'file'],
    parse(o) {
      const granularity = o.size('block', VIRTIO_BLK_SECTOR_SIZE);
      if (granularity !== undefined && (granularity > MAX_COW_GRANULARITY || (granularity & (granularity - 1)) !== 0)) {
        throw new FilterSpecError('BAD_FILTER_VALUE', `filter cow: block must be a power of two from 512 to 16M, got ${quote(o.text('block') ?? '')}`);
      }
      const file = o.text('file');
      if (file === '') throw new FilterSpecError('BAD_FILTER_VALUE', 'filter cow: file must be a path, got ""');
      return { granularity, file };
    },
  },
  error: {
    keys: ['ops', 'sectors', 'nth', 'rate', 'seed', 'status'],
    parse: (o) => ({
      ops: o.list('ops', FILTER_OPS),
      sectors: o.sectorRanges('sectors'),
      nth: o.count('nth', 1),
      rate: o.fraction('rate'),
      seed: o.count('seed', 0, U32_MAX),
      status: o.choice('status', ['ioerr', 'unsupp'] as const),
    }),
  },
  delay: {
    keys: [...FILTER_OPS],
    parse: (o) => ({
      read: o.duration('read'), write: o.duration('write'), flush: o.duration('flush'),
      discard: o.duration('discard'), zero: o.duration('zero'),
    }),
  },
  throttle: {
    keys: ['iops', 'read-iops', 'write-iops', 'bps', 'read-bps', 'write-bps', 'burst'],
    parse(o) {
      const burst = o.duration('burst');
      const options: ThrottleOptions = {
        iops: o.number('iops', true), readIops: o.number('read-iops', true), writeIops: o.number('write-iops', true),
        bps: o.size('bps', 1), readBps: o.size('read-bps', 1), writeBps: o.size('write-bps', 1),
        burst: burst === undefined ? undefined : burst / MS_PER_S,
      };
      const { iops, readIops, writeIops, bps, readBps, writeBps } = options;
      if ([iops, readIops, writeIops, bps, readBps, writeBps].every((v) => v === undefined)) {
        throw new FilterSpecError('BAD_FILTER_VALUE', 'filter throttle: set at least one limit (iops, read-iops, write-iops, bps, read-bps, write-bps)');
      }
      return options;
    },
  },
  stats: { keys: [], parse: () => ({}) },
};

const NAMES = Object.keys(PARSERS) as FilterName[];

/**
 * Parses and checks `NAME[:KEY=VALUE,...]`. Throws {@link FilterSpecError} (a one-line
 * message) for a malformed spec, an unknown filter or key, a key given twice, or a bad value.
 */
export function parseFilterSpec(text: string): FilterSpec {
  const { name, pairs } = splitFilterSpec(text);
  if (!(NAMES as string[]).includes(name)) {
    throw new FilterSpecError('UNKNOWN_FILTER', `unknown filter ${quote(name)}: the filters are ${NAMES.join(', ')}`);
  }
  const n = name as FilterName;
  const parser = PARSERS[n];
  const options = parser.parse(new FilterOptionReader(n, pairs, parser.keys));
  return { name: n, text, options } as FilterSpec;
}

/**
 * Stacks the filters of `specs` over `backend` and returns the top of the stack. The
 * first spec is the outermost, nearest the guest, as nbdkit stacks `--filter`s: with
 * `stats` then `error`, the statistics count the injected errors; the other way round
 * they would not see them. The stack owns `backend` (closing it closes everything);
 * when this throws (a `cow` file that cannot be opened) nothing has been closed and the
 * caller still owns `backend`.
 */
export function applyFilters(backend: BlockBackend, specs: readonly FilterSpec[], env: FilterEnvironment = {}): BlockBackend {
  let top = backend;
  for (let i = specs.length - 1; i >= 0; i--) top = makeFilter(top, specs[i], env);
  return top;
}

function makeFilter(inner: BlockBackend, spec: FilterSpec, env: FilterEnvironment): BlockBackend {
  switch (spec.name) {
    case 'cow': {
      const { granularity, file } = spec.options;
      if (file === undefined) return new CowFilter(inner, { granularity });
      if (!env.openOverlayFile) {
        throw new FilterSpecError('FILTER_UNAVAILABLE', `filter cow: file= needs a host with files; here the overlay can only be in memory`);
      }
      const open = env.openOverlayFile;
      return new CowFilter(inner, { granularity, overlay: (size) => open(file, size) });
    }
    case 'error':
      return new ErrorFilter(inner, spec.options);
    case 'delay':
      return new DelayFilter(inner, spec.options, env.clock);
    case 'throttle':
      return new ThrottleFilter(inner, spec.options, env.clock);
    case 'stats':
      return new StatsFilter(inner);
  }
}

/** The filters of a stack, outermost first (as {@link applyFilters} built it): to find its statistics, say. */
export function filtersOf(backend: BlockBackend): FilterBackend[] {
  const found: FilterBackend[] = [];
  for (let b = backend; b instanceof FilterBackend; b = b.inner) found.push(b);
  return found;
}
