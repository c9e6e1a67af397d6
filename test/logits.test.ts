/**
 * The logits processors, sampling and beam search on given logits, against values worked out by
 * hand from transformers' documented semantics (generation/logits_process.py and `_beam_search`):
 * - temperature divides the scores; top-k keeps every score >= the k-th largest (ties kept); top-p
 *   sorts ascending, removes the tokens whose cumulative probability is <= 1 - p, and always keeps
 *   the best; the repetition penalty divides a positive score of a token already in the sequence
 *   and multiplies a negative one; no-repeat-n-gram bans every token that would complete an n-gram
 *   already in the sequence; processors run before warpers (temperature, top-k, top-p).
 * - beam search keeps 2 x beams candidates by summed log-probability; the top `beams` of them that
 *   end (EOS, or the last allowed token) become hypotheses scored sum / generated_length ** length_penalty;
 *   with early_stopping true the search ends once `beams` hypotheses exist, with false once the best
 *   running beam's sum / generated_length ** length_penalty cannot beat the worst hypothesis.
 */
import { describe, expect, it } from "vitest";
import { logitsProcessors, noRepeatNgram, repetitionPenalty, softmax, temperature, topK, topP } from "../src/generation/logits.js";
import { resolveGeneration, type GenerationOptions } from "../src/generation/options.js";
import { beamSearch, sampleOrGreedy, type DecodingModel } from "../src/generation/search.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { fixture } from "./helpers.js";

const config = Checkpoint.open(fixture("tiny-blip2-opt")).config;
const resolve = (o: GenerationOptions) => resolveGeneration(o, {}, config);
const apply = (p: (s: Float32Array, seq: readonly number[]) => void, scores: number[], sequence: number[] = []) => {
  const s = Float32Array.from(scores);
  p(s, sequence);
  return Array.from(s);
};
const ln = Math.log;
const closeTo = (actual: number[], expected: number[]) => {
  expect(actual).toHaveLength(expected.length);
  actual.forEach((a, i) => (Number.isFinite(expected[i]) ? expect(a, `index ${i}`).toBeCloseTo(expected[i]!, 5) : expect(a, `index ${i}`).toBe(expected[i])));
};

describe("logits processors on given scores", () => {
  it("temperature divides every score", () => {
    closeTo(apply(temperature(0.5), [2, 1, 0, -1]), [4, 2, 0, -2]);
    closeTo(apply(temperature(2), [2, 1, 0, -1]), [1, 0.5, 0, -0.5]);
  });

  it("top-k keeps the scores >= the k-th largest, ties included", () => {
    closeTo(apply(topK(2), [1, 3, 2, 3, 0]), [-Infinity, 3, -Infinity, 3, -Infinity]);
    closeTo(apply(topK(3), [1, 3, 2, 3, 0]), [-Infinity, 3, 2, 3, -Infinity]);
    // The k-th largest is tied with the (k+1)-th: both stay.
    closeTo(apply(topK(2), [3, 1, 2, 2]), [3, -Infinity, 2, 2]);
    closeTo(apply(topK(10), [1, 2]), [1, 2]);
  });

  it("top-p removes the least likely tokens whose cumulative probability stays <= 1 - p", () => {
    // Probabilities .15, .5, .05, .3: ascending .05 (cumulative .05), .15 (.20), .3 (.50), .5 (1).
    const scores = [ln(0.15), ln(0.5), ln(0.05), ln(0.3)];
    closeTo(apply(topP(0.9), scores), [ln(0.15), ln(0.5), -Infinity, ln(0.3)]); // removes <= .1
    closeTo(apply(topP(0.75), scores), [-Infinity, ln(0.5), -Infinity, ln(0.3)]); // removes <= .25
    closeTo(apply(topP(0.3), scores), [-Infinity, ln(0.5), -Infinity, -Infinity]); // removes <= .7
    // The best token stays even when its own mass is below p.
    closeTo(apply(topP(0.01), scores), [-Infinity, ln(0.5), -Infinity, -Infinity]);
  });

  it("the repetition penalty divides positive and multiplies negative scores of tokens in the sequence, once each", () => {
    closeTo(apply(repetitionPenalty(2), [1, -1, 2, -2, 0.5, 0], [0, 1, 1, 4, 5]), [0.5, -2, 2, -2, 0.25, 0]);
    closeTo(apply(repetitionPenalty(0.5), [1, -1, 2], [0, 1]), [2, -0.5, 2]);
  });

  it("no-repeat-n-gram bans the tokens that would complete an n-gram already seen", () => {
    const zeros = (n: number) => new Array(n).fill(0);
    // Bigrams (5,1), (1,2), (2,1); the last token is 1: 2 is banned.
    closeTo(apply(noRepeatNgram(2), zeros(6), [5, 1, 2, 1]), [0, 0, -Infinity, 0, 0, 0]);
    // Trigrams (1,2,3), (2,3,1), (3,1,2); the last two are (1,2): 3 is banned.
    closeTo(apply(noRepeatNgram(3), zeros(6), [1, 2, 3, 1, 2]), [0, 0, 0, -Infinity, 0, 0]);
    // Both (1,2)->3 and (1,2)->4 were seen.
    closeTo(apply(noRepeatNgram(3), zeros(6), [1, 2, 3, 1, 2, 4, 1, 2]), [0, 0, 0, -Infinity, -Infinity, 0]);
    // Too short for a whole n-gram: nothing is banned.
    closeTo(apply(noRepeatNgram(3), zeros(6), [1, 2]), zeros(6));
  });

  it("run in transformers' order: repetition penalty, then temperature, top-k, top-p", () => {
    const g = resolve({ doSample: true, repetitionPenalty: 2, temperature: 0.5, topK: 3, topP: 0.8 });
    const scores = Float32Array.from([2, 1, 0.5, -1]);
    for (const p of logitsProcessors(g, 1)) p(scores, [0]);
    // Penalty on token 0: [1, 1, .5, -1]; / 0.5: [2, 2, 1, -2]; top-3 (3rd largest 1): [2, 2, 1, -inf];
    // probabilities e^2, e^2, e^1 over their sum: .4223, .4223, .1554, 0; ascending cumulative
    // 0, .1554, .5777, 1: top-p 0.8 removes those <= .2, token 2 as well.
    closeTo(Array.from(scores), [2, 2, -Infinity, -Infinity]);
  });
});

