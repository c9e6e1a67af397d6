/**
 * Speed and memory benchmark on full-size BLIP-2 shapes with random weights (generated once):
 * for each dtype and thread count, a fresh process loads the model and measures the image path,
 * time to first token, per-token decode, a 20-token caption, a batch of 4 captions, peak memory
 * and (lower precisions) logits quality against float32. Also measures the machine's read
 * bandwidth from the memory each dtype's weights are read from, for the decode floor. Prints a
 * table and a JSON line, and appends the line to bench/results/<date>-<machine>.jsonl.
 *
 * npm run bench [-- --model opt-2.7b|flan-t5-xl --dtypes fp32,q8,q4 --threads 2,1 --runs 3 --tokens 20 --device cpu|webgpu|cuda --no-packed-cache]
 * (the bandwidth floor is the CPU's: on another device, read it as the host's figure only)
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { parseArgs } from "node:util";
import { loadCheckpoint } from "../src/api/load.js";
import type { TensorInfo } from "../src/io/safetensors.js";
import { tensorsInUse } from "../src/quantize/quantize.js";
import { blip2CacheDir } from "../src/quantize/weightCache.js";
import { listPacked, packedDataFile } from "../src/runtime/packedModels.js";
import * as ort from "onnxruntime-node";
import { attr, Graph } from "../src/ir/graph.js";
import { CompiledGraph, isDevice } from "../src/runtime/session.js";
import { recordResult } from "./bench-results.js";
import { syntheticCheckpoint, type Variant } from "./synthetic-checkpoint.js";

const { values } = parseArgs({ options: { model: { type: "string" }, dtypes: { type: "string" }, threads: { type: "string" }, runs: { type: "string" }, tokens: { type: "string" }, device: { type: "string" }, "no-packed-cache": { type: "boolean" } } });
const variant = (values.model ?? "opt-2.7b") as Variant;
const dtypes = (values.dtypes ?? "fp32,q8,q4").split(",");
const threadCounts = (values.threads ?? "2,1").split(",").map(Number);
const runs = values.runs ?? "3";
const tokens = values.tokens ?? "20";
const device = values.device ?? "cpu";
/** Quantized weights' packed copies mapped from the blip2 cache (the default), or packed in memory. */
const packed = values["no-packed-cache"] !== true;
const packedFlag = packed ? [] : ["--no-packed-cache"];
if (!isDevice(device)) {
  console.error(`--device: expected cpu, webgpu or cuda, got ${JSON.stringify(device)}`);
  process.exit(2);
}
const GB = 1e9;

const dir = syntheticCheckpoint(variant);
const reference = path.join(os.tmpdir(), `blip2-bench-${variant}-logits.f32`);
fs.rmSync(reference, { force: true });

/**
 * Read the tensors the sessions will read, and the packed weights kept from them, so that load
 * times exclude a cold page cache.
 */
function warm(tensors: TensorInfo[]): void {
  const buf = Buffer.alloc(64 << 20);
  const read = (file: string, offset: number, bytes: number) => {
    const fd = fs.openSync(file, "r");
    for (let done = 0; done < bytes; ) done += fs.readSync(fd, buf, 0, Math.min(buf.length, bytes - done), offset + done) || bytes;
    fs.closeSync(fd);
  };
  for (const t of tensors) read(t.file, t.offset, t.byteLength);
  const files = new Set(tensors.map((t) => fs.realpathSync(t.file)));
  for (const e of listPacked(blip2CacheDir())) {
    if (e.stale || !e.weights?.some((f) => files.has(f))) continue;
    const data = packedDataFile(e.dir);
    read(data, 0, fs.statSync(data).size);
  }
}

