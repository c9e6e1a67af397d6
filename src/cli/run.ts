/** The `blip2` command line: dispatch to a command, turn every failure into one clear line. */
import { Blip2Error, describeError } from "../errors.js";
import { parse, UsageError, type Command, type Io } from "./command.js";
import { ask } from "./commands/ask.js";
import { cache } from "./commands/cache.js";
import { caption } from "./commands/caption.js";
import { chat } from "./commands/chat.js";
import { compose } from "./commands/compose.js";
import { dump } from "./commands/dump.js";
import { evalCommand } from "./commands/eval.js";
import { grad } from "./commands/grad.js";
import { index } from "./commands/index.js";
import { match } from "./commands/match.js";
import { quantize } from "./commands/quantize.js";
import { search } from "./commands/search.js";
import { serve } from "./commands/serve.js";
import { trainCommand } from "./commands/train.js";
import { world } from "./commands/world.js";

const COMMANDS: Command[] = [caption, ask, chat, match, index, search, quantize, cache, dump, compose, trainCommand, evalCommand, grad, world, serve];

function mainHelp(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length));
  return [
    "Usage: blip2 <command> [options]",
    "",
    "Commands:",
    ...COMMANDS.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    "",
    "Run 'blip2 <command> --help' for a command's options.",
    "",
  ].join("\n");
}

function commandHelp(c: Command): string {
  return `Usage: ${c.usage}\n\n${c.summary}\n\nOptions:\n${c.help.replace(/^/gm, "  ")}\n  -h, --help               show this help\n`;
}

/** Runs the CLI; returns the exit code. Never throws. */
export async function run(argv: string[], io: Io): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    io.stdout.write(mainHelp());
    return name === undefined ? 2 : 0;
  }
  const command = COMMANDS.find((c) => c.name === name);
  if (!command) {
    io.stderr.write(`blip2: error: unknown command ${JSON.stringify(name)} (commands: ${COMMANDS.map((c) => c.name).join(", ")})\n`);
    return 2;
  }
  try {
    const args = parse(command, rest);
    if (args.values.help) {
      io.stdout.write(commandHelp(command));
      return 0;
    }
    return await command.run(args, io);
  } catch (err) {
    return report(err, io, command);
  }
}

function report(err: unknown, io: Io, command: Command): number {
  if (process.env.BLIP2_DEBUG && err instanceof Error) io.stderr.write(`${err.stack}\n`);
  if (err instanceof UsageError) {
    io.stderr.write(`blip2: error: ${err.message} (see 'blip2 ${command.name} --help')\n`);
    return 2;
  }
  const hint = err instanceof Blip2Error ? "" : " (unexpected: set BLIP2_DEBUG=1 for details)";
  io.stderr.write(`blip2: error: ${describeError(err)}${hint}\n`);
  return 1;
}
