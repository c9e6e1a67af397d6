/** Lower-precision weights: the block format against MatMulNBits, the tiny models in q8/q4/fp16, conversion and caching. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as ort from "onnxruntime-node";
import { afterAll, describe, expect, it } from "vitest";
import { Blip2, Blip2ForImageTextRetrieval, type GenerationOptions } from "../src/index.js";
import { Graph, type Target, type Value } from "../src/ir/graph.js";
import { serializeGraph } from "../src/ir/onnx.js";
import * as op from "../src/ir/ops.js";
import { floatToHalf } from "../src/io/safetensors.js";
import { dequantizeMatrix, quantizeMatrix } from "../src/quantize/blockQuant.js";
import { dequantizeChannels, quantizeChannels } from "../src/quantize/channelQuant.js";
import { linearInt8 } from "../src/models/layers.js";
import { weightDType } from "../src/io/weightFormat.js";
import { parseDTypeSpec, resolveDTypes } from "../src/quantize/dtype.js";
import { gatherRows } from "../src/runtime/kvCache.js";
import { cli, fixture, loadReference } from "./helpers.js";

const cache = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-qcache-"));
const loaded: Blip2[] = [];
afterAll(async () => Promise.all(loaded.map((b) => b.dispose())));

function random(n: number, seed: number): Float32Array {
  let s = seed;
  return Float32Array.from({ length: n }, () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 31 - 1) * 0.1);
}

/** A graph of one linear layer in the given precision, run on rows `xs` [rows, k]. */
async function runLinear(build: (g: Graph, x: Value) => Value, xs: Float32Array, rows: number, k: number, target: Target = "cpu"): Promise<Float32Array> {
  const g = new Graph("linear", target);
  g.output(build(g, g.input("x", "float32", [rows, k])), "y");
  // A GPU graph runs here on the CPU without the extended optimizations: those would fuse its
  // dequantized weight and product back into a dynamically quantized integer product (a CPU kernel).
  const session = await ort.InferenceSession.create(serializeGraph(g, { externalLocation: () => "" }), { graphOptimizationLevel: target === "gpu" ? "basic" : "all" });
  return (await session.run({ x: new ort.Tensor("float32", xs, [rows, k]) })).y!.data as Float32Array;
}

describe("4-bit blocks", () => {
  it("blocks are 256 values long, or the largest power of two dividing a shorter row", async () => {
    const { blockSizeFor } = await import("../src/quantize/quantize.js");
    // OPT-2.7B's 2560 and 10240, ViT-g's 1408 and 6144, a tiny fixture's 32.
    expect([2560, 10240, 1408, 6144, 32, 48].map(blockSizeFor)).toEqual([256, 256, 128, 256, 32, 16]);
  });

  it.each([256, 32, 16])("blocks of %i: MatMulNBits multiplies by exactly the dequantized matrix", async (block) => {
    const n = 48;
    const k = 256;
    const w = random(n * k, 7);
    const q = quantizeMatrix(w, n, k, block);
    const deq = dequantizeMatrix(q);
    // Rounding error is at most half a step of each block.
    for (let i = 0; i < w.length; i++) expect(Math.abs(w[i]! - deq[i]!)).toBeLessThanOrEqual(q.scales[Math.floor(i / block)]! / 2 + 1e-7);
    const xs = random(3 * k, 11);
    const y = await runLinear((g, x) => {
      const weight = g.constant(q.weight, "uint8", [n, k / block, block / 2]);
      return op.matMulNBits(x, weight, g.constant(q.scales, "float32", [q.scales.length]), g.constant(q.zeroPoints, "uint8", [q.zeroPoints.length]), null, { k, n, bits: 4, blockSize: block, accuracyLevel: 0 });
    }, xs, 3, k);
    for (let r = 0; r < 3; r++) {
      for (let c = 0; c < n; c++) {
        let acc = 0;
        for (let i = 0; i < k; i++) acc += xs[r * k + i]! * deq[c * k + i]!;
        expect(y[r * n + c]).toBeCloseTo(acc, 5);
      }
    }
  });
});

