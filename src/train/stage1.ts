/**
 * BLIP-2's first stage (representation learning, LAVIS `Blip2Qformer.forward`) as one graph: the
 * Q-Former between the frozen image encoder's cached features and text, trained with
 * ITC + ITM + ITG, forward and backward together.
 *
 * Image features come in before `vision_model.post_layernorm` (what a trainer can cache), and the
 * post-LayerNorm is trained (LAVIS's `ln_vision`).
 *
 * Three Q-Former passes per step, as few as the losses allow:
 * - queries and the [DEC] text together under the multimodal causal mask: the query rows see only
 *   queries, so they are the ITC image side's query output, and the text rows give ITG (LAVIS runs
 *   the queries once and reuses their keys and values for ITG; this is that, in one pass);
 * - the text alone (ITC's text side);
 * - queries and text for the 3B ITM pairs.
 * Hard negatives for ITM are drawn inside the graph from the ITC similarities (inverse CDF of each
 * row's softmax against uniforms the trainer feeds, so its generator decides them and a resumed
 * run draws the same), or given as indices.
 */
import type { Blip2Config } from "../config.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { Graph, type Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { gradients } from "../autodiff/backward.js";
import { DropoutContext } from "../models/dropout.js";
import { activation, expandToBatch, layerNormLayer, linearLayer, Params } from "../models/layers.js";
import { imageKeyValues, MASKED, qformer, qformerTextEmbeddings } from "../models/qformer.js";
import { normalize } from "../models/retrieval.js";
import { itcLoss, itgLoss, itmLoss } from "./losses.js";

/** Stage 1 trains everything but the image encoder, whose last LayerNorm it does train. */
export function stage1Trained(name: string): boolean {
  return !name.startsWith("vision_model.") || name.startsWith("vision_model.post_layernorm.");
}

export interface Stage1Shape {
  batch: number;
  /** Text length (padded). */
  length: number;
}

interface Stage1Inputs {
  features: Value;
  inputIds: Value;
  attentionMask: Value;
}

function stage1Inputs(g: Graph, cfg: Blip2Config, s: Stage1Shape): Stage1Inputs {
  const patches = (cfg.vision.imageSize / cfg.vision.patchSize) ** 2 + 1;
  return {
    features: g.input("image_features", "float32", [s.batch, patches, cfg.vision.hiddenSize]),
    inputIds: g.input("input_ids", "int64", [s.batch, s.length]),
    attentionMask: g.input("attention_mask", "int64", [s.batch, s.length]),
  };
}

/** The image embeddings: post-LayerNorm of the cached features (trained, LAVIS's `ln_vision`). */
function imageEmbeddings(root: Params, cfg: Blip2Config, features: Value): Value {
  return layerNormLayer(root.at("vision_model.post_layernorm"), features, cfg.vision.hiddenSize, cfg.vision.layerNormEps);
}

/** ITC's image side: each query's output projected and normalized. */
function imageFeatsOf(root: Params, cfg: Blip2Config, queryOutput: Value): Value {
  return normalize(linearLayer(root.at("vision_projection"), queryOutput, cfg.qformer.hiddenSize, cfg.imageTextHiddenSize));
}

/** The text side: the Q-Former over the text alone, the [CLS] output projected and normalized. */
function textSide(root: Params, cfg: Blip2Config, inputIds: Value, attentionMask: Value, dropout?: DropoutContext): Value {
  const text = qformer(root.at("qformer"), cfg.qformer, {
    queryEmbeds: null,
    textEmbeds: qformerTextEmbeddings(root.at("embeddings"), cfg.qformer, inputIds),
    attentionMask,
    imageEmbeds: null,
    queryLength: 0,
    dropout,
  }).lastHiddenState;
  const cls = op.squeeze(op.slice(text, [0], [1], [1]), [1]);
  return normalize(linearLayer(root.at("text_projection"), cls, cfg.qformer.hiddenSize, cfg.imageTextHiddenSize));
}

export interface Stage1GraphOptions {
  /** Also output the ITM and ITG logits (for tests and `blip2 grad`). */
  logits?: boolean;
  /**
   * "given": the hard negatives come in as `image_for_text`/`text_for_image` [B]; "drawn" (default):
   * drawn in the graph with the uniforms `negative_draws` [2, B] (texts' images, then images' texts).
   */
  negatives?: "given" | "drawn";
  /**
   * Dropout in the Q-Former at the config's rates, its masks drawn from an int64 scalar input
   * `dropout_seed` (models/dropout.ts). The image encoder is frozen and runs without dropout, in
   * eval mode, as LAVIS keeps it.
   */
  dropout?: boolean;
}

