/**
 * Lower-precision copies of a checkpoint's linear weights, made once and kept on disk: per model
 * part and precision, a safetensors file under the blip2 cache (keyed by the checkpoint's
 * fingerprint), memory-mapped at load like the original weights. Only the weights of linear layers
 * change (the graphs' Gemm weights); embeddings, norms and biases stay as they are.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { readSafetensorsHeader, writeSafetensorsStreamed, type StreamedTensor, type TensorInfo } from "../io/safetensors.js";
import type { Graph } from "../ir/graph.js";
import { embedGraph, imageGraph, optDecoderGraph, t5CrossGraph, t5DecoderGraph, t5EncoderGraph } from "../models/blip2.js";
import { itmGraph, retrievalImageGraph, retrievalTextGraph } from "../models/retrieval.js";
import { zeroPointBytesPerRow } from "./blockQuant.js";
import { QuantizePool } from "./pool.js";
import { partialFile, removeAbandonedFiles } from "../io/partialFile.js";
import { blip2CacheDir, formatFolder, recordSource, weightCacheRoot } from "./weightCache.js";
import { MODEL_PARTS, partOf, WEIGHTS_FORMAT, weightDType, type ModelPart, type PartDTypes, type WeightDType } from "../io/weightFormat.js";

/**
 * Values per 4-bit block along K: 256, MatMulNBits's largest, where the row length allows (a power
 * of two dividing it). Its int8 kernels convert and scale each block's sum in float, so longer
 * blocks run faster, at the same accuracy against float32 (docs/performance.md). The block size
 * is recorded in each weight's shape, so weights converted with another one still load and run.
 */
const BLOCK_SIZE = 256;

export interface QuantizeProgress {
  part: ModelPart;
  dtype: WeightDType;
  /** Weights converted so far, and in all, for this part. */
  done: number;
  total: number;
}

export interface QuantizeOptions {
  /** Root of the blip2 cache (default $BLIP2_CACHE, else ~/.cache/blip2). */
  cacheDir?: string;
  progress?: (p: QuantizeProgress) => void;
}

/** The graphs a checkpoint runs as, in float32 (to find its linear weights). */
function graphsOf(ckpt: Checkpoint): Graph[] {
  const fp32 = ckpt.withWeights(new Map(), { vision: "fp32", qformer: "fp32", language: "fp32" });
  if (ckpt.config.architectures.includes("Blip2ForImageTextRetrieval")) return [retrievalImageGraph(fp32), retrievalTextGraph(fp32), itmGraph(fp32)];
  const text = ckpt.config.text;
  const lm = text.modelType === "opt" ? [optDecoderGraph(fp32, text)] : [t5EncoderGraph(fp32, text), t5CrossGraph(fp32, text), t5DecoderGraph(fp32, text)];
  return [imageGraph(fp32, { project: true }), embedGraph(fp32), ...lm];
}

export interface LinearWeights {
  /** The checkpoint tensors used as linear-layer weights (Gemm's B input), by model part. */
  byPart: Record<ModelPart, string[]>;
  /** Those also used otherwise (OPT's tied token embeddings are looked up too). */
  sharedWithOtherOps: Set<string>;
}

export function linearWeights(ckpt: Checkpoint): LinearWeights {
  const linear = new Set<string>();
  const other = new Set<string>();
  for (const g of graphsOf(ckpt)) {
    for (const node of g.nodes) {
      node.inputs.forEach((v, i) => {
        const name = v ? g.weightNames.get(v) : undefined;
        if (name) (node.op === "Gemm" && i === 1 ? linear : other).add(name);
      });
    }
  }
  const byPart: Record<ModelPart, string[]> = { vision: [], qformer: [], language: [] };
  for (const n of [...linear].sort()) byPart[partOf(n)].push(n);
  return { byPart, sharedWithOtherOps: new Set([...linear].filter((n) => other.has(n))) };
}

/**
 * The tensors the model's sessions read: everything but the float linear weights of parts that run
 * in another precision (whose converted copies are read instead).
 */
