/**
 * Dropout in the frozen language model during stage 2, as LAVIS trains it (its Blip2OPT/Blip2T5
 * freeze the LM's weights but leave it in train mode): OPT's `dropout` and `attention_dropout`, T5's
 * `dropout_rate`, read from text_config; on with a seed (the loss moves, repeats with the same seed),
 * off without or at rate 0 (PyTorch's loss, bit for bit the graph without dropout); at rate 1 the
 * residual branches (OPT) and the final norm's output (T5) are dropped whole, which places the
 * sites; T5's embedding masks are the seed's hash at the config's rate; a trainer run with LM
 * dropout stopped and resumed equals a straight run bit for bit.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as ort from "onnxruntime-node";
import { afterAll, describe, expect, it } from "vitest";
import { parseBlip2Config, type OptConfig, type T5Config } from "../src/config.js";
import type { Checkpoint } from "../src/io/checkpoint.js";
import { readSafetensorsHeader, readTensorBytes, readTensorF32 } from "../src/io/safetensors.js";
import { Graph } from "../src/ir/graph.js";
import { DROPOUT_SEED, DropoutContext, dropoutUniform } from "../src/models/dropout.js";
import { Params } from "../src/models/layers.js";
import { relativePositionBuckets, t5Encoder } from "../src/models/t5.js";
import { CompiledGraph } from "../src/runtime/session.js";
import { Stage2Step, type StepOutput } from "../src/train/steps.js";
import { train, type TrainOptions } from "../src/train/trainer.js";
import { stage2Reference } from "./trainFixtures.js";

const fixtures = path.join(import.meta.dirname, "fixtures");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-lm-dropout-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const relative = (a: number, b: number) => Math.abs(a - b) / Math.abs(b);
const seedTensor = (seed: number) => new ort.Tensor("int64", BigInt64Array.from([BigInt(seed)]), []);

function expectIdentical(a: StepOutput, b: StepOutput): void {
  expect(a.losses).toEqual(b.losses);
  expect([...a.grads.keys()]).toEqual([...b.grads.keys()]);
  for (const [name, grad] of a.grads) expect(Buffer.from(grad.buffer).equals(Buffer.from(b.grads.get(name)!.buffer)), name).toBe(true);
}

/** The checkpoint with its language model's text_config patched (the fixtures' rates are 0). */
function withText(ckpt: Checkpoint, patch: Partial<OptConfig> | Partial<T5Config>): Checkpoint {
  return ckpt.withConfig({ text: { ...ckpt.config.text, ...patch } as OptConfig | T5Config });
}

describe("language-model dropout rates in config.json", () => {
  it("default to transformers' (OPT dropout 0.1, attention_dropout 0; T5 dropout_rate 0.1) and are read from text_config", () => {
    const opt = parseBlip2Config({ model_type: "blip-2" }, "config.json").text as OptConfig;
    expect([opt.dropout, opt.attentionDropout]).toEqual([0.1, 0]);
    const t5 = parseBlip2Config({ model_type: "blip-2", text_config: { model_type: "t5" } }, "config.json").text as T5Config;
    expect(t5.dropoutRate).toBe(0.1);
    const given = parseBlip2Config({ model_type: "blip-2", text_config: { dropout: 0.2, attention_dropout: 0.05 } }, "config.json").text as OptConfig;
    expect([given.dropout, given.attentionDropout]).toEqual([0.2, 0.05]);
  });

  it("outside [0, 1] are an error naming the field", () => {
    expect(() => parseBlip2Config({ model_type: "blip-2", text_config: { dropout: 1.5 } }, "config.json")).toThrow("config.json: text_config.dropout: expected a probability in [0, 1], got 1.5");
    expect(() => parseBlip2Config({ model_type: "blip-2", text_config: { model_type: "t5", dropout_rate: -0.1 } }, "config.json")).toThrow(/text_config\.dropout_rate: expected a probability/);
  });
});

/** A stage-2 fixture and a step runner over it, for a checkpoint derived from the fixture's. */
async function stage2(name: string) {
  const { f, ckpt, features, batch } = await stage2Reference(name);
  const params = new Map((f.json.trainable as string[]).map((n) => [n, readTensorF32(ckpt.tensor(n))]));
  const run = async (c: Checkpoint, seeds: (number | undefined)[]) => {
    const step = new Stage2Step(c);
    const outs: StepOutput[] = [];
    for (const seed of seeds) outs.push(await step.run(batch, features, params, seed === undefined ? {} : { dropoutSeed: seed }));
    await step.release();
    return outs;
  };
  return { ckpt, run, expected: f.get("loss").data[0]! };
}

