/**
 * BLIP-2's second stage (generative learning) as one graph: the Q-Former's queries, projected by
 * `language_projection`, are soft visual prompts in front of a frozen language model, trained with
 * its language-modelling loss: OPT's next-token loss on the caption (LAVIS `Blip2OPT`), or T5's
 * prefix language modelling (the prompt to the encoder, the caption as the decoder's labels,
 * LAVIS `Blip2T5`). The language model's weights are frozen: gradients only pass through it to the
 * visual prompts. Frozen is not eval mode, though: LAVIS sets `requires_grad = False` on the LM's
 * weights but, unlike its image encoder, leaves it in train mode, so its dropout is on in training.
 */
import * as ort from "onnxruntime-node";
import type { Blip2Config, OptConfig, T5Config } from "../config.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { Graph, type Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { gradients } from "../autodiff/backward.js";
import { textHiddenSize } from "../models/blip2.js";
import { DropoutContext } from "../models/dropout.js";
import { expandToBatch, layerNormLayer, linearLayer, Params } from "../models/layers.js";
import { optDecoder, optEmbedTokens } from "../models/opt.js";
import { qformer } from "../models/qformer.js";
import { relativePositionBuckets, t5CrossKeyValues, t5Decoder, t5EmbedTokens, t5Encoder } from "../models/t5.js";
import { visionEncoder } from "../models/vision.js";
import { crossEntropy, lmLoss, shiftedTargets } from "./losses.js";

/** Stage 2 trains the Q-Former, its queries, the projection and the image encoder's last LayerNorm. */
export function stage2Trained(name: string): boolean {
  return name.startsWith("qformer.") || name === "query_tokens" || name.startsWith("language_projection.") || name.startsWith("vision_model.post_layernorm.");
}

export interface Stage2Shape {
  batch: number;
  /** Text tokens after the image tokens (OPT: the whole text; T5: the encoder's prompt). */
  length: number;
  /** T5: the decoder's length (the labels'). */
  targetLength?: number;
}

/** pixel_values -> the frozen image encoder's last hidden state before post_layernorm (what training caches). */
export function imageFeaturesGraph(ckpt: Checkpoint): Graph {
  const cfg = ckpt.config;
  const g = new Graph("image_features");
  const size = cfg.vision.imageSize;
  const pixels = g.input("pixel_values", "float32", ["batch", 3, size, size]);
  const vision = visionEncoder(new Params(g, ckpt).at("vision_model"), cfg.vision, pixels);
  g.output(vision.hiddenStates[vision.hiddenStates.length - 1]!, "image_features");
  return g;
}

/** Cached image features -> the visual prompts [B, Q, LM hidden size]; `dropout` in the Q-Former when training with it. */
export function visualPrompts(root: Params, cfg: Blip2Config, features: Value, dropout?: DropoutContext): Value {
  const imageEmbeds = layerNormLayer(root.at("vision_model.post_layernorm"), features, cfg.vision.hiddenSize, cfg.vision.layerNormEps);
  const queries = qformer(root.at("qformer"), cfg.qformer, {
    queryEmbeds: expandToBatch(root.get("query_tokens", [1, cfg.numQueryTokens, cfg.qformer.hiddenSize]), imageEmbeds),
    textEmbeds: null,
    attentionMask: null,
    imageEmbeds,
    queryLength: cfg.numQueryTokens,
    dropout,
  }).lastHiddenState;
  return linearLayer(root.at("language_projection"), queries, cfg.qformer.hiddenSize, textHiddenSize(cfg));
}

export interface Stage2GraphOptions {
  /**
   * Dropout in the Q-Former and the frozen language model at their configs' rates, all masks drawn
   * from one int64 scalar input `dropout_seed` (models/dropout.ts). The frozen image encoder runs
   * without dropout: LAVIS puts it in eval mode (`visual_encoder.train = disabled_train`). Its
   * frozen LM it does not (lavis/models/blip2_models/blip2_opt.py, blip2_t5.py: only
   * `requires_grad = False`, and the runner's `model.train()` reaches it), so OPT's `dropout` and
   * `attention_dropout`, and T5's `dropout_rate`, apply as in transformers' training mode.
   */
  dropout?: boolean;
  /** Build the backward part (default true); without it the graph gives the loss only (evaluation). */
  gradients?: boolean;
}

const dropoutFor = (g: Graph, options: Stage2GraphOptions) => (options.dropout ? DropoutContext.input(g) : undefined);

