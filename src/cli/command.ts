/** The shape of a CLI command and the helpers every command uses to read its options. */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { Blip2Error } from "../errors.js";

export interface Io {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream & { isTTY?: boolean };
  stdin: NodeJS.ReadableStream & { isTTY?: boolean };
}

export type OptionSpec = NonNullable<ParseArgsConfig["options"]>;

export interface Command {
  name: string;
  summary: string;
  usage: string;
  /** Help text for the options, one line each. */
  help: string;
  options: OptionSpec;
  run(args: ParsedArgs, io: Io): Promise<number>;
}

export interface ParsedArgs {
  values: Record<string, string | boolean | string[] | undefined>;
  positionals: string[];
}

/** A mistake in how the command was called: reported with a pointer to --help. */
export class UsageError extends Blip2Error {}

export function parse(command: Command, argv: string[]): ParsedArgs {
  try {
    const { values, positionals } = parseArgs({ args: argv, options: { ...command.options, help: { type: "boolean", short: "h" } }, allowPositionals: true, strict: true });
    return { values: values as ParsedArgs["values"], positionals };
  } catch (err) {
    throw new UsageError(`${command.name}: ${(err as Error).message.replace(/\. To specify a positional.*$/s, "")}`);
  }
}

export function stringOption(args: ParsedArgs, name: string): string | undefined {
  const v = args.values[name];
  return typeof v === "string" ? v : undefined;
}

export function requiredOption(args: ParsedArgs, command: string, name: string): string {
  const v = stringOption(args, name);
  if (v === undefined) throw new UsageError(`${command}: missing --${name}`);
  return v;
}

export function intOption(args: ParsedArgs, name: string, min: number): number | undefined {
  const v = stringOption(args, name);
  if (v === undefined) return undefined;
  if (!/^-?\d+$/.test(v) || Number(v) < min) throw new UsageError(`invalid value for --${name}: expected an integer >= ${min}, got ${JSON.stringify(v)}`);
  return Number(v);
}

export function numberOption(args: ParsedArgs, name: string, check: (x: number) => boolean, expected: string): number | undefined {
  const v = stringOption(args, name);
  if (v === undefined) return undefined;
  const x = Number(v);
  if (v.trim() === "" || !Number.isFinite(x) || !check(x)) throw new UsageError(`invalid value for --${name}: expected ${expected}, got ${JSON.stringify(v)}`);
  return x;
}

export function listOption(args: ParsedArgs, name: string): string[] {
  const v = args.values[name];
  return Array.isArray(v) ? v : typeof v === "string" ? [v] : [];
}
