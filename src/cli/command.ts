/**
 * What a subcommand module provides. Each subcommand of DESIGN.md's CLI contract lives in
 * its own module, `src/cli/<name>.ts`, exporting `command` made with
 * {@link defineCommand}; the dispatcher (main.ts) loads it by name, so adding a
 * subcommand touches no shared file.
 */
import type { OptionSpecs, ParsedArgs } from './args.js';

/** Where a command writes: injectable so tests can capture output. */
export interface CliIo {
  /** Writes `text` to standard output as is (add the newline yourself). */
  stdout(text: string): void;
  /** Writes `text` to standard error as is. */
  stderr(text: string): void;
}

/** A subcommand: its help text, its options, and what it does. */
export interface Command<S extends OptionSpecs = OptionSpecs> {
  /** The subcommand, as typed after `vblk`. */
  readonly name: string;
  /** One line for `vblk --help`. */
  readonly summary: string;
  /** The usage after `vblk <name>`, e.g. "IMAGE --socket PATH [options]". */
  readonly usage: string;
  /** More lines for `vblk <name> --help`, after the usage. */
  readonly details?: readonly string[];
  readonly options: S;
  /**
   * Commands under this one (`vblk image create`): each named `"<this> <sub>"`. The
   * dispatcher picks one by the first argument and runs it; this command's own `run`
   * is never called then, and its help lists theirs.
   */
  readonly subcommands?: readonly Command[];
  /**
   * Exit status of a bad command line, when the usual 2 means something else for
   * this command (`vblk image check`: qemu-img check's 2 is "corruptions found").
   */
  readonly usageStatus?: number;
  /**
   * Runs the command with parsed arguments. Resolves to the exit status (0 when nothing
   * is returned). Throw {@link CliUsageError} for a bad command line; any other error is
   * printed as one line and exits with status 1.
   */
  run(args: ParsedArgs<S>, io: CliIo): Promise<number | void>;
}

/** Declares a command; the option specs' literal types flow into `run`'s parsed values. */
export function defineCommand<const S extends OptionSpecs>(command: Command<S>): Command<S> {
  return command;
}
