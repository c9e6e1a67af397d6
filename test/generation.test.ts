/**
 * Generation parity with transformers `generate`, on reference pixel values and prompt ids:
 * tiny 5.17 fixtures (ids echo the prompt for OPT) and the 4.45 set (returned as [bos] + new
 * tokens there: compared on the new tokens), step logits included.
 */
import fs from "node:fs";
import { afterAll, describe, expect, it, vi } from "vitest";
import { generateIds, type KeptCache } from "../src/generation/generate.js";
import { generationDefaults, resolveGeneration, type GenerationOptions } from "../src/generation/options.js";
import { sampleOrGreedy, type DecodingModel } from "../src/generation/search.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { Blip2Runtime } from "../src/runtime/blip2Runtime.js";
import { CompiledGraph } from "../src/runtime/session.js";
import { expectClose, fixture, loadReference, type RefTensor } from "./helpers.js";

const runtimes: Blip2Runtime[] = [];
afterAll(async () => Promise.all(runtimes.map((r) => r.release())));

function setup(...dir: string[]) {
  const ckpt = Checkpoint.open(fixture(...dir));
  const rt = new Blip2Runtime(ckpt);
  runtimes.push(rt);
  const defaults = generationDefaults(ckpt.json("generation_config.json"), "generation_config.json");
  const options = (o: GenerationOptions) => resolveGeneration(o, defaults, ckpt.config);
  return { ckpt, rt, options, ref: loadReference(fixture(...dir, "reference.safetensors")), json: JSON.parse(fs.readFileSync(fixture(...dir, "reference.json"), "utf8")) };
}

const ones = (ids: number[][]) => ids.map((r) => r.map(() => 1));
const rows = (t: RefTensor) => Array.from({ length: t.shape[0]! }, (_, i) => Array.from(t.data.subarray(i * t.shape[1]!, (i + 1) * t.shape[1]!)));
const concat = (...parts: Float32Array[]) => {
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  parts.reduce((at, p) => (out.set(p, at), at + p.length), 0);
  return out;
};

const SETTINGS: Record<string, GenerationOptions> = {
  greedy_ids: { maxNewTokens: 10 },
  greedy_min10_ids: { maxNewTokens: 10, minNewTokens: 10 },
  beam3_ids: { maxNewTokens: 10, numBeams: 3, minNewTokens: 3 },
  "repetition_penalty_1.5_ids": { maxNewTokens: 10, minNewTokens: 10, repetitionPenalty: 1.5 },
};

describe.each(["tiny-blip2-opt", "tiny-blip2-t5"])("%s generate (transformers 5.17)", (name) => {
  const { rt, options, ref, json } = setup(name);

  it.each(["0", "1", "2"])("case %s: greedy, min_new_tokens, beam search, repetition penalty", async (c) => {
    const cs = json.cases[c];
    for (const [key, opts] of Object.entries(SETTINGS)) {
      const out = await generateIds(rt, { pixelValues: ref.get(`case${c}.pixel_values`)!.data, inputIds: [cs.input_ids], attentionMask: [cs.attention_mask] }, options(opts));
      expect(out.sequences, `case ${c} ${key}`).toEqual([cs[key]]);
    }
  });

  it("batch of two images and prompts of different lengths, left-padded", async () => {
    const b = json.batch;
    const pixelValues = concat(ref.get("image0.pixel_values")!.data, ref.get("image1.pixel_values")!.data);
    const out = await generateIds(rt, { pixelValues, inputIds: b.input_ids, attentionMask: b.attention_mask }, options({ maxNewTokens: 8, minNewTokens: 8 }));
    expect(out.sequences).toEqual(b.greedy_ids);
  });

  it("legacy prompt without <image> tokens (transformers leaves the image unused)", async () => {
    const l = json.legacy;
    const out = await generateIds(rt, { pixelValues: ref.get("case2.pixel_values")!.data, inputIds: l.input_ids, attentionMask: ones(l.input_ids) }, options({ maxNewTokens: 8 }));
    expect(out.sequences).toEqual(l.greedy_ids);
  });
});