describe("stage 2 with dropout in the frozen language model", () => {
  for (const [name, rates] of [
    ["stage2-opt-prompted", { dropout: 0.1, attentionDropout: 0.1 }],
    ["stage2-t5-prompted", { dropoutRate: 0.1 }],
  ] as const) {
    it(`${name}: moves the loss with a seed, repeats it with the same seed (a fresh session too), another seed another loss; off is PyTorch's`, async () => {
      const { ckpt, run, expected } = await stage2(name);
      expect(ckpt.config.qformer.hiddenDropoutProb, "the Q-Former drops nothing here: what moves is the LM's").toBe(0);
      const lm = withText(ckpt, rates);
      const [off, a, again, b] = await run(lm, [undefined, 5, 5, 6]);
      const [fresh] = await run(lm, [5]);
      expect(relative(off!.losses.loss!, expected)).toBeLessThanOrEqual(1e-5);
      expect(relative(a!.losses.loss!, off!.losses.loss!)).toBeGreaterThan(1e-4);
      expectIdentical(a!, again!);
      expectIdentical(a!, fresh!);
      expect(b!.losses.loss).not.toBe(a!.losses.loss);
      const gradA = a!.grads.get("query_tokens")!;
      expect(gradA.some((x, i) => x !== b!.grads.get("query_tokens")![i]), "another seed, other gradients").toBe(true);
      for (const grad of a!.grads.values()) expect(grad.every(Number.isFinite)).toBe(true);
    });

    it(`${name}: at the fixture's rate 0 equals the graph without dropout, bit for bit`, async () => {
      const { ckpt, run, expected } = await stage2(name);
      const text = ckpt.config.text;
      expect(text.modelType === "opt" ? [text.dropout, text.attentionDropout] : [text.dropoutRate]).toEqual(text.modelType === "opt" ? [0, 0] : [0]);
      const [off, on] = await run(ckpt, [undefined, 9]);
      expectIdentical(on!, off!);
      expect(relative(on!.losses.loss!, expected)).toBeLessThanOrEqual(1e-5);
    });
  }

  it("OPT at dropout 1 drops both residual branches of every layer: the loss of the same model with no layers", async () => {
    const { ckpt, run } = await stage2("stage2-opt-prompted");
    const [dropped] = await run(withText(ckpt, { dropout: 1 }), [3]);
    const [noLayers] = await run(withText(ckpt, { numHiddenLayers: 0 }), [undefined]);
    const [full] = await run(ckpt, [undefined]);
    expect(relative(dropped!.losses.loss!, noLayers!.losses.loss!)).toBeLessThanOrEqual(1e-6);
    expect(relative(full!.losses.loss!, noLayers!.losses.loss!), "the layers matter").toBeGreaterThan(1e-3);
  });

  it("OPT with attention dropout takes the plain attention ops: at a rate that drops nothing, PyTorch's loss and gradients", async () => {
    const { ckpt, run, expected } = await stage2("stage2-opt-prompted");
    // u < 1e-9 needs the hash's top 24 bits all zero: no element of this batch is dropped.
    const [plain, fused] = await Promise.all([run(withText(ckpt, { attentionDropout: 1e-9 }), [4]), run(ckpt, [undefined])]);
    expect(relative(plain[0]!.losses.loss!, expected)).toBeLessThanOrEqual(1e-5);
    for (const [n, g] of fused[0]!.grads) {
      const p = plain[0]!.grads.get(n)!;
      const scale = Math.max(1e-3, ...Array.from(g, Math.abs));
      expect(Math.max(...Array.from(g, (x, i) => Math.abs(x - p[i]!))) / scale, n).toBeLessThanOrEqual(1e-4);
    }
  });

  it("T5 at dropout_rate 1 drops the decoder's final output whole: uniform logits, the loss is ln(vocab)", async () => {
    const { ckpt, run } = await stage2("stage2-t5-prompted");
    const [dropped] = await run(withText(ckpt, { dropoutRate: 1 }), [3]);
    expect(relative(dropped!.losses.loss!, Math.log((ckpt.config.text as T5Config).vocabSize))).toBeLessThanOrEqual(1e-6);
  });

  it("T5's first site (the encoder's embeddings) keeps each element by the hash of the seed at the config's rate", async () => {
    const { ckpt } = await stage2("stage2-t5-prompted");
    const rate = 0.3;
    const cfg = { ...(ckpt.config.text as T5Config), dropoutRate: rate };
    const [b, s, d] = [4, 64, cfg.dModel];
    const g = new Graph("t5_encoder_dropout");
    const embeds = g.input("inputs_embeds", "float32", [b, s, d]);
    const mask = g.input("attention_mask", "int64", [b, s]);
    const buckets = g.input("buckets", "int64", [s, s]);
    const out = t5Encoder(new Params(g, ckpt, "language_model."), cfg, embeds, mask, buckets, DropoutContext.input(g));
    g.output(out.hiddenStates[0]!, "dropped");
    const session = await CompiledGraph.create(g, { worker: false });
    const x = Float32Array.from({ length: b * s * d }, (_, i) => 1 + Math.sin(i * 0.37) * 0.5);
    const positions = Array.from({ length: s }, (_, i) => i);
    const n = x.length;
    for (const seed of [1, 77]) {
      const result = await session.run({
        inputs_embeds: new ort.Tensor("float32", x, [b, s, d]),
        attention_mask: new ort.Tensor("int64", new BigInt64Array(b * s).fill(1n), [b, s]),
        buckets: new ort.Tensor("int64", relativePositionBuckets(cfg, positions, positions, true), [s, s]),
        [DROPOUT_SEED]: seedTensor(seed),
      });
      const y = result.dropped!.data as Float32Array;
      const scale = Math.fround(1 / (1 - rate));
      let zeros = 0;
      for (let i = 0; i < n; i++) {
        const drop = dropoutUniform(seed, 1, i) < rate;
        zeros += drop ? 1 : 0;
        if (y[i] !== (drop ? 0 : Math.fround(x[i]! * scale))) throw new Error(`seed ${seed} element ${i}: ${y[i]}, expected ${drop ? 0 : Math.fround(x[i]! * scale)}`);
      }
      expect(Math.abs(zeros / n - rate), `seed ${seed}: share dropped ${zeros / n}`).toBeLessThanOrEqual(3 * Math.sqrt((rate * (1 - rate)) / n));
    }
    await session.release();
  });
});