export function tensorsInUse(ckpt: Checkpoint): TensorInfo[] {
  const { byPart, sharedWithOtherOps } = linearWeights(ckpt);
  const converted = new Set(Object.values(byPart).flat().filter((n) => ckpt.dtypeOf(n) !== "fp32"));
  const names = ckpt.names().filter((n) => !/\.(q4|q8)\.(weight|scales|zero_points)$|\.fp16$/.test(n));
  return names.flatMap((n) => {
    if (!converted.has(n)) return [ckpt.tensor(n)];
    const copies = variantNames(n, ckpt.dtypeOf(n)).map((v) => ckpt.tensor(v));
    return sharedWithOtherOps.has(n) ? [ckpt.tensor(n), ...copies] : copies;
  });
}

/** Tensor names a weight has in the given precision. */
export function variantNames(name: string, dtype: WeightDType): string[] {
  if (dtype === "fp16") return [`${name}.fp16`];
  return (dtype === "q8" ? ["weight", "scales"] : ["weight", "scales", "zero_points"]).map((s) => `${name}.${dtype}.${s}`);
}

/**
 * The checkpoint with its parts' linear weights in the given precisions, converting (once) what
 * neither the checkpoint itself (a `blip2 quantize --out` folder) nor the cache already has.
 */
export async function withDTypes(ckpt: Checkpoint, dtypes: PartDTypes, options: QuantizeOptions = {}): Promise<Checkpoint> {
  if (ckpt.converted) {
    // A `blip2 quantize --out` folder runs in the precisions it was written in.
    const differs = MODEL_PARTS.filter((p) => dtypes[p] !== ckpt.dtypes[p] && dtypes[p] !== "fp32");
    if (differs.length) throw new Blip2Error(`${ckpt.dir}: holds ${MODEL_PARTS.map((p) => `${p} ${ckpt.dtypes[p]}`).join(", ")} weights; it cannot run ${differs.map((p) => `${p} as ${dtypes[p]}`).join(", ")} (convert the original checkpoint instead)`);
    return ckpt;
  }
  const extra = new Map<string, TensorInfo>();
  const parts = MODEL_PARTS.filter((p) => dtypes[p] !== "fp32");
  // The format version is part of the path: a change of scheme never meets an older file.
  const folder = parts.length ? path.join(weightCacheRoot(blip2CacheDir(options.cacheDir)), ckpt.fingerprint(), formatFolder(WEIGHTS_FORMAT)) : "";
  let weights: LinearWeights | null = null;
  for (const part of parts) {
    const dtype = dtypes[part] as Exclude<WeightDType, "fp32">;
    const file = path.join(folder, `${part}-${dtype}.safetensors`);
    if (!fs.existsSync(file)) {
      fs.mkdirSync(folder, { recursive: true });
      removeAbandonedFiles(folder);
      weights ??= linearWeights(ckpt);
      const mine = partialFile(file);
      await writeVariants(mine, ckpt, weights.byPart[part], dtype, (done, total) => options.progress?.({ part, dtype, done, total }));
      placeUnlessThere(mine, file);
      recordSource(folder, ckpt.dir);
    }
    for (const [name, info] of readSafetensorsHeader(file).tensors) extra.set(name, info);
  }
  return ckpt.withWeights(extra, dtypes);
}

/**
 * Moves a finished conversion into place, unless another process converting the same checkpoint
 * has put its own there meanwhile: theirs then stays, so every process reads one file. Its size and
 * time are part of the packed copies' key (runtime/packedModels.ts): a file replaced after the first
 * process had packed its sessions left that process's copies superseded in the cache.
 */