/**
 * Read bandwidth: ONNX Runtime summing a large block (the reduction axis is a graph input, so the
 * sum is not folded away at load), from memory of the kind the decoding weights live in. Float32
 * weights are read in place from the memory-mapped files: a 4 GB block of a weight shard that sits
 * in the page cache. Quantized weights are read from ONNX Runtime's packed copies, mapped from the
 * blip2 cache (runtime/packedModels.ts), unless the bench runs with `--no-packed-cache`: then they
 * are anonymous memory, probed with a 2 GB input buffer. The two can read at different rates on
 * the same machine, so each kind of weights is held to the floor of its own memory.
 */
async function bandwidth(threads: number, memory: Memory): Promise<number> {
  const shard = path.join(dir, fs.readdirSync(dir).filter((f) => f.endsWith(".safetensors")).sort()[0]!);
  const bytes = memory === "mapped" ? Math.min(4 * GB, fs.statSync(shard).size - 4096) : 2 * GB;
  const cols = 2560;
  const rows = Math.floor(bytes / 4 / cols);
  const g = new Graph("bandwidth");
  const axes = g.input("axes", "int64", [1]);
  const data = memory === "mapped" ? g.weight({ name: "data", dtype: "F32", shape: [rows, cols], file: shard, offset: 4096, byteLength: rows * cols * 4 }) : g.input("data", "float32", [rows, cols]);
  g.output(g.addNode("ReduceSum", [data, axes], { keepdims: attr.int(0) }, [{ dtype: "float32", shape: ["rows"] }])[0]!, "sums");
  const s = await CompiledGraph.create(g, { threads, worker: false });
  const feeds: Record<string, ort.Tensor> = { axes: new ort.Tensor("int64", BigInt64Array.from([1n]), [1]) };
  if (memory === "anonymous") feeds.data = new ort.Tensor("float32", new Float32Array(rows * cols).fill(1), [rows, cols]);
  await s.run(feeds);
  const times: number[] = [];
  for (let r = 0; r < 5; r++) {
    const t = performance.now();
    await s.run(feeds);
    times.push((performance.now() - t) / 1000);
  }
  await s.release();
  return (rows * cols * 4) / Math.min(...times) / GB;
}

type Memory = "mapped" | "anonymous";
/** Where a dtype's language-model weights are read from while decoding. */
const memoryOf = (dtype: string): Memory => (dtype === "fp32" || packed ? "mapped" : "anonymous");

const run = promisify(execFile);
/**
 * A worker's warnings, passed on: they say when a run is not what it seems (packed weights that
 * could not be saved are packed in private memory instead, and the figures then are of that).
 */
function relayWarnings(stderr: string, config: string): void {
  for (const line of stderr.split("\n").filter((l) => l.startsWith("blip2: warning"))) console.error(`${config}: ${line}`);
}
const results: Record<string, unknown>[] = [];
/**
 * The read bandwidth that bounds a configuration's decoding: the mean of probes taken just before
 * and just after its process ran. It moves with the machine's load, even between consecutive
 * runs, so one probe at the start would misjudge later configurations.
 */
const bw = (r: { bandwidthGBs: { before: number; after: number } }) => (r.bandwidthGBs.before + r.bandwidthGBs.after) / 2;
for (const dtype of dtypes) {
  // Convert once, outside the timed load.
  const ckpt = await loadCheckpoint(dir, { dtype: dtype as "fp32" });
  const tensors = tensorsInUse(ckpt);
  const worker = path.join(path.dirname(new URL(import.meta.url).pathname), "bench-worker.ts");
  // One untimed load first: the first process to allocate gigabytes after the page cache filled
  // the memory pays for the kernel's reclaim, which is not the model's load time.
  warm(tensors);
  const load = await run(process.execPath, ["--import", "tsx", worker, "--dir", dir, "--dtype", dtype, "--threads", "1", "--load-only", "--device", device, ...packedFlag], { maxBuffer: 1 << 24 });
  relayWarnings(load.stderr, `${dtype}, first load`);
  for (const threads of threadCounts) {
    warm(tensors);
    const before = await bandwidth(threads, memoryOf(dtype));
    const { stdout, stderr } = await run(process.execPath, ["--import", "tsx", worker, "--dir", dir, "--dtype", dtype, "--threads", String(threads), "--runs", runs, "--tokens", tokens, "--reference", reference, "--device", device, ...packedFlag], { maxBuffer: 1 << 24 });
    relayWarnings(stderr, `${dtype}, ${threads} thread(s)`);
    const after = await bandwidth(threads, memoryOf(dtype));
    const r = JSON.parse(stdout.trim().split("\n").at(-1)!);
    results.push({ ...r, memoryKind: memoryOf(dtype), bandwidthGBs: { before, after } });
    console.error(`done: ${dtype}, ${threads} thread(s)`);
  }
}