/** Round half to even, as ONNX's Round. */
const roundEven = (v: number) => (Math.abs(v % 1) === 0.5 ? 2 * Math.round(v / 2) : Math.round(v));

describe("8-bit channels", () => {
  it("codes stay within half a step of each row's scale, and zero rows stay zero", () => {
    const n = 5;
    const k = 64;
    const w = random(n * k, 3);
    w.fill(0, 2 * k, 3 * k);
    const q = quantizeChannels(w, n, k);
    const deq = dequantizeChannels(q);
    for (let i = 0; i < w.length; i++) expect(Math.abs(w[i]! - deq[i]!)).toBeLessThanOrEqual(q.scales[Math.floor(i / k)]! / 2 + 1e-9);
    expect(Array.from(deq.subarray(2 * k, 3 * k)).every((v) => v === 0)).toBe(true);
    // Each row's largest magnitude maps onto 127 exactly.
    expect(Math.max(...Array.from(q.weight).map(Math.abs))).toBe(127);
  });

  it("the integer linear layer gives exactly the product of the rows' 8-bit codes and the weight's, scaled back, per row", async () => {
    const n = 48;
    const k = 96;
    const rows = 4;
    const q = quantizeChannels(random(n * k, 7), n, k);
    const bias = random(n, 5);
    const xs = random(rows * k, 11);
    xs.fill(0, 2 * k, 3 * k); // a row of zeros: its scale must not divide by zero
    xs[k + 3] = 40; // an outlier coarsens its own row only
    const y = await runLinear((g, x) => linearInt8(x, g.constant(q.weight, "int8", [k, n]), g.constant(q.scales, "float32", [n]), g.constant(bias, "float32", [n])), xs, rows, k);
    for (let r = 0; r < rows; r++) {
      const row = xs.subarray(r * k, (r + 1) * k);
      const scale = Math.max(Math.fround(Math.max(...Array.from(row).map(Math.abs)) * Math.fround(1 / 127)), 1e-30);
      const codes = Array.from(row, (v) => roundEven(Math.fround(v / scale)));
      for (let c = 0; c < n; c++) {
        let sum = 0;
        for (let i = 0; i < k; i++) sum += codes[i]! * q.weight[i * n + c]!;
        const expected = sum * q.scales[c]! * scale + bias[c]!;
        expect(Math.abs(y[r * n + c]! - expected)).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(expected)));
      }
    }
  });
});

describe("8-bit channels on a GPU", () => {
  it("a GPU graph's 8-bit layer multiplies in float by the dequantized weight, with no integer kernels", async () => {
    const n = 48;
    const k = 96;
    const rows = 3;
    const q = quantizeChannels(random(n * k, 7), n, k);
    const deq = dequantizeChannels(q);
    const bias = random(n, 5);
    const xs = random(rows * k, 11);
    const ops = new Set<string>();
    const y = await runLinear((g, x) => {
      const out = linearInt8(x, g.constant(q.weight, "int8", [k, n]), g.constant(q.scales, "float32", [n]), g.constant(bias, "float32", [n]));
      g.nodes.forEach((node) => ops.add(node.op));
      return out;
    }, xs, rows, k, "gpu");
    expect(ops.has("DequantizeLinear") && !ops.has("QuantizeLinear") && !ops.has("MatMulIntegerToFloat")).toBe(true);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < n; c++) {
        let expected = bias[c]!;
        for (let i = 0; i < k; i++) expected += xs[r * k + i]! * deq[c * k + i]!;
        expect(Math.abs(y[r * n + c]! - expected)).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(expected)));
      }
  });
});

