/**
 * A user's backend module (`vblk serve --backend MODULE`): an ES module whose default
 * export is a factory `(options) => BlockBackend | Promise<BlockBackend>`. Loading it is
 * parsing outside input: every way it can be wrong — no such file, a module that throws
 * while loading, no factory, a factory that throws or rejects, a result that is not a
 * backend — is a {@link BackendModuleError} with one line naming the module and what to
 * fix. The backend returned is guarded (see checked-backend.ts).
 */
import { existsSync } from 'node:fs';
import { extname, isAbsolute, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { BlockBackend } from '../backends/backend.js';
import { BackendShapeError, openCheckedBackend } from '../backends/checked-backend.js';
import { VblkError, describeThrown } from '../errors.js';

/** The default export of a backend module. `options` holds the `--backend-opt KEY=VALUE` pairs. */
export type BackendFactory = (options: Readonly<Record<string, string>>) => BlockBackend | Promise<BlockBackend>;

/** What went wrong with a backend module; the code says which step. */
export type BackendModuleErrorCode = 'MODULE_NOT_FOUND' | 'MODULE_FAILED' | 'NO_FACTORY' | 'FACTORY_FAILED' | 'NOT_A_BACKEND';

/** A backend module that cannot be served; the message is one line naming the module. */
export class BackendModuleError extends VblkError {
  declare readonly code: BackendModuleErrorCode;
  constructor(code: BackendModuleErrorCode, message: string) {
    super(code, message);
  }
}

/** How {@link loadBackendModule} finds a module given as a path. */
export interface LoadBackendOptions {
  /** The directory relative paths start from. Default `process.cwd()`. */
  readonly cwd?: string;
}

/** A path names a file (`./disk.js`, `/opt/disk.mjs`, a `file:` URL); anything else names a package. */
function isPath(specifier: string): boolean {
  return isAbsolute(specifier) || specifier.startsWith('./') || specifier.startsWith('../') || specifier.startsWith('file:');
}

/**
 * Imports the module `specifier` — a path (relative to `cwd`) or a package name, which
 * is found as vblk's own imports are (from the project vblk is installed in) — calls
 * its default export with `factoryOptions`, and returns the backend it makes, checked
 * and guarded. Throws {@link BackendModuleError}.
 */
export async function loadBackendModule(
  specifier: string,
  factoryOptions: Readonly<Record<string, string>> = {},
  options: LoadBackendOptions = {},
): Promise<BlockBackend> {
  const name = `backend module ${specifier}`;
  const cwd = options.cwd ?? process.cwd();
  let url = specifier;
  if (isPath(specifier)) {
    url = specifier.startsWith('file:') ? specifier : pathToFileURL(resolve(cwd, specifier)).href;
    if (!specifier.startsWith('file:') && !existsSync(resolve(cwd, specifier))) {
      throw new BackendModuleError('MODULE_NOT_FOUND', `${name}: no such file (${resolve(cwd, specifier)})`);
    }
  } else if (existsSync(resolve(cwd, specifier))) {
    // `disk.js` is a package name to import(); the user almost certainly meant the file.
    throw new BackendModuleError('MODULE_NOT_FOUND', `${name}: a path needs ./ or / (--backend ./${specifier}); without, it names a package`);
  }
  let loaded: { default?: unknown };
  try {
    loaded = (await import(url)) as { default?: unknown };
  } catch (e) {
    const ext = extname(specifier);
    const hint = ['.ts', '.mts', '.cts'].includes(ext) ? ' (compile TypeScript to JavaScript first)' : '';
    throw new BackendModuleError('MODULE_FAILED', `${name} failed to load: ${describeThrown(e)}${hint}`);
  }
  const factory = loaded.default;
  if (typeof factory !== 'function') {
    throw new BackendModuleError('NO_FACTORY', `${name}: its default export must be a function (options) => BlockBackend, got ${factory === null ? 'null' : typeof factory}`);
  }
  let made: unknown;
  try {
    made = await (factory as BackendFactory)(factoryOptions);
  } catch (e) {
    throw new BackendModuleError('FACTORY_FAILED', `${name}: its factory failed: ${describeThrown(e)}`);
  }
  try {
    return await openCheckedBackend(made);
  } catch (e) {
    if (!(e instanceof BackendShapeError)) throw e;
    throw new BackendModuleError('NOT_A_BACKEND', `${name}: ${e.message}`);
  }
}
