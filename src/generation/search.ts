/**
 * The decoding loops of transformers' `generate`: greedy / multinomial sampling and beam search
 * (its vectorized form: 2 x beams candidates per step, finished hypotheses scored by
 * sum of log-probs / generated_length ** length_penalty). Model-agnostic: the language model is
 * reached through `DecodingModel`, which owns the key/value cache.
 */
import { Blip2Error } from "../errors.js";
import { argmax, logitsProcessors, logSoftmax, softmax, type Processor } from "./logits.js";
import type { ResolvedGeneration } from "./options.js";
import { Random } from "./random.js";

export interface DecodingModel {
  readonly vocabSize: number;
  /** Run the prompt of every row; logits of each row's last position, [rows * vocab]. */
  prefill(): Promise<Float32Array>;
  /** Append one token per row; logits of the new position. */
  step(tokens: number[]): Promise<Float32Array>;
  /** Keep rows `index` (in that order): beam reordering, within each input's rows. */
  reorder(index: number[]): void | Promise<void>;
}

export interface SearchResult {
  /** Per returned sequence: the prompt ids followed by the new tokens (padded after EOS). */
  sequences: number[][];
  /** Beam search: each sequence's score (sum of log-probs / length ** length_penalty). */
  scores?: number[];
}

/** Called after each step with one new token per row (greedy/sampling only). */
export type TokenCallback = (tokens: number[], finished: boolean[]) => void | Promise<void>;

const row = (logits: Float32Array, i: number, vocab: number) => logits.slice(i * vocab, (i + 1) * vocab);

/**
 * Greedy search, or sampling when `g.doSample`. `prompts` are the rows' token histories (what the
 * repetition penalty and n-gram rules see); new tokens are appended to them.
 */
export async function sampleOrGreedy(model: DecodingModel, prompts: number[][], g: ResolvedGeneration, onToken?: TokenCallback): Promise<SearchResult> {
  const promptLength = prompts[0]!.length;
  const processors = logitsProcessors(g, promptLength);
  const random = new Random(g.seed);
  const sequences = prompts.map((p) => [...p]);
  const finished = prompts.map(() => false);
  let logits = await model.prefill();
  for (let step = 0; step < g.maxNewTokens; step++) {
    const tokens = sequences.map((seq, i) => {
      if (finished[i]) return g.padTokenId;
      const scores = row(logits, i, model.vocabSize);
      for (const p of processors) p(scores, seq);
      return g.doSample ? sample(softmax(scores), random) : argmax(scores);
    });
    tokens.forEach((t, i) => {
      sequences[i]!.push(t);
      if (g.eosTokenIds.includes(t)) finished[i] = true;
    });
    await onToken?.(tokens, [...finished]);
    if (finished.every(Boolean) || step === g.maxNewTokens - 1) break;
    logits = await model.step(tokens);
  }
  return { sequences };
}

function sample(probs: Float64Array, random: Random): number {
  let u = random.next();
  for (let i = 0; i < probs.length; i++) {
    u -= probs[i]!;
    if (u < 0) return i;
  }
  // Rounding left a sliver of mass: take the last token that has any.
  for (let i = probs.length - 1; i >= 0; i--) if (probs[i]! > 0) return i;
  throw new Blip2Error("sampling: every token has probability zero");
}

interface Hypothesis {
  sequence: number[];
  score: number;
}

/**
 * Beam search over `batch` inputs whose rows are already expanded to `numBeams` each (rows
 * b * numBeams .. b * numBeams + numBeams - 1 belong to input b, identical at the start).
 */
