/**
 * `--backend-opt KEY=VALUE`, given any number of times: the options object a backend
 * module's factory receives. Keys are names (a letter, then letters, digits, `_`, `-`,
 * `.`), so none can be `__proto__` or an empty string; a value is everything after the
 * first `=` and may be empty or hold more `=`. A key given twice is a mistake, not an
 * override.
 */
import { CliUsageError } from './args.js';

const KEY = /^[A-Za-z][A-Za-z0-9_.-]*$/;

/**
 * Parses `items` (each `KEY=VALUE`) into an object. `what` names the option in errors:
 * "vblk serve: --backend-opt must be KEY=VALUE, got 'size'". Throws {@link CliUsageError}.
 */
export function parseKeyValues(what: string, items: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const item of items) {
    const eq = item.indexOf('=');
    const key = eq < 0 ? '' : item.slice(0, eq);
    if (!KEY.test(key)) {
      throw new CliUsageError(`${what} must be KEY=VALUE with KEY a name (letters, digits, _ - .), got ${JSON.stringify(item)}`);
    }
    if (Object.hasOwn(out, key)) throw new CliUsageError(`${what}: ${key} is given more than once`);
    out[key] = item.slice(eq + 1);
  }
  return out;
}
