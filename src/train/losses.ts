/**
 * BLIP-2's training losses as graph pieces, named after the paper:
 * - `itcLoss`: image-text contrastive, queries' best match against the text's [CLS];
 * - `itmLoss`: image-text matching, a binary classifier over the query outputs;
 * - `itgLoss`: image-grounded text generation, BERT's LM head under the multimodal causal mask;
 * - `lmLoss`: the language model's next-token loss on the caption (stage 2).
 * Each returns a scalar; targets come in as int64 tensors and the per-row weights as float32
 * tensors (1 / labelled count, or 0 for ignored rows), so that "mean over labelled tokens" and
 * ignore_index are plain weighted sums in the graph.
 */
import { attr, type Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { detach } from "../autodiff/backward.js";

/** LAVIS's label smoothing for ITC and ITG. */
export const LABEL_SMOOTHING = 0.1;

function logSoftmax(x: Value): Value {
  return x.graph.addNode("LogSoftmax", [x], { axis: attr.int(-1) }, [{ dtype: x.dtype, shape: x.shape }])[0]!;
}

/**
 * torch's cross_entropy over rows of `logits` [N, C] with `targets` [N] (int64, any value where
 * the weight is 0) and label smoothing ε: -Σ_i w_i ((1 - ε) log p_i[t_i] + ε/C Σ_c log p_i[c]).
 */
export function crossEntropy(logits: Value, targets: Value, weights: Value, smoothing = 0): Value {
  const g = logits.graph;
  const classes = logits.dim(-1) as number;
  const logp = logSoftmax(logits);
  const picked = op.squeeze(g.addNode("GatherElements", [logp, op.unsqueeze(targets, [1])], { axis: attr.int(1) }, [{ dtype: "float32", shape: [logits.dim(0), 1] }])[0]!, [1]);
  let perRow = op.mul(picked, g.scalar(1 - smoothing));
  if (smoothing > 0) perRow = op.add(perRow, op.mul(op.reduceSum(logp, [-1], false), g.scalar(smoothing / classes)));
  return op.neg(op.reduceSum(op.mul(perRow, weights), [0], false));
}

/** Cross-entropy with every row counted once (mean over rows). */
export function meanCrossEntropy(logits: Value, targets: Value, smoothing = 0): Value {
  const g = logits.graph;
  const rows = logits.dim(0) as number;
  return crossEntropy(logits, targets, g.constant(new Float32Array(rows).fill(1 / rows), "float32", [rows]), smoothing);
}

export interface ItcOutputs {
  loss: Value;
  simI2t: Value;
  simT2i: Value;
}

/**
 * ITC as LAVIS computes it on one process: `imageFeats` [B, Q, E] and `textFeat` [B, E] normalized;
 * sim_i2t[i, j] = max_q v[i, q]·t[j] / temp with the text side detached, sim_t2i[i, j] =
 * max_q t[i]·v[j, q] / temp with the image side detached (LAVIS gathers the other side across
 * processes without gradient); the mean of both cross-entropies, targets on the diagonal.
 */
export function itcLoss(imageFeats: Value, textFeat: Value, temp: Value): ItcOutputs {
  const g = imageFeats.graph;
  const [b, q, e] = imageFeats.shape as number[];
  const perQueryI2t = op.matmul(imageFeats, op.transpose(detach(textFeat), [1, 0]));
  const simI2t = op.div(op.reduceMax(perQueryI2t, [1], false), temp);
  const queriesFlat = op.reshape(detach(imageFeats), [b! * q!, e!]);
  const perQueryT2i = op.reshape(op.matmul(textFeat, op.transpose(queriesFlat, [1, 0])), [b!, b!, q!]);
  const simT2i = op.div(op.reduceMax(perQueryT2i, [2], false), temp);
  const diagonal = g.constant(BigInt64Array.from({ length: b! }, (_, i) => BigInt(i)), "int64", [b!]);
  const both = op.add(meanCrossEntropy(simI2t, diagonal, LABEL_SMOOTHING), meanCrossEntropy(simT2i, diagonal, LABEL_SMOOTHING));
  return { loss: op.mul(both, g.scalar(0.5)), simI2t, simT2i };
}

/** ITM: logits [3B, 2] for B positive pairs followed by 2B negative ones; plain cross-entropy. */
export function itmLoss(logits: Value): Value {
  const g = logits.graph;
  const n = logits.dim(0) as number;
  const positives = n / 3;
  const labels = g.constant(BigInt64Array.from({ length: n }, (_, i) => (i < positives ? 1n : 0n)), "int64", [n]);
  return meanCrossEntropy(logits, labels);
}

/**
 * ITG / LM: `logits` [B, T, V] predict the token after each position; `targets` and `weights` are
 * [B, T - 1] for positions 0..T-2 (the labels shifted left by the caller, ignored ones weighted 0).
 */
export function nextTokenLoss(logits: Value, targets: Value, weights: Value, smoothing: number): Value {
  const [b, t, v] = logits.shape as number[];
  const shifted = op.reshape(op.slice(logits, [0], [t! - 1], [1]), [b! * (t! - 1), v!]);
  return crossEntropy(shifted, op.reshape(targets, [-1]), op.reshape(weights, [-1]), smoothing);
}

export const itgLoss = (logits: Value, targets: Value, weights: Value) => nextTokenLoss(logits, targets, weights, LABEL_SMOOTHING);
export const lmLoss = (logits: Value, targets: Value, weights: Value) => nextTokenLoss(logits, targets, weights, 0);

/**
 * Shifted targets and weights from labels [B, T] (-100 = ignored): targets[i, j] = labels[i, j + 1],
 * each labelled one weighted 1 / (labelled count), as torch's mean over non-ignored tokens.
 */
export function shiftedTargets(labels: number[][]): { targets: BigInt64Array; weights: Float32Array; shape: [number, number] } {
  const b = labels.length;
  const t = labels[0]!.length;
  const targets = new BigInt64Array(b * (t - 1));
  const mask = new Float32Array(b * (t - 1));
  let count = 0;
  labels.forEach((row, i) => {
    for (let j = 0; j + 1 < t; j++) {
      const label = row[j + 1]!;
      if (label === -100) continue;
      targets[i * (t - 1) + j] = BigInt(label);
      mask[i * (t - 1) + j] = 1;
      count++;
    }
  });
  const weights = mask.map((m) => (count ? m / count : 0));
  return { targets, weights, shape: [b, t - 1] };
}
