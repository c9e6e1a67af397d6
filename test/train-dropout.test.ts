/**
 * Dropout in the training graphs (src/models/dropout.ts): masks that are a pure function of the
 * step's seed (the graph's hash equals the reference below, the same seed gives the same losses and
 * gradients bit for bit in a fresh session, another seed others), a share dropped within 3σ of the
 * rate, gradients through the masks against finite differences, and the stage graphs: dropout on
 * changes the fixture's loss, off (or at rate 0) leaves it as PyTorch computed it.
 */
import path from "node:path";
import * as ort from "onnxruntime-node";
import { describe, expect, it } from "vitest";
import { gradients } from "../src/autodiff/backward.js";
import { parseBlip2Config } from "../src/config.js";
import { Blip2Error } from "../src/errors.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { readTensorF32 } from "../src/io/safetensors.js";
import { Graph } from "../src/ir/graph.js";
import { serializeGraph } from "../src/ir/onnx.js";
import * as op from "../src/ir/ops.js";
import { DROPOUT_SEED, DropoutContext, dropout, dropoutUniform, lowbias32 } from "../src/models/dropout.js";
import { CompiledGraph } from "../src/runtime/session.js";
import { imageFeaturesGraph } from "../src/train/stage2.js";
import { Rng } from "../src/train/rng.js";
import { Stage1Step, Stage2Step, type StepOutput } from "../src/train/steps.js";
import { dir, fixture } from "./trainFixtures.js";

const seedTensor = (seed: number) => new ort.Tensor("int64", BigInt64Array.from([BigInt(seed)]), []);

async function session(g: Graph) {
  return ort.InferenceSession.create(serializeGraph(g, { externalLocation: (f) => f }), { graphOptimizationLevel: "disabled" });
}

/** A graph of one or more dropout sites over `x` [rows, cols] (ones): each site's output. */
async function maskGraph(rates: number[], rows: number, cols: number) {
  const g = new Graph("masks");
  const x = g.input("x", "float32", [rows, cols]);
  const ctx = DropoutContext.input(g);
  rates.forEach((rate, i) => g.output(dropout(x, rate, ctx), `y${i}`));
  const s = await session(g);
  const ones = new ort.Tensor("float32", new Float32Array(rows * cols).fill(1), [rows, cols]);
  return async (seed: number) => {
    const out = await s.run({ x: ones, [DROPOUT_SEED]: seedTensor(seed) });
    return rates.map((_, i) => out[`y${i}`]!.data as Float32Array);
  };
}