/**
 * The stage-1 training graph. Inputs: `image_features` [B, N, D] (before post_layernorm),
 * `input_ids`/`attention_mask` [B, T], `decoder_input_ids` [B, T] (the ids with [DEC] first),
 * `itg_bias` [B, 1, Q + T, Q + T] (`multimodalCausalBias`), `itg_targets`/`itg_weights` [B, T - 1]
 * (`shiftedTargets`), the hard negatives (see `negatives`), and every trained tensor under its
 * checkpoint name. Outputs: `loss`, `loss_itc`, `loss_itm`, `loss_itg`, `sim_i2t`, `sim_t2i`,
 * `image_for_text`, `text_for_image`, and `grad.<name>` for every trained tensor.
 */
export function stage1Graph(ckpt: Checkpoint, s: Stage1Shape, options: Stage1GraphOptions = {}): Graph {
  const cfg = ckpt.config;
  const q = cfg.numQueryTokens;
  const d = cfg.qformer.hiddenSize;
  const g = new Graph("stage1");
  g.trainable = stage1Trained;
  const root = new Params(g, ckpt);
  const x = stage1Inputs(g, cfg, s);
  const decoderIds = g.input("decoder_input_ids", "int64", [s.batch, s.length]);
  const itgBias = g.input("itg_bias", "float32", [s.batch, 1, q + s.length, q + s.length]);
  const itgTargets = g.input("itg_targets", "int64", [s.batch, s.length - 1]);
  const itgWeights = g.input("itg_weights", "float32", [s.batch, s.length - 1]);
  const dropout = options.dropout ? DropoutContext.input(g) : undefined;
  const imageEmbeds = imageEmbeddings(root, cfg, x.features);
  const queryTokens = root.get("query_tokens", [1, q, d]);

  // Each image's cross-attention keys and values, once: the ITM pass gathers them.
  const imageKv = imageKeyValues(root.at("qformer"), cfg.qformer, imageEmbeds);

  // Queries and the [DEC] text in one pass: the query rows are ITC's, the text rows ITG's.
  const joint = qformer(root.at("qformer"), cfg.qformer, {
    queryEmbeds: expandToBatch(queryTokens, imageEmbeds),
    textEmbeds: qformerTextEmbeddings(root.at("embeddings"), cfg.qformer, decoderIds),
    attentionMask: null,
    attentionBias: itgBias,
    imageEmbeds: null,
    imageKeyValues: imageKv,
    queryLength: q,
    dropout,
  }).lastHiddenState;
  const imageFeats = imageFeatsOf(root, cfg, op.slice(joint, [0], [q], [1]));
  const itc = itcLoss(imageFeats, textSide(root, cfg, x.inputIds, x.attentionMask, dropout), root.get("temp", []));
  const itgLogits = itgHead(root, cfg, op.slice(joint, [q], [2 ** 62], [1]));
  const lossItg = itgLoss(itgLogits, itgTargets, itgWeights);

  let imageForText: Value;
  let textForImage: Value;
  if (options.negatives === "given") {
    imageForText = g.input("image_for_text", "int64", [s.batch]);
    textForImage = g.input("text_for_image", "int64", [s.batch]);
  } else {
    const draws = g.input("negative_draws", "float32", [2, s.batch]);
    imageForText = drawNegatives(itc.simT2i, op.squeeze(op.slice(draws, [0], [1], [0]), [0]));
    textForImage = drawNegatives(itc.simI2t, op.squeeze(op.slice(draws, [1], [2], [0]), [0]));
  }

  // ITM: B positive pairs, B texts with a hard negative image, B images with a hard negative text.
  const same = g.constant(BigInt64Array.from({ length: s.batch }, (_, i) => BigInt(i)), "int64", [s.batch]);
  const imageRows = op.concat([same, imageForText, same], 0);
  const textRows = op.concat([same, same, textForImage], 0);
  const itmKv = new Map([...imageKv].map(([layer, kv]) => [layer, { key: op.gather(kv.key, imageRows), value: op.gather(kv.value, imageRows) }]));
  const itmIds = op.gather(x.inputIds, textRows);
  const itmMask = op.gather(x.attentionMask, textRows);
  const queryMask = g.constant(new BigInt64Array(3 * s.batch * q).fill(1n), "int64", [3 * s.batch, q]);
  const itmOut = qformer(root.at("qformer"), cfg.qformer, {
    queryEmbeds: expandToBatch(queryTokens, itmIds),
    textEmbeds: qformerTextEmbeddings(root.at("embeddings"), cfg.qformer, itmIds),
    attentionMask: op.concat([queryMask, itmMask], 1),
    imageEmbeds: null,
    imageKeyValues: itmKv,
    queryLength: q,
    dropout,
  }).lastHiddenState;
  const itmLogits = op.reduceMean(linearLayer(root.at("itm_head"), op.slice(itmOut, [0], [q], [1]), d, 2), [1], false);
  const lossItm = itmLoss(itmLogits);

  const loss = op.add(op.add(itc.loss, lossItm), lossItg);
  g.output(loss, "loss");
  g.output(itc.loss, "loss_itc");
  g.output(lossItm, "loss_itm");
  g.output(lossItg, "loss_itg");
  g.output(itc.simI2t, "sim_i2t");
  g.output(itc.simT2i, "sim_t2i");
  g.output(imageForText, "image_for_text_drawn");
  g.output(textForImage, "text_for_image_drawn");
  if (options.logits) {
    g.output(itmLogits, "itm_logits");
    g.output(itgLogits, "itg_logits");
  }
  const trained = [...g.trained.entries()];
  gradients(loss, trained.map(([, v]) => v)).forEach((grad, i) => g.output(grad, `grad.${trained[i]![0]}`));
  return g;
}

