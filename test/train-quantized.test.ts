/**
 * Training through a quantized frozen language model: the backward of a q8 or q4 linear layer is
 * d y @ W with W the same quantized weight, dequantized for that product only (models/layers.ts).
 * Checked exactly on small layers, then on stage 2 (test/fixtures/train/stage2-*): with the language
 * model in q8 or q4 (vision and Q-Former in fp32), every trained tensor's gradient points the way
 * the fp32 one does (cosine >= 0.99) and the loss stays within a few percent.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as ort from "onnxruntime-node";
import onnxProto from "onnx-proto";
import { afterAll, describe, expect, it, vi } from "vitest";
import { gradients } from "../src/autodiff/backward.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { readTensorF32 } from "../src/io/safetensors.js";
import type { PartDTypes } from "../src/io/weightFormat.js";
import { Graph, type Value } from "../src/ir/graph.js";
import { serializeGraph } from "../src/ir/onnx.js";
import * as op from "../src/ir/ops.js";
import { linearInt8, linearNBits } from "../src/models/layers.js";
import { dequantizeMatrix, quantizeMatrix } from "../src/quantize/blockQuant.js";
import { dequantizeChannels, quantizeChannels } from "../src/quantize/channelQuant.js";
import { weightDType } from "../src/io/weightFormat.js";
import { blockSizeFor, linearWeights, withDTypes } from "../src/quantize/quantize.js";
import { CompiledGraph, disabledOptimizers } from "../src/runtime/session.js";
import { imageFeaturesGraph, stage2Feeds, stage2Graph } from "../src/train/stage2.js";
import { Stage2Step, type StepOutput } from "../src/train/steps.js";
import { fixture } from "./trainFixtures.js";

const fixtures = path.join(import.meta.dirname, "fixtures");
const cache = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-train-quantized-"));
afterAll(() => fs.rmSync(cache, { recursive: true, force: true }));

function random(n: number, seed: number): Float32Array {
  let s = seed;
  return Float32Array.from({ length: n }, () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 31 - 1) * 0.5);
}

/** d x for x [2, 3, k] through `layer`, given d y [2, 3, n]. */
async function inputGradient(layer: (g: Graph, x: Value) => Value, k: number, n: number, xs: Float32Array, dys: Float32Array): Promise<Float32Array> {
  const g = new Graph("layer");
  const x = g.input("x", "float32", [2, 3, k]);
  const dy = g.input("dy", "float32", [2, 3, n]);
  const [dx] = gradients(layer(g, x), [x], dy);
  g.output(dx!, "dx");
  const s = await ort.InferenceSession.create(serializeGraph(g, { externalLocation: () => "" }));
  const out = await s.run({ x: new ort.Tensor("float32", xs, [2, 3, k]), dy: new ort.Tensor("float32", dys, [2, 3, n]) });
  await s.release();
  return out.dx!.data as Float32Array;
}

/** dy [rows, n] @ w [n, k], accumulated in float64. */
function times(dy: Float32Array, w: Float32Array, rows: number, n: number, k: number): Float64Array {
  const out = new Float64Array(rows * k);
  for (let r = 0; r < rows; r++) for (let j = 0; j < n; j++) for (let i = 0; i < k; i++) out[r * k + i]! += dy[r * n + j]! * w[j * k + i]!;
  return out;
}

function expectProduct(actual: Float32Array, expected: Float64Array): void {
  expect(actual.length).toBe(expected.length);
  const scale = Math.max(...Array.from(expected, Math.abs));
  for (let i = 0; i < expected.length; i++) expect(Math.abs(actual[i]! - expected[i]!)).toBeLessThanOrEqual(1e-6 * scale);
}