describe("the trainer with language-model dropout", () => {
  const images = ["image0.png", "image1.png", "image2.png", "hf-4.45/images/img0.png"].map((f) => path.join(fixtures, f));
  const captions = ["a red circle on a blue square", "two cats laying on a pink blanket", "a photo of a dog in the snow", "a bowl of fruit on a table"];

  /** A copy of the fixture checkpoint whose text_config has nonzero dropout rates. */
  function modelWithRates(model: string, rates: Record<string, number>): string {
    const out = path.join(tmp, `${model}-rates`);
    fs.cpSync(path.join(fixtures, "hf-4.45", model), out, { recursive: true });
    const file = path.join(out, "config.json");
    const config = JSON.parse(fs.readFileSync(file, "utf8")) as { text_config: Record<string, unknown> };
    Object.assign(config.text_config, rates);
    fs.writeFileSync(file, JSON.stringify(config, null, 2));
    return out;
  }

  const options = (model: string, out: string): TrainOptions => {
    const data = path.join(tmp, `${path.basename(out)}.jsonl`);
    fs.writeFileSync(data, images.map((image, i) => JSON.stringify({ image, text: captions[i] })).join("\n"));
    return { stage: 2, model, data, out, batchSize: 2, lr: 1e-3, warmupSteps: 0, minLr: 1e-3, seed: 3, blip2Cache: path.join(tmp, "cache"), runtime: { threads: 1 }, prompt: "a photo of", saveEvery: 2, dropout: true };
  };

  for (const [model, rates] of [["opt", { dropout: 0.1, attention_dropout: 0.1 }], ["t5", { dropout_rate: 0.1 }]] as const) {
    it(`${model}: its losses differ from the same run without LM dropout, and 2 steps, a stop and 2 more equal 4 straight, bit for bit`, async () => {
      const withRates = modelWithRates(model, rates);
      const losses = async (m: string, out: string, stopAt?: number) => {
        const seen: number[] = [];
        const controller = new AbortController();
        const result = await train({ ...options(m, out), steps: 4, signal: controller.signal, onStep: (s) => { seen.push(s.losses.loss!); if (s.step === stopAt) controller.abort(); } });
        return { seen, result };
      };
      const straight = await losses(withRates, path.join(tmp, `${model}-4`));
      const rateZero = await losses(path.join(fixtures, "hf-4.45", model), path.join(tmp, `${model}-zero`));
      expect(relative(straight.seen[0]!, rateZero.seen[0]!), "the first step's loss moves with LM dropout").toBeGreaterThan(1e-4);
      const split = path.join(tmp, `${model}-2+2`);
      const first = await losses(withRates, split, 2);
      expect([first.result.stopped, first.result.steps]).toEqual([true, 2]);
      const second = await losses(withRates, split);
      expect(second.result.steps).toBe(4);
      expect([...first.seen, ...second.seen]).toEqual(straight.seen);
      const a = readSafetensorsHeader(path.join(tmp, `${model}-4`, "model.safetensors")).tensors;
      const b = readSafetensorsHeader(path.join(split, "model.safetensors")).tensors;
      for (const [n, info] of a) expect(Buffer.compare(readTensorBytes(info), readTensorBytes(b.get(n)!)), n).toBe(0);
    });
  }
});