export async function beamSearch(model: DecodingModel, prompts: number[][], g: ResolvedGeneration): Promise<SearchResult> {
  const beams = g.numBeams;
  const batch = prompts.length / beams;
  const promptLength = prompts[0]!.length;
  const processors = logitsProcessors(g, promptLength);
  const random = new Random(g.seed);
  const keep = Math.max(2, 1 + g.eosTokenIds.length) * beams;
  const vocab = model.vocabSize;
  let running = prompts.map((p) => [...p]);
  // Only the first beam of each input is live at the start (the others are copies).
  let runningScores: number[] = prompts.map((_, i) => (i % beams === 0 ? 0 : -1e9));
  const finished: Hypothesis[][] = Array.from({ length: batch }, () => []);
  const improvable = new Array(batch).fill(true);
  let logits = await model.prefill();
  for (let curLen = promptLength; ; curLen++) {
    const generated = curLen + 1 - promptLength;
    const atMaxLength = generated >= g.maxNewTokens;
    const nextRunning: number[][] = [];
    const nextScores: number[] = [];
    const reorder: number[] = [];
    let anyContinuation = false;
    for (let b = 0; b < batch; b++) {
      const candidates = topCandidates(b, running, runningScores, logits, processors, keep, beams, vocab, g.doSample ? random : null);
      const hits = candidates.map((c) => atMaxLength || g.eosTokenIds.includes(c.token));
      // Finished hypotheses: the top `beams` candidates that end here.
      const full = finished[b]!.length >= beams && g.earlyStopping === true;
      candidates.forEach((c, k) => {
        if (k < beams && hits[k] && improvable[b] && !full) {
          addFinished(finished[b]!, { sequence: [...running[c.beam]!, c.token], score: c.score / generated ** g.lengthPenalty }, beams);
        }
      });
      // Running beams: the best `beams` candidates that do not end here.
      const live = candidates.map((c, k) => ({ c, score: hits[k] ? c.score - 1e9 : c.score })).sort((x, y) => y.score - x.score).slice(0, beams);
      for (const { c, score } of live) {
        nextRunning.push([...running[c.beam]!, c.token]);
        nextScores.push(score);
        reorder.push(c.beam);
      }
      if (!hits.every(Boolean)) anyContinuation = true;
    }
    running = nextRunning;
    runningScores = nextScores;
    for (let b = 0; b < batch; b++) improvable[b] = improvable[b] && canImprove(finished[b]!, runningScores[b * beams]!, curLen + 1 - promptLength, g, beams);
    const allFull = finished.every((f) => f.length >= beams) && g.earlyStopping === true;
    if (!improvable.some(Boolean) || allFull || !anyContinuation) break;
    await model.reorder(reorder);
    logits = await model.step(running.map((r) => r[r.length - 1]!));
  }
  return collect(finished, g);
}

interface Candidate {
  beam: number;
  token: number;
  score: number;
}

/** The `keep` best (beam, token) continuations of input b by accumulated log-probability. */
function topCandidates(b: number, running: number[][], scores: number[], logits: Float32Array, processors: Processor[], keep: number, beams: number, vocab: number, random: Random | null): Candidate[] {
  const all = new Float32Array(beams * vocab);
  for (let k = 0; k < beams; k++) {
    const r = b * beams + k;
    const logProbs = logSoftmax(row(logits, r, vocab));
    for (const p of processors) p(logProbs, running[r]!);
    for (let v = 0; v < vocab; v++) all[k * vocab + v] = logProbs[v]! + scores[r]!;
  }
  const pick = random ? sampleWithoutReplacement(all, keep, random) : topIndices(all, keep);
  return pick.map((i) => ({ beam: b * beams + Math.floor(i / vocab), token: i % vocab, score: all[i]! }));
}

function topIndices(values: Float32Array, k: number): number[] {
  const idx: number[] = [];
  for (let i = 0; i < values.length; i++) {
    if (idx.length < k || values[i]! > values[idx[idx.length - 1]!]!) {
      let j = Math.min(idx.length, k - 1);
      if (idx.length < k) idx.push(i);
      // Insertion keeps the list sorted descending; equal values keep their index order.
      while (j > 0 && values[idx[j - 1]!]! < values[i]!) {
        idx[j] = idx[j - 1]!;
        j--;
      }
      idx[j] = i;
    }
  }
  return idx;
}

function sampleWithoutReplacement(logProbs: Float32Array, k: number, random: Random): number[] {
  const probs = softmax(logProbs);
  const out: number[] = [];
  for (let n = 0; n < k; n++) {
    const i = sample(probs, random);
    out.push(i);
    const mass = probs[i]!;
    probs[i] = 0;
    for (let j = 0; j < probs.length; j++) probs[j]! /= 1 - mass;
  }
  return out.sort((x, y) => logProbs[y]! - logProbs[x]!);
}

function addFinished(list: Hypothesis[], h: Hypothesis, beams: number): void {
  list.push(h);
  list.sort((x, y) => y.score - x.score);
  if (list.length > beams) list.pop();
}

/** transformers' early-stop heuristic: can the best running beam still beat the worst finished one? */
function canImprove(finished: Hypothesis[], bestRunning: number, generated: number, g: ResolvedGeneration, beams: number): boolean {
  if (finished.length < beams) return true;
  const length = g.earlyStopping === "never" && g.lengthPenalty > 0 ? g.maxNewTokens : generated;
  return bestRunning / length ** g.lengthPenalty > finished[finished.length - 1]!.score;
}

function collect(finished: Hypothesis[][], g: ResolvedGeneration): SearchResult {
  const chosen = finished.flatMap((f) => f.slice(0, g.numReturnSequences));
  const width = Math.max(...chosen.map((h) => h.sequence.length));
  return {
    sequences: chosen.map((h) => [...h.sequence, ...new Array(width - h.sequence.length).fill(g.padTokenId)]),
    scores: chosen.map((h) => h.score),
  };
}
