/**
 * The CLI's option parser, shared by every subcommand: `--flag value` and `--flag=value`,
 * booleans, integers, sizes with K/M/G/T suffixes (powers of 1024, DESIGN.md's CLI
 * contract), numbers and choices. Every mistake is a {@link CliUsageError} whose message
 * is one line naming the subcommand and the option:
 * "vblk bench: --iodepth must be a positive integer, got 'x'".
 */
import { VblkError } from '../errors.js';

/** A command line the user got wrong: printed as one line, exit status {@link EXIT_USAGE}. */
export class CliUsageError extends VblkError {
  constructor(message: string) {
    super('CLI_USAGE', message);
  }
}

/** Exit status for success, for a failure while running, and for a bad command line. */
export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

interface SpecBase {
  /** One line for `--help`. */
  readonly description: string;
  /** Placeholder for the value in `--help` (e.g. PATH). */
  readonly valueName?: string;
}

/** A flag without a value: present → true. */
export interface BooleanSpec extends SpecBase {
  readonly kind: 'boolean';
}
/** Any text. */
export interface StringSpec extends SpecBase {
  readonly kind: 'string';
  readonly default?: string;
}
/** A whole number, at least `min` (default 1: "a positive integer"), at most `max`. */
export interface IntegerSpec extends SpecBase {
  readonly kind: 'integer';
  readonly min?: number;
  readonly max?: number;
  readonly default?: number;
}
/** Bytes: plain digits or digits with a K, M, G or T suffix (powers of 1024), at least `min` (default 1). */
export interface SizeSpec extends SpecBase {
  readonly kind: 'size';
  readonly min?: number;
  readonly default?: number;
}
/** A decimal number, > 0 unless `allowZero`. */
export interface NumberSpec extends SpecBase {
  readonly kind: 'number';
  readonly allowZero?: boolean;
  readonly default?: number;
}
/** One of `choices`. */
export interface ChoiceSpec<C extends string = string> extends SpecBase {
  readonly kind: 'choice';
  readonly choices: readonly C[];
  readonly default?: C;
}
/** Any text, and the option may be given again: every value, in order (none when absent). */
export interface ListSpec extends SpecBase {
  readonly kind: 'list';
}
/** One option's kind, help text and limits. */
export type OptionSpec = BooleanSpec | StringSpec | IntegerSpec | SizeSpec | NumberSpec | ChoiceSpec | ListSpec;
/** Options by name, without the leading `--`. */
export type OptionSpecs = Readonly<Record<string, OptionSpec>>;

type BaseValue<S> = S extends BooleanSpec ? boolean
  : S extends IntegerSpec | SizeSpec | NumberSpec ? number
  : S extends ChoiceSpec<infer C> ? C
  : string;
/**
 * The parsed value of one option: booleans and lists are always set (false, []); others
 * are undefined when absent without a default.
 */
export type OptionValue<S> = S extends BooleanSpec ? boolean
  : S extends ListSpec ? string[]
  : S extends { readonly default: unknown } ? BaseValue<S> : BaseValue<S> | undefined;
/** Parsed values of every option in `S`, by name. */
export type OptionValues<S extends OptionSpecs> = { -readonly [K in keyof S]: OptionValue<S[K]> };

/** A parsed command line: option values, and the other arguments in order. */
export interface ParsedArgs<S extends OptionSpecs> {
  readonly options: OptionValues<S>;
  readonly positionals: readonly string[];
}

const SIZE_SUFFIX: Readonly<Record<string, number>> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/**
 * Bytes from "4096", "4k", "64M", "1G", "2T" (case-insensitive suffix, powers of 1024).
 * Returns null when `text` is not such a size or is beyond a safe integer.
 */
export function parseSizeValue(text: string): number | null {
  const m = /^(\d+)([kmgt]?)$/i.exec(text);
  if (!m) return null;
  const bytes = Number(m[1]) * SIZE_SUFFIX[m[2].toUpperCase()];
  return Number.isSafeInteger(bytes) ? bytes : null;
}

/** `bytes` in the largest K/M/G/T unit that divides it: the inverse of {@link parseSizeValue}. */
export function formatSizeValue(bytes: number): string {
  for (const suffix of ['T', 'G', 'M', 'K']) {
    const unit = SIZE_SUFFIX[suffix];
    if (bytes >= unit && bytes % unit === 0) return `${bytes / unit}${suffix}`;
  }
  return String(bytes);
}

/** Whether `arg` asks for help. */
export function isHelpFlag(arg: string): boolean {
  return arg === '--help' || arg === '-h';
}

/**
 * Parses `argv` (the arguments after the subcommand) against `specs`. `command` names
 * the subcommand in error messages. Positionals are collected in order; the caller
 * checks how many it wants. `--` ends the options.
 */
