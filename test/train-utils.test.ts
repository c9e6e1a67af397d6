/** Training utilities: AdamW, gradient tools, learning-rate schedule, the seeded generator, data sets and batches. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Blip2Error } from "../src/errors.js";
import { readSafetensorsHeader, readTensorF32 } from "../src/io/safetensors.js";
import { Batches, describeExample, loadExamples, type Example } from "../src/train/data.js";
import { AdamW, GradAccumulator, clipByGlobalNorm, decays, globalNorm, type Param } from "../src/train/optimizer.js";
import { Rng } from "../src/train/rng.js";
import { LAVIS_STAGE1, LAVIS_STAGE2, lrAt } from "../src/train/schedule.js";
import { fixture } from "./helpers.js";

describe("AdamW", () => {
  it("decays matrices only: not vectors, bias, norm (any case) or temp", () => {
    expect(decays("language_projection.weight", [64, 32])).toBe(true);
    expect(decays("query_tokens", [1, 32, 768])).toBe(true);
    expect(decays("language_projection.bias", [64])).toBe(false);
    expect(decays("qformer.layernorm.weight", [32])).toBe(false);
    expect(decays("some.bias_matrix", [4, 4])).toBe(false);
    expect(decays("encoder.LayerNorm.weight2d", [4, 4])).toBe(false);
    expect(decays("NORM_gain", [4, 4])).toBe(false);
    expect(decays("temp", [])).toBe(false);
    expect(decays("temp", [2, 2])).toBe(false);
    expect(decays("qformer.temp", [2, 2])).toBe(false);
  });

  it("matches a hand-computed two-step case", () => {
    const w: Param = { name: "w", shape: [1, 2], value: Float32Array.from([1, -2]) };
    const b: Param = { name: "b", shape: [2], value: Float32Array.from([1, -2]) };
    const opt = new AdamW([w, b], { weightDecay: 0.05 });
    // Step 1 (w): p = 1 * (1 - 0.1*0.05) = 0.995; m̂ = g, v̂ = g², so p -= 0.1 * 0.5 / (0.5 + 1e-8).
    opt.step(new Map([["w", Float32Array.from([0.5, -0.1])], ["b", Float32Array.from([0.5, -0.1])]]), 0.1);
    expect(w.value[0]).toBeCloseTo(0.895000002, 6);
    expect(w.value[1]).toBeCloseTo(-1.89000001, 6);
    // b is not decayed: the same update without the factor 0.995.
    expect(b.value[0]).toBeCloseTo(0.900000002, 6);
    expect(b.value[1]).toBeCloseTo(-1.90000001, 6);
    const bAfterStep1 = b.value.slice();
    // Step 2, worked out in float64 with PyTorch's formula (m = [0.025, 0.021], v = [2.8975e-4, 9.999e-5]).
    opt.step(new Map([["w", Float32Array.from([-0.2, 0.3])]]), 0.1);
    expect(w.value[0]).toBeCloseTo(0.8559644181065108, 6);
    expect(w.value[1]).toBeCloseTo(-1.9299689910700655, 6);
    // No gradient for b in step 2: untouched, and its step count stays 1.
    expect(Array.from(b.value)).toEqual(Array.from(bAfterStep1));
    expect(opt.state().tensors.b!.step).toBe(1);
    expect(opt.state().tensors.w!.step).toBe(2);
  });

  it("one step on the stage-2 fixture equals PyTorch's formula in float64, and moves each value by about lr·sign(g)", () => {
    const ref = JSON.parse(fs.readFileSync(fixture("train", "stage2-opt-caption.json"), "utf8"));
    const { lr, betas, eps, weight_decay: wd } = ref.adamw as { lr: number; betas: [number, number]; eps: number; weight_decay: number };
    const checkpoint = readSafetensorsHeader(fixture("hf-4.45", "opt", "model.safetensors")).tensors;
    const gradsFile = readSafetensorsHeader(fixture("train", "stage2-opt-caption.safetensors")).tensors;
    const names = ref.trainable as string[];
    expect(names.length).toBe(49);
    const params: Param[] = names.map((name) => ({ name, shape: checkpoint.get(name)!.shape, value: readTensorF32(checkpoint.get(name)!) }));
    const initial = new Map(params.map((p) => [p.name, p.value.slice()]));
    const grads = new Map(names.map((name) => [name, readTensorF32(gradsFile.get(`grad.${name}`)!)]));

    const opt = new AdamW(params, { betas, eps, weightDecay: wd });
    opt.step(grads, lr);

    let decayed = 0, checked = 0, zeros = 0;
    for (const p of params) {
      const p0 = initial.get(p.name)!;
      const g = grads.get(p.name)!;
      const wdHere = decays(p.name, p.shape) ? wd : 0;
      if (wdHere) decayed += 1;
      for (let i = 0; i < p0.length; i++) {
        // PyTorch's single-tensor AdamW, step 1, every operation in float64.
        const m = (1 - betas[0]) * g[i]!;
        const v = (1 - betas[1]) * g[i]! * g[i]!;
        const denom = Math.sqrt(v) / Math.sqrt(1 - betas[1]) + eps;
        const expected = p0[i]! * (1 - lr * wdHere) - (lr / (1 - betas[0])) * (m / denom);
        expect(Math.abs(p.value[i]! - expected), `${p.name}[${i}]`).toBeLessThanOrEqual(1e-6);
        // Adam's first step: m̂/√v̂ = g/|g|, so the move (besides decay) is lr·sign(g).
        const move = p.value[i]! - p0[i]! * (1 - lr * wdHere);
        if (Math.abs(g[i]!) > 1e-4) {
          expect(Math.abs(move + lr * Math.sign(g[i]!)), `${p.name}[${i}]`).toBeLessThanOrEqual(1e-6);
          checked += 1;
        } else if (g[i] === 0) {
          expect(Math.abs(move)).toBeLessThanOrEqual(1e-7);
          zeros += 1;
        }
      }
    }
    // Decayed: query_tokens, language_projection.weight and the Q-Former's dense matrices (10 in
    // layer 0, which has cross-attention, 6 in layer 1); biases and norms are not.
    expect(decayed).toBe(1 + 1 + 10 + 6);
    expect(checked).toBeGreaterThan(10000);
    expect(zeros).toBeLessThan(checked);
  });

  it("resumes bit for bit: 4 steps, state, load into a fresh optimizer, 4 steps == 8 steps", () => {
    const shapes: Record<string, number[]> = { "a.weight": [3, 5], "a.bias": [5], "b.weight": [4, 2, 2] };
    const init = (): Param[] => {
      const rng = new Rng(7);
      return Object.entries(shapes).map(([name, shape]) => ({
        name, shape, value: Float32Array.from({ length: shape.reduce((x, y) => x * y, 1) }, () => rng.normal()),
      }));
    };
    const gradRng = new Rng(99);
    const grads = Array.from({ length: 8 }, () => new Map(Object.entries(shapes).map(([name, shape]) => [
      name, Float32Array.from({ length: shape.reduce((x, y) => x * y, 1) }, () => gradRng.normal() * 0.01),
    ])));
    const lrs = [1e-3, 2e-3, 3e-3, 4e-3, 4e-3, 3e-3, 2e-3, 1e-3];

    const straight = init();
    const optA = new AdamW(straight);
    grads.forEach((g, t) => optA.step(g, lrs[t]!));

    const first = init();
    const optB = new AdamW(first);
    for (let t = 0; t < 4; t++) optB.step(grads[t]!, lrs[t]!);
    // What a checkpoint holds: the master copies and the optimizer state.
    const saved = optB.state();
    const resumed = first.map((p) => ({ ...p, value: p.value.slice() }));
    optB.step(grads[4]!, 1); // a later step must not change the state already taken
    const optC = new AdamW(resumed);
    optC.load(saved);
    for (let t = 4; t < 8; t++) optC.step(grads[t]!, lrs[t]!);

    for (let i = 0; i < straight.length; i++) {
      expect(Buffer.from(resumed[i]!.value.buffer).equals(Buffer.from(straight[i]!.value.buffer)), straight[i]!.name).toBe(true);
    }
    const a = optA.state().tensors, c = optC.state().tensors;
    for (const name of Object.keys(shapes)) {
      expect(c[name]!.step).toBe(8);
      expect(Array.from(c[name]!.expAvg)).toEqual(Array.from(a[name]!.expAvg));
      expect(Array.from(c[name]!.expAvgSq)).toEqual(Array.from(a[name]!.expAvgSq));
    }
  });

  it("refuses gradients and states that do not fit its tensors", () => {
    const p: Param = { name: "w", shape: [2, 2], value: new Float32Array(4) };
    const opt = new AdamW([p]);
    expect(() => opt.step(new Map([["v", new Float32Array(4)]]), 1e-3)).toThrow(/gradient for v, which is not a trained tensor/);
    expect(() => opt.step(new Map([["w", new Float32Array(3)]]), 1e-3)).toThrow(/gradient for w has 3 values, the tensor 4/);
    expect(() => opt.load({ tensors: { w: { step: 1, expAvg: new Float32Array(4), expAvgSq: new Float32Array(2) } } })).toThrow(/exp_avg_sq of w has 2 values/);
    expect(() => opt.load({ tensors: { x: { step: 1, expAvg: new Float32Array(4), expAvgSq: new Float32Array(4) } } })).toThrow(/tensor x is not trained/);
    expect(() => new AdamW([{ name: "w", shape: [2, 3], value: new Float32Array(4) }])).toThrow(Blip2Error);
  });
});

describe("gradient tools", () => {
  it("global norm and clip_grad_norm_", () => {
    const grads = () => new Map([["a", Float32Array.from([3, 0])], ["b", Float32Array.from([0, -4])]]);
    expect(globalNorm(grads())).toBe(5);
    const big = grads();
    expect(clipByGlobalNorm(big, 10)).toBe(5);
    expect(Array.from(big.get("b")!)).toEqual([0, -4]);
    const clipped = grads();
    expect(clipByGlobalNorm(clipped, 1)).toBe(5);
    const coef = 1 / (5 + 1e-6);
    expect(clipped.get("a")![0]).toBeCloseTo(3 * coef, 7);
    expect(clipped.get("b")![1]).toBeCloseTo(-4 * coef, 7);
    expect(globalNorm(clipped)).toBeCloseTo(1, 6);
    // A norm that overflows float32 but not float64.
    expect(globalNorm(new Map([["x", Float32Array.from([3e20, 4e20])]]))).toBeCloseTo(5e20, -14);
    const bad = new Map([["x", Float32Array.from([NaN, 1])]]);
    expect(Number.isNaN(clipByGlobalNorm(bad, 1))).toBe(true);
    expect(bad.get("x")![1]).toBe(1);
  });

  it("accumulates micro-batches into their mean", () => {
    const acc = new GradAccumulator();
    expect(() => acc.mean()).toThrow(/no micro-batch/);
    acc.add(new Map([["w", Float32Array.from([1, 2])], ["b", Float32Array.from([4])]]));
    acc.add(new Map([["w", Float32Array.from([3, -2])]]));
    expect(acc.count).toBe(2);
    const mean = acc.mean();
    expect(Array.from(mean.get("w")!)).toEqual([2, 0]);
    expect(Array.from(mean.get("b")!)).toEqual([2]); // absent from the second micro-batch: zero there
    expect(() => acc.add(new Map([["w", new Float32Array(3)]]))).toThrow(/w has 3 values in this micro-batch, 2 before/);
    acc.reset();
    acc.add(new Map([["w", Float32Array.from([5, 5])]]));
    expect(Array.from(acc.mean().get("w")!)).toEqual([5, 5]);
  });
});

describe("learning-rate schedule", () => {
  const s = { lr: 1e-4, minLr: 1e-5, warmupLr: 1e-6, warmupSteps: 10, totalSteps: 110 };

  it("warms up linearly, then follows a cosine to minLr at totalSteps", () => {
    expect(lrAt(0, s)).toBe(1e-6);
    expect(lrAt(5, s)).toBeCloseTo(1e-6 + 99e-6 / 2, 18);
    expect(lrAt(9, s)).toBeCloseTo(1e-6 + (99e-6 * 9) / 10, 18);
    expect(lrAt(10, s)).toBe(1e-4);
    expect(lrAt(35, s)).toBeCloseTo(1e-5 + 9e-5 * (1 + Math.SQRT1_2) / 2, 18);
    expect(lrAt(60, s)).toBeCloseTo(5.5e-5, 18);
    expect(lrAt(109, s)).toBeGreaterThan(1e-5);
    expect(lrAt(109, s)).toBeCloseTo(1e-5 + 9e-5 * (1 + Math.cos(Math.PI * 0.99)) / 2, 18);
    expect(lrAt(110, s)).toBe(1e-5);
    expect(lrAt(5000, s)).toBe(1e-5);
    for (let t = 11; t <= 110; t++) expect(lrAt(t, s)).toBeLessThan(lrAt(t - 1, s));
  });

  it("handles no warmup, all warmup, and the constant schedule", () => {
    expect(lrAt(0, { ...s, warmupSteps: 0 })).toBe(1e-4);
    expect(lrAt(100, { ...s, warmupSteps: 0, totalSteps: 200 })).toBeCloseTo(5.5e-5, 18);
    expect(lrAt(9, { ...s, totalSteps: 10 })).toBeCloseTo(1e-6 + (99e-6 * 9) / 10, 18);
    expect(lrAt(10, { ...s, totalSteps: 10 })).toBe(1e-5);
    expect(lrAt(0, { kind: "constant", lr: 1e-3 })).toBe(1e-3);
    expect(lrAt(123456, { kind: "constant", lr: 1e-3 })).toBe(1e-3);
    const warm = { kind: "constant" as const, lr: 1e-3, warmupLr: 0, warmupSteps: 4 };
    expect([0, 1, 2, 3, 4, 100].map((t) => lrAt(t, warm))).toEqual([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]);
  });

  it("exports LAVIS's BLIP-2 settings and rejects unusable ones", () => {
    expect(LAVIS_STAGE1).toEqual({ lr: 1e-4, minLr: 1e-5, warmupLr: 1e-6, warmupSteps: 5000 });
    expect(LAVIS_STAGE2).toEqual({ lr: 1e-4, minLr: 1e-5, warmupLr: 1e-6, warmupSteps: 2000 });
    expect(lrAt(5000, { ...LAVIS_STAGE1, totalSteps: 100000 })).toBe(1e-4);
    expect(() => lrAt(-1, s)).toThrow(/step must be an integer >= 0, got -1/);
    expect(() => lrAt(1.5, s)).toThrow(Blip2Error);
    expect(() => lrAt(0, { ...s, warmupSteps: 200 })).toThrow(/warmupSteps \(200\) exceeds totalSteps \(110\)/);
    expect(() => lrAt(0, { ...s, lr: -1 })).toThrow(/lr must be a finite number >= 0, got -1/);
    expect(() => lrAt(0, { ...s, minLr: NaN })).toThrow(/minLr/);
  });
});

describe("Rng (xoshiro128**)", () => {
  it("gives xoshiro128**'s reference outputs", () => {
    const rng = Rng.fromState({ s: [1, 2, 3, 4], spare: null });
    expect(Array.from({ length: 6 }, () => rng.nextUint32())).toEqual([11520, 0, 5927040, 70819200, 2031721883, 1637235492]);
  });

  it("same seed, same stream; other seeds, other streams", () => {
    const draw = (seed: number) => { const r = new Rng(seed); return Array.from({ length: 20 }, () => r.nextUint32()); };
    expect(draw(42)).toEqual(draw(42));
    expect(draw(42)).not.toEqual(draw(43));
    expect(draw(0)).not.toEqual(draw(2 ** 32)); // the high bits of the seed count
    expect(() => new Rng(-1)).toThrow(Blip2Error);
    expect(() => new Rng(0.5)).toThrow(/non-negative integer/);
  });

  it("restore mid-stream continues identically, normals' spare included", () => {
    const a = new Rng(3);
    for (let i = 0; i < 5; i++) a.uniform();
    a.normal(); // leaves the pair's second value pending
    const saved = JSON.parse(JSON.stringify(a.state()));
    expect(saved.spare).not.toBeNull();
    const rest = () => [a.normal(), a.normal(), a.uniform(), a.int(1000), a.multinomial([1, 2, 3])];
    const expected = rest();
    const b = Rng.fromState(saved);
    expect([b.normal(), b.normal(), b.uniform(), b.int(1000), b.multinomial([1, 2, 3])]).toEqual(expected);
    expect(() => b.restore({ s: [0, 0, 0, 0], spare: null })).toThrow(/not all zero/);
    expect(() => b.restore({ s: [1, 2, 3] as never, spare: null })).toThrow(Blip2Error);
  });

  it("uniform, int, normal and shuffle have the right ranges and moments", () => {
    const rng = new Rng(11);
    const n = 100_000;
    let sum = 0, min = 1, max = 0;
    for (let i = 0; i < n; i++) { const u = rng.uniform(); sum += u; min = Math.min(min, u); max = Math.max(max, u); }
    expect(min).toBeGreaterThanOrEqual(0);
    expect(max).toBeLessThan(1);
    expect(sum / n).toBeCloseTo(0.5, 2);
    const counts = new Array(7).fill(0);
    for (let i = 0; i < 70_000; i++) counts[rng.int(7)]++;
    for (const c of counts) expect(Math.abs(c - 10_000)).toBeLessThan(400);
    let s1 = 0, s2 = 0;
    for (let i = 0; i < n; i++) { const z = rng.normal(); s1 += z; s2 += z * z; }
    expect(Math.abs(s1 / n)).toBeLessThan(0.02);
    expect(Math.abs(s2 / n - 1)).toBeLessThan(0.02);
    const shuffled = rng.shuffle(Array.from({ length: 50 }, (_, i) => i));
    expect([...shuffled].sort((x, y) => x - y)).toEqual(Array.from({ length: 50 }, (_, i) => i));
    expect(shuffled).not.toEqual(Array.from({ length: 50 }, (_, i) => i));
    expect(new Rng(5).shuffle([1, 2, 3, 4, 5, 6])).toEqual(new Rng(5).shuffle([1, 2, 3, 4, 5, 6]));
    expect(() => rng.int(0)).toThrow(Blip2Error);
  });

  it("multinomial draws in proportion, never a zero weight, and refuses all-zero weights", () => {
    const rng = new Rng(2024);
    const weights = Float32Array.from([1, 0, 3, 0, 6, 0]);
    const counts = new Array(weights.length).fill(0);
    const n = 100_000;
    for (let i = 0; i < n; i++) counts[rng.multinomial(weights)]++;
    expect(counts[1]).toBe(0);
    expect(counts[3]).toBe(0);
    expect(counts[5]).toBe(0); // a trailing zero weight: not drawn even when u rounds to the total
    expect(Math.abs(counts[0] / n - 0.1)).toBeLessThan(0.005);
    expect(Math.abs(counts[2] / n - 0.3)).toBeLessThan(0.005);
    expect(Math.abs(counts[4] / n - 0.6)).toBeLessThan(0.005);
    expect(rng.multinomial([0, 0, 5e-30, 0])).toBe(2);
    expect(() => rng.multinomial([0, 0, 0])).toThrow(/all 3 weights are zero/);
    expect(() => rng.multinomial([])).toThrow(Blip2Error);
    expect(() => rng.multinomial([1, -1])).toThrow(/weight 1 is -1/);
    expect(() => rng.multinomial([1, NaN])).toThrow(/weight 1 is NaN/);
  });
});

describe("training data", () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-train-data-"));
  afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
  let count = 0;
  /** A fresh folder with the given files; "*.png" names get a real PNG. */
  const folder = (files: Record<string, string>): string => {
    const dir = path.join(root, `case${count++}`);
    fs.mkdirSync(dir);
    for (const [name, content] of Object.entries(files)) {
      fs.mkdirSync(path.dirname(path.join(dir, name)), { recursive: true });
      if (content === "<png>") fs.copyFileSync(fixture("image0.png"), path.join(dir, name));
      else fs.writeFileSync(path.join(dir, name), content);
    }
    return dir;
  };
  const jsonl = (...records: unknown[]) => records.map((r) => (typeof r === "string" ? r : JSON.stringify(r))).join("\n");

  it("reads JSONL: relative and absolute images, prefixes, blank lines skipped, text trimmed", () => {
    const elsewhere = folder({ "far.png": "<png>" });
    const dir = folder({
      "imgs/a.png": "<png>",
      "data.jsonl": jsonl(
        { image: "imgs/a.png", text: "a red circle", extra: 1 },
        "",
        "   ",
        { image: path.join(elsewhere, "far.png"), text: "  far away \r", prefix: "a photo of" },
        { image: "imgs/a.png", text: "again", prefix: "" },
      ) + "\n",
    });
    const file = path.join(dir, "data.jsonl");
    const examples = loadExamples(file);
    expect(examples).toEqual([
      { image: path.join(dir, "imgs", "a.png"), text: "a red circle", where: `${file}:1` },
      { image: path.join(elsewhere, "far.png"), text: "far away", prefix: "a photo of", where: `${file}:4` },
      { image: path.join(dir, "imgs", "a.png"), text: "again", prefix: "", where: `${file}:5` },
    ]);
    expect(describeExample(examples[1]!)).toBe(`${file}:4 (image ${path.join(elsewhere, "far.png")})`);
  });

  it("names the JSONL line at fault", () => {
    const dir = folder({ "a.png": "<png>" });
    const write = (content: string) => { const f = path.join(dir, "d.jsonl"); fs.writeFileSync(f, content); return f; };
    const ok = { image: "a.png", text: "fine" };
    let f = write(jsonl(ok, "{not json"));
    expect(() => loadExamples(f)).toThrow(new RegExp(`^${escape(f)}:2: not valid JSON`));
    f = write(jsonl(ok, ok, "[1, 2]"));
    expect(() => loadExamples(f)).toThrow(`${f}:3: expected a JSON object {"image": ..., "text": ...}, got an array`);
    f = write(jsonl({ text: "no image" }));
    expect(() => loadExamples(f)).toThrow(`${f}:1: missing "image"`);
    f = write(jsonl(ok, { image: "a.png" }));
    expect(() => loadExamples(f)).toThrow(`${f}:2: missing "text"`);
    f = write(jsonl({ image: 3, text: "x" }));
    expect(() => loadExamples(f)).toThrow(`${f}:1: "image" must be a string, got number 3`);
    f = write(jsonl({ image: "a.png", text: ["x"] }));
    expect(() => loadExamples(f)).toThrow(`${f}:1: "text" must be a string, got an array`);
    f = write(jsonl(ok, { image: "a.png", text: " \t " }));
    expect(() => loadExamples(f)).toThrow(`${f}:2: "text" is empty`);
    f = write(jsonl({ image: "a.png", text: "x", prefix: 1 }));
    expect(() => loadExamples(f)).toThrow(`${f}:1: "prefix" must be a string, got number 1`);
    f = write(jsonl(ok, { image: "gone.png", text: "x" }, { image: "gone2.png", text: "y" }, { image: "gone.png", text: "z" }));
    expect(() => loadExamples(f)).toThrow(`${f}:2: image ${path.join(dir, "gone.png")} does not exist or is not a file (and 1 other image of the data set)`);
    f = write(jsonl({ image: ".", text: "a folder" }));
    expect(() => loadExamples(f)).toThrow(/:1: image .* does not exist or is not a file$/);
    f = write("\n\n  \n");
    expect(() => loadExamples(f)).toThrow(`${f}: the data set has no examples`);
  });

  it("reads COCO captions JSON: one example per annotation, images beside the JSON", () => {
    const dir = folder({
      "1.png": "<png>",
      "2.png": "<png>",
      "captions.json": JSON.stringify({
        info: {},
        images: [{ id: 1, file_name: "1.png", width: 9 }, { id: 2, file_name: "2.png" }, { id: 3, file_name: "unused.png" }],
        annotations: [
          { id: 10, image_id: 2, caption: "two cats\n" },
          { id: 11, image_id: 1, caption: "a circle" },
          { id: 12, image_id: 2, caption: "cats on a blanket" },
        ],
      }),
    });
    const file = path.join(dir, "captions.json");
    expect(loadExamples(file)).toEqual([
      { image: path.join(dir, "2.png"), text: "two cats", where: `${file}:annotations[0]` },
      { image: path.join(dir, "1.png"), text: "a circle", where: `${file}:annotations[1]` },
      { image: path.join(dir, "2.png"), text: "cats on a blanket", where: `${file}:annotations[2]` },
    ]);
  });

  it("names the COCO entry at fault", () => {
    const dir = folder({ "1.png": "<png>", "sub/2.png": "<png>" });
    const f = path.join(dir, "c.json");
    const write = (doc: unknown) => { fs.writeFileSync(f, typeof doc === "string" ? doc : JSON.stringify(doc)); return f; };
    const images = [{ id: 1, file_name: "1.png" }];
    expect(() => loadExamples(write("{"))).toThrow(new RegExp(`^${escape(f)}: not valid JSON`));
    expect(() => loadExamples(write([{ image: "1.png", caption: "x" }]))).toThrow(`${f}: not a COCO captions file (expected an object with "images" and "annotations" arrays)`);
    expect(() => loadExamples(write({ images }))).toThrow(/not a COCO captions file/);
    expect(() => loadExamples(write({ images: [{ id: 1 }], annotations: [] }))).toThrow(`${f}:images[0]: missing "file_name"`);
    expect(() => loadExamples(write({ images: [{ file_name: "1.png" }], annotations: [] }))).toThrow(`${f}:images[0]: "id" must be a number or a string, got undefined`);
    expect(() => loadExamples(write({ images: [...images, ...images], annotations: [] }))).toThrow(`${f}:images[1]: image id 1 appears twice`);
    expect(() => loadExamples(write({ images, annotations: [{ image_id: 1, caption: "x" }, { image_id: 7, caption: "y" }] })))
      .toThrow(`${f}:annotations[1]: image_id 7 is not the id of any entry of "images"`);
    expect(() => loadExamples(write({ images, annotations: [{ image_id: 1 }] }))).toThrow(`${f}:annotations[0]: missing "caption"`);
    expect(() => loadExamples(write({ images, annotations: [{ image_id: 1, caption: "" }] }))).toThrow(`${f}:annotations[0]: "caption" is empty`);
    // Only the JSON's own folder: an image in a subfolder is not looked for there.
    expect(() => loadExamples(write({ images: [{ id: 1, file_name: "2.png" }], annotations: [{ image_id: 1, caption: "x" }] })))
      .toThrow(`${f}:annotations[0]: image ${path.join(dir, "2.png")} does not exist or is not a file`);
    expect(() => loadExamples(write({ images, annotations: [] }))).toThrow(`${f}: the data set has no examples`);
  });

  it("reads a folder of images with same-name .txt captions, one example per non-empty line", () => {
    const dir = folder({
      "b.jpg": "<png>",
      "a.PNG": "<png>",
      "a.txt": "first caption\r\n\r\n  second caption  \n",
      "b.txt": "a bee",
      "notes.txt": "not a caption of anything",
      ".hidden.png": "<png>",
      "sub/c.png": "<png>",
    });
    expect(loadExamples(dir)).toEqual([
      { image: path.join(dir, "a.PNG"), text: "first caption", where: `${path.join(dir, "a.txt")}:1` },
      { image: path.join(dir, "a.PNG"), text: "second caption", where: `${path.join(dir, "a.txt")}:3` },
      { image: path.join(dir, "b.jpg"), text: "a bee", where: `${path.join(dir, "b.txt")}:1` },
    ]);
  });

  it("refuses a folder with uncaptioned images, an empty caption file or no images", () => {
    const missing = folder({ "a.png": "<png>", "a.txt": "ok", "b.png": "<png>", "c.webp": "<png>" });
    expect(() => loadExamples(missing)).toThrow(`${missing}: 2 of 3 images have no caption file beside them (image.png needs image.txt): b.png, c.webp`);
    const empty = folder({ "a.png": "<png>", "a.txt": " \n\n" });
    expect(() => loadExamples(empty)).toThrow(`${path.join(empty, "a.txt")}: no caption (the file is empty) for a.png`);
    const none = folder({ "readme.txt": "hello" });
    expect(() => loadExamples(none)).toThrow(`${none}: the data set has no examples`);
  });

  it("refuses paths that do not exist or are none of the three forms", () => {
    const dir = folder({ "data.csv": "image,text\n" });
    expect(() => loadExamples(path.join(dir, "nope.jsonl"))).toThrow(`${path.join(dir, "nope.jsonl")}: training data not found`);
    expect(() => loadExamples(path.join(dir, "data.csv"))).toThrow(`${path.join(dir, "data.csv")}: not a training data set (expected a .jsonl file, a COCO captions .json file or a folder of images with .txt captions)`);
    try {
      loadExamples(path.join(dir, "data.csv"));
    } catch (err) {
      expect(err).toBeInstanceOf(Blip2Error);
    }
  });
});

