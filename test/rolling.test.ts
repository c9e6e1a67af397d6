/**
 * Continuous batching (generation/rolling.ts) on the tiny OPT fixture: rows that join an empty or a
 * running batch, and rows around them that leave, get exactly the tokens of their prompt alone;
 * and the key/value cache's rows composed from other caches (runtime/kvCache.ts).
 */
import * as ort from "onnxruntime-node";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { Blip2 } from "../src/api/tasks.js";
import type { GenerationOptions } from "../src/generation/options.js";
import type { RollingBatch, RollingRequest, RollingResult, RowInputs } from "../src/generation/rolling.js";
import { KvCache } from "../src/runtime/kvCache.js";
import { CacheHandle } from "../src/runtime/session.js";
import { fixture } from "./helpers.js";

describe("key/value cache rows composed from other caches", () => {
  /** A cache whose slot s of head h of row r holds 1000n + 100r + 10h + s in tensor n (where filled), with the given slot masks. */
  function filled(rows: number, capacity: number, masks: number[][], base = 0): KvCache {
    const cache = new KvCache({ layers: 1, rows, heads: 2, capacity, headDim: 1 });
    const width = masks[0]!.length;
    const fresh = (n: number) => new ort.Tensor("float32", Float32Array.from({ length: rows * 2 * width }, (_, i) => base + 1000 * n + 100 * Math.floor(i / (2 * width)) + 10 * (Math.floor(i / width) % 2) + (i % width)), [rows, 2, width, 1]);
    cache.write({ "new.0.key": fresh(0), "new.0.value": fresh(1) }, masks);
    cache.advance(width);
    return cache;
  }
  const slots = (cache: KvCache, name: string, row: number, head: number) => Array.from((cache.tensors[name]!.data as Float32Array).subarray((row * 2 + head) * cache.capacity, (row * 2 + head + 1) * cache.capacity));
  const mask = (cache: KvCache) => Array.from(cache.inputs(new Array(cache.shape.rows).fill([1])).attention_mask!.data as BigInt64Array, Number);

  it("moves each row's filled slots by its shift, masks the rest, and leaves its sources alone", () => {
    // A batch of two rows (the first left-padded by one slot) and a newcomer of 5 slots.
    const batch = filled(2, 6, [[0, 1, 1], [1, 1, 1]]);
    const newcomer = filled(1, 5, [[1, 1, 1, 1, 1]], 5000);
    const before = slots(batch, "past.0.key", 1, 1);
    // The newcomer is longer: the batch's rows move 2 slots later; the first row then drops nothing.
    const out = KvCache.composed([{ cache: batch, row: 1, shift: 2 }, { cache: newcomer, row: 0, shift: 0 }, { cache: batch, row: 0, shift: 2 }], 8, 5);
    expect(out.shape.rows).toBe(3);
    expect(out.length).toBe(5);
    expect(slots(out, "past.0.key", 0, 1)).toEqual([0, 0, 110, 111, 112, 0, 0, 0]);
    expect(slots(out, "past.0.value", 0, 0)).toEqual([0, 0, 1100, 1101, 1102, 0, 0, 0]);
    expect(slots(out, "past.0.key", 1, 0)).toEqual([5000, 5001, 5002, 5003, 5004, 0, 0, 0]);
    // Its masked slot comes too (masked), as it lies before its keys.
    expect(slots(out, "past.0.key", 2, 1)).toEqual([0, 0, 10, 11, 12, 0, 0, 0]);
    // Every slot, then the step's own position.
    expect(mask(out)).toEqual([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1]);
    expect(slots(batch, "past.0.key", 1, 1)).toEqual(before);
  });

  it("drops the padding no row needs (a negative shift), never a slot a row attends to", () => {
    const batch = filled(2, 4, [[0, 0, 1], [0, 1, 1]]);
    const out = KvCache.composed([{ cache: batch, row: 0, shift: -1 }, { cache: batch, row: 1, shift: -1 }], 3, 2);
    expect(slots(out, "past.0.key", 0, 0)).toEqual([1, 2, 0]);
    expect(slots(out, "past.0.key", 1, 1)).toEqual([111, 112, 0]);
    expect(mask(out)).toEqual([0, 1, 0, 1, 1, 1, 0, 1]);
    expect(() => KvCache.composed([{ cache: batch, row: 1, shift: -2 }], 3, 1)).toThrow(/would drop keys it attends to/);
    expect(() => KvCache.composed([{ cache: batch, row: 1, shift: 1 }], 3, 3)).toThrow(/would drop keys it attends to/);
    expect(() => KvCache.composed([{ cache: batch, row: 0, shift: 0 }], 2, 3)).toThrow(/3 filled slots in a cache of 2/);
  });
});

