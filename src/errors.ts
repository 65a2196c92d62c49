/**
 * The one error base of vblk. Every error that crosses a module boundary has a stable
 * machine-readable `code` (tests and callers switch on it) and a message a user can act on.
 */
export class VblkError extends Error {
  constructor(
    /** The stable machine-readable reason (`BAD_OPTION`, `READ_ONLY` …); subclasses narrow it to their own codes. */
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** Host-facing misuse of an API (bad options, calls in the wrong state). */
export class UsageError extends VblkError {}

/**
 * One line about anything thrown, for a log line or a one-line message: an error's
 * message with its line breaks folded, or the value as text. Code vblk does not control
 * (a user's backend module) may throw anything, an object whose toString throws
 * included, so this never throws.
 */
export function describeThrown(e: unknown): string {
  try {
    const text = (e instanceof Error ? e.message : String(e)).replace(/\s*\n\s*/g, ' ').trim();
    return text || (e instanceof Error ? e.name : 'an empty error');
  } catch {
    return 'an error that cannot be printed';
  }
}