const PYTORCH = { vision1: 5.75, ttft: [7.9, 9.3], perToken: [1.27, 1.39], total: [32, 36], peakRss: 14.9 * 2 ** 30 };
const f = (x: number, d = 2) => x.toFixed(d);
const cell = (s: { median: number; min: number; max: number }) => `${f(s.median)} (${f(s.min)}-${f(s.max)})`;
const columns = results.map((r: any) => `${r.dtype} ${r.threads}t${r.device === "cpu" ? "" : ` ${r.device}`}`);
const row = (label: string, get: (r: any) => string) => [label, ...results.map(get)];
const table = [
  ["", ...columns],
  row("model load, s", (r) => f(r.loadS, 1)),
  row("vision+Q-Former+proj, 1 image, s", (r) => cell(r.vision1)),
  row("  same, per image at batch 4, s", (r) => cell(r.vision4PerImage)),
  row("time to first token, s", (r) => cell(r.ttft)),
  row("decode per token, s", (r) => cell(r.perToken)),
  row("  read GB/s before/after (memory)", (r) => `${f(r.bandwidthGBs.before, 1)}/${f(r.bandwidthGBs.after, 1)} (${r.memoryKind})`),
  row("  bandwidth floor (LM bytes / mean read GB/s), s", (r) => f(r.lmBytesPerToken / GB / bw(r), 3)),
  row("  % of floor", (r) => `${f((100 * (r.lmBytesPerToken / GB / bw(r))) / r.perToken.median, 0)}%`),
  row(`${tokens}-token caption, s`, (r) => cell(r.total)),
  row("  x PyTorch (32-36 s)", (r) => f(r.total.median / 34, 2)),
  row("batch of 4 captions, s", (r) => cell(r.batch4Total)),
  row("  throughput x batch 1", (r) => f((4 * r.total.median) / r.batch4Total.median, 2)),
  row("  decode tokens/s x batch 1", (r) => f((4 * r.perToken.median) / r.batch4PerToken.median, 2)),
  row("weights in use, GB", (r) => f(r.weightBytes / GB)),
  row("peak resident, GB (x weights)", (r) => `${f(r.memory.peakRss / GB)} (${f(r.memory.peakRss / r.weightBytes)})`),
  row("peak private (anon), GB", (r) => f(r.memory.peakAnon / GB)),
  row("logits cosine vs fp32 (top-1 agree)", (r) => (r.quality ? `${f(r.quality.cosine, 4)} (${r.quality.top1})` : "-")),
];
const widths = table[0]!.map((_, c) => Math.max(...table.map((r) => r[c]!.length)));
console.log(`BLIP-2 ${variant} shapes, random weights; ${os.cpus().length} cores (${os.cpus()[0]?.model}); medians of ${runs} runs (min-max)${packed ? "" : "; quantized weights packed in memory"}`);
if (results.some((r: any) => r.device !== device)) console.log(`${device} was not available here: these figures are the CPU's`);
for (const r of table) console.log(r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  "));
const line = { bench: "blip2", model: variant, device, packedWeights: packed, cores: os.cpus().length, pytorch: PYTORCH, results };
console.log(JSON.stringify(line));
console.error(`appended to ${recordResult(line)}`);