/** A model whose every row has the same logits `scores` at every step. */
const constant = (scores: number[], rows: number): DecodingModel => {
  const logits = () => Float32Array.from({ length: rows * scores.length }, (_, i) => scores[i % scores.length]!);
  return { vocabSize: scores.length, prefill: async () => logits(), step: async () => logits(), reorder: () => {} };
};

/** Frequencies of the first sampled token over `rows` rows. */
async function frequencies(scores: number[], o: GenerationOptions, rows = 4000): Promise<number[]> {
  const g = resolve({ ...o, doSample: true, maxNewTokens: 1, eosTokenId: 99, seed: 1 });
  const out = await sampleOrGreedy(constant(scores, rows), Array.from({ length: rows }, () => [0]), g);
  const counts = new Array(scores.length).fill(0);
  for (const seq of out.sequences) counts[seq[1]!]++;
  return counts.map((c) => c / rows);
}

describe("sampling draws from the processed distribution", () => {
  // 4000 draws: a frequency's standard deviation is at most .008; the bounds are 4 of them.
  const near = (got: number[], want: number[]) => got.forEach((f, i) => expect(Math.abs(f - want[i]!), `token ${i}: ${f} vs ${want[i]}`).toBeLessThan(0.03));

  it("temperature 0.5: probabilities .5, .3, .2 become .25, .09, .04 over .38", async () => {
    near(await frequencies([ln(0.5), ln(0.3), ln(0.2)], { temperature: 0.5, topK: 0 }), [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]);
  });

  it("top-k 2: only the two best, e^2 and e^3 over their sum", async () => {
    const f = await frequencies([0, 1, 2, 3], { topK: 2 });
    expect(f.slice(0, 2)).toEqual([0, 0]);
    near(f, [0, 0, Math.exp(2) / (Math.exp(2) + Math.exp(3)), Math.exp(3) / (Math.exp(2) + Math.exp(3))]);
  });

  it("top-p 0.75: of .15, .5, .05, .3 only .5 and .3, renormalized", async () => {
    const f = await frequencies([ln(0.15), ln(0.5), ln(0.05), ln(0.3)], { topP: 0.75, topK: 0 });
    expect([f[0], f[2]]).toEqual([0, 0]);
    near(f, [0, 0.625, 0, 0.375]);
  });

  it("without sampling, the processed argmax: the repetition penalty moves it off a repeated token", async () => {
    const g = resolve({ maxNewTokens: 1, eosTokenId: 99, repetitionPenalty: 2 });
    const out = await sampleOrGreedy(constant([0, 3, 2], 1), [[1]], g);
    expect(out.sequences).toEqual([[1, 2]]); // 3 / 2 = 1.5 < 2
  });
});

