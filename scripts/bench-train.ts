/**
 * Training speed and memory on full-size shapes with random weights (generated once, as for
 * `npm run bench`): a stage-1 step (Blip2ForImageTextRetrieval's Q-Former, batch 8, texts of 32
 * tokens, 32 queries, cached ViT-g features [8, 257, 1408], hard negatives drawn from the ITC
 * similarities) and a stage-2 step through OPT-2.7B (batch 4, 24 text tokens after the 32 queries)
 * with the language model in each dtype. A step is the forward+backward graph and the AdamW update.
 *
 * Each configuration runs in fresh processes (`--repeats` of them, default 2: the machine may be
 * shared, so the spread says how far to trust a figure), each a warm-up step then `--steps` timed
 * ones. Peak resident memory is the process's VmHWM; peak private memory is sampled from outside
 * (RssAnon every 50 ms). Prints a table and a JSON line, and appends the line to
 * bench/results/<date>-<machine>.jsonl.
 *
 * npm run bench:train [-- --stages 1,2 --dtypes fp32,q8,q4 --threads 2 --steps 3 --repeats 2 --profile --no-arena]
 * (--profile: each configuration's kernel times by operator under ONNX Runtime's profiler, forward and backward;
 * --no-arena: training sessions without ONNX Runtime's memory arena)
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { recordResult } from "./bench-results.js";
import { syntheticCheckpoint } from "./synthetic-checkpoint.js";

const { values } = parseArgs({ options: { stages: { type: "string" }, dtypes: { type: "string" }, threads: { type: "string" }, steps: { type: "string" }, repeats: { type: "string" }, profile: { type: "boolean" }, "no-arena": { type: "boolean" } } });
const stages = (values.stages ?? "1,2").split(",").map(Number);
const dtypes = (values.dtypes ?? "fp32,q8,q4").split(",");
const threads = values.threads ?? "2";
const steps = values.steps ?? "3";
const repeats = Number(values.repeats ?? 2);
for (const s of stages) if (s !== 1 && s !== 2) fail(`--stages: expected 1 and/or 2, got ${values.stages}`);
for (const d of dtypes) if (!["fp32", "q8", "q4"].includes(d)) fail(`--dtypes: expected fp32, q8 or q4, got ${JSON.stringify(d)}`);
for (const [flag, v] of [["--threads", threads], ["--steps", steps], ["--repeats", String(repeats)]] as const) {
  if (!/^[1-9]\d*$/.test(v)) fail(`${flag}: expected a whole number >= 1, got ${JSON.stringify(v)}`);
}

function fail(message: string): never {
  console.error(message);
  process.exit(2);
}

/** PyTorch 1.13 on the same machine type (transformers' modules, float32, 2 threads), from the issue. */
const PYTORCH = { stage1: { stepS: [24.9, 28.9], trainedParameters: 186.7e6 }, stage2Fp32: { stepS: [24.3, 28.3], peakRss: 15.0 * 2 ** 30 } };
/** The issue's bars, as multiples of PyTorch's step (its midpoint) and a resident-memory cap. */
const BARS = { stage1: 0.5, stage2Fp32: 0.8, stage2Quantized: 0.4, stage2Q4Rss: 4e9 };
const mid = (r: number[]) => (r[0]! + r[1]!) / 2;

interface WorkerResult {
  stage: 1 | 2;
  dtype: string;
  threads: number;
  batch: number;
  textLength: number;
  trainedParameters: number;
  loadS: number;
  warmupS: number;
  warmupGraphs: Record<string, number>;
  steps: { total: number; cpu: number; graphs: Record<string, number>; adamw: number }[];
  memory: { peakRss: number; anonAtEnd: number; fileRssAtEnd: number };
  profile?: unknown;
  peakAnon: number;
}

/** A worker's private memory, read from its /proc status while it runs. */
function anonOf(pid: number): number {
  try {
    const s = fs.readFileSync(`/proc/${pid}/status`, "utf8");
    return Number(s.match(/RssAnon:\s+(\d+)/)?.[1] ?? 0) * 1024;
  } catch {
    return 0; // exited between two samples
  }
}