describe.each(["opt", "t5"])("hf-4.45/%s generate (transformers 4.45)", (variant) => {
  const { ckpt, rt, options, ref, json } = setup("hf-4.45", variant);
  const pixelValues = ref.get("pixel_values")!.data;
  /** 4.45 returns [bos] + new tokens for OPT; we return prompt + new tokens. */
  const as445 = (seqs: number[][], promptLength: number) => (variant === "opt" ? seqs.map((s) => [ckpt.config.text.modelType === "opt" ? 2 : 0, ...s.slice(promptLength)]) : seqs);

  it.each([["greedy", "input_ids"], ["caption_greedy", "caption_input_ids"]])("%s: sequences and every step's logits", async (key, idsName) => {
    const inputIds = rows(ref.get(idsName)!);
    const g = options({ maxNewTokens: 8 });
    const stepLogits: Float32Array[] = [];
    const out = await generateIds(rt, { pixelValues, inputIds, attentionMask: ones(inputIds) }, g, { onLogits: (l) => void stepLogits.push(l) });
    expect(as445(out.sequences, inputIds[0]!.length)).toEqual(json.generation[key].sequences);
    const refLogits = ref.get(`${key}_step_logits`)!;
    expectClose(`${key}_step_logits`, { shape: [stepLogits.length, 2, refLogits.shape[2]!], data: concat(...stepLogits) }, refLogits);
  });

  it("beam search (3 beams): sequences and scores; T5's cross-attention keys/values once per input", async () => {
    const inputIds = rows(ref.get("input_ids")!);
    const cross = vi.spyOn(CompiledGraph.prototype, "runIntoCache");
    const decode = vi.spyOn(rt, "t5Decode");
    const out = await generateIds(rt, { pixelValues, inputIds, attentionMask: ones(inputIds) }, options({ maxNewTokens: 8, numBeams: 3 }));
    expect(as445(out.sequences, inputIds[0]!.length)).toEqual(json.generation.beam.sequences);
    expectClose("beam scores", { shape: [2], data: Float32Array.from(out.scores!) }, ref.get("beam_sequences_scores")!);
    // 2 inputs x 3 beams decode as 6 rows; the projections run over the 2 encoder outputs, and
    // every step attends to those 2 rows of keys/values (with their 2 encoder masks).
    expect(cross.mock.calls.map(([feeds]) => feeds.encoder_hidden_states!.dims[0])).toEqual(variant === "t5" ? [2] : []);
    expect(new Set(decode.mock.calls.map(([ids, encoderMask]) => `${ids.length} rows, ${encoderMask.length} inputs`))).toEqual(new Set(variant === "t5" ? ["6 rows, 2 inputs"] : []));
    cross.mockRestore();
    decode.mockRestore();
  });
});

describe("OPT's session runs", () => {
  it("one per decoding step: the tokens' embeddings and the image's queries are placed in the decoder graph", async () => {
    const { rt, options, ref, json } = setup("tiny-blip2-opt");
    await rt.prepare();
    const runs = vi.spyOn(CompiledGraph.prototype, "run");
    const cs = json.cases["1"];
    const out = await generateIds(rt, { pixelValues: ref.get("case1.pixel_values")!.data, inputIds: [cs.input_ids], attentionMask: [cs.attention_mask] }, options({ maxNewTokens: 10, minNewTokens: 10 }));
    expect(out.sequences).toEqual([cs.greedy_min10_ids]);
    // The image, the prompt, then 9 steps (the 10th token is never fed back).
    expect((runs.mock.contexts as CompiledGraph[]).map((s) => s.name)).toEqual(["image", ...new Array(10).fill("opt_decoder")]);
    runs.mockRestore();
  });
});

describe("a kept cache (a conversation's next turn)", () => {
  it.each([
    ["image tokens", {}],
    ["queries before the text (legacy)", { imageTokenIndex: null }],
  ])("%s: the next prompt runs only its new positions, with the logits and ids of a whole pass", async (_, patch) => {
    const { ckpt, options, ref, json } = setup("tiny-blip2-opt");
    const rt = new Blip2Runtime(ckpt.withConfig(patch));
    runtimes.push(rt);
    // Legacy checkpoints place the queries before the text: positions the ids do not show.
    const queries = rt.config.imageTokenIndex === null ? rt.config.numQueryTokens : 0;
    const imageFeatures = (await rt.image(ref.get("case1.pixel_values")!.data, 1)).language_model_inputs!;
    const g = options({ maxNewTokens: 6, minNewTokens: 6 });
    const run = async (ids: number[], keptCache?: KeptCache) => {
      const logits: Float32Array[] = [];
      const out = await generateIds(rt, { imageFeatures, inputIds: [ids], attentionMask: [ids.map(() => 1)], keptCache }, g, { onLogits: (l) => void logits.push(l) });
      return { ids: out.sequences[0]!, logits: concat(...logits) };
    };
    const kept: KeptCache = { handle: null, image: null, ids: [] };
    const first = json.cases["1"].input_ids as number[];
    const turn1 = await run(first, kept);
    // As a chat's: the first prompt, its answer, then a new question.
    const next = [...turn1.ids, 263, 395, 291];
    const decode = vi.spyOn(rt, "optDecode");
    const reused = await run(next, kept);
    const prefillLength = decode.mock.calls[0]![0].ids[0]!.length;
    decode.mockRestore();
    const whole = await run(next);
    // The cache held the first prompt and 5 of its 6 new tokens (the last is never fed).
    expect(prefillLength).toBe(next.length - first.length - 5);
    expect(reused.ids).toEqual(whole.ids);
    expectClose("step logits", { shape: [reused.logits.length], data: reused.logits }, { shape: [whole.logits.length], data: whole.logits });
    expect(kept.handle!.length).toBe(queries + reused.ids.length - 1);
    // Another image: a whole pass again.
    const other = (await rt.image(ref.get("case2.pixel_values")!.data, 1)).language_model_inputs!;
    const spy = vi.spyOn(rt, "optDecode");
    await generateIds(rt, { imageFeatures: other, inputIds: [next], attentionMask: [next.map(() => 1)], keptCache: kept }, g);
    expect(spy.mock.calls[0]![0].ids[0]!.length).toBe(queries + next.length);
    spy.mockRestore();
  });
});