describe("conversion threads", () => {
  it("write, over several threads, exactly what quantizeChannels gives for each weight", async () => {
    const { Checkpoint } = await import("../src/io/checkpoint.js");
    const { readSafetensorsHeader, readTensorBytes, readTensorF32 } = await import("../src/io/safetensors.js");
    const { linearWeights, writeVariants } = await import("../src/quantize/quantize.js");
    const ckpt = Checkpoint.open(fixture("tiny-blip2-opt"));
    const names = linearWeights(ckpt).byPart.language;
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "blip2-threads-")), "language-q8.safetensors");
    const seen: number[] = [];
    await writeVariants(file, ckpt, names, "q8", (done) => seen.push(done));
    expect(seen).toEqual(names.map((_, i) => i + 1));
    const written = readSafetensorsHeader(file).tensors;
    for (const name of names) {
      const info = ckpt.tensor(name);
      const [n, k] = info.shape as [number, number];
      const q = quantizeChannels(readTensorF32(info), n, k);
      expect(written.get(`${name}.q8.weight`)!.shape).toEqual([k, n]);
      const codes = readTensorBytes(written.get(`${name}.q8.weight`)!);
      expect(new Int8Array(codes.buffer, codes.byteOffset, codes.byteLength)).toEqual(q.weight);
      expect(new Float32Array(new Uint8Array(readTensorBytes(written.get(`${name}.q8.scales`)!)).buffer)).toEqual(q.scales);
    }
  });

  it("a weight that cannot be read fails its job with the file named, and the threads go on (blocks and float16)", async () => {
    const { QuantizePool } = await import("../src/quantize/pool.js");
    const pool = new QuantizePool(2);
    try {
      const missing = { name: "w", dtype: "F32" as const, shape: [16, 32], file: path.join(os.tmpdir(), "no-such-blip2-file.safetensors"), offset: 0, byteLength: 16 * 32 * 4 };
      await expect(pool.quantizeChannels(missing)).rejects.toThrow(/no-such-blip2-file/);
      const weights = random(16 * 32, 3);
      const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "blip2-pool-")), "w.bin");
      fs.writeFileSync(file, weights);
      const q = await pool.quantizeBlocks({ ...missing, file }, 16);
      expect(q.weight).toEqual(quantizeMatrix(weights, 16, 32, 16).weight);
      expect((await pool.quantizeChannels({ ...missing, file })).weight).toEqual(quantizeChannels(weights, 16, 32).weight);
      expect(await pool.toHalf({ ...missing, file })).toEqual(Uint16Array.from(weights, floatToHalf));
      // Closing (a write failed) fails what is still queued rather than starting it.
      const jobs = [1, 2, 3, 4].map(() => pool.quantizeBlocks({ ...missing, file }, 16));
      const settled = Promise.allSettled(jobs);
      await pool.close();
      const results = await settled;
      expect(results.at(-1)).toMatchObject({ status: "rejected", reason: { message: "the quantization threads were closed" } });
    } finally {
      await pool.close();
    }
  });
});

describe("dtype options", () => {
  it("parses the shorthand and per-part forms", () => {
    expect(resolveDTypes(parseDTypeSpec("q8"))).toEqual({ vision: "q8", qformer: "q8", language: "q8" });
    expect(resolveDTypes(parseDTypeSpec("q4"))).toEqual({ vision: "q8", qformer: "q8", language: "q4" });
    expect(resolveDTypes(parseDTypeSpec("vision=fp32,language=q4"))).toEqual({ vision: "fp32", qformer: "fp32", language: "q4" });
    expect(() => parseDTypeSpec("q3")).toThrow(/expected one of fp32, fp16, q8, q4, got "q3"/);
    expect(() => parseDTypeSpec("eyes=q8")).toThrow(/unknown part "eyes"/);
    expect(() => resolveDTypes({ vision: "int2" as never })).toThrow(/dtype.vision/);
  });

  it("q4 puts only the per-token feed-forward weights in 4 bits", () => {
    expect(weightDType("language_model.model.decoder.layers.3.fc1.weight", "q4")).toBe("q4");
    expect(weightDType("language_model.model.decoder.layers.3.self_attn.q_proj.weight", "q4")).toBe("q8");
    expect(weightDType("language_model.decoder.block.2.layer.2.DenseReluDense.wo.weight", "q4")).toBe("q4");
    // T5's encoder runs once per prompt: 8 bits.
    expect(weightDType("language_model.encoder.block.2.layer.1.DenseReluDense.wi_0.weight", "q4")).toBe("q8");
    // The vision encoder in q4 when asked for by name.
    expect(weightDType("vision_model.encoder.layers.0.mlp.fc1.weight", "q4")).toBe("q4");
    expect(weightDType("vision_model.encoder.layers.0.mlp.fc1.weight", "q8")).toBe("q8");
  });

  it("the CLI reports a bad --dtype in one line", async () => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-opt"), "--dtype", "q3", fixture("image0.png"));
    expect(r.code).toBe(2); // a usage error, as every bad option value
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toMatch(/--dtype: expected one of/);
  });
});

