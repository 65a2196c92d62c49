#!/usr/bin/env node
/**
 * `vblk`: the command-line entry point. Dispatches to the subcommands of DESIGN.md's CLI
 * contract, each in its own module `./<name>.js` exporting `command` (see command.ts).
 * Modules are loaded on demand, so a subcommand that is not built yet is reported as
 * such instead of breaking the others. Errors print one line to stderr and exit non-zero
 * (2 for a bad command line, 1 for a failure while running).
 */
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { CliUsageError, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, formatOptions, isHelpFlag, parseCommandLine } from './args.js';
import type { CliIo, Command } from './command.js';

/** The subcommands, in the order `vblk --help` lists them. */
export const SUBCOMMANDS = ['serve', 'info', 'read', 'write', 'bench', 'resize', 'stats', 'image'] as const;
/** A subcommand of the CLI contract. */
export type SubcommandName = (typeof SUBCOMMANDS)[number];

const processIo: CliIo = {
  stdout: (text) => void process.stdout.write(text),
  stderr: (text) => void process.stderr.write(text),
};

function isSubcommand(name: string): name is SubcommandName {
  return (SUBCOMMANDS as readonly string[]).includes(name);
}

/** The module of subcommand `name`, or null when it is not part of this build. */
async function loadCommand(name: SubcommandName): Promise<Command | null> {
  const url = new URL(`./${name}.js`, import.meta.url);
  if (!existsSync(url)) return null;
  const module = (await import(url.href)) as { command?: Command };
  return module.command ?? null;
}

/** `vblk <name> --help`; for a command with subcommands, the help of each of them too. */
export function commandHelp(command: Command): string {
  const lines = [`Usage: vblk ${command.name} ${command.usage}`, '', command.summary];
  if (command.details) lines.push('', ...command.details);
  if (command.subcommands) {
    for (const sub of command.subcommands) {
      lines.push('', `vblk ${sub.name} ${sub.usage}`, `  ${sub.summary}`);
      if (sub.details) lines.push(...sub.details.map((d) => (d ? `  ${d}` : d)));
      if (Object.keys(sub.options).length > 0) lines.push('  Options:', ...formatOptions(sub.options).slice(0, -1).map((l) => `  ${l}`));
    }
    lines.push('', 'Options:', '  -h, --help  show this help');
  } else {
    lines.push('', 'Options:', ...formatOptions(command.options));
  }
  return `${lines.join('\n')}\n`;
}

/**
 * The command that `rest` (the arguments after `vblk <name>`) asks for: `command`
 * itself, or one of its subcommands with the arguments after its name. A missing or
 * unknown subcommand is a usage error.
 */
function pickSubcommand(command: Command, rest: readonly string[]): { command: Command; rest: readonly string[] } | 'help' {
  if (!command.subcommands) return { command, rest };
  const names = command.subcommands.map((s) => s.name.slice(command.name.length + 1));
  const [first, ...after] = rest;
  if (first !== undefined && isHelpFlag(first)) return 'help';
  if (first === undefined || first.startsWith('-')) {
    throw new CliUsageError(`vblk ${command.name}: missing subcommand (one of ${names.join(', ')}); see vblk ${command.name} --help`);
  }
  const i = names.indexOf(first);
  if (i < 0) throw new CliUsageError(`vblk ${command.name}: unknown subcommand '${first}' (one of ${names.join(', ')}); see vblk ${command.name} --help`);
  return { command: command.subcommands[i], rest: after };
}

async function topLevelHelp(): Promise<string> {
  const lines = ['Usage: vblk <command> [options]', '       vblk --version', '', 'The virtio block device, both ends of it.', '', 'Commands:'];
  for (const name of SUBCOMMANDS) {
    const c = await loadCommand(name);
    lines.push(`  ${name.padEnd(8)}${c ? c.summary : '(not available in this build)'}`);
  }
  lines.push('', 'Options:', '  -V, --version  print the version', '  -h, --help     show this help');
  lines.push('', "Run 'vblk <command> --help' for a command's options.");
  return `${lines.join('\n')}\n`;
}