function featuresInput(g: Graph, cfg: Blip2Config, batch: number): Value {
  const patches = (cfg.vision.imageSize / cfg.vision.patchSize) ** 2 + 1;
  return g.input("image_features", "float32", [batch, patches, cfg.vision.hiddenSize]);
}

/** Outputs the loss and, unless asked not to, `grad.<name>` of every trained tensor. */
function finish(g: Graph, loss: Value, options: Stage2GraphOptions): Graph {
  g.output(loss, "loss");
  if (options.gradients === false) return g;
  const trained = [...g.trained.entries()];
  gradients(loss, trained.map(([, v]) => v)).forEach((grad, i) => g.output(grad, `grad.${trained[i]![0]}`));
  return g;
}

/**
 * Stage 2 through a frozen OPT. Inputs: `image_features`, `input_ids` [B, T] (the text after the
 * image tokens), `attention_mask` [B, Q + T], `lm_targets`/`lm_weights` [B, Q + T - 1] from the
 * labels over the whole sequence (`shiftedTargets`).
 */
export function stage2OptGraph(ckpt: Checkpoint, s: Stage2Shape, options: Stage2GraphOptions = {}): Graph {
  const cfg = ckpt.config;
  const text = cfg.text as OptConfig;
  const q = cfg.numQueryTokens;
  const g = new Graph("stage2_opt");
  g.trainable = stage2Trained;
  const root = new Params(g, ckpt);
  const features = featuresInput(g, cfg, s.batch);
  const ids = g.input("input_ids", "int64", [s.batch, s.length]);
  const mask = g.input("attention_mask", "int64", [s.batch, q + s.length]);
  const targets = g.input("lm_targets", "int64", [s.batch, q + s.length - 1]);
  const weights = g.input("lm_weights", "float32", [s.batch, q + s.length - 1]);
  const drop = dropoutFor(g, options);
  const prompts = visualPrompts(root, cfg, features, drop);
  const lm = new Params(g, ckpt, "language_model.");
  const decoder = lm.at("model.decoder");
  const embeds = op.concat([prompts, optEmbedTokens(decoder, text, ids)], 1);
  const total = q + s.length;
  const heads = text.numAttentionHeads;
  const noCache = Array.from({ length: text.numHiddenLayers }, () => {
    const empty = g.constant(new Float32Array(0), "float32", [s.batch, heads, 0, text.hiddenSize / heads]);
    return { key: empty, value: empty };
  });
  const everyPosition = g.ints(Array.from({ length: total }, (_, i) => i));
  const logits = optDecoder(decoder, lm, text, embeds, mask, noCache, everyPosition, drop).logits;
  return finish(g, lmLoss(logits, targets, weights), options);
}

/**
 * Stage 2 through a frozen T5. Inputs: `image_features`, `input_ids` [B, T] (the prompt after the
 * image tokens, to the encoder), `attention_mask` [B, Q + T], `encoder_buckets` [Q + T, Q + T] and
 * `decoder_buckets` [L, L] (relative positions, `relativePositionBuckets`), `decoder_input_ids`
 * and `decoder_attention_mask` [B, L] (the labels shifted right), `lm_targets`/`lm_weights` [B, L]
 * (the labels, unshifted: T5's decoder input is already shifted).
 */
export function stage2T5Graph(ckpt: Checkpoint, s: Stage2Shape, options: Stage2GraphOptions = {}): Graph {
  const cfg = ckpt.config;
  const text = cfg.text as T5Config;
  const q = cfg.numQueryTokens;
  const l = s.targetLength!;
  const g = new Graph("stage2_t5");
  g.trainable = stage2Trained;
  const root = new Params(g, ckpt);
  const features = featuresInput(g, cfg, s.batch);
  const ids = g.input("input_ids", "int64", [s.batch, s.length]);
  const mask = g.input("attention_mask", "int64", [s.batch, q + s.length]);
  const encoderBuckets = g.input("encoder_buckets", "int64", [q + s.length, q + s.length]);
  const decoderIds = g.input("decoder_input_ids", "int64", [s.batch, l]);
  const decoderMask = g.input("decoder_attention_mask", "int64", [s.batch, l]);
  const decoderBuckets = g.input("decoder_buckets", "int64", [l, l]);
  const targets = g.input("lm_targets", "int64", [s.batch, l]);
  const weights = g.input("lm_weights", "float32", [s.batch, l]);
  const drop = dropoutFor(g, options);
  const prompts = visualPrompts(root, cfg, features, drop);
  const lm = new Params(g, ckpt, "language_model.");
  const embeds = op.concat([prompts, t5EmbedTokens(lm, text, ids)], 1);
  const encoded = t5Encoder(lm, text, embeds, mask, encoderBuckets, drop).lastHiddenState;
  const cross = t5CrossKeyValues(lm, text, encoded);
  const everyPosition = g.ints(Array.from({ length: l }, (_, i) => i));
  const logits = t5Decoder(lm, text, decoderIds, decoderBuckets, decoderMask, mask, cross, null, everyPosition, drop).logits;
  const v = text.vocabSize;
  return finish(g, crossEntropy(op.reshape(logits, [s.batch * l, v]), op.reshape(targets, [-1]), op.reshape(weights, [-1])), options);
}


