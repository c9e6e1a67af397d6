/**
 * The graphs of Blip2ForConditionalGeneration, one per session: image -> language-model inputs
 * (vision encoder, Q-Former, language projection), and the language model's decoder step (OPT:
 * token embeddings and the image's queries placed in the graph) or token embeddings and encoder /
 * cross keys-values / decoder step (T5).
 */
import type { Blip2Config, OptConfig, T5Config } from "../config.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { attr, Graph, type Target, type Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { Params, expandToBatch, linearLayer } from "./layers.js";
import { optDecoder, optEmbedTokens, pastInputs } from "./opt.js";
import { qformer } from "./qformer.js";
import { t5CacheInputs, t5CrossKeyValues, t5Decoder, t5EmbedTokens, t5Encoder } from "./t5.js";
import { visionEncoder } from "./vision.js";

export interface GraphOptions {
  /** Also output every layer's hidden states (for parity checks and the `dump` command). */
  hiddenStates?: boolean;
  /** The device kind the graph runs on (see Graph's Target); default "cpu". */
  target?: Target;
}

/** The new positions' keys and values, for the caller's cache (runtime/kvCache.ts). */
function outputNewKeyValues(g: Graph, present: { key: Value; value: Value }[]): void {
  present.forEach((kv, i) => {
    g.output(kv.key, `new.${i}.key`);
    g.output(kv.value, `new.${i}.value`);
  });
}

function outputList(g: Graph, name: string, values: Value[]): void {
  values.forEach((v, i) => g.output(v, `${name}.${i}`));
}

/**
 * pixel_values [B, 3, H, W] -> vision features, Q-Former query outputs, and (when `project` is set)
 * the language-model inputs [B, Q, text hidden size].
 */
export function imageGraph(ckpt: Checkpoint, options: GraphOptions & { project: boolean }): Graph {
  const cfg = ckpt.config;
  const { g, root, vision, queries } = visionAndQueries(ckpt, "image", options.target);
  if (options.project) {
    const d = cfg.qformer.hiddenSize;
    g.output(linearLayer(root.at("language_projection"), queries.lastHiddenState, d, textHiddenSize(cfg)), "language_model_inputs");
  }
  if (options.hiddenStates) {
    outputList(g, "vision_hidden_states", vision.hiddenStates);
    outputList(g, "qformer_hidden_states", queries.hiddenStates);
  }
  return g;
}

/**
 * A graph from pixel_values [B, 3, H, W] through the vision encoder and the Q-Former's queries,
 * with their outputs (`vision_last_hidden_state`, `vision_pooler_output`, `qformer_last_hidden_state`).
 */
export function visionAndQueries(ckpt: Checkpoint, name: string, target?: Target) {
  const cfg = ckpt.config;
  const g = new Graph(name, target);
  const root = new Params(g, ckpt);
  const size = cfg.vision.imageSize;
  const pixels = g.input("pixel_values", "float32", ["batch", 3, size, size]);
  const vision = visionEncoder(root.at("vision_model"), cfg.vision, pixels);
  const queries = queryOutputs(root, cfg, vision.lastHiddenState);
  g.output(vision.lastHiddenState, "vision_last_hidden_state");
  g.output(vision.poolerOutput, "vision_pooler_output");
  g.output(queries.lastHiddenState, "qformer_last_hidden_state");
  return { g, root, vision, queries };
}

/** The Q-Former over the learned query tokens, cross-attending to the image features. */
export function queryOutputs(root: Params, cfg: Blip2Config, imageEmbeds: Value) {
  const queryTokens = expandToBatch(root.get("query_tokens", [1, cfg.numQueryTokens, cfg.qformer.hiddenSize]), imageEmbeds);
  return qformer(root.at("qformer"), cfg.qformer, {
    queryEmbeds: queryTokens,
    textEmbeds: null,
    attentionMask: null,
    imageEmbeds,
    queryLength: cfg.numQueryTokens,
  });
}

export function textHiddenSize(cfg: Blip2Config): number {
  return cfg.text.modelType === "opt" ? cfg.text.hiddenSize : cfg.text.dModel;
}

/** input_ids [B, S] -> the language model's token embeddings [B, S, D]. */
export function embedGraph(ckpt: Checkpoint, options: GraphOptions = {}): Graph {
  const text = ckpt.config.text;
  const g = new Graph("embed_tokens", options.target);
  const ids = g.input("input_ids", "int64", ["batch", "length"]);
  const root = new Params(g, ckpt, "language_model.");
  g.output(text.modelType === "opt" ? optEmbedTokens(root.at("model.decoder"), text, ids) : t5EmbedTokens(root, text, ids), "inputs_embeds");
  return g;
}