const SETTINGS: Record<string, GenerationOptions> = {
  greedy_ids: { maxNewTokens: 10 },
  greedy_min10_ids: { maxNewTokens: 10, minNewTokens: 10 },
  beam3_ids: { maxNewTokens: 10, numBeams: 3, minNewTokens: 3 },
  "repetition_penalty_1.5_ids": { maxNewTokens: 10, minNewTokens: 10, repetitionPenalty: 1.5 },
};

/**
 * Where lower precision keeps transformers' ids on the tiny models, and where it does not: the
 * cases left out have top-1/top-2 margins (or beam score gaps) smaller than the quantization error,
 * mostly on the T5 model, whose 12-token vocabulary has logits within a few hundredths.
 */
const DIFFERS: Record<string, string[]> = {
  "tiny-blip2-opt q8": [],
  "tiny-blip2-opt fp16": [],
  "tiny-blip2-opt q4": ["2:repetition_penalty_1.5_ids"],
  "tiny-blip2-t5 q8": ["0:greedy_ids", "0:greedy_min10_ids", "0:beam3_ids", "0:repetition_penalty_1.5_ids", "1:greedy_ids", "1:greedy_min10_ids", "1:beam3_ids", "2:beam3_ids"],
  "tiny-blip2-t5 fp16": [],
  "tiny-blip2-t5 q4": ["0:beam3_ids", "0:repetition_penalty_1.5_ids", "1:greedy_ids", "1:greedy_min10_ids", "1:beam3_ids", "2:beam3_ids"],
};

describe.each(["tiny-blip2-opt", "tiny-blip2-t5"])("%s in lower precision", (name) => {
  const ref = JSON.parse(fs.readFileSync(fixture(name, "reference.json"), "utf8"));
  it.each(["q8", "q4", "fp16"] as const)("%s keeps transformers' ids wherever the margins allow", async (dtype) => {
    const b = await Blip2.load(fixture(name), { dtype, blip2Cache: cache });
    loaded.push(b);
    const differs = DIFFERS[`${name} ${dtype}`]!;
    let same = 0;
    for (const c of ["0", "1", "2"]) {
      for (const [key, options] of Object.entries(SETTINGS)) {
        if (differs.includes(`${c}:${key}`)) continue;
        const [r] = await b.captionAll([fixture("image0.png")], { ...options, prompt: ref.prompts[Number(c)] });
        expect(r!.ids, `${dtype} case ${c} ${key}`).toEqual(ref.cases[c][key]);
        same++;
      }
    }
    expect(same).toBe(12 - differs.length);
  });
});