/**
 * A beam-search model over tokens 0-5 (0 = EOS, prompt [5]) whose next-token probabilities depend
 * on the row's last token only.
 */
const NEXT: Record<number, Record<number, number>> = {
  5: { 0: 0.4, 1: 0.35, 2: 0.25 },
  1: { 0: 0.3, 3: 0.7 },
  2: { 0: 0.2, 4: 0.8 },
  3: { 0: 0.95, 3: 0.05 },
  4: { 0: 0.1, 4: 0.9 },
};

function treeModel(rows: number) {
  let last = new Array<number>(rows).fill(5);
  const calls = { steps: 0 };
  const logits = () => Float32Array.from({ length: rows * 6 }, (_, i) => ln(NEXT[last[Math.floor(i / 6)]!]![i % 6] ?? 0));
  const model: DecodingModel = {
    vocabSize: 6,
    prefill: async () => logits(),
    step: async (tokens) => {
      calls.steps++;
      last = tokens;
      return logits();
    },
    reorder: (index) => void (last = index.map((i) => last[i]!)),
  };
  return { model, calls };
}

async function beams(o: GenerationOptions) {
  const { model, calls } = treeModel(2);
  const out = await beamSearch(model, [[5], [5]], resolve({ numBeams: 2, maxNewTokens: 4, eosTokenId: 0, padTokenId: 0, ...o }));
  return { sequence: out.sequences[0], score: out.scores![0], steps: calls.steps };
}

describe("beam search (2 beams, at most 4 new tokens) on a given tree", () => {
  // Worked by hand. Step 1: [5,0] ends (A = ln .4); running [5,1] (ln .35), [5,2] (ln .25).
  // Step 2: best [5,1,3] (ln .35 + ln .7) and [5,2,4] (ln .25 + ln .8); no EOS among the top 2.
  // Step 3: [5,1,3,0] (C = ln .35 + ln .7 + ln .95) ends at rank 1; running [5,2,4,4] (R = ln .25 +
  // ln .8 + ln .9) and [5,1,3,3]. Step 4 (the last): D = [5,2,4,4,4] (R + ln .9) and E = [5,2,4,4,0].
  const A = ln(0.4);
  const C = ln(0.35) + ln(0.7) + ln(0.95);
  const R = ln(0.25) + ln(0.8) + ln(0.9);
  const D = R + ln(0.9);

  it("length penalty 1, early stopping false: the best running beam can still win at step 3 (R/3 > A), and does (D/4 > C/3)", async () => {
    expect(R / 3).toBeGreaterThan(A);
    expect(await beams({ lengthPenalty: 1, earlyStopping: false })).toEqual({ sequence: [5, 2, 4, 4, 4], score: expect.closeTo(D / 4, 5), steps: 3 });
  });

  it("early stopping true: ends at step 3 with 2 hypotheses, C/3 best", async () => {
    expect(await beams({ lengthPenalty: 1, earlyStopping: true })).toEqual({ sequence: [5, 1, 3, 0], score: expect.closeTo(C / 3, 5), steps: 2 });
  });

  it("length penalty 0 (sums): after step 3 the best running sum R cannot beat the worst hypothesis C, so it ends with A", async () => {
    expect(R).toBeLessThan(C);
    expect(await beams({ lengthPenalty: 0 })).toEqual({ sequence: [5, 0], score: expect.closeTo(A, 5), steps: 2 });
  });

  it("length penalty 2 favours the long hypothesis: D/16", async () => {
    expect(await beams({ lengthPenalty: 2 })).toEqual({ sequence: [5, 2, 4, 4, 4], score: expect.closeTo(D / 16, 5), steps: 3 });
  });

  it("returns the hypotheses best first", async () => {
    const { model } = treeModel(2);
    const out = await beamSearch(model, [[5], [5]], resolve({ numBeams: 2, numReturnSequences: 2, maxNewTokens: 4, eosTokenId: 0, padTokenId: 9 }));
    // D and C (A and E scored lower); C padded to D's length.
    expect(out.sequences).toEqual([[5, 2, 4, 4, 4], [5, 1, 3, 0, 9]]);
    closeTo(out.scores!, [D / 4, C / 3]);
  });
});

describe("softmax", () => {
  it("normalizes the processed scores, -inf to zero", () => {
    closeTo(Array.from(softmax(Float32Array.from([ln(0.5), -Infinity, ln(1.5)]))), [0.25, 0, 0.75]);
  });
});