describe("Batches", () => {
  const examples: Example[] = Array.from({ length: 10 }, (_, i) => ({ image: `/img${i}.png`, text: `caption ${i}`, where: `d.jsonl:${i + 1}` }));
  const ids = (b: { examples: Example[] }) => b.examples.map((e) => e.where);

  it("shuffles each epoch anew and drops the incomplete last batch by default", () => {
    const batches = [...new Batches(examples, { batchSize: 4, epochs: 3, seed: 1 })];
    expect(batches.map((b) => [b.epoch, b.index, b.step])).toEqual([[0, 0, 0], [0, 1, 1], [1, 0, 2], [1, 1, 3], [2, 0, 4], [2, 1, 5]]);
    for (const b of batches) expect(b.examples).toHaveLength(4);
    for (let e = 0; e < 3; e++) {
      const seen = batches.filter((b) => b.epoch === e).flatMap(ids);
      expect(new Set(seen).size).toBe(8); // no repeats within an epoch
    }
    expect(ids(batches[0]!)).not.toEqual(ids(batches[2]!));
    expect([...new Batches(examples, { batchSize: 4, epochs: 3, seed: 1 })].map(ids)).toEqual(batches.map(ids));
    expect([...new Batches(examples, { batchSize: 4, epochs: 3, seed: 2 })].map(ids)).not.toEqual(batches.map(ids));
  });

  it("keeps the last smaller batch with dropLast: false", () => {
    const b = new Batches(examples, { batchSize: 4, epochs: 2, seed: 1, dropLast: false });
    expect(b.batchesPerEpoch).toBe(3);
    expect(b.totalBatches).toBe(6);
    const all = [...b];
    expect(all.map((x) => x.examples.length)).toEqual([4, 4, 2, 4, 4, 2]);
    expect(new Set(all.filter((x) => x.epoch === 0).flatMap(ids)).size).toBe(10);
    expect(b.next()).toBeUndefined();
  });

  it("resumes from position() with exactly the batches of the uninterrupted run", () => {
    const options = { batchSize: 3, epochs: 4, seed: 77 };
    const straight = [...new Batches(examples, options)].map(ids);
    expect(straight).toHaveLength(12);
    for (const stopAfter of [0, 1, 2, 3, 5, 7, 11, 12]) {
      const first = new Batches(examples, options);
      const seen: string[][] = [];
      for (let i = 0; i < stopAfter; i++) seen.push(ids(first.next()!));
      const saved = JSON.parse(JSON.stringify(first.position()));
      const resumed = new Batches(examples, options);
      resumed.seek(saved);
      expect(resumed.position()).toEqual(saved);
      for (let b = resumed.next(); b; b = resumed.next()) seen.push(ids(b));
      expect(seen, `stopped after ${stopAfter}`).toEqual(straight);
    }
  });

  it("refuses to resume a different run and too small a data set", () => {
    const saved = new Batches(examples, { batchSize: 3, epochs: 2, seed: 1 }).position();
    expect(() => new Batches(examples.slice(1), { batchSize: 3, epochs: 2, seed: 1 }).seek(saved))
      .toThrow("cannot resume: the saved position is for 10 examples in batches of 3 (dropLast true), this run has 9 in batches of 3 (dropLast true)");
    expect(() => new Batches(examples, { batchSize: 3, epochs: 2, seed: 1 }).seek({ ...saved, epoch: 0, index: 3 })).toThrow(/outside this run \(2 epochs of 3 batches\)/);
    expect(() => new Batches(examples, { batchSize: 3, epochs: 2, seed: 1 }).seek({ ...saved, epoch: 5 })).toThrow(/outside this run/);
    expect(() => new Batches(examples, { batchSize: 11, epochs: 1, seed: 1 })).toThrow("the data set has 10 examples, fewer than the batch size 11 (an incomplete batch is dropped)");
    expect(new Batches(examples, { batchSize: 11, epochs: 1, seed: 1, dropLast: false }).batchesPerEpoch).toBe(1);
    expect(() => new Batches(examples, { batchSize: 0, epochs: 1, seed: 1 })).toThrow(/batch size must be an integer >= 1, got 0/);
  });
});

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