/**
 * One OPT pass over new positions with the key/value cache, from their token ids: `image_index`
 * places the image's projected queries (`image_embeds`, per row) at the positions that take them,
 * so a prompt and each decoding step are one run of one session. A step gives no queries.
 */
export function optDecoderGraph(ckpt: Checkpoint, cfg: OptConfig, options: GraphOptions = {}): Graph {
  const g = new Graph("opt_decoder", options.target);
  const ids = g.input("input_ids", "int64", ["batch", "length"]);
  const imageEmbeds = g.input("image_embeds", "float32", ["batch", "queries", cfg.wordEmbedProjDim]);
  const imageIndex = g.input("image_index", "int64", ["batch", "length"]);
  const mask = g.input("attention_mask", "int64", ["batch", "total"]);
  const past = pastInputs(g, cfg);
  const logitsAt = g.input("logits_positions", "int64", ["positions"]);
  const root = new Params(g, ckpt, "language_model.");
  const decoder = root.at("model.decoder");
  const embeds = placeQueries(optEmbedTokens(decoder, cfg, ids), imageEmbeds, imageIndex);
  const out = optDecoder(decoder, root, cfg, embeds, mask, past, logitsAt);
  g.output(out.logits, "logits");
  outputNewKeyValues(g, out.present);
  if (options.hiddenStates) outputList(g, "lm_hidden_states", out.hiddenStates);
  return g;
}

/**
 * The input embeddings [B, S, D]: at a position whose `imageIndex` is k > 0, the row's k-th query
 * of `imageEmbeds` [B, Q, D]; elsewhere the token's embedding (`tokens`). Index 0 reads a zero slot
 * put before the queries, so rows without queries (Q = 0, a decoding step) gather nothing out of
 * range.
 */
function placeQueries(tokens: Value, imageEmbeds: Value, imageIndex: Value): Value {
  const g = tokens.graph;
  const d = tokens.dim(-1) as number;
  const slots = op.concat([expandToBatch(g.constant(new Float32Array(d), "float32", [1, 1, d]), imageEmbeds), imageEmbeds], 1);
  // GatherND with one batch dimension: row b, position s reads slots[b, imageIndex[b, s]].
  const [queries] = g.addNode("GatherND", [slots, op.unsqueeze(imageIndex, [-1])], { batch_dims: attr.int(1) }, [{ dtype: "float32", shape: tokens.shape }]);
  return op.where(op.unsqueeze(op.less(g.scalar(0, "int64"), imageIndex), [-1]), queries!, tokens);
}

export function t5EncoderGraph(ckpt: Checkpoint, cfg: T5Config, options: GraphOptions = {}): Graph {
  const g = new Graph("t5_encoder", options.target);
  const embeds = g.input("inputs_embeds", "float32", ["batch", "length", cfg.dModel]);
  const mask = g.input("attention_mask", "int64", ["batch", "length"]);
  const buckets = g.input("position_buckets", "int64", ["length", "length"]);
  const out = t5Encoder(new Params(g, ckpt, "language_model."), cfg, embeds, mask, buckets);
  g.output(out.lastHiddenState, "last_hidden_state");
  if (options.hiddenStates) outputList(g, "lm_encoder_hidden_states", out.hiddenStates);
  return g;
}

export function t5CrossGraph(ckpt: Checkpoint, cfg: T5Config, options: GraphOptions = {}): Graph {
  const g = new Graph("t5_cross_key_values", options.target);
  const hidden = g.input("encoder_hidden_states", "float32", ["batch", "encoder_length", cfg.dModel]);
  t5CrossKeyValues(new Params(g, ckpt, "language_model."), cfg, hidden).forEach((kv, i) => {
    g.output(kv.key, `cross.${i}.key`);
    g.output(kv.value, `cross.${i}.value`);
  });
  return g;
}

export function t5DecoderGraph(ckpt: Checkpoint, cfg: T5Config, options: GraphOptions = {}): Graph {
  const g = new Graph("t5_decoder", options.target);
  const ids = g.input("decoder_input_ids", "int64", ["batch", "length"]);
  const buckets = g.input("position_buckets", "int64", ["length", "total"]);
  const mask = g.input("attention_mask", "int64", ["batch", "total"]);
  const encoderMask = g.input("encoder_attention_mask", "int64", ["batch", "encoder_length"]);
  const { past, cross } = t5CacheInputs(g, cfg);
  const logitsAt = g.input("logits_positions", "int64", ["positions"]);
  const out = t5Decoder(new Params(g, ckpt, "language_model."), cfg, ids, buckets, mask, encoderMask, cross, past, logitsAt);
  g.output(out.logits, "logits");
  outputNewKeyValues(g, out.present);
  if (options.hiddenStates) outputList(g, "lm_decoder_hidden_states", out.hiddenStates);
  return g;
}