/**
 * The version in vblk's package.json. This module is dist/src/cli/main.js, so the
 * package root is three levels up, in a checkout and in an installed package alike (npm
 * always ships package.json; its bin link is a symlink, which Node resolves before
 * setting import.meta.url).
 */
function packageVersion(): string {
  const url = new URL('../../../package.json', import.meta.url);
  let pkg: { name?: unknown; version?: unknown };
  try {
    pkg = JSON.parse(readFileSync(url, 'utf8')) as typeof pkg;
  } catch (e) {
    throw new Error(`cannot read the version from ${fileURLToPath(url)}: ${e instanceof Error ? e.message : String(e)}`);
  }
  if (pkg.name !== 'vblk' || typeof pkg.version !== 'string') throw new Error(`${fileURLToPath(url)} is not vblk's package.json`);
  return pkg.version;
}

/** One line: an error's message with any line breaks folded. */
function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').trim();
}

/** Runs `vblk` with `argv` (the arguments after the program name) and returns the exit status. */
export async function main(argv: readonly string[], io: CliIo = processIo): Promise<number> {
  const [name, ...rest] = argv;
  if (name === '--version' || name === '-V') {
    try {
      io.stdout(`vblk ${packageVersion()}\n`);
      return EXIT_OK;
    } catch (e) {
      io.stderr(`vblk: ${oneLine((e as Error).message)}\n`);
      return EXIT_FAILURE;
    }
  }
  if (name === undefined || isHelpFlag(name) || name === 'help') {
    const topic = name === 'help' ? rest[0] : undefined;
    if (topic !== undefined && isSubcommand(topic)) {
      const c = await loadCommand(topic);
      if (c) {
        io.stdout(commandHelp(c));
        return EXIT_OK;
      }
    }
    if (name === undefined) {
      io.stderr(`vblk: missing command (one of ${SUBCOMMANDS.join(', ')}); see vblk --help\n`);
      return EXIT_USAGE;
    }
    io.stdout(await topLevelHelp());
    return EXIT_OK;
  }
  if (!isSubcommand(name)) {
    io.stderr(`vblk: unknown command '${name}' (one of ${SUBCOMMANDS.join(', ')}); see vblk --help\n`);
    return EXIT_USAGE;
  }
  const top = await loadCommand(name);
  if (top === null) {
    io.stderr(`vblk ${name}: not available in this build\n`);
    return EXIT_FAILURE;
  }
  let picked: ReturnType<typeof pickSubcommand>;
  try {
    picked = pickSubcommand(top, rest);
  } catch (e) {
    io.stderr(`${oneLine((e as Error).message)}\n`);
    return EXIT_USAGE;
  }
  if (picked === 'help') {
    io.stdout(commandHelp(top));
    return EXIT_OK;
  }
  const { command } = picked;
  const args = picked.rest;
  const dashDash = args.indexOf('--');
  if (args.slice(0, dashDash < 0 ? undefined : dashDash).some(isHelpFlag)) {
    io.stdout(commandHelp(command));
    return EXIT_OK;
  }
  try {
    const status = await command.run(parseCommandLine(command.name, command.options, args), io);
    return status ?? EXIT_OK;
  } catch (e) {
    if (e instanceof CliUsageError) {
      io.stderr(`${oneLine(e.message)}\n`);
      return command.usageStatus ?? EXIT_USAGE;
    }
    io.stderr(`vblk ${command.name}: ${oneLine(e instanceof Error ? e.message : String(e))}\n`);
    return EXIT_FAILURE;
  }
}

/** Whether this module is the program being run (not imported by a test). */
function isEntryPoint(): boolean {
  const script = process.argv[1];
  if (!script) return false;
  try {
    return realpathSync(script) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return pathToFileURL(script).href === import.meta.url;
  }
}

if (isEntryPoint()) {
  process.exitCode = await main(process.argv.slice(2));
}