/**
 * One index per row of `sim` [B, B], drawn from softmax(row) with the row's own pair excluded, given `u` in (0, 1]
 * (LAVIS sets the diagonal to -10000 before the softmax): the first index whose cumulative weight
 * exceeds the row's uniform `u` [B]. Integers all the way, so no gradient flows through the draw.
 */
function drawNegatives(sim: Value, u: Value): Value {
  const g = sim.graph;
  const b = sim.dim(0) as number;
  const eye = g.constant(Uint8Array.from({ length: b * b }, (_, i) => (i % (b + 1) === 0 ? 1 : 0)), "bool", [b, b]);
  const cumulative = op.cumsum(op.softmax(op.where(eye, g.scalar(-10000), sim), -1), 1);
  // u in (0, 1] scaled to the row's total (1 up to rounding): the draw never lands past the end.
  const target = op.mul(op.unsqueeze(u, [1]), op.reduceMax(cumulative, [1]));
  const below = op.cast(op.less(cumulative, target), "int64");
  return op.min(op.reduceSum(below, [1], false), g.scalar(b - 1, "int64"));
}

/**
 * BERT's LM head (`cls.predictions`): dense, gelu, LayerNorm, then the decoder tied to the word
 * embeddings plus its own bias.
 */
function itgHead(root: Params, cfg: Blip2Config, hidden: Value): Value {
  const d = cfg.qformer.hiddenSize;
  const vocab = cfg.qformer.vocabSize;
  const head = root.at("cls.predictions");
  const t = head.at("transform");
  let h = activation(linearLayer(t.at("dense"), hidden, d, d), cfg.qformer.hiddenAct);
  h = layerNormLayer(t.at("LayerNorm"), h, d, cfg.qformer.layerNormEps);
  const words = root.at("embeddings").get("word_embeddings.weight", [vocab, d]);
  return op.add(op.matmul(h, op.transpose(words, [1, 0])), head.get("bias", [vocab]));
}

/**
 * ITG's self-attention bias [B, 1, Q + T, Q + T]: queries attend to queries only; text position j
 * attends to every query and to text positions up to j that are not padding. Masked entries get
 * the Q-Former's -10000, as transformers' extended attention mask does.
 */
export function multimodalCausalBias(attentionMask: number[][], queries: number): Float32Array {
  const b = attentionMask.length;
  const t = attentionMask[0]!.length;
  const n = queries + t;
  const out = new Float32Array(b * n * n);
  attentionMask.forEach((mask, i) => {
    for (let row = 0; row < n; row++) {
      for (let col = 0; col < n; col++) {
        const seen = col < queries ? true : row >= queries && col <= row && mask[col - queries] === 1;
        out[(i * n + row) * n + col] = seen ? 0 : MASKED;
      }
    }
  });
  return out;
}
