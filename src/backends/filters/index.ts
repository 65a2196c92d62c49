/**
 * Filters: backends that wrap a backend (copy-on-write, error injection, delay,
 * throttling, statistics), the base they share, and the registry that builds them from
 * `NAME:KEY=VALUE,...` text.
 */
export { FilterBackend, systemClock, type FilterClock } from './filter.js';
export { CowFilter, DEFAULT_COW_GRANULARITY, MAX_COW_GRANULARITY, type CowOptions } from './cow.js';
export { DelayFilter, type DelayOptions } from './delay.js';
export { ErrorFilter, type ErrorOptions, type InjectedStatus } from './error.js';
export { StatsFilter, type OpCounts, type StatsSnapshot } from './stats.js';
export { ThrottleFilter, MIN_BURST_MS, type ThrottleOptions } from './throttle.js';
export {
  FILTER_OPS, FilterSpecError, type FilterOp, type FilterSpecErrorCode, type SectorSpan,
} from './options.js';
export {
  FILTER_HELP, applyFilters, filtersOf, parseFilterSpec,
  type CowSpecOptions, type FilterEnvironment, type FilterName, type FilterSpec,
} from './registry.js';