describe("where tiny-blip2-t5's greedy ids differ in lower precision", () => {
  /** Greedy ids and each step's logits for prompt `c` of the fixture. */
  async function greedy(dtype: "fp32" | "q8" | "q4", c: number) {
    const { generateIds } = await import("../src/generation/generate.js");
    const { resolveGeneration } = await import("../src/generation/options.js");
    const ref = JSON.parse(fs.readFileSync(fixture("tiny-blip2-t5", "reference.json"), "utf8"));
    const b = await Blip2.load(fixture("tiny-blip2-t5"), { dtype, blip2Cache: cache });
    try {
      const m = b.model as unknown as { runtime: import("../src/runtime/blip2Runtime.js").Blip2Runtime; defaults: GenerationOptions };
      const inputs = await b.processor({ images: [fixture("image0.png")], text: [ref.prompts[c]] });
      const logits: Float32Array[] = [];
      const g = resolveGeneration({ maxNewTokens: 10 }, m.defaults, b.model.config);
      const out = await generateIds(m.runtime, { pixelValues: inputs.pixelValues!, inputIds: inputs.inputIds, attentionMask: inputs.attentionMask }, g, { onLogits: (l) => void logits.push(l) });
      return { ids: out.sequences[0]!.slice(1), logits };
    } finally {
      await b.dispose();
    }
  }

  // The DIFFERS greedy cases: the first new token that differs is one whose float32 top-1/top-2
  // margin is under twice the quantized logits' largest error at that step, so rounding can swap them.
  it.each([["q8", 0], ["q8", 1], ["q4", 1]] as const)("%s, prompt %i: at a step where float32's top two are closer than the quantization error", async (dtype, c) => {
    expect(DIFFERS[`tiny-blip2-t5 ${dtype}`]).toContain(`${c}:greedy_ids`);
    const exact = await greedy("fp32", c);
    const low = await greedy(dtype, c);
    const step = exact.ids.findIndex((id, i) => id !== low.ids[i]);
    expect(step).toBeGreaterThanOrEqual(0);
    const [top1, top2] = Array.from(exact.logits[step]!).sort((a, b) => b - a);
    const error = Math.max(...Array.from(low.logits[step]!, (v, j) => Math.abs(v - exact.logits[step]![j]!)));
    expect(top1! - top2!).toBeLessThan(2 * error);
  });
});

describe("integer sessions", () => {
  it("prepack their weights (the integer kernels repack them on every run otherwise), float ones do not", async () => {
    const { Checkpoint } = await import("../src/io/checkpoint.js");
    const { imageGraph, optDecoderGraph } = await import("../src/models/blip2.js");
    const { withDTypes } = await import("../src/quantize/quantize.js");
    const { prepacks } = await import("../src/runtime/session.js");
    const ckpt = Checkpoint.open(fixture("tiny-blip2-opt"));
    const graphs = (c: typeof ckpt) => [imageGraph(c, { project: true }), optDecoderGraph(c, c.config.text as import("../src/config.js").OptConfig)];
    expect(graphs(ckpt).map(prepacks)).toEqual([false, false]);
    for (const dtype of ["q8", "q4"] as const) {
      const quantized = await withDTypes(ckpt, resolveDTypes(dtype), { cacheDir: cache });
      expect(graphs(quantized).map(prepacks), dtype).toEqual([true, true]);
    }
  });
});

describe("tiny-blip2-itm in q8", () => {
  it("keeps transformers' ITC and ITM scores within the quantization error, and their order", async () => {
    const dir = fixture("tiny-blip2-itm");
    const ref = loadReference(path.join(dir, "reference.safetensors"));
    const texts = JSON.parse(fs.readFileSync(path.join(dir, "reference.json"), "utf8")).texts.slice(0, 2);
    const images = [fixture("image0.png"), fixture("image1.png")];
    const model = await Blip2ForImageTextRetrieval.fromPretrained(dir, { dtype: "q8", blip2Cache: cache });
    try {
      const itc = (await model.similarity(images, texts)).flat();
      const refItc = Array.from(ref.get("itc.logits_per_image")!.data);
      itc.forEach((v, i) => expect(Math.abs(v - refItc[i]!), `itc ${i}`).toBeLessThan(0.02));
      // Each image prefers the same text.
      expect(itc[0]! < itc[1]!).toBe(refItc[0]! < refItc[1]!);
      expect(itc[2]! < itc[3]!).toBe(refItc[2]! < refItc[3]!);
      const match = await model.match(images, texts);
      const itm = [match.logits[0]![0]!, match.logits[1]![1]!].flat();
      const refItm = Array.from(ref.get("itm.logits_per_image")!.data);
      itm.forEach((v, i) => expect(Math.abs(v - refItm[i]!), `itm ${i}`).toBeLessThan(0.03));
      expect(itm[0]! > itm[1]!).toBe(refItm[0]! > refItm[1]!);
      expect(itm[2]! > itm[3]!).toBe(refItm[2]! > refItm[3]!);
    } finally {
      await model.dispose();
    }
  });
});