describe("the input gradient of a quantized linear layer", () => {
  // Square, so that a transposed weight would still fit the shapes and only the numbers tell.
  it("q8: d x = d y @ W with W the 8-bit codes times their channels' scales", async () => {
    const n = 24;
    const k = 24;
    const q = quantizeChannels(random(n * k, 1), n, k);
    const [xs, dys] = [random(6 * k, 2), random(6 * n, 3)];
    const dx = await inputGradient((g, x) => linearInt8(x, g.constant(q.weight, "int8", [k, n]), g.constant(q.scales, "float32", [n]), g.constant(random(n, 4), "float32", [n])), k, n, xs, dys);
    expectProduct(dx, times(dys, dequantizeChannels(q), 6, n, k));
  });

  // Three blocks per row: the zero points' last byte holds one value and padding.
  it.each([16, 32])("q4 in blocks of %i: d x = d y @ W with W the 4-bit blocks dequantized", async (blockSize) => {
    const n = 3 * blockSize;
    const k = 3 * blockSize;
    const q = quantizeMatrix(random(n * k, 5), n, k, blockSize);
    const [xs, dys] = [random(6 * k, 6), random(6 * n, 7)];
    const dx = await inputGradient((g, x) => {
      const weight = { weight: g.constant(q.weight, "uint8", [n, k / blockSize, blockSize / 2]), scales: g.constant(q.scales, "float32", [q.scales.length]), zeroPoints: g.constant(q.zeroPoints, "uint8", [q.zeroPoints.length]) };
      return linearNBits(x, weight, null, { k, n, blockSize });
    }, k, n, xs, dys);
    expectProduct(dx, times(dys, dequantizeMatrix(q), 6, n, k));
  });

  it("a layer whose input needs no gradient adds nothing to the backward", () => {
    const g = new Graph("frozen");
    const ids = g.input("x", "float32", [2, 8]);
    const trained = g.input("p", "float32", [2, 8]);
    const q = quantizeChannels(random(64, 8), 8, 8);
    const frozen = linearInt8(ids, g.constant(q.weight, "int8", [8, 8]), g.constant(q.scales, "float32", [8]), null);
    const before = g.nodes.length;
    gradients(op.reduceSum(op.mul(frozen, trained), [0, 1], false), [trained]);
    expect(g.nodes.slice(before).map((n) => n.op)).not.toContain("DequantizeLinear");
  });

  // As MultiHeadAttention's rule asks: the gradient of the layer's output itself, not of its input.
  it("nor when only its output's gradient is asked for", () => {
    const g = new Graph("output");
    const x = g.input("x", "float32", [2, 8]);
    const q = quantizeChannels(random(64, 9), 8, 8);
    const y = linearInt8(x, g.constant(q.weight, "int8", [8, 8]), g.constant(q.scales, "float32", [8]), null);
    const before = g.nodes.length;
    gradients(op.reduceSum(op.mul(y, y), [0, 1], false), [y]);
    expect(g.nodes.slice(before).map((n) => n.op)).not.toContain("DequantizeLinear");
  });
});

const LM = (dtype: "q8" | "q4"): PartDTypes => ({ vision: "fp32", qformer: "fp32", language: dtype });

/**
 * A float32 copy of the checkpoint whose language model's linear weights are the values `dtype`
 * stands for (quantized and dequantized here, by the reference code of quantize/): its gradients,
 * by the float rules, are the exact ones of the quantized weights. OPT's tied token embeddings are
 * replaced too, so the few text tokens' embeddings differ slightly from the quantized graph's, which
 * looks them up in the original tensor.
 */
function dequantizedCopy(ckpt: Checkpoint, dtype: "q8" | "q4"): Checkpoint {
  const dir = fs.mkdtempSync(path.join(cache, `dequantized-${dtype}-`));
  fs.cpSync(ckpt.dir, dir, { recursive: true });
  const copy = Checkpoint.open(dir);
  const fd = fs.openSync(path.join(dir, "model.safetensors"), "r+");
  try {
    for (const name of linearWeights(copy).byPart.language) {
      const info = copy.tensor(name);
      const [n, k] = info.shape as [number, number];
      const w = readTensorF32(info);
      const values = weightDType(name, dtype) === "q8" ? dequantizeChannels(quantizeChannels(w, n, k)) : dequantizeMatrix(quantizeMatrix(w, n, k, blockSizeFor(k)));
      expect(info.dtype).toBe("F32");
      fs.writeSync(fd, new Uint8Array(values.buffer), 0, values.byteLength, info.offset);
    }
  } finally {
    fs.closeSync(fd);
  }
  return copy;
}

function cosine(a: Float32Array, b: Float32Array): number {
  let [ab, aa, bb] = [0, 0, 0];
  for (let i = 0; i < a.length; i++) [ab, aa, bb] = [ab + a[i]! * b[i]!, aa + a[i]! * a[i]!, bb + b[i]! * b[i]!];
  return ab / Math.sqrt(aa * bb);
}

const norm = (a: Float32Array) => Math.sqrt(a.reduce((s, v) => s + v * v, 0));

/** Every trained tensor's gradient in `out` has at least `least` cosine with the one in `reference`. */
function expectAligned(label: string, out: StepOutput, reference: StepOutput, least: number): void {
  const largest = Math.max(...[...reference.grads.values()].map(norm));
  for (const [n, r] of reference.grads) {
    const q = out.grads.get(n)!;
    // Attention key biases have no gradient (a softmax does not change when a row's scores all
    // move together): both are rounding noise there, with no direction to compare.
    if (norm(r) <= 1e-6 * largest) expect(norm(q), `${label} grad.${n}`).toBeLessThanOrEqual(1e-5 * largest);
    else expect(cosine(q, r), `${label} grad.${n}`).toBeGreaterThanOrEqual(least);
  }
}