const OPT = fixture("tiny-blip2-opt");
const IMAGES = ["image0.png", "image1.png", "image2.png", "photo640x427.jpg"].map((f) => fixture(f));

let blip2: Blip2;

beforeAll(async () => {
  blip2 = await Blip2.load(OPT);
});

afterAll(async () => {
  await blip2?.dispose();
});

interface Case {
  image: number;
  prompt: string;
  options: GenerationOptions;
}

/** What the CLI gives for one request alone: `captionAll` of its image and prompt. */
async function alone(c: Case): Promise<number[]> {
  return (await blip2.captionAll([IMAGES[c.image]!], { prompt: c.prompt, ...c.options }))[0]!.ids;
}

async function inputsOf(c: Case): Promise<RowInputs> {
  const { pixelValues } = await blip2.processor.imageProcessor.preprocess([IMAGES[c.image]!]);
  return { inputIds: blip2.processor.tokenize([c.prompt]).inputIds[0]!, image: await blip2.model.imageFeatures(pixelValues, 1) };
}

/** A request whose inputs are there already, so that it joins at the next step. */
async function request(c: Case, extra: Partial<RollingRequest> = {}): Promise<RollingRequest> {
  return { inputs: await inputsOf(c), generation: blip2.model.generationConfig(c.options), ...extra };
}

/** A promise's state, without waiting for it. */
function tracked<T>(p: Promise<T>): { promise: Promise<T>; settled: () => boolean } {
  let done = false;
  p.then(() => (done = true), () => (done = true));
  return { promise: p, settled: () => done };
}

async function stepUntil(batch: RollingBatch, stop: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !stop(); i++) {
    await batch.step();
    await new Promise((r) => setImmediate(r));
  }
}