describe("quantized OPT prompts of several rows", () => {
  it("give each row the logits, and the cache, it gets alone (each row is quantized on its own), run together or in chunks", async () => {
    const ref = JSON.parse(fs.readFileSync(fixture("tiny-blip2-opt", "reference.json"), "utf8"));
    const b = await Blip2.load(fixture("tiny-blip2-opt"), { dtype: "q8", blip2Cache: cache });
    loaded.push(b);
    const rt = (b.model as unknown as { runtime: import("../src/runtime/blip2Runtime.js").Blip2Runtime }).runtime;
    const images = [fixture("image0.png"), fixture("image1.png")];
    const inputs = await b.processor({ images, text: ref.batch.prompts, paddingSide: "left" });
    const features = await b.model.imageFeatures(inputs.pixelValues!, 2);
    const prompts = rt.optPrompt(inputs.inputIds, inputs.attentionMask, features);
    /** Last-position logits of the prompt (`rowsPerRun` rows per pass), then of one more token (id 5), for `rows`. */
    const run = async (rows: number[], rowsPerRun?: number) => {
      const width = prompts.ids[0]!.length;
      const pick = (list: number[][]) => rows.map((r) => list[r]!);
      const part = { ids: pick(prompts.ids), imageIndex: pick(prompts.imageIndex), image: gatherRows(prompts.image, rows), mask: pick(prompts.mask) };
      const c = await rt.newCache(rows.length, width + 1);
      const prompt = (await rt.optDecode(part, c, true, rowsPerRun)).logits!.data as Float32Array;
      const step = (await rt.optDecode(rt.optStep(rows.map(() => 5)), c, true)).logits!.data as Float32Array;
      await c.drop();
      return { prompt, step };
    };
    const both = await run([0, 1]);
    const vocab = both.prompt.length / 2;
    for (const r of [0, 1]) {
      const alone = await run([r]);
      expect(maxDiff(both.prompt.subarray(r * vocab, (r + 1) * vocab), alone.prompt)).toBeLessThan(1e-4);
      expect(maxDiff(both.step.subarray(r * vocab, (r + 1) * vocab), alone.step)).toBeLessThan(1e-4);
    }
    const chunked = await run([0, 1], 1);
    expect(maxDiff(chunked.prompt, both.prompt)).toBeLessThan(1e-4);
    expect(maxDiff(chunked.step, both.step)).toBeLessThan(1e-4);
  });
});

function maxDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  return a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i]!)), 0);
}

