/**
 * The Querying Transformer: a BERT-style (post-LN) encoder whose input is the learned query tokens,
 * optionally followed by text tokens. Queries and text share self-attention; only the queries
 * cross-attend to the image features (every `cross_attention_frequency`-th layer), and queries and
 * text have separate feed-forward weights.
 */
import type { QFormerConfig } from "../config.js";
import type { Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { dropout, type DropoutContext } from "./dropout.js";
import { activation, attend, layerNormLayer, linearLayer, mergeHeads, paddingBias, Params, splitHeads, type KeyValue } from "./layers.js";

export interface QFormerInputs {
  /** [B, Q, D] query embeddings (the expanded `query_tokens`), or null for text-only. */
  queryEmbeds: Value | null;
  /** [B, T, D] text embeddings placed after the queries, or null. */
  textEmbeds: Value | null;
  /** [B, Q + T] int64 mask over the whole sequence; null means attend everywhere. */
  attentionMask: Value | null;
  /**
   * An additive self-attention bias [B, 1, Q + T, Q + T] in place of `attentionMask`, for masks that
   * differ per row: ITG's multimodal causal mask (queries see queries, text sees the queries and
   * the text up to itself).
   */
  attentionBias?: Value;
  /** [B, N, encoder_hidden_size] image features to cross-attend to; null for text-only. */
  imageEmbeds: Value | null;
  /**
   * The cross-attention keys and values of the image features, by layer (`imageKeyValues`), in
   * place of computing them from `imageEmbeds`: training computes them once per image and gathers
   * them for every pass that looks at that image.
   */
  imageKeyValues?: Map<number, KeyValue>;
  /** How many leading positions are queries. */
  queryLength: number;
  /**
   * Training: dropout as BERT places it (after the embeddings' LayerNorm, on the attention
   * probabilities, on each output dense before its residual LayerNorm), at the config's rates.
   */
  dropout?: DropoutContext;
}

export interface QFormerOutputs {
  lastHiddenState: Value;
  /** The normalized input embeddings, then each layer's output. */
  hiddenStates: Value[];
}

/** Transformers masks Q-Former attention with -10000, not the dtype's minimum. */
export const MASKED = -10000;

export function qformer(p: Params, cfg: QFormerConfig, inputs: QFormerInputs): QFormerOutputs {
  const parts = [inputs.queryEmbeds, inputs.textEmbeds].filter((v): v is Value => v !== null);
  const drop = inputs.dropout;
  let x = layerNormLayer(p.at("layernorm"), parts.length === 1 ? parts[0]! : op.concat(parts, 1), cfg.hiddenSize, cfg.layerNormEps);
  x = dropout(x, cfg.hiddenDropoutProb, drop);
  const bias = inputs.attentionBias ?? (inputs.attentionMask ? paddingBias(inputs.attentionMask, MASKED) : null);
  const hiddenStates = [x];
  for (let i = 0; i < cfg.numHiddenLayers; i++) {
    const hasCrossAttention = (inputs.imageEmbeds !== null || inputs.imageKeyValues !== undefined) && i % cfg.crossAttentionFrequency === 0;
    const image = hasCrossAttention ? (inputs.imageKeyValues?.get(i) ?? inputs.imageEmbeds) : null;
    x = layer(p.at("encoder.layer").at(i), cfg, x, bias, image, inputs.queryLength, inputs.textEmbeds !== null, drop);
    hiddenStates.push(x);
  }
  return { lastHiddenState: x, hiddenStates };
}

function layer(p: Params, cfg: QFormerConfig, x: Value, bias: Value | null, image: Value | KeyValue | null, queryLength: number, hasText: boolean, drop?: DropoutContext): Value {
  const attended = attentionBlock(p.at("attention"), cfg, x, x, cfg.hiddenSize, bias, drop);
  if (queryLength === 0) return feedForward(p, "", cfg, attended, drop);
  let queries = queryLength > 0 && hasText ? op.slice(attended, [0], [queryLength], [1]) : attended;
  if (image) queries = attentionBlock(p.at("crossattention"), cfg, queries, image, cfg.encoderHiddenSize, null, drop);
  const queryOut = feedForward(p, "_query", cfg, queries, drop);
  if (!hasText) return queryOut;
  const text = op.slice(attended, [queryLength], [2 ** 62], [1]);
  return op.concat([queryOut, feedForward(p, "", cfg, text, drop)], 1);
}

/** BERT attention: multi-head attention, output dense, then LayerNorm(dense + input). */
function attentionBlock(p: Params, cfg: QFormerConfig, x: Value, context: Value | KeyValue, contextSize: number, bias: Value | null, drop?: DropoutContext): Value {
  const d = cfg.hiddenSize;
  const heads = cfg.numAttentionHeads;
  const a = p.at("attention");
  const q = splitHeads(linearLayer(a.at("query"), x, d, d), heads);
  const { key: k, value: v } = "key" in context ? context : keyValues(a, cfg, context, contextSize);
  const dropProbs = drop && ((probs: Value) => dropout(probs, cfg.attentionProbsDropoutProb, drop));
  const weighted = mergeHeads(attend(q, k, v, (d / heads) ** -0.5, bias, dropProbs));
  const out = dropout(linearLayer(p.at("output.dense"), weighted, d, d), cfg.hiddenDropoutProb, drop);
  return layerNormLayer(p.at("output.LayerNorm"), op.add(out, x), d, cfg.layerNormEps);
}

/** An attention's keys and values of `context`, heads split: [B, H, N, Dh] each. */
function keyValues(a: Params, cfg: QFormerConfig, context: Value, contextSize: number): KeyValue {
  const d = cfg.hiddenSize;
  const heads = cfg.numAttentionHeads;
  return {
    key: splitHeads(linearLayer(a.at("key"), context, contextSize, d), heads),
    value: splitHeads(linearLayer(a.at("value"), context, contextSize, d), heads),
  };
}

/** The cross-attention keys and values of image features for every layer that has cross-attention. */
export function imageKeyValues(p: Params, cfg: QFormerConfig, imageEmbeds: Value): Map<number, KeyValue> {
  const out = new Map<number, KeyValue>();
  for (let i = 0; i < cfg.numHiddenLayers; i += cfg.crossAttentionFrequency) {
    out.set(i, keyValues(p.at("encoder.layer").at(i).at("crossattention.attention"), cfg, imageEmbeds, cfg.encoderHiddenSize));
  }
  return out;
}

/** Feed-forward: `intermediate{suffix}` (dense + act), `output{suffix}` (dense, LayerNorm with residual). */
function feedForward(p: Params, suffix: "" | "_query", cfg: QFormerConfig, x: Value, drop?: DropoutContext): Value {
  const d = cfg.hiddenSize;
  const h = activation(linearLayer(p.at(`intermediate${suffix}.dense`), x, d, cfg.intermediateSize), cfg.hiddenAct);
  const out = dropout(linearLayer(p.at(`output${suffix}.dense`), h, cfg.intermediateSize, d), cfg.hiddenDropoutProb, drop);
  return layerNormLayer(p.at(`output${suffix}.LayerNorm`), op.add(out, x), d, cfg.layerNormEps);
}

/** Q-Former text embeddings: word + absolute position embeddings (normalized later by `layernorm`). */
export function qformerTextEmbeddings(p: Params, cfg: QFormerConfig, inputIds: Value): Value {
  const g = inputIds.graph;
  const words = op.gather(p.get("word_embeddings.weight", [cfg.vocabSize, cfg.hiddenSize]), inputIds);
  const length = op.slice(op.shapeOf(inputIds), [1], [2], [0]);
  const positions = op.range(g.scalar(0, "int64"), op.squeeze(length, [0]), g.scalar(1, "int64"), inputIds.dim(1));
  const pos = op.gather(p.get("position_embeddings.weight", [cfg.maxPositionEmbeddings, cfg.hiddenSize]), positions);
  return op.add(words, pos);
}
