/**
 * One training-benchmark configuration (stage, language-model dtype, threads) in a fresh process,
 * so that its peak memory is its own: a warm-up step (which also compiles the graphs), then timed
 * steps, each a forward+backward graph step and an AdamW update on float32 master copies, as the
 * trainer runs them. Prints one JSON object. Run by scripts/bench-train.ts, which also samples this
 * process's private memory from outside while it runs.
 *
 * With --profile DIR: each graph the steps ran, run once more under ONNX Runtime's profiler, its
 * kernel times summed by operator type and split into forward and backward.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import * as ort from "onnxruntime-node";
import { Checkpoint } from "../src/io/checkpoint.js";
import { readTensorF32 } from "../src/io/safetensors.js";
import type { Graph } from "../src/ir/graph.js";
import { serializeGraph } from "../src/ir/onnx.js";
import { withDTypes } from "../src/quantize/quantize.js";
import { commonFolder, CompiledGraph, disabledOptimizers, prepacks, type RuntimeOptions } from "../src/runtime/session.js";
import { AdamW } from "../src/train/optimizer.js";
import { Rng } from "../src/train/rng.js";
import { stage1Trained } from "../src/train/stage1.js";
import { stage2Trained } from "../src/train/stage2.js";
import { Stage1Step, Stage2Step, type StepOutput } from "../src/train/steps.js";

const { values } = parseArgs({ options: { dir: { type: "string" }, stage: { type: "string" }, dtype: { type: "string" }, threads: { type: "string" }, steps: { type: "string" }, profile: { type: "string" }, "no-arena": { type: "boolean" } } });
const dir = values.dir!;
const stage = Number(values.stage) as 1 | 2;
const dtype = (values.dtype ?? "fp32") as "fp32" | "q8" | "q4";
const threads = Number(values.threads ?? 2);
const timedSteps = Number(values.steps ?? 3);
/** Stage 1: the batch of the issue, 8 texts of 32 tokens. Stage 2: 4 captions of 24 tokens after the 32 queries. */
const BATCH = stage === 1 ? 8 : 4;
const TEXT_LENGTH = stage === 1 ? 32 : 24;
/** Stage 1's learning rate in LAVIS; the value does not change the work done. */
const LR = 1e-4;

const status = () => {
  const s = fs.readFileSync("/proc/self/status", "utf8");
  const kb = (k: string) => Number(s.match(new RegExp(`${k}:\\s+(\\d+)`))![1]) * 1024;
  return { hwm: kb("VmHWM"), anon: kb("RssAnon"), file: kb("RssFile") };
};
const seconds = (ms: number) => ms / 1000;

// Time spent in each graph's runs, by graph name; and each graph with its last feeds, for the profile.
const runTimes = new Map<string, number>();
const captured = new Map<string, { graph: Graph; feeds: Record<string, ort.Tensor> }>();
const originalCreate = CompiledGraph.create.bind(CompiledGraph);
CompiledGraph.create = async (graph, options) => {
  captured.set(graph.name, { graph, feeds: {} });
  return originalCreate(graph, options);
};
const originalRun = CompiledGraph.prototype.run;
CompiledGraph.prototype.run = async function (this: CompiledGraph, ...args: Parameters<typeof originalRun>) {
  const c = captured.get(this.name);
  if (c) c.feeds = { ...args[0] };
  const t = performance.now();
  try {
    return await originalRun.apply(this, args);
  } finally {
    runTimes.set(this.name, (runTimes.get(this.name) ?? 0) + seconds(performance.now() - t));
  }
};

const rng = new Rng(1);
function randomFeatures(batch: number, ckpt: Checkpoint): ort.Tensor {
  const cfg = ckpt.config.vision;
  const patches = (cfg.imageSize / cfg.patchSize) ** 2 + 1;
  const data = new Float32Array(batch * patches * cfg.hiddenSize);
  for (let i = 0; i < data.length; i++) data[i] = rng.normal();
  return new ort.Tensor("float32", data, [batch, patches, cfg.hiddenSize]);
}
const randomIds = (n: number, from: number, to: number) => Array.from({ length: n }, () => from + rng.int(to - from));

