/**
 * OPT, the decoder-only language model: learned positions (offset 2, counted from the attention
 * mask), pre-LN blocks with ReLU feed-forward, a final LayerNorm, and the head tied to the token
 * embeddings. The decoder graph takes `inputs_embeds` (so BLIP-2 can place the projected queries)
 * and a key/value cache: the cache's buffers in (slots masked by the attention mask), the new
 * positions' keys/values out.
 *
 * In training (a dropout context given), dropout as transformers' OPT places it: `dropout` on the
 * self-attention's output and on fc2's, each before its residual, and `attention_dropout` on the
 * attention probabilities. Nothing on the embeddings, and no `activation_dropout`: transformers'
 * OPT reads that field but never applies it.
 */
import type { OptConfig } from "../config.js";
import type { Graph, Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { dropout, type DropoutContext } from "./dropout.js";
import { activation, attend, attendWithCacheFused, causalBias, layerNormLayer, linearLayer, linearWith, mergeHeads, Params, splitHeads, type KeyValue } from "./layers.js";

export type { KeyValue };

const POSITION_OFFSET = 2;
const LAYER_NORM_EPS = 1e-5;

export interface OptDecoderOutputs {
  logits: Value;
  /** The new positions' keys and values, per layer [B, S, H*Dh], for the caller's cache. */
  present: KeyValue[];
  /** Embeddings + positions, each layer's output, and the final normalized output. */
  hiddenStates: Value[];
}

/** Token ids -> word embeddings ([B, S] int64 -> [B, S, word_embed_proj_dim]). */
export function optEmbedTokens(p: Params, cfg: OptConfig, inputIds: Value): Value {
  return op.gather(p.get("embed_tokens.weight", [cfg.vocabSize, cfg.wordEmbedProjDim]), inputIds);
}

/**
 * @param p            parameters under `language_model.model.decoder.`
 * @param head         parameters under `language_model.` (for an untied `lm_head`)
 * @param inputsEmbeds [B, S, word_embed_proj_dim]
 * @param attentionMask [B, L + S] int64 over the cache's L slots and the new positions
 * @param past         per layer [B, H, L, Dh] (see runtime/kvCache.ts)
 * @param logitsAt     [n] int64: the new positions whose logits to compute (generation needs the last only)
 * @param drop         training: dropout at the config's rates, masks from this context; none without
 */
export function optDecoder(p: Params, head: Params, cfg: OptConfig, inputsEmbeds: Value, attentionMask: Value, past: KeyValue[], logitsAt: Value, drop?: DropoutContext): OptDecoderOutputs {
  const d = cfg.hiddenSize;
  let x = inputsEmbeds;
  if (cfg.wordEmbedProjDim !== d) x = linearLayer(p.at("project_in"), x, cfg.wordEmbedProjDim, d, false);
  x = op.add(x, positionEmbeddings(p, cfg, attentionMask, inputsEmbeds));
  const bias = causalBias(attentionMask, inputsEmbeds);
  const hiddenStates = [x];
  const present: KeyValue[] = [];
  for (let i = 0; i < cfg.numHiddenLayers; i++) {
    const out = decoderLayer(p.at("layers").at(i), cfg, x, bias, past[i]!, drop);
    x = out.x;
    present.push(out.present);
    hiddenStates.push(x);
  }
  if (cfg.doLayerNormBefore && !cfg.removeFinalLayerNorm) {
    x = layerNorm(p.at("final_layer_norm"), cfg, x);
    hiddenStates[hiddenStates.length - 1] = x;
  }
  x = op.gather(x, logitsAt, 1);
  if (cfg.wordEmbedProjDim !== d) x = linearLayer(p.at("project_out"), x, d, cfg.wordEmbedProjDim, false);
  // The head is tied to the token embeddings unless the checkpoint has its own.
  const [headParams, headName] = head.has("lm_head.weight") ? [head, "lm_head.weight"] : [p, "embed_tokens.weight"];
  return { logits: linearWith(headParams, headName, x, cfg.wordEmbedProjDim, cfg.vocabSize, null), present, hiddenStates };
}

/** Learned positions from the mask: cumsum(mask) * mask - 1 for the new positions, plus 2. */
function positionEmbeddings(p: Params, cfg: OptConfig, attentionMask: Value, inputsEmbeds: Value): Value {
  const g = attentionMask.graph;
  const positions = op.sub(op.mul(op.cumsum(attentionMask, 1), attentionMask), g.scalar(1, "int64"));
  const newLength = op.slice(op.shapeOf(inputsEmbeds), [1], [2], [0]);
  const last = op.sliceDynamic(positions, op.neg(newLength), g.ints([2 ** 62]), [1], [inputsEmbeds.dim(0), inputsEmbeds.dim(1)]);
  const table = p.get("embed_positions.weight", [cfg.maxPositionEmbeddings + POSITION_OFFSET, cfg.hiddenSize]);
  return op.gather(table, op.add(last, g.scalar(POSITION_OFFSET, "int64")));
}

function layerNorm(p: Params, cfg: OptConfig, x: Value): Value {
  return layerNormLayer(p, x, cfg.hiddenSize, LAYER_NORM_EPS, cfg.layerNormElementwiseAffine);
}

function decoderLayer(p: Params, cfg: OptConfig, x: Value, bias: Value, past: KeyValue, drop?: DropoutContext): { x: Value; present: KeyValue } {
  const pre = cfg.doLayerNormBefore;
  let h = pre ? layerNorm(p.at("self_attn_layer_norm"), cfg, x) : x;
  const attn = selfAttention(p.at("self_attn"), cfg, h, bias, past, drop);
  x = op.add(x, dropout(attn.out, cfg.dropout, drop));
  if (!pre) x = layerNorm(p.at("self_attn_layer_norm"), cfg, x);
  h = pre ? layerNorm(p.at("final_layer_norm"), cfg, x) : x;
  h = linearLayer(p.at("fc1"), h, cfg.hiddenSize, cfg.ffnDim, cfg.enableBias);
  h = linearLayer(p.at("fc2"), activation(h, cfg.activationFunction), cfg.ffnDim, cfg.hiddenSize, cfg.enableBias);
  x = op.add(x, dropout(h, cfg.dropout, drop));
  if (!pre) x = layerNorm(p.at("final_layer_norm"), cfg, x);
  return { x, present: attn.present };
}

function selfAttention(p: Params, cfg: OptConfig, x: Value, bias: Value, past: KeyValue, drop?: DropoutContext): { out: Value; present: KeyValue } {
  const d = cfg.hiddenSize;
  const heads = cfg.numAttentionHeads;
  const scaling = (d / heads) ** -0.5;
  const proj = (name: string) => linearLayer(p.at(name), x, d, d, cfg.enableBias);
  const fresh = { key: splitHeads(proj("k_proj"), heads), value: splitHeads(proj("v_proj"), heads) };
  // transformers scales the query projection; the kernel scales its products, the same up to rounding.
  // The fused kernel cannot drop attention probabilities: with attention dropout, the plain ops.
  const context = drop && cfg.attentionDropout > 0
    ? attendDropped(proj("q_proj"), past, fresh, heads, scaling, bias, (probs) => dropout(probs, cfg.attentionDropout, drop))
    : attendWithCacheFused(proj("q_proj"), past, fresh, heads, scaling, bias);
  const out = linearLayer(p.at("out_proj"), context, d, d, cfg.enableBias);
  return { out, present: fresh };
}

/** `attendWithCacheFused` in plain ops, its probabilities through `dropProbs`: [B, S, H*Dh]. */
function attendDropped(q: Value, past: KeyValue, fresh: KeyValue, heads: number, scaling: number, bias: Value, dropProbs: (probs: Value) => Value): Value {
  const join = (cached: Value, now: Value) => op.concat([cached, now], 2);
  return mergeHeads(attend(splitHeads(q, heads), join(past.key, fresh.key), join(past.value, fresh.value), scaling, bias, dropProbs));
}

/** Graph inputs for the cache: one key and one value per layer, [B, H, L, Dh] with L the capacity. */
export function pastInputs(g: Graph, cfg: OptConfig): KeyValue[] {
  const heads = cfg.numAttentionHeads;
  const dh = cfg.hiddenSize / heads;
  const shape = ["batch", heads, "capacity", dh];
  return Array.from({ length: cfg.numHiddenLayers }, (_, i) => ({
    key: g.input(`past.${i}.key`, "float32", shape),
    value: g.input(`past.${i}.value`, "float32", shape),
  }));
}
