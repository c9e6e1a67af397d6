/**
 * The trainer end to end on the tiny checkpoints: losses fall, a run of 4 steps resumed for 4 more
 * equals 8 straight bit for bit, and the output is a checkpoint with the input's tensors (plus
 * stage 1's extras), frozen ones byte-identical, that blip2 loads and runs.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Blip2ForImageTextRetrieval } from "../src/api/retrieval.js";
import { Blip2 } from "../src/api/tasks.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { readSafetensorsHeader, readTensorBytes } from "../src/io/safetensors.js";
import { train, type TrainOptions } from "../src/train/trainer.js";

const fixtures = path.join(import.meta.dirname, "fixtures");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-train-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const images = ["image0.png", "image1.png", "image2.png", "hf-4.45/images/img0.png", "hf-4.45/images/img1.png"].map((f) => path.join(fixtures, f));
const captions = ["a red circle on a blue square", "two cats laying on a pink blanket", "a photo of a dog in the snow", "a bowl of fruit on a table", "a green triangle"];

function dataFile(name: string): string {
  const file = path.join(tmp, name);
  fs.writeFileSync(file, images.map((image, i) => JSON.stringify({ image, text: captions[i] })).join("\n"));
  return file;
}

function tensorsOf(dir: string) {
  const ckpt = Checkpoint.open(dir);
  return new Map(ckpt.names().map((n) => [n, ckpt.tensor(n)]));
}

const base = (stage: 1 | 2, model: string, out: string): TrainOptions => ({
  stage,
  model: path.join(fixtures, model),
  data: dataFile(`${path.basename(out)}.jsonl`),
  out,
  batchSize: 4,
  lr: 1e-3,
  warmupSteps: 0,
  minLr: 1e-3,
  seed: 3,
  blip2Cache: path.join(tmp, "cache"),
  runtime: { threads: 1 },
  dropout: false,
});

describe("trainer", () => {
  it("stage 1 on a retrieval checkpoint without the extras: adds them, the loss falls, frozen tensors are kept", async () => {
    const out = path.join(tmp, "s1");
    const notices: string[] = [];
    const losses: number[] = [];
    const result = await train({ ...base(1, "hf-4.45/itm", out), steps: 6, onNotice: (m) => notices.push(m), onStep: (s) => losses.push(s.losses.loss!) });
    expect(result.steps).toBe(6);
    expect(notices.some((n) => /added \[DEC\]/.test(n))).toBe(true);
    expect(losses.at(-1)!).toBeLessThan(losses[0]!);
    const input = tensorsOf(path.join(fixtures, "hf-4.45/itm"));
    const saved = tensorsOf(out);
    for (const name of ["cls.predictions.bias", "cls.predictions.transform.dense.weight", "temp"]) expect(saved.has(name), name).toBe(true);
    for (const [name, info] of input) {
      const s = saved.get(name)!;
      expect(s.dtype, name).toBe(info.dtype);
      if (name === "embeddings.word_embeddings.weight") expect(s.shape).toEqual([info.shape[0]! + 1, info.shape[1]]);
      else expect(s.shape, name).toEqual(info.shape);
      const frozen = name.startsWith("vision_model.") && !name.startsWith("vision_model.post_layernorm.");
      if (frozen) expect(Buffer.compare(readTensorBytes(s), readTensorBytes(info)), name).toBe(0);
      else if (name === "qformer.layernorm.weight") expect(Buffer.compare(readTensorBytes(s), readTensorBytes(info)), `${name} was trained`).not.toBe(0);
    }
    // blip2 loads the trained checkpoint and runs ITC and ITM with it, with other scores than before.
    const scores = async (dir: string) => {
      const m = await Blip2ForImageTextRetrieval.fromPretrained(dir);
      const out = { itc: await m.similarity(images.slice(0, 2), captions.slice(0, 2)), itm: (await m.match(images.slice(0, 2), captions.slice(0, 2))).probability };
      await m.dispose();
      return out;
    };
    const before = await scores(path.join(fixtures, "hf-4.45/itm"));
    const after = await scores(out);
    for (const v of [...after.itc.flat(), ...after.itm.flat()]) expect(Number.isFinite(v)).toBe(true);
    expect(after.itc).not.toEqual(before.itc);
    expect(after.itm).not.toEqual(before.itm);
  });

  for (const [model, name, stage] of [["hf-4.45/itm", "itm", 1], ["hf-4.45/opt", "opt", 2], ["hf-4.45/t5", "t5", 2]] as const) {
    it(`stage ${stage} (${name}) with dropout: 4 steps, a stop and 4 more equal 8 straight, bit for bit`, async () => {
      const straight = path.join(tmp, `${name}-8`);
      const split = path.join(tmp, `${name}-4+4`);
      // With dropout on: its masks come from the trainer's generator, which the checkpoint keeps.
      const opts = (out: string) => ({ ...base(stage, model, out), batchSize: 2, prompt: "a photo of", saveEvery: 4, dropout: true });
      const lossesStraight: number[] = [];
      await train({ ...opts(straight), steps: 8, onStep: (s) => lossesStraight.push(s.losses.loss!) });
      const controller = new AbortController();
      const lossesSplit: number[] = [];
      const first = await train({ ...opts(split), steps: 8, signal: controller.signal, onStep: (s) => { lossesSplit.push(s.losses.loss!); if (s.step === 4) controller.abort(); } });
      expect(first.stopped).toBe(true);
      expect(first.steps).toBe(4);
      const second = await train({ ...opts(split), steps: 8, onStep: (s) => lossesSplit.push(s.losses.loss!) });
      expect(second.steps).toBe(8);
      expect(lossesSplit).toEqual(lossesStraight);
      expect(lossesStraight.at(-1)!).toBeLessThan(lossesStraight[0]!);
      const a = readSafetensorsHeader(path.join(straight, "model.safetensors")).tensors;
      const b = readSafetensorsHeader(path.join(split, "model.safetensors")).tensors;
      for (const [n, info] of a) expect(Buffer.compare(readTensorBytes(info), readTensorBytes(b.get(n)!)), n).toBe(0);
      if (stage === 2) {
        // blip2 loads the trained checkpoint and captions with it.
        const blip2 = await Blip2.load(split);
        expect(typeof (await blip2.caption(images[0]!, { maxNewTokens: 5 }))).toBe("string");
        await blip2.dispose();
      }
      const input = tensorsOf(path.join(fixtures, model));
      for (const [n, info] of input) {
        const s = b.get(n)!;
        // Stage 1 grew the word embeddings by [DEC]'s row (checked in the test above).
        if (stage === 1 && n === "embeddings.word_embeddings.weight") continue;
        expect([s.dtype, s.shape], n).toEqual([info.dtype, info.shape]);
        if (n.startsWith("language_model.") || n.startsWith("vision_model.encoder.")) expect(Buffer.compare(readTensorBytes(s), readTensorBytes(info)), n).toBe(0);
      }
    });
  }
});

describe("image features for training", () => {
  it("are computed once per image and read from the cache afterwards, and equal the encoder's output", async () => {
    const { ImageFeatures } = await import("../src/train/features.js");
    const { Blip2Processor } = await import("../src/processor.js");
    const ckpt = Checkpoint.open(path.join(fixtures, "hf-4.45/itm"));
    const processor = await Blip2Processor.fromDirectory(ckpt.dir, ckpt.config);
    const cache = path.join(tmp, "features-cache");
    const first = new ImageFeatures(ckpt, processor.imageProcessor, {}, cache);
    const a = await first.of(images.slice(0, 3), ["a", "b", "c"]);
    expect(first.computed).toBe(3);
    const again = await first.of([images[1]!, images[3]!], ["b", "d"]);
    expect(first.computed).toBe(4);
    await first.release();
    const later = new ImageFeatures(ckpt, processor.imageProcessor, {}, cache);
    const b = await later.of(images.slice(0, 3), ["a", "b", "c"]);
    expect(later.computed).toBe(0);
    expect(Array.from(b.data as Float32Array)).toEqual(Array.from(a.data as Float32Array));
    const per = (a.data as Float32Array).length / 3;
    expect(Array.from((again.data as Float32Array).subarray(0, per))).toEqual(Array.from((a.data as Float32Array).subarray(per, 2 * per)));
    await later.release();
  });
});
