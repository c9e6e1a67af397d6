/**
 * Logits processors and warpers, each as transformers defines it, applied row by row in
 * transformers' order: repetition penalty, no-repeat n-grams, min new tokens, then (sampling)
 * temperature, top-k, top-p.
 */
import type { ResolvedGeneration } from "./options.js";

export type Processor = (scores: Float32Array, sequence: readonly number[]) => void;

/** Divide positive / multiply negative scores of every token already in the sequence. */
export function repetitionPenalty(penalty: number): Processor {
  return (scores, sequence) => {
    for (const t of new Set(sequence)) {
      const s = scores[t]!;
      scores[t] = s < 0 ? s * penalty : s / penalty;
    }
  };
}

/** Forbid any token that would repeat an n-gram already in the sequence. */
export function noRepeatNgram(n: number): Processor {
  return (scores, sequence) => {
    if (sequence.length + 1 < n) return;
    const prefix = sequence.slice(sequence.length - n + 1);
    for (let i = 0; i + n <= sequence.length; i++) {
      let same = true;
      for (let j = 0; j < n - 1 && same; j++) same = sequence[i + j] === prefix[j];
      if (same) scores[sequence[i + n - 1]!] = -Infinity;
    }
  };
}

/** EOS is impossible until `minNewTokens` tokens follow the prompt. */
export function minNewTokens(min: number, promptLength: number, eos: number[]): Processor {
  return (scores, sequence) => {
    if (sequence.length - promptLength < min) for (const e of eos) scores[e] = -Infinity;
  };
}

export function temperature(t: number): Processor {
  return (scores) => {
    for (let i = 0; i < scores.length; i++) scores[i]! /= t;
  };
}

/** Keep the k best scores (and every score tied with the k-th). */
export function topK(k: number): Processor {
  return (scores) => {
    if (k <= 0 || k >= scores.length) return;
    const kth = Float32Array.from(scores).sort().reverse()[k - 1]!;
    for (let i = 0; i < scores.length; i++) if (scores[i]! < kth) scores[i] = -Infinity;
  };
}

/** Keep the smallest set of best tokens whose probability reaches p (at least one). */
export function topP(p: number): Processor {
  return (scores) => {
    if (p >= 1) return;
    const order = Array.from(scores.keys()).sort((a, b) => scores[a]! - scores[b]!);
    const probs = softmax(scores);
    let cumulative = 0;
    // Ascending order: drop tokens while the mass below them stays within 1 - p.
    for (let i = 0; i < order.length - 1; i++) {
      cumulative += probs[order[i]!]!;
      if (cumulative > 1 - p) break;
      scores[order[i]!] = -Infinity;
    }
  };
}

export function logitsProcessors(g: ResolvedGeneration, promptLength: number): Processor[] {
  const list: Processor[] = [];
  if (g.repetitionPenalty !== 1) list.push(repetitionPenalty(g.repetitionPenalty));
  if (g.noRepeatNgramSize > 0) list.push(noRepeatNgram(g.noRepeatNgramSize));
  if (g.minNewTokens > 0 && g.eosTokenIds.length) list.push(minNewTokens(g.minNewTokens, promptLength, g.eosTokenIds));
  if (g.doSample) {
    if (g.temperature !== 1) list.push(temperature(g.temperature));
    if (g.topK > 0) list.push(topK(g.topK));
    if (g.topP < 1) list.push(topP(g.topP));
  }
  return list;
}

export function softmax(scores: Float32Array): Float64Array {
  let max = -Infinity;
  for (const s of scores) if (s > max) max = s;
  const out = new Float64Array(scores.length);
  let sum = 0;
  for (let i = 0; i < scores.length; i++) sum += out[i] = Math.exp(scores[i]! - max);
  for (let i = 0; i < out.length; i++) out[i]! /= sum;
  return out;
}

/** log_softmax in float64, returned as float32 like transformers' float32 log-probs. */
export function logSoftmax(scores: Float32Array): Float32Array {
  let max = -Infinity;
  for (const s of scores) if (s > max) max = s;
  let sum = 0;
  for (const s of scores) sum += Math.exp(s - max);
  const lse = max + Math.log(sum);
  return scores.map((s) => s - lse);
}

export function argmax(scores: Float32Array): number {
  let best = 0;
  for (let i = 1; i < scores.length; i++) if (scores[i]! > scores[best]!) best = i;
  return best;
}