/** The stage-2 graph for the checkpoint's language model. */
export function stage2Graph(ckpt: Checkpoint, s: Stage2Shape, options: Stage2GraphOptions = {}): Graph {
  return ckpt.config.text.modelType === "opt" ? stage2OptGraph(ckpt, s, options) : stage2T5Graph(ckpt, s, options);
}

/** One stage-2 batch as token ids, in the processor's layout (image tokens first where the checkpoint has them). */
export interface Stage2Batch {
  inputIds: number[][];
  attentionMask: number[][];
  /** OPT: over the whole input (image tokens included, -100 there); T5: the decoder's targets. */
  labels: number[][];
  /** T5: the labels' mask (default: where labels are not -100). */
  decoderAttentionMask?: number[][];
}

/**
 * The graph's feeds for a batch: image tokens taken out of the ids (the visual prompts take their
 * place), the mask and labels over [queries; text], the shifted targets, T5's decoder inputs and
 * relative-position buckets.
 */
export function stage2Feeds(cfg: Blip2Config, batch: Stage2Batch): { shape: Stage2Shape; feeds: Record<string, ort.Tensor> } {
  const q = cfg.numQueryTokens;
  const imageToken = cfg.imageTokenIndex;
  const hasImageTokens = imageToken !== null && batch.inputIds.every((row) => row.slice(0, q).every((id) => id === imageToken));
  const strip = <T>(row: T[]) => (hasImageTokens ? row.slice(q) : row);
  const ids = batch.inputIds.map(strip);
  const textMask = batch.attentionMask.map(strip);
  const mask = textMask.map((row) => [...new Array<number>(q).fill(1), ...row]);
  const b = ids.length;
  const t = ids[0]!.length;
  const feeds: Record<string, ort.Tensor> = { input_ids: int64(ids), attention_mask: int64(mask) };
  if (cfg.text.modelType === "opt") {
    const labels = batch.labels.map((row) => (row.length === q + t ? row : [...new Array<number>(q).fill(-100), ...row]));
    const shifted = shiftedTargets(labels);
    feeds.lm_targets = new ort.Tensor("int64", shifted.targets, shifted.shape);
    feeds.lm_weights = new ort.Tensor("float32", shifted.weights, shifted.shape);
    return { shape: { batch: b, length: t }, feeds };
  }
  const t5 = cfg.text as T5Config;
  const l = batch.labels[0]!.length;
  const decoderIds = batch.labels.map((row) => [t5.decoderStartTokenId, ...row.slice(0, -1)].map((id) => (id === -100 ? (t5.padTokenId ?? 0) : id)));
  const decoderMask = batch.decoderAttentionMask ?? batch.labels.map((row) => row.map((id) => (id === -100 ? 0 : 1)));
  const labelled = batch.labels.flat().filter((id) => id !== -100).length;
  feeds.decoder_input_ids = int64(decoderIds);
  feeds.decoder_attention_mask = int64(decoderMask);
  feeds.lm_targets = int64(batch.labels.map((row) => row.map((id) => (id === -100 ? 0 : id))));
  feeds.lm_weights = new ort.Tensor("float32", Float32Array.from(batch.labels.flat(), (id) => (id === -100 || !labelled ? 0 : 1 / labelled)), [b, l]);
  const positions = (n: number) => Array.from({ length: n }, (_, i) => i);
  feeds.encoder_buckets = new ort.Tensor("int64", relativePositionBuckets(t5, positions(q + t), positions(q + t), true), [q + t, q + t]);
  feeds.decoder_buckets = new ort.Tensor("int64", relativePositionBuckets(t5, positions(l), positions(l), false), [l, l]);
  return { shape: { batch: b, length: t, targetLength: l }, feeds };
}

function int64(rows: number[][]): ort.Tensor {
  return new ort.Tensor("int64", BigInt64Array.from(rows.flat().map(BigInt)), [rows.length, rows[0]!.length]);
}