let t = performance.now();
let ckpt = Checkpoint.open(dir);
if (stage === 2 && dtype !== "fp32") ckpt = await withDTypes(ckpt, { vision: "fp32", qformer: "fp32", language: dtype });
const trained = ckpt.names().filter((n) => (stage === 1 ? stage1Trained(n) : stage2Trained(n)) && !n.includes(".q8.") && !n.includes(".q4.") && !n.endsWith(".fp16"));
const params = new Map(trained.map((n) => [n, readTensorF32(ckpt.tensor(n))]));
const optimizer = new AdamW(trained.map((name) => ({ name, shape: [...ckpt.tensor(name).shape], value: params.get(name)! })));
const trainedParameters = [...params.values()].reduce((s, p) => s + p.length, 0);
const features = randomFeatures(BATCH, ckpt);
// Without ONNX Runtime's arena, each activation is allocated and freed as its kernel needs it.
const runtime: RuntimeOptions = { threads, ...(values["no-arena"] ? { arena: false } : {}) };
const loadS = seconds(performance.now() - t);

type Run = () => Promise<StepOutput>;
let run: Run;
let release: () => Promise<void>;
if (stage === 1) {
  const cls = 101; // BERT's [CLS]; the ids are drawn from the word pieces after BERT's special tokens
  const vocab = ckpt.config.qformer.vocabSize - 1;
  const batch = {
    inputIds: Array.from({ length: BATCH }, () => [cls, ...randomIds(TEXT_LENGTH - 1, 1000, vocab)]),
    attentionMask: Array.from({ length: BATCH }, () => new Array<number>(TEXT_LENGTH).fill(1)),
    decTokenId: vocab,
    padTokenId: 0,
  };
  const step = new Stage1Step(ckpt, runtime);
  const negatives = new Rng(2);
  run = () => step.run(batch, features, params, negatives);
  release = () => step.release();
} else {
  const q = ckpt.config.numQueryTokens;
  const image = ckpt.config.imageTokenIndex!;
  const text = Array.from({ length: BATCH }, () => [2, ...randomIds(TEXT_LENGTH - 1, 4, 50000)]);
  const batch = {
    inputIds: text.map((row) => [...new Array<number>(q).fill(image), ...row]),
    attentionMask: text.map(() => new Array<number>(q + TEXT_LENGTH).fill(1)),
    // The caption's next-token loss; the image tokens and BOS are not predicted (LAVIS).
    labels: text.map((row) => [...new Array<number>(q + 1).fill(-100), ...row.slice(1)]),
  };
  const step = new Stage2Step(ckpt, runtime);
  run = () => step.run(batch, features, params);
  release = () => step.release();
}

interface StepTimes {
  total: number;
  /** CPU seconds of the whole process (every thread) in the step: less sensitive than wall time to other work on the machine. */
  cpu: number;
  graphs: Record<string, number>;
  adamw: number;
}
async function timedStep(): Promise<StepTimes> {
  runTimes.clear();
  const cpuStart = process.cpuUsage();
  const start = performance.now();
  const out = await run();
  const graphsDone = performance.now();
  if (!Number.isFinite(out.losses.loss!)) throw new Error(`loss is ${out.losses.loss}`);
  optimizer.step(out.grads, LR);
  const end = performance.now();
  const cpu = process.cpuUsage(cpuStart);
  return { total: seconds(end - start), cpu: (cpu.user + cpu.system) / 1e6, graphs: Object.fromEntries(runTimes), adamw: seconds(end - graphsDone) };
}

t = performance.now();
const warmup = await timedStep();
const warmupS = seconds(performance.now() - t);
const steps: StepTimes[] = [];
for (let i = 0; i < timedSteps; i++) steps.push(await timedStep());
const end = status();
await release();