describe("dropout masks", () => {
  it("are the hash of the seed, the site and the element's index", async () => {
    const rates = [0.1, 0.5];
    const run = await maskGraph(rates, 40, 50);
    for (const seed of [0, 7, 2 ** 32 - 1]) {
      const ys = await run(seed);
      ys.forEach((y, site) => {
        const rate = rates[site]!;
        const kept = Math.fround(1 / (1 - rate));
        for (let i = 0; i < y.length; i++) {
          const dropped = dropoutUniform(seed, site + 1, i) < rate;
          if (y[i] !== (dropped ? 0 : kept)) throw new Error(`seed ${seed} site ${site} element ${i}: ${y[i]}, expected ${dropped ? 0 : kept}`);
        }
      });
    }
    // The reference mixer is a bijection: distinct indices, distinct hashes.
    const outputs = new Set(Array.from({ length: 4096 }, (_, i) => lowbias32(i)));
    expect(outputs.size).toBe(4096);
  });

  it("drop a share of each site within 3σ of its rate", async () => {
    const rates = [0.1, 0.3, 0.5];
    const run = await maskGraph(rates, 200, 250);
    const n = 200 * 250;
    for (const seed of [1, 2, 3, 123456789]) {
      const ys = await run(seed);
      ys.forEach((y, site) => {
        const rate = rates[site]!;
        const share = y.filter((v) => v === 0).length / n;
        expect(Math.abs(share - rate), `seed ${seed} rate ${rate}: share ${share}`).toBeLessThanOrEqual(3 * Math.sqrt((rate * (1 - rate)) / n));
      });
    }
  });

  it("differ from seed to seed and from site to site, independently", async () => {
    const run = await maskGraph([0.5, 0.5], 100, 100);
    const [a1, b1] = await run(1);
    const [a2] = await run(2);
    const n = 100 * 100;
    // Two independent masks at 0.5 agree on half the elements: within 3σ of n/2.
    const agree = (u: Float32Array, v: Float32Array) => u.filter((x, i) => (x === 0) === (v[i] === 0)).length;
    for (const [u, v, what] of [[a1!, a2!, "seeds 1 and 2"], [a1!, b1!, "sites 1 and 2"]] as const) {
      expect(Math.abs(agree(u, v) - n / 2), what).toBeLessThanOrEqual(3 * Math.sqrt(n / 4));
    }
  });

  it("adds no node without a context or at rate 0, and rejects a rate outside [0, 1]", () => {
    const g = new Graph("none");
    const x = g.input("x", "float32", [2, 3]);
    expect(dropout(x, 0.1, undefined)).toBe(x);
    expect(dropout(x, 0, DropoutContext.input(g))).toBe(x);
    expect(g.nodes.length).toBe(1); // the seed's Cast
    expect(() => dropout(x, 1.5, null)).toThrow(Blip2Error);
  });

  it("pass gradients through the same masks (finite differences on a Q-Former-like chain)", async () => {
    // h = LayerNorm(drop(softmax(drop(x) W) V) + x), with masks dropping a good share (0.3).
    const g = new Graph("fd");
    const xs = [g.input("x", "float32", [2, 3, 4]), g.input("w", "float32", [4, 4]), g.input("v", "float32", [4, 4])];
    const [x, w, v] = xs as [typeof xs[0], typeof xs[0], typeof xs[0]];
    const ctx = DropoutContext.input(g);
    const dropped = dropout(x, 0.3, ctx);
    const probs = dropout(op.softmax(op.matmul(dropped, w), -1), 0.3, ctx);
    const out = dropout(op.matmul(probs, v), 0.3, ctx);
    const h = op.layerNorm(op.add(out, x), g.constant(new Float32Array(4).fill(1), "float32", [4]), null, 1e-5);
    const r = g.constant(Float32Array.from({ length: 24 }, (_, i) => Math.sin(i * 1.7)), "float32", [2, 3, 4]);
    const loss = op.reduceSum(op.mul(h, r), [0, 1, 2], false);
    g.output(loss, "loss");
    g.output(dropped, "dropped");
    gradients(loss, xs).forEach((grad, i) => g.output(grad, `grad_${i}`));
    const s = await session(g);
    const shapes = [[2, 3, 4], [4, 4], [4, 4]];
    const values = shapes.map((shape, k) => Float32Array.from({ length: shape.reduce((a, b) => a * b) }, (_, i) => Math.cos(i * 0.9 + k) * 1.5));
    const feeds = (vals: Float32Array[]) => ({ ...Object.fromEntries(vals.map((d, k) => [["x", "w", "v"][k]!, new ort.Tensor("float32", d, shapes[k]!)])), [DROPOUT_SEED]: seedTensor(11) });
    const first = await s.run(feeds(values));
    const zeros = (first.dropped!.data as Float32Array).filter((a) => a === 0).length;
    expect(zeros, "elements dropped from x").toBeGreaterThan(0);
    expect(zeros).toBeLessThan(24);
    const lossAt = async (vals: Float32Array[]) => Number((await s.run(feeds(vals))).loss!.data[0]);
    const step = 1e-2;
    for (let k = 0; k < 3; k++) {
      const analytic = first[`grad_${k}`]!.data as Float32Array;
      const scale = Math.max(1, ...Array.from(analytic, Math.abs));
      for (let e = 0; e < values[k]!.length; e++) {
        const plus = values.map((a) => a.slice());
        const minus = values.map((a) => a.slice());
        plus[k]![e]! += step;
        minus[k]![e]! -= step;
        const numeric = ((await lossAt(plus)) - (await lossAt(minus))) / (2 * step);
        if (Math.abs(numeric - analytic[e]!) > 2e-2 * scale) throw new Error(`input ${k}[${e}]: analytic ${analytic[e]} vs numeric ${numeric}`);
      }
    }
  });
});