describe("sampling", () => {
  const { rt, options, ref, json } = setup("tiny-blip2-opt");
  const inputs = { pixelValues: ref.get("case1.pixel_values")!.data, inputIds: [json.cases["1"].input_ids], attentionMask: [json.cases["1"].attention_mask] };

  it("is reproducible from a seed and changes with it", async () => {
    const run = (seed: number) => generateIds(rt, inputs, options({ maxNewTokens: 12, doSample: true, seed, topK: 0 }));
    const a = await run(7);
    expect((await run(7)).sequences).toEqual(a.sequences);
    const others = await Promise.all([1, 2, 3, 4].map(run));
    expect(others.some((o) => JSON.stringify(o.sequences) !== JSON.stringify(a.sequences))).toBe(true);
  });

  it("temperature -> 0 equals greedy", async () => {
    const greedy = await generateIds(rt, inputs, options({ maxNewTokens: 10 }));
    const cold = await generateIds(rt, inputs, options({ maxNewTokens: 10, doSample: true, temperature: 1e-4, seed: 3 }));
    expect(cold.sequences).toEqual(greedy.sequences);
    expect(greedy.sequences).toEqual([json.cases["1"].greedy_ids]);
  });

  it("numReturnSequences gives that many samples per prompt", async () => {
    const out = await generateIds(rt, inputs, options({ maxNewTokens: 5, doSample: true, seed: 1, numReturnSequences: 3 }));
    expect(out.sequences).toHaveLength(3);
  });
});

describe("search loop", () => {
  const { options, ckpt } = setup("tiny-blip2-opt");
  /** A fake model whose logits favour token (last + 1) % V, to check stopping rules in isolation. */
  const counting = (vocab: number, rowsCount: number): DecodingModel => {
    let last = new Array(rowsCount).fill(0);
    const logits = () => Float32Array.from({ length: rowsCount * vocab }, (_, i) => (i % vocab === (last[Math.floor(i / vocab)]! + 1) % vocab ? 5 : 0));
    return { vocabSize: vocab, prefill: async () => logits(), step: async (t) => ((last = t), logits()), reorder: () => {} };
  };

  it("stops at any of several EOS ids and pads finished rows", async () => {
    const g = resolveGeneration({ maxNewTokens: 10, eosTokenId: [3, 50], padTokenId: 9 }, {}, ckpt.config);
    const out = await sampleOrGreedy(counting(8, 1), [[0]], g);
    expect(out.sequences).toEqual([[0, 1, 2, 3]]);
  });

  it("no_repeat_ngram_size forbids a repeated bigram", async () => {
    const g = resolveGeneration({ maxNewTokens: 9, noRepeatNgramSize: 2, eosTokenId: 99 }, {}, ckpt.config);
    const out = await sampleOrGreedy(counting(4, 1), [[0]], g);
    const seq = out.sequences[0]!;
    const bigrams = seq.slice(1).map((t, i) => `${seq[i]},${t}`);
    expect(new Set(bigrams).size).toBe(bigrams.length);
  });

  it("streams the same tokens the call returns", async () => {
    const g = options({ maxNewTokens: 6, eosTokenId: 99 });
    const streamed: number[] = [];
    const out = await sampleOrGreedy(counting(8, 1), [[0]], g, (t) => void streamed.push(t[0]!));
    expect([0, ...streamed]).toEqual(out.sequences[0]);
  });
});