const profile = values.profile ? await profileAll(values.profile) : undefined;

console.log(JSON.stringify({
  stage, dtype, threads, arena: !values["no-arena"], batch: BATCH, textLength: TEXT_LENGTH, trainedParameters,
  loadS, warmupS, warmupGraphs: warmup.graphs,
  steps,
  memory: { peakRss: end.hwm, anonAtEnd: end.anon, fileRssAtEnd: end.file },
  profile,
}));

/**
 * Kernel time of each graph the steps ran, under ONNX Runtime's profiler, with the feeds of its
 * last run: by operator type, split into forward and backward (the nodes after the graph's last
 * non-gradient output are the backward's). Sessions are made as CompiledGraph makes training ones.
 */
async function profileAll(outDir: string) {
  fs.mkdirSync(outDir, { recursive: true });
  const out: Record<string, Awaited<ReturnType<typeof profileGraph>>> = {};
  for (const [name, { graph, feeds }] of captured) out[name] = await profileGraph(graph, feeds, outDir);
  return out;
}

async function profileGraph(graph: Graph, feeds: Record<string, ort.Tensor>, outDir: string) {
  // External data is found relative to a folder that holds every weight file (the checkpoint's and the converted ones).
  const files = [...new Set(graph.initializers.flatMap((i) => (i.kind === "external" ? [fs.realpathSync(i.file)] : [])))];
  const folder = files.length ? commonFolder(files) : os.tmpdir();
  const bytes = serializeGraph(graph, { externalLocation: (file) => path.relative(folder, fs.realpathSync(file)) });
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: ["cpu"],
    graphOptimizationLevel: "all",
    logSeverityLevel: 3,
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    enableProfiling: true,
    profileFilePrefix: path.join(outDir, graph.name),
    extra: { session: { model_external_initializers_file_folder_path: folder, disable_prepacking: prepacks(graph) ? "0" : "1" }, optimization: { disable_specified_optimizers: disabledOptimizers({ foldConstants: false }) } },
  });
  await session.run(feeds); // warm-up: the arena's first allocations
  const start = performance.now();
  await session.run(feeds);
  const wall = seconds(performance.now() - start);
  session.endProfiling();
  await session.release();
  const file = fs.readdirSync(outDir).filter((f) => f.startsWith(graph.name + "_") && f.endsWith(".json")).map((f) => path.join(outDir, f)).sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs)[0]!;
  const events = JSON.parse(fs.readFileSync(file, "utf8")) as { cat: string; name: string; dur: number; args?: { op_name?: string } }[];
  // The last forward node: the highest-numbered Identity giving a graph output other than a gradient.
  const lastForward = Math.max(...graph.nodes.flatMap((n, i) => (n.op === "Identity" && graph.outputs.includes(n.outputs[0]!) && !n.outputs[0]!.name.startsWith("grad.") ? [i] : [])));
  const runs = events.filter((e) => e.cat === "Session" && e.name === "model_run");
  const lastRun = runs.at(-1)!;
  const kernels = events.filter((e) => e.cat === "Node" && e.name.endsWith("_kernel_time") && (e as unknown as { ts: number }).ts >= (lastRun as unknown as { ts: number }).ts);
  const byOp: Record<string, { forward: number; backward: number; count: number }> = {};
  for (const e of kernels) {
    const index = Number(e.name.match(/_(\d+)/)?.[1] ?? -1);
    const op = e.args?.op_name ?? "?";
    const entry = (byOp[op] ??= { forward: 0, backward: 0, count: 0 });
    entry[index > lastForward ? "backward" : "forward"] += e.dur / 1e6;
    entry.count += 1;
  }
  const kernelS = kernels.reduce((s, e) => s + e.dur / 1e6, 0);
  return { wallS: wall, modelRunS: lastRun.dur / 1e6, kernelS, nodes: graph.nodes.length, byOp };
}