describe("a batch whose rows come and go", () => {
  it("gives each row the tokens of its prompt alone: joining empty, joining mid-way, longer and shorter, others leaving", async () => {
    const a: Case = { image: 0, prompt: "", options: { maxNewTokens: 20 } };
    // Longer than A's filled slots when it joins (A's rows move right), with its own repetition rule.
    const b: Case = { image: 1, prompt: "a photo of a red circle next to a blue square on a table", options: { maxNewTokens: 5, repetitionPenalty: 1.5 } };
    const c: Case = { image: 2, prompt: "Question: what is it? Answer:", options: { maxNewTokens: 9, noRepeatNgramSize: 2, minNewTokens: 4 } };
    // One token: it ends with its prompt's pass and never enters the batch's cache.
    const d: Case = { image: 3, prompt: "two", options: { maxNewTokens: 1 } };
    const expected = await Promise.all([a, b, c, d].map(alone));

    const compose = vi.spyOn(CacheHandle, "compose");
    try {
      const batch = blip2.model.rollingBatch();
      const ra = tracked(batch.join(await request(a)));
      expect(batch.size).toBe(1);
      for (let i = 0; i < 3; i++) await batch.step();
      const rb = tracked(batch.join(await request(b)));
      await stepUntil(batch, rb.settled);
      await batch.step();
      expect(ra.settled()).toBe(false);
      const rc = tracked(batch.join(await request(c)));
      const rd = tracked(batch.join(await request(d)));
      expect(batch.size).toBe(3);
      await stepUntil(batch, () => batch.size === 0);
      const results = (await Promise.all([ra.promise, rb.promise, rc.promise, rd.promise])) as RollingResult[];
      results.forEach((r, i) => expect(r.sequence, `request ${"abcd"[i]}`).toEqual(expected[i]));
      expect(results.map((r) => r.reason)).toEqual(["length", "length", "length", "length"]);
      expect(results.map((r) => r.peakRows)).toEqual([2, 2, 2, 1]);
      // Each cache made: rows, capacity (filled slots and the most steps a row may still take),
      // filled slots (the longest row's).
      const composed = compose.mock.calls.map(([rows, capacity, length]) => [rows.length, capacity, length]);
      const [promptA, promptB, promptC] = [expected[0]!.length - 20, expected[1]!.length - 5, expected[2]!.length - 9];
      expect(promptB).toBeGreaterThan(promptA + 4);
      const withC = Math.max(promptA + 8, promptC);
      expect(composed).toEqual([
        [1, promptA + 19, promptA], // A alone, its first token from its prompt's pass
        [2, promptB + 16, promptB], // B joins after A's third step, longer: A's slots move right
        [1, promptA + 19, promptA + 7], // B has left: its row goes, and the padding A needed beside it
        [2, withC + 11, withC], // C joins (D ended with its prompt's pass)
        [1, promptA + 19, promptA + 16], // C has left
      ]);
    } finally {
      compose.mockRestore();
    }
  });

  it("a row that is done, or whose signal aborts, leaves; the others keep their tokens", async () => {
    const cases: Case[] = [
      { image: 0, prompt: "a", options: { maxNewTokens: 12 } },
      { image: 1, prompt: "", options: { maxNewTokens: 12 } },
      { image: 2, prompt: "the", options: { maxNewTokens: 12 } },
    ];
    const expected = await Promise.all(cases.map(alone));
    const batch = blip2.model.rollingBatch();
    const leaving = new AbortController();
    let seen = 0;
    const tokens: number[] = [];
    const done = batch.join(await request(cases[0]!, { done: () => ++seen === 3, onToken: (t) => tokens.push(t) }));
    const aborted = batch.join(await request(cases[1]!, { signal: leaving.signal })).catch((e: unknown) => e);
    const kept = batch.join(await request(cases[2]!));
    await batch.step();
    await batch.step();
    // The done row left at its third token, with the second step.
    expect(batch.size).toBe(2);
    leaving.abort("client left");
    expect(batch.size).toBe(1);
    await stepUntil(batch, () => batch.size === 0);
    const r = await done;
    expect(r.reason).toBe("done");
    expect(r.sequence).toEqual(expected[0]!.slice(0, expected[0]!.length - 9));
    expect(tokens).toEqual(r.sequence.slice(-3));
    expect(await aborted).toBe("client left");
    expect((await kept).sequence).toEqual(expected[2]);
  });

  it("waits for a joining row's image when nothing decodes; a row whose inputs fail leaves alone", async () => {
    const c: Case = { image: 1, prompt: "", options: { maxNewTokens: 4 } };
    const expected = await alone(c);
    const batch = blip2.model.rollingBatch();
    let give!: (inputs: RowInputs) => void;
    const later = batch.join({ ...(await request(c)), inputs: new Promise<RowInputs>((resolve) => (give = resolve)) });
    const stepping = tracked(batch.step());
    await new Promise((r) => setTimeout(r, 50));
    expect(stepping.settled()).toBe(false);
    give(await inputsOf(c));
    await stepping.promise;
    const failing = batch.join({ ...(await request(c)), inputs: Promise.reject(new Error("no image")) }).catch((e: Error) => e.message);
    await batch.step();
    expect(await failing).toBe("no image");
    await stepUntil(batch, () => batch.size === 0);
    expect((await later).sequence).toEqual(expected);
  });

  it("refuses sampling, and a prompt too long for the model when it joins", async () => {
    const batch = blip2.model.rollingBatch();
    await expect(batch.join(await request({ image: 0, prompt: "", options: { doSample: true } }))).rejects.toThrow(/greedy search only/);
    const long = batch.join(await request({ image: 0, prompt: "word ".repeat(200), options: {} }));
    await batch.step();
    await expect(long).rejects.toThrow(/prompt too long/);
    expect(batch.size).toBe(0);
  });
});