describe("stage 2 through a q8 or q4 language model", () => {
  for (const name of ["stage2-opt-prompted", "stage2-t5-prompted"]) {
    it(name, async () => {
      const f = fixture(name);
      const fp32 = Checkpoint.open(path.join(fixtures, f.json.checkpoint_path as string));
      const pixels = f.get("pixel_values");
      const vision = await CompiledGraph.create(imageFeaturesGraph(fp32), { worker: false });
      const features = (await vision.run({ pixel_values: new ort.Tensor("float32", pixels.data, pixels.shape) })).image_features!;
      await vision.release();
      const batch = {
        inputIds: f.json.input_ids as number[][],
        attentionMask: f.json.attention_mask as number[][],
        labels: f.json.labels as number[][],
        decoderAttentionMask: f.json.decoder_attention_mask as number[][] | undefined,
      };
      const trainable = f.json.trainable as string[];
      const params = new Map(trainable.map((n) => [n, readTensorF32(fp32.tensor(n))]));
      const create = vi.spyOn(CompiledGraph, "create");
      const step = async (ckpt: Checkpoint): Promise<StepOutput> => {
        const s = new Stage2Step(ckpt);
        try {
          return await s.run(batch, features, params);
        } finally {
          await s.release();
        }
      };
      const reference = await step(fp32);
      for (const dtype of ["q8", "q4"] as const) {
        const out = await step(await withDTypes(fp32, LM(dtype), { cacheDir: cache }));
        expect([...out.grads.keys()].sort()).toEqual([...trainable].sort());
        expect(Math.abs(out.losses.loss! / reference.losses.loss! - 1), `${dtype} loss`).toBeLessThanOrEqual(0.02);
        // The backward goes through the same quantized weights: the gradients are those of the float
        // model with the weights the codes stand for, up to the rounding of the activations.
        expectAligned(`${dtype} against the dequantized weights`, out, await step(dequantizedCopy(fp32, dtype)), 0.99);
        // Against the original float weights, the rounding of the weights themselves counts: on these
        // tiny models (one block per row of 32) even the exact gradient of the 4-bit weights has
        // cosines down to 0.97 with the fp32 one.
        expectAligned(`${dtype} against fp32`, out, reference, dtype === "q8" ? 0.98 : 0.95);
      }
      // Training sessions are created without constant folding (see below).
      expect(create.mock.calls.length).toBeGreaterThan(0);
      expect(create.mock.calls.every(([, options]) => options?.foldConstants === false)).toBe(true);
      create.mockRestore();
    });
  }
});

describe("memory of a training session with a quantized language model", () => {
  it("keeps no float or unpacked copy of the quantized weights: each is dequantized when its product runs", async () => {
    const f = fixture("stage2-opt-prompted");
    const ckpt = await withDTypes(Checkpoint.open(path.join(fixtures, f.json.checkpoint_path as string)), LM("q4"), { cacheDir: cache });
    const batch = { inputIds: f.json.input_ids as number[][], attentionMask: f.json.attention_mask as number[][], labels: f.json.labels as number[][] };
    const graph = stage2Graph(ckpt, stage2Feeds(ckpt.config, batch).shape);
    const optimized = (foldConstants: boolean) => initializersAfterOptimization(graph, disabledOptimizers({ foldConstants }));
    // What ONNX Runtime keeps of a 4-bit weight [N, K]: its packed bytes [N, K / block, block / 2].
    const unpacked = (inits: { dims: number[]; dataType: number }[]) => inits.filter((t) => t.dataType === 2 && t.dims.length === 2 && t.dims[1]! >= 32);
    const floats = (inits: { dims: number[]; dataType: number }[]) => inits.filter((t) => t.dataType === 1 && t.dims.length === 2);
    // Folded, the codes of every 4-bit weight would be unpacked into a uint8 matrix kept beside the packed one.
    expect(unpacked(await optimized(true)).length).toBeGreaterThan(0);
    const training = await optimized(false);
    expect(unpacked(training)).toEqual([]);
    // The float 2-D initializers are the frozen fp32 tensors of the checkpoint (embeddings), none new.
    const frozen = graph.initializers.filter((i) => i.dtype === "float32" && i.dims.length === 2).length;
    expect(floats(training).length).toBeLessThanOrEqual(frozen);
  });
});

