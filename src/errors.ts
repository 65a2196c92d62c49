/**
 * The one error base of vblk. Every error that crosses a module boundary has a stable
 * machine-readable `code` (tests and callers switch on it) and a message a user can act on.
 */
export class VblkError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** Host-facing misuse of an API (bad options, calls in the wrong state). */
export class UsageError extends VblkError {}