function placeUnlessThere(mine: string, file: string): void {
  try {
    fs.linkSync(mine, file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // A file system without hard links: the next best, a rename where nothing is yet.
    if (code !== "EEXIST" && !fs.existsSync(file)) fs.renameSync(mine, file);
    else if (code !== "EEXIST") throw err;
  } finally {
    fs.rmSync(mine, { force: true });
  }
}

/** Converts `names` to `dtype` into a safetensors file, on worker threads, a few weights in memory at a time. */
export async function writeVariants(file: string, ckpt: Checkpoint, names: string[], dtype: Exclude<WeightDType, "fp32">, progress?: (done: number, total: number) => void): Promise<void> {
  const each = (name: string) => weightDType(name, dtype) as Exclude<WeightDType, "fp32">;
  await withQuantizePool((pool, ahead) => {
    const tensors = names.flatMap((name) => variantTensors(ckpt.tensor(name), each(name), pool));
    return writeSafetensorsStreamed(file, tensors, { format: WEIGHTS_FORMAT, dtype }, (written) => {
      const done = names.findIndex((n) => written === variantNames(n, each(n)).at(-1)) + 1;
      if (done) progress?.(done, names.length);
    }, ahead);
  });
}

/**
 * Runs `write` with a quantization pool, closed afterwards whatever happens, and how many tensors
 * to prepare ahead of the one being written: enough to keep every thread busy (3 tensors per weight).
 */
export async function withQuantizePool(write: (pool: QuantizePool, ahead: number) => Promise<void>): Promise<void> {
  const pool = new QuantizePool();
  try {
    await write(pool, 3 * pool.threads);
  } finally {
    await pool.close();
  }
}

/** Values per block for rows of `k` values: BLOCK_SIZE, or the largest power of two dividing `k` if less (a block cannot straddle rows). */
export function blockSizeFor(k: number): number {
  let p = 1;
  while (k % (p * 2) === 0 && p < BLOCK_SIZE) p *= 2;
  return p;
}

/**
 * The tensors standing for one [N, K] weight in `dtype`, produced lazily: the weight is converted
 * once, on `pool`'s threads, when the first of them is prepared or needed.
 */
export function variantTensors(info: TensorInfo, dtype: Exclude<WeightDType, "fp32">, pool: QuantizePool): StreamedTensor[] {
  const [n, k] = info.shape as [number, number];
  const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  if (dtype === "fp16") {
    const { start, take } = lazyJob(() => pool.toHalf(info));
    return [{ name: `${info.name}.fp16`, dtype: "F16", shape: [n, k], data: take(bytes, true), prepare: start }];
  }
  if (dtype === "q8") {
    const { start, take } = lazyJob(() => pool.quantizeChannels(info));
    return [
      { name: `${info.name}.q8.weight`, dtype: "I8", shape: [k, n], data: take((m) => bytes(m.weight)), prepare: start },
      { name: `${info.name}.q8.scales`, dtype: "F32", shape: [n], data: take((m) => bytes(m.scales), true), prepare: start },
    ];
  }
  const blockSize = blockSizeFor(k);
  if (blockSize < 16) throw new Blip2Error(`${info.name}: ${k} input features cannot be split into blocks of 16 or more for q4; keep this part in q8 or fp32`);
  const kBlocks = k / blockSize;
  const { start, take } = lazyJob(() => pool.quantizeBlocks(info, blockSize));
  return [
    { name: `${info.name}.q4.weight`, dtype: "U8", shape: [n, kBlocks, blockSize / 2], data: take((m) => m.weight), prepare: start },
    { name: `${info.name}.q4.scales`, dtype: "F32", shape: [n * kBlocks], data: take((m) => bytes(m.scales)), prepare: start },
    { name: `${info.name}.q4.zero_points`, dtype: "U8", shape: [n * zeroPointBytesPerRow(kBlocks)], data: take((m) => m.zeroPoints, true), prepare: start },
  ];
}

/**
 * A job started by the first `start` (a tensor prepared ahead) or `take` (a tensor written), whose
 * result the tensors take their bytes from; the last `take` lets it go.
 */
function lazyJob<T>(run: () => Promise<T>) {
  let job: Promise<T> | null = null;
  const start = () => {
    if (!job) {
      job = run();
      // Handled where the bytes are taken; a write that fails first never takes them.
      job.catch(() => {});
    }
    return job;
  };
  const take = (f: (result: T) => Uint8Array, last = false) => async () => {
    const value = f(await start());
    if (last) job = null;
    return value;
  };
  return { start, take };
}