describe("order of a training step with a quantized language model", () => {
  it("dequantizes each weight for the backward only when its gradient is there, one at a time", async () => {
    const f = fixture("stage2-opt-prompted");
    const ckpt = await withDTypes(Checkpoint.open(path.join(fixtures, f.json.checkpoint_path as string)), LM("q4"), { cacheDir: cache });
    const batch = { inputIds: f.json.input_ids as number[][], attentionMask: f.json.attention_mask as number[][], labels: f.json.labels as number[][] };
    const { shape, feeds } = stage2Feeds(ckpt.config, batch);
    const graph = stage2Graph(ckpt, shape);
    const features = new Float32Array((graph.inputs.find((v) => v.name === "image_features")!.shape as number[]).reduce((a, b) => a * b, 1)).fill(0.5);
    feeds.image_features = new ort.Tensor("float32", features, graph.inputs.find((v) => v.name === "image_features")!.shape as number[]);
    for (const [n, v] of graph.trained) feeds[n] = new ort.Tensor("float32", readTensorF32(ckpt.tensor(n)), v.shape as number[]);
    const kernels = await executionOrder(graph, disabledOptimizers({ foldConstants: false }), feeds);
    const at = (types: string[]) => kernels.flatMap((k, i) => (types.includes(k) ? [i] : []));
    const dequantized = at(["DequantizeLinear"]);
    const forward = at(["MatMulNBits", "MatMulIntegerToFloat"]);
    const products = at(["MatMul", "Gemm", "FusedMatMul"]);
    // One per quantized layer of the language model, after the whole forward pass...
    expect(dequantized.length).toBe(forward.length);
    expect(Math.min(...dequantized)).toBeGreaterThan(Math.max(...forward));
    // ...and each used by a product before the next one is made.
    for (let i = 1; i < dequantized.length; i++) expect(products.some((p) => p > dequantized[i - 1]! && p < dequantized[i]!), `between dequantizations ${i - 1} and ${i}`).toBe(true);
  });
});

/** The op types of the kernels one run of the graph executes, in order (from ONNX Runtime's profile). */
async function executionOrder(graph: Graph, disabled: string, feeds: Record<string, ort.Tensor>): Promise<string[]> {
  const dir = fs.mkdtempSync(path.join(cache, "profile-"));
  const bytes = serializeGraph(graph, { externalLocation: (file) => path.relative("/", fs.realpathSync(file)) });
  const s = await ort.InferenceSession.create(bytes, {
    graphOptimizationLevel: "all",
    enableProfiling: true,
    profileFilePrefix: path.join(dir, "profile"),
    logSeverityLevel: 3,
    extra: { session: { model_external_initializers_file_folder_path: "/" }, optimization: { disable_specified_optimizers: disabled } },
  });
  await s.run(feeds);
  await s.release();
  const events = JSON.parse(fs.readFileSync(path.join(dir, fs.readdirSync(dir)[0]!), "utf8")) as { cat: string; name: string; ts: number; args: { op_name?: string } }[];
  return events.filter((e) => e.cat === "Node" && e.name.endsWith("_kernel_time")).sort((a, b) => a.ts - b.ts).map((e) => e.args.op_name!);
}

/** The initializers of the graph as ONNX Runtime optimizes it for a session, with `disabled` optimizers left out. */
async function initializersAfterOptimization(graph: Graph, disabled: string): Promise<{ name: string; dims: number[]; dataType: number }[]> {
  const dir = fs.mkdtempSync(path.join(cache, "optimized-"));
  const files = [...new Set(graph.initializers.flatMap((i) => (i.kind === "external" ? [i.file] : [])))];
  // External data is found relative to a folder that holds every weight file: here the root.
  const bytes = serializeGraph(graph, { externalLocation: (file) => path.relative("/", fs.realpathSync(file)) });
  const file = path.join(dir, "model.onnx");
  const s = await ort.InferenceSession.create(bytes, {
    graphOptimizationLevel: "all",
    optimizedModelFilePath: file,
    logSeverityLevel: 3,
    extra: { session: { model_external_initializers_file_folder_path: "/" }, optimization: { disable_specified_optimizers: disabled } },
  });
  await s.release();
  expect(files.length).toBeGreaterThan(0);
  const model = onnxProto.onnx.ModelProto.decode(fs.readFileSync(file));
  return model.graph!.initializer!.map((t) => ({ name: t.name!, dims: (t.dims ?? []).map(Number), dataType: t.dataType! }));
}