describe("Q-Former dropout rates in config.json", () => {
  it("default to BERT's 0.1 and are read from qformer_config", () => {
    const defaults = parseBlip2Config({ model_type: "blip-2" }, "config.json").qformer;
    expect([defaults.hiddenDropoutProb, defaults.attentionProbsDropoutProb]).toEqual([0.1, 0.1]);
    const given = parseBlip2Config({ model_type: "blip-2", qformer_config: { hidden_dropout_prob: 0.2, attention_probs_dropout_prob: 0 } }, "config.json").qformer;
    expect([given.hiddenDropoutProb, given.attentionProbsDropoutProb]).toEqual([0.2, 0]);
  });

  it("outside [0, 1] are an error naming the field", () => {
    expect(() => parseBlip2Config({ model_type: "blip-2", qformer_config: { hidden_dropout_prob: 1.5 } }, "config.json")).toThrow(
      "config.json: qformer_config.hidden_dropout_prob: expected a probability in [0, 1], got 1.5",
    );
    expect(() => parseBlip2Config({ model_type: "blip-2", qformer_config: { attention_probs_dropout_prob: "0.1" } }, "config.json")).toThrow(/attention_probs_dropout_prob: expected a number/);
  });
});

/** The checkpoint under Q-Former dropout rates of 0.1 (the fixtures' were made with dropout off). */
function withRates(ckpt: Checkpoint, rate: number): Checkpoint {
  return ckpt.withConfig({ qformer: { ...ckpt.config.qformer, hiddenDropoutProb: rate, attentionProbsDropoutProb: rate } });
}

function expectIdentical(a: StepOutput, b: StepOutput): void {
  expect(a.losses).toEqual(b.losses);
  expect([...a.grads.keys()]).toEqual([...b.grads.keys()]);
  for (const [name, grad] of a.grads) expect(Buffer.from(grad.buffer).equals(Buffer.from(b.grads.get(name)!.buffer)), name).toBe(true);
}

const relative = (a: number, b: number) => Math.abs(a - b) / Math.abs(b);

describe("dropout in stage 1", () => {
  const f = fixture("stage1");
  const base = Checkpoint.open(path.join(dir, "stage1-itm"));
  const features = f.get("vision_hidden_before_layernorm");
  const featureTensor = () => new ort.Tensor("float32", features.data, features.shape);
  const negatives = f.json.negatives as { image_for_text: number[]; text_for_image: number[] };
  const given = { imageForText: negatives.image_for_text, textForImage: negatives.text_for_image };
  const batch = { inputIds: f.json.input_ids as number[][], attentionMask: f.json.attention_mask as number[][], decTokenId: f.json.dec_token_id as number, padTokenId: f.json.pad_token_id as number };
  const params = new Map((f.json.trainable as string[]).map((n) => [n, readTensorF32(base.tensor(n))]));
  const expectedLoss = f.get("loss").data[0]!;

  it("is on with a seed (the loss moves), off without (the loss is PyTorch's), the same with the same seed in a fresh session", async () => {
    const ckpt = withRates(base, 0.1);
    const first = new Stage1Step(ckpt);
    const off = await first.run(batch, featureTensor(), params, given);
    expect(relative(off.losses.loss!, expectedLoss), "no dropout: the fixture's loss").toBeLessThanOrEqual(1e-5);
    const a = await first.run(batch, featureTensor(), params, given, { dropoutSeed: 1234 });
    const again = await first.run(batch, featureTensor(), params, given, { dropoutSeed: 1234 });
    const b = await first.run(batch, featureTensor(), params, given, { dropoutSeed: 1235 });
    await first.release();
    const fresh = new Stage1Step(ckpt);
    const resumed = await fresh.run(batch, featureTensor(), params, given, { dropoutSeed: 1234 });
    await fresh.release();

    for (const term of ["loss", "loss_itc", "loss_itm", "loss_itg"]) {
      expect(relative(a.losses[term]!, off.losses[term]!), `${term} moves with dropout`).toBeGreaterThan(1e-4);
      expect(Number.isFinite(a.losses[term]!)).toBe(true);
    }
    expectIdentical(a, again); // no generator state carried from run to run
    expectIdentical(a, resumed); // nor from session to session
    expect(b.losses.loss).not.toBe(a.losses.loss);
    const gradA = a.grads.get("query_tokens")!;
    const gradB = b.grads.get("query_tokens")!;
    expect(gradA.some((x, i) => x !== gradB[i]), "another seed, other gradients").toBe(true);
    for (const grad of a.grads.values()) expect(grad.every(Number.isFinite)).toBe(true);
  });

  it("at rate 0 (the fixture's config) equals the graph without dropout, bit for bit", async () => {
    expect(base.config.qformer.hiddenDropoutProb).toBe(0);
    const step = new Stage1Step(base);
    const off = await step.run(batch, featureTensor(), params, given);
    const on = await step.run(batch, featureTensor(), params, given, { dropoutSeed: 99 });
    await step.release();
    expectIdentical(on, off);
    expect(relative(on.losses.loss!, expectedLoss)).toBeLessThanOrEqual(1e-5);
  });

  it("draws hard negatives in the graph from the similarities of the step's own forward pass", async () => {
    const ckpt = withRates(base, 0.1);
    const step = new Stage1Step(ckpt);
    const out = await step.run(batch, featureTensor(), params, new Rng(5), { dropoutSeed: 77 });
    await step.release();
    // The draw by inverse CDF over each row's softmax (own pair excluded), with the uniforms the
    // step took from the same generator: texts' images first, then images' texts.
    const rng = new Rng(5);
    const b = batch.inputIds.length;
    const u = Array.from({ length: 2 * b }, () => 1 - rng.uniform());
    const draw = (sim: Float32Array, row: number, uniform: number) => {
      const s = Array.from(sim.subarray(row * b, (row + 1) * b), (x, j) => (j === row ? -10000 : x));
      const top = Math.max(...s);
      const w = s.map((x) => Math.exp(x - top));
      const total = w.reduce((p, q) => p + q, 0);
      let c = 0;
      for (let j = 0; j < b; j++) {
        c += w[j]! / total;
        if (c >= uniform) return j;
      }
      return b - 1;
    };
    const simT2i = out.outputs.sim_t2i!.data as Float32Array;
    const simI2t = out.outputs.sim_i2t!.data as Float32Array;
    const imageForText = Array.from(out.outputs.image_for_text!.data as BigInt64Array, Number);
    const textForImage = Array.from(out.outputs.text_for_image!.data as BigInt64Array, Number);
    expect(imageForText).toEqual(Array.from({ length: b }, (_, i) => draw(simT2i, i, u[i]!)));
    expect(textForImage).toEqual(Array.from({ length: b }, (_, i) => draw(simI2t, i, u[b + i]!)));
    imageForText.forEach((j, i) => expect(j, "never the text's own image").not.toBe(i));
  });
});