function runWorker(args: string[]): Promise<WorkerResult> {
  const worker = path.join(import.meta.dirname, "bench-train-worker.ts");
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", worker, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    let peakAnon = 0;
    const sampler = setInterval(() => (peakAnon = Math.max(peakAnon, anonOf(child.pid!))), 50);
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    child.on("close", (code, signal) => {
      clearInterval(sampler);
      if (code !== 0) return reject(new Error(`worker ${args.join(" ")} failed (${signal ?? `exit ${code}`}):\n${stderr.trim().split("\n").slice(-15).join("\n")}`));
      const r = JSON.parse(stdout.trim().split("\n").at(-1)!) as WorkerResult;
      resolve({ ...r, peakAnon: Math.max(peakAnon, r.memory.anonAtEnd) });
    });
  });
}

interface Config {
  stage: 1 | 2;
  dtype: string;
  runs: WorkerResult[];
}

const configs: Config[] = [];
const profileDir = path.join(os.tmpdir(), `blip2-bench-train-profile-${process.pid}`);
for (const stage of stages) {
  const dir = syntheticCheckpoint(stage === 1 ? "itm-vit-g" : "opt-2.7b");
  for (const dtype of stage === 1 ? ["fp32"] : dtypes) {
    const config: Config = { stage: stage as 1 | 2, dtype, runs: [] };
    for (let r = 0; r < repeats; r++) {
      const profile = values.profile && r === repeats - 1 ? ["--profile", profileDir] : [];
      try {
        const arena = values["no-arena"] ? ["--no-arena"] : [];
        config.runs.push(await runWorker(["--dir", dir, "--stage", String(stage), "--dtype", dtype, "--threads", threads, "--steps", steps, ...profile, ...arena]));
        console.error(`done: stage ${stage}${stage === 2 ? ` ${dtype}` : ""}, process ${r + 1} of ${repeats}`);
      } catch (e) {
        console.error(`stage ${stage} ${dtype}: ${(e as Error).message}`);
      }
    }
    configs.push(config);
  }
}

const GB = 1e9;
const GiB = 2 ** 30;
const f = (x: number, d = 2) => x.toFixed(d);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const spread = (xs: number[]) => ({ median: median(xs), min: Math.min(...xs), max: Math.max(...xs) });
const cell = (s: { median: number; min: number; max: number }, d = 2) => `${f(s.median, d)} (${f(s.min, d)}-${f(s.max, d)})`;

const summaries = configs.filter((c) => c.runs.length).map((c) => {
  const stepsS = c.runs.flatMap((r) => r.steps.map((s) => s.total));
  const graphNames = [...new Set(c.runs.flatMap((r) => r.steps.flatMap((s) => Object.keys(s.graphs))))];
  const graphs = Object.fromEntries(graphNames.map((g) => [g, spread(c.runs.flatMap((r) => r.steps.map((s) => s.graphs[g] ?? 0)))]));
  const batch = c.runs[0]!.batch;
  const pytorch = c.stage === 1 ? PYTORCH.stage1.stepS : PYTORCH.stage2Fp32.stepS;
  const bar = c.stage === 1 ? BARS.stage1 : c.dtype === "fp32" ? BARS.stage2Fp32 : BARS.stage2Quantized;
  const step = spread(stepsS);
  return {
    stage: c.stage,
    dtype: c.dtype,
    batch,
    textLength: c.runs[0]!.textLength,
    trainedParameters: c.runs[0]!.trainedParameters,
    processes: c.runs.length,
    stepS: step,
    // Per process: the median of its timed steps, to show how far processes differ.
    perProcessStepS: c.runs.map((r) => median(r.steps.map((s) => s.total))),
    samplesPerS: batch / step.median,
    cpuS: spread(c.runs.flatMap((r) => r.steps.map((s) => s.cpu))),
    graphsS: graphs,
    adamwS: spread(c.runs.flatMap((r) => r.steps.map((s) => s.adamw))),
    warmupS: spread(c.runs.map((r) => r.warmupS)),
    loadS: spread(c.runs.map((r) => r.loadS)),
    peakRss: Math.max(...c.runs.map((r) => r.memory.peakRss)),
    peakAnon: Math.max(...c.runs.map((r) => r.peakAnon)),
    xPytorch: step.median / mid(pytorch),
    bar,
    meetsBar: step.median <= bar * mid(pytorch) && (c.stage !== 2 || c.dtype !== "q4" || Math.max(...c.runs.map((r) => r.memory.peakRss)) <= BARS.stage2Q4Rss),
    profile: c.runs.find((r) => r.profile)?.profile,
  };
});