describe("conversion", () => {
  it("is written once to the cache and reused", async () => {
    const b = await Blip2.load(fixture("tiny-blip2-opt"), { dtype: "q8", blip2Cache: cache });
    loaded.push(b);
    const files = () => fs.readdirSync(cache, { recursive: true }).map(String).filter((f) => f.endsWith(".safetensors")).sort();
    const stamps = () => files().map((f) => fs.statSync(path.join(cache, f)).mtimeMs);
    const before = stamps();
    let converted = 0;
    loaded.push(await Blip2.load(fixture("tiny-blip2-opt"), { dtype: "q8", blip2Cache: cache, conversionProgress: () => void converted++ }));
    expect(converted).toBe(0);
    expect(stamps()).toEqual(before);
    expect(files().some((f) => /language-q8\.safetensors$/.test(f))).toBe(true);
  });

  it("a checkpoint with the same shapes but other weights gets its own conversion", async () => {
    const { copyFixture } = await import("./helpers.js");
    const { readSafetensorsHeader } = await import("../src/io/safetensors.js");
    const { Checkpoint } = await import("../src/io/checkpoint.js");
    const dir = copyFixture("tiny-blip2-opt");
    const file = path.join(dir, "model.safetensors");
    const original = Checkpoint.open(dir).fingerprint();
    // Change one weight's values in place (a fine-tuned copy): same header, same size.
    const info = readSafetensorsHeader(file).tensors.get("language_model.model.decoder.layers.0.fc1.weight")!;
    const bytes = fs.readFileSync(file);
    for (let i = 0; i < info.byteLength; i++) bytes[info.offset + i] ^= 0x01;
    fs.writeFileSync(file, bytes);
    expect(Checkpoint.open(dir).fingerprint()).not.toBe(original);
    let converted = 0;
    loaded.push(await Blip2.load(dir, { dtype: "q8", blip2Cache: cache, conversionProgress: () => void converted++ }));
    expect(converted).toBeGreaterThan(0);
  });

  it("removes the partial files of a killed conversion, not those of a running one", async () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-qcache-"));
    const b = await Blip2.load(fixture("tiny-blip2-opt"), { dtype: { language: "q8" }, blip2Cache: root });
    loaded.push(b);
    const folder = path.dirname(fs.readdirSync(root, { recursive: true }).map((f) => path.join(root, String(f))).find((f) => f.endsWith("language-q8.safetensors"))!);
    // A pid that cannot be running (above Linux's pid_max) and this process's own.
    const dead = path.join(folder, "vision-q8.safetensors.tmp-99999999");
    const running = path.join(folder, `qformer-q8.safetensors.tmp-${process.pid}`);
    fs.writeFileSync(dead, "partial");
    fs.writeFileSync(running, "partial");
    loaded.push(await Blip2.load(fixture("tiny-blip2-opt"), { dtype: { vision: "q8" }, blip2Cache: root }));
    expect(fs.existsSync(dead)).toBe(false);
    expect(fs.existsSync(running)).toBe(true);
    expect(fs.existsSync(path.join(folder, "vision-q8.safetensors"))).toBe(true);
  });

  it("blip2 quantize --out writes a folder that loads as it was written", async () => {
    const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "blip2-q4-")), "tiny-q4");
    const r = await cli("quantize", "-m", fixture("tiny-blip2-opt"), "--dtype", "q4", "--out", out);
    expect(r.code, r.stderr).toBe(0);
    expect(fs.existsSync(path.join(out, "blip2_weights.json"))).toBe(true);
    expect(fs.existsSync(path.join(out, "tokenizer.json"))).toBe(true);
    const ref = JSON.parse(fs.readFileSync(fixture("tiny-blip2-opt", "reference.json"), "utf8"));
    const b = await Blip2.load(out, { blip2Cache: cache });
    loaded.push(b);
    expect(b.model.checkpoint.dtypes).toEqual({ vision: "q8", qformer: "q8", language: "q4" });
    const [res] = await b.captionAll([fixture("image0.png")], { maxNewTokens: 10 });
    expect(res!.ids).toEqual(ref.cases["0"].greedy_ids);
    await expect(Blip2.load(out, { dtype: "q8" })).rejects.toThrow(/holds vision q8, qformer q8, language q4 weights; it cannot run language as q8/);
    const again = await cli("quantize", "-m", fixture("tiny-blip2-opt"), "--dtype", "q8", "--out", out);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/exists and is not empty/);
    // A folder written under an earlier weight scheme is refused by name, not misread.
    const marker = path.join(out, "blip2_weights.json");
    const { format: _, ...older } = JSON.parse(fs.readFileSync(marker, "utf8"));
    fs.writeFileSync(marker, JSON.stringify(older));
    await expect(Blip2.load(out)).rejects.toThrow(/blip2_weights.json: written in weight format "blip2-weights\/1", this version of blip2 reads blip2-weights\/3; convert the original checkpoint again/);
  });
});