describe("dropout in stage 2", () => {
  it("moves the loss with a seed, repeats it with the same seed, and leaves it as PyTorch's without", async () => {
    const f = fixture("stage2-opt-prompted");
    const ckpt = withRates(Checkpoint.open(path.join(dir, "..", f.json.checkpoint_path as string)), 0.1);
    const pixels = f.get("pixel_values");
    const vision = await CompiledGraph.create(imageFeaturesGraph(ckpt), { worker: false });
    const features = (await vision.run({ pixel_values: new ort.Tensor("float32", pixels.data, pixels.shape) })).image_features!;
    await vision.release();
    const params = new Map((f.json.trainable as string[]).map((n) => [n, readTensorF32(ckpt.tensor(n))]));
    const batch = { inputIds: f.json.input_ids as number[][], attentionMask: f.json.attention_mask as number[][], labels: f.json.labels as number[][] };
    const step = new Stage2Step(ckpt);
    const off = await step.run(batch, features, params);
    const a = await step.run(batch, features, params, { dropoutSeed: 5 });
    const again = await step.run(batch, features, params, { dropoutSeed: 5 });
    const b = await step.run(batch, features, params, { dropoutSeed: 6 });
    await step.release();
    expect(relative(off.losses.loss!, f.get("loss").data[0]!)).toBeLessThanOrEqual(1e-5);
    expect(relative(a.losses.loss!, off.losses.loss!)).toBeGreaterThan(1e-5);
    expectIdentical(a, again);
    expect(b.losses.loss).not.toBe(a.losses.loss);
  });

  it("rejects a seed that is not a 32-bit unsigned integer", async () => {
    const step = new Stage2Step(Checkpoint.open(path.join(dir, "..", "hf-4.45/opt")));
    const batch = { inputIds: [[2, 100]], attentionMask: [[1, 1]], labels: [[2, 100]] };
    await expect(step.run(batch, new ort.Tensor("float32", new Float32Array(0), [0]), new Map(), { dropoutSeed: -1 })).rejects.toThrow("dropout seed must be an integer in [0, 2^32), got -1");
    await step.release();
  });
});