const cpu = fs.readFileSync("/proc/cpuinfo", "utf8").match(/model name\s*:\s*(.*)/)?.[1]?.trim() ?? os.cpus()[0]?.model ?? "unknown";
const columns = summaries.map((s) => (s.stage === 1 ? "stage 1" : `stage 2 ${s.dtype}`));
const row = (label: string, get: (s: (typeof summaries)[number]) => string) => [label, ...summaries.map(get)];
const graphRows = [...new Set(summaries.flatMap((s) => Object.keys(s.graphsS)))].map((g) => row(`  graph ${g}, s`, (s) => (s.graphsS[g] ? cell(s.graphsS[g]!) : "-")));
const table = [
  ["", ...columns],
  row("step, s (median, min-max)", (s) => cell(s.stepS)),
  row("  per process (medians)", (s) => s.perProcessStepS.map((x) => f(x)).join(" / ")),
  ...graphRows,
  row("  AdamW, s", (s) => cell(s.adamwS)),
  row("  CPU time (all threads), s", (s) => cell(s.cpuS)),
  row("samples/s", (s) => f(s.samplesPerS, 3)),
  row("x PyTorch's step (bar)", (s) => `${f(s.xPytorch)} (${f(s.bar, 1)})${s.meetsBar ? "" : " not met"}`),
  row("warm-up step (compiles), s", (s) => cell(s.warmupS, 1)),
  row("peak resident, GB (GiB)", (s) => `${f(s.peakRss / GB)} (${f(s.peakRss / GiB)})`),
  row("peak private, GB", (s) => f(s.peakAnon / GB)),
  row("trained parameters, M", (s) => f(s.trainedParameters / 1e6, 1)),
];
const widths = table[0]!.map((_, c) => Math.max(...table.map((r) => r[c]!.length)));
console.log(`BLIP-2 training steps, full-size shapes, random weights; ${os.cpus().length} cores (${cpu}); ${threads} thread(s)${values["no-arena"] ? ", no arena" : ""}; ${steps} timed steps after a warm-up in each of ${repeats} processes per configuration`);
console.log(`PyTorch 1.13 (float32, 2 threads): stage 1 ${PYTORCH.stage1.stepS.join("-")} s per step, stage 2 (OPT-2.7B fp32) ${PYTORCH.stage2Fp32.stepS.join("-")} s at ${f(PYTORCH.stage2Fp32.peakRss / GiB, 1)} GiB`);
for (const r of table) console.log(r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  "));
for (const c of configs.filter((c) => c.runs.length < repeats)) console.log(`stage ${c.stage} ${c.dtype}: ${repeats - c.runs.length} of ${repeats} processes failed (see above)`);
const line = { bench: "blip2-train", cpu, cores: os.cpus().length, threads: Number(threads), arena: !values["no-arena"], stepsPerProcess: Number(steps), repeats, pytorch: PYTORCH, bars: BARS, results: summaries };
console.log(JSON.stringify(line));
console.error(`appended to ${recordResult(line)}`);
fs.rmSync(profileDir, { recursive: true, force: true });
if (configs.some((c) => c.runs.length < repeats)) process.exitCode = 1;
