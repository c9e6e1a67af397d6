/**
 * Where benchmark runs are kept: each run appends one JSON line, with when, where and how it was
 * made, to `bench/results/<date>-<machine>.jsonl` (or `$BLIP2_BENCH_RESULTS/...`). The history of
 * the figures is these files; docs/performance.md shows only the current ones.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const ROOT = path.resolve(import.meta.dirname, "..");

/** The machine's kind, as a file name: its CPU model and core count ("intel-xeon-platinum-8481c-2-cores"). */
export function machineName(cpuModel = os.cpus()[0]?.model ?? "unknown-cpu", cores = os.cpus().length): string {
  const slug = cpuModel
    .toLowerCase()
    .replace(/\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$/g, " ")
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "");
  return `${slug || "unknown-cpu"}-${cores}-cores`;
}

/** The commit the run measured, with "+changes" when the working tree differed from it; undefined outside git. */
function commit(): string | undefined {
  try {
    const head = execFileSync("git", ["rev-parse", "--short=12", "HEAD"], { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    const dirty = execFileSync("git", ["status", "--porcelain", "--untracked-files=no"], { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    return dirty ? `${head}+changes` : head;
  } catch {
    return undefined;
  }
}

export interface RunRecord {
  /** When the run ended (ISO 8601, UTC). */
  date: string;
  /** CPU model and core count, and the file's machine name. */
  machine: { cpu: string; cores: number; name: string };
  /** The command as typed, from the repository root. */
  command: string;
  commit?: string;
}

/** Appends `result` with the run's date, machine, command and commit; returns the file written. */
export function recordResult(result: Record<string, unknown>, options: { dir?: string; now?: Date; argv?: string[] } = {}): string {
  const now = options.now ?? new Date();
  const cpu = os.cpus()[0]?.model ?? "unknown-cpu";
  const cores = os.cpus().length;
  const name = machineName(cpu, cores);
  const argv = options.argv ?? process.argv.slice(1);
  const record: RunRecord & Record<string, unknown> = {
    date: now.toISOString(),
    machine: { cpu, cores, name },
    command: ["node --import tsx", ...argv.map((a) => (a.startsWith(ROOT + path.sep) ? path.relative(ROOT, a) : a))].join(" "),
    commit: commit(),
    ...result,
  };
  const dir = options.dir ?? process.env.BLIP2_BENCH_RESULTS ?? path.join(ROOT, "bench", "results");
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${now.toISOString().slice(0, 10)}-${name}.jsonl`);
  fs.appendFileSync(file, `${JSON.stringify(record)}\n`);
  return file;
}