export function parseCommandLine<S extends OptionSpecs>(command: string, specs: S, argv: readonly string[]): ParsedArgs<S> {
  const fail = (why: string): never => {
    throw new CliUsageError(`vblk ${command}: ${why}`);
  };
  const values: Record<string, unknown> = {};
  const seen = new Set<string>();
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith('-') || arg === '-') {
      positionals.push(arg);
      continue;
    }
    if (!arg.startsWith('--')) fail(`unknown option ${arg} (see vblk ${command} --help)`);
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    const spec = Object.hasOwn(specs, name) ? specs[name] : undefined;
    if (spec === undefined) fail(`unknown option --${name} (see vblk ${command} --help)`);
    const s = spec as OptionSpec;
    if (seen.has(name) && s.kind !== 'list') fail(`--${name} is given more than once`);
    seen.add(name);
    if (s.kind === 'boolean') {
      if (eq >= 0) fail(`--${name} takes no value`);
      values[name] = true;
      continue;
    }
    let text: string;
    if (eq >= 0) text = arg.slice(eq + 1);
    else {
      if (i + 1 >= argv.length) fail(`--${name} needs a value`);
      text = argv[++i];
    }
    if (s.kind === 'list') ((values[name] ??= []) as string[]).push(text);
    else values[name] = convert(name, s, text, fail);
  }
  for (const [name, spec] of Object.entries(specs)) {
    if (name in values) continue;
    values[name] = spec.kind === 'boolean' ? false : spec.kind === 'list' ? [] : spec.default;
  }
  return { options: values as OptionValues<S>, positionals };
}

function convert(name: string, spec: Exclude<OptionSpec, BooleanSpec | ListSpec>, text: string, fail: (why: string) => never): unknown {
  const got = `got '${text}'`;
  switch (spec.kind) {
    case 'string':
      return text;
    case 'integer': {
      const min = spec.min ?? 1;
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      const n = /^\d+$/.test(text) ? Number(text) : NaN;
      if (!Number.isSafeInteger(n) || n < min || n > max) {
        const what = min === 1 && max === Number.MAX_SAFE_INTEGER ? 'a positive integer'
          : min === 0 && max === Number.MAX_SAFE_INTEGER ? 'a non-negative integer'
            : max === Number.MAX_SAFE_INTEGER ? `an integer of at least ${min}` : `an integer from ${min} to ${max}`;
        fail(`--${name} must be ${what}, ${got}`);
      }
      return n;
    }
    case 'size': {
      const n = parseSizeValue(text);
      const min = spec.min ?? 1;
      if (n === null || n < min) {
        fail(`--${name} must be a size in bytes (digits with an optional K, M, G or T suffix)${min > 1 ? ` of at least ${min}` : ''}, ${got}`);
      }
      return n;
    }
    case 'number': {
      const n = /^(\d+(\.\d*)?|\.\d+)$/.test(text) ? Number(text) : NaN;
      if (!Number.isFinite(n) || n < 0 || (n === 0 && !spec.allowZero)) {
        fail(`--${name} must be a ${spec.allowZero ? 'non-negative' : 'positive'} number, ${got}`);
      }
      return n;
    }
    case 'choice':
      if (!spec.choices.includes(text)) fail(`--${name} must be one of ${spec.choices.join(', ')}, ${got}`);
      return text;
  }
}

/** The `--help` lines for `specs`: one per option, aligned, with its default. */
export function formatOptions(specs: OptionSpecs): string[] {
  const rows: [string, string][] = Object.entries(specs).map(([name, s]) => {
    const value = s.kind === 'boolean' ? '' : ` ${s.valueName ?? defaultValueName(s)}`;
    const d = 'default' in s ? s.default : undefined;
    const def = d === undefined ? '' : ` (default ${typeof d === 'number' && s.kind === 'size' ? formatSizeValue(d) : String(d)})`;
    const choices = s.kind === 'choice' ? ` [${s.choices.join('|')}]` : '';
    const again = s.kind === 'list' ? ' (may be repeated)' : '';
    return [`--${name}${value}`, `${s.description}${choices}${def}${again}`];
  });
  rows.push(['-h, --help', 'show this help']);
  const width = Math.max(...rows.map(([left]) => left.length));
  return rows.map(([left, right]) => `  ${left.padEnd(width)}  ${right}`);
}

function defaultValueName(s: Exclude<OptionSpec, BooleanSpec>): string {
  switch (s.kind) {
    case 'integer': return 'N';
    case 'size': return 'SIZE';
    case 'number': return 'NUMBER';
    case 'choice': return 'MODE';
    default: return 'VALUE';
  }
}
