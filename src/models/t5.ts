/**
 * T5 (Flan-T5), the encoder-decoder language model: RMS norms, unscaled attention with a learned
 * relative-position bias (computed by the first layer of each stack and shared by all layers),
 * ReLU or gated-GELU feed-forward, and an untied head (or the shared table, scaled, when tied).
 *
 * Three graphs: the encoder over `inputs_embeds`; the cross-attention keys/values of every decoder
 * layer, computed once per encoder output; and the decoder step with a self-attention cache.
 *
 * In training (a dropout context given), `dropout_rate` everywhere transformers' T5 applies it, in
 * both stacks: after the embeddings, on the attention probabilities, after each attention and
 * feed-forward sublayer (before its residual), inside the feed-forward (after the activation or the
 * gate's product) and after the final norm.
 */
import type { T5Config } from "../config.js";
import { Blip2Error } from "../errors.js";
import type { Graph, Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { dropout, type DropoutContext } from "./dropout.js";
import { activation, attend, attendWithCache, causalBias, FLOAT32_MIN, linearLayer, linearWith, mergeHeads, paddingBias, Params, rmsNorm, splitHeads } from "./layers.js";
import type { KeyValue } from "./opt.js";

export interface T5EncoderOutputs {
  lastHiddenState: Value;
  hiddenStates: Value[];
}

export interface T5DecoderOutputs {
  logits: Value;
  present: KeyValue[];
  hiddenStates: Value[];
}

const inner = (cfg: T5Config) => cfg.numHeads * cfg.dKv;

/**
 * The positions blip2 lets T5's encoder (the prompt, image tokens included) and its decoder (the
 * start token and the new tokens) each take. T5's relative positions set no limit, but its attention
 * weighs every position against every other, heads x positions^2 floats per layer, and an
 * unbounded prompt ends in an out-of-memory kill rather than an error. 2048 is what the OPT
 * checkpoints of BLIP-2 take, so both families accept the same prompts.
 */
export const T5_MAX_POSITIONS = 2048;

/** Token ids -> shared embeddings. */
export function t5EmbedTokens(p: Params, cfg: T5Config, inputIds: Value): Value {
  return op.gather(p.get("shared.weight", [cfg.vocabSize, cfg.dModel]), inputIds);
}

/**
 * @param p        parameters under `language_model.`
 * @param buckets  [S, S] int64 relative-position buckets (bidirectional), from `relativePositionBuckets`
 * @param drop     training: dropout at `dropout_rate`, masks from this context; none without
 */
export function t5Encoder(p: Params, cfg: T5Config, inputsEmbeds: Value, attentionMask: Value, buckets: Value, drop?: DropoutContext): T5EncoderOutputs {
  const enc = p.at("encoder");
  const bias = op.add(positionBias(enc.at("block.0.layer.0.SelfAttention"), cfg, buckets), paddingBias(attentionMask, FLOAT32_MIN));
  let x = dropout(inputsEmbeds, cfg.dropoutRate, drop);
  const hiddenStates = [x];
  for (let i = 0; i < cfg.numLayers; i++) {
    const block = enc.at("block").at(i);
    x = residual(cfg, drop, x, attention(block.at("layer.0.SelfAttention"), cfg, norm(block.at("layer.0.layer_norm"), cfg, x), null, bias, undefined, drop).out);
    x = residual(cfg, drop, x, feedForward(block.at("layer.1"), cfg, x, drop));
    hiddenStates.push(x);
  }
  x = dropout(norm(enc.at("final_layer_norm"), cfg, x), cfg.dropoutRate, drop);
  hiddenStates[hiddenStates.length - 1] = x;
  return { lastHiddenState: x, hiddenStates };
}

/** Keys and values of every decoder layer's cross-attention over the encoder output. */
export function t5CrossKeyValues(p: Params, cfg: T5Config, encoderHidden: Value): KeyValue[] {
  return Array.from({ length: cfg.numDecoderLayers }, (_, i) => {
    const a = p.at("decoder.block").at(i).at("layer.1.EncDecAttention");
    return {
      key: splitHeads(linearLayer(a.at("k"), encoderHidden, cfg.dModel, inner(cfg), false), cfg.numHeads),
      value: splitHeads(linearLayer(a.at("v"), encoderHidden, cfg.dModel, inner(cfg), false), cfg.numHeads),
    };
  });
}

/**
 * One decoder pass over new tokens, given the cache.
 * @param buckets        [S, L + S] int64 relative-position buckets of the new positions against the
 *                       cache's L slots and themselves
 * @param attentionMask  [B, L + S] int64: the cache slots holding keys, then the new positions
 * @param encoderMask    [B, Se] int64
 * @param cross          per layer, from `t5CrossKeyValues`
 * @param past           per layer self-attention cache [B, H, L, Dkv] (see runtime/kvCache.ts), or null
 *                       for a whole sequence at once (training)
 * @param logitsAt       [n] int64: the new positions whose logits to compute
 * @param drop           training (no cache): dropout at `dropout_rate`, masks from this context
 */
export function t5Decoder(p: Params, cfg: T5Config, decoderInputIds: Value, buckets: Value, attentionMask: Value, encoderMask: Value, cross: KeyValue[], past: KeyValue[] | null, logitsAt: Value, drop?: DropoutContext): T5DecoderOutputs {
  if (drop && past) throw new Blip2Error("internal: T5 dropout is for training, which runs the decoder without a cache");
  const dec = p.at("decoder");
  let x = dropout(t5EmbedTokens(p, cfg, decoderInputIds), cfg.dropoutRate, drop);
  const selfBias = op.add(positionBias(dec.at("block.0.layer.0.SelfAttention"), cfg, buckets), causalBias(attentionMask, decoderInputIds));
  const crossBias = paddingBias(encoderMask, FLOAT32_MIN);
  const hiddenStates = [x];
  const present: KeyValue[] = [];
  for (let i = 0; i < cfg.numDecoderLayers; i++) {
    const block = dec.at("block").at(i);
    const self = attention(block.at("layer.0.SelfAttention"), cfg, norm(block.at("layer.0.layer_norm"), cfg, x), null, selfBias, past?.[i], drop);
    x = residual(cfg, drop, x, self.out);
    present.push(self.present!);
    x = residual(cfg, drop, x, attention(block.at("layer.1.EncDecAttention"), cfg, norm(block.at("layer.1.layer_norm"), cfg, x), cross[i]!, crossBias, undefined, drop).out);
    x = residual(cfg, drop, x, feedForward(block.at("layer.2"), cfg, x, drop));
    hiddenStates.push(x);
  }
  x = dropout(norm(dec.at("final_layer_norm"), cfg, x), cfg.dropoutRate, drop);
  hiddenStates[hiddenStates.length - 1] = x;
  x = op.gather(x, logitsAt, 1);
  if (cfg.scaleDecoderOutputs) x = op.mul(x, x.graph.scalar(cfg.dModel ** -0.5));
  const head = cfg.tieWordEmbeddings ? "shared.weight" : "lm_head.weight";
  return { logits: linearWith(p, head, x, cfg.dModel, cfg.vocabSize, null), present, hiddenStates };
}

/** A sublayer's output added to its input, after dropout in training. */
function residual(cfg: T5Config, drop: DropoutContext | undefined, x: Value, out: Value): Value {
  return op.add(x, dropout(out, cfg.dropoutRate, drop));
}

function norm(p: Params, cfg: T5Config, x: Value): Value {
  return rmsNorm(p, x, cfg.dModel, cfg.layerNormEpsilon);
}

/**
 * T5 attention (no scaling). With `cross`, keys/values are the precomputed encoder projections;
 * otherwise they come from `x`, attending also to the cache `past` when given. `present` is the
 * new positions' keys/values, [B, H, S, Dkv], for the cache (runtime/kvCache.ts); cross-attention
 * has none.
 */
function attention(p: Params, cfg: T5Config, x: Value, cross: KeyValue | null, bias: Value, past?: KeyValue, drop?: DropoutContext): { out: Value; present: KeyValue | null } {
  const project = (name: string) => linearLayer(p.at(name), x, cfg.dModel, inner(cfg), false);
  const split = (v: Value) => splitHeads(v, cfg.numHeads);
  const output = (context: Value) => linearLayer(p.at("o"), context, inner(cfg), cfg.dModel, false);
  const dropProbs = drop && ((probs: Value) => dropout(probs, cfg.dropoutRate, drop));
  if (cross) {
    const q = project("q");
    return { out: output(ungroupRows(mergeHeads(attend(split(groupRows(q, cross.key)), cross.key, cross.value, null, bias, dropProbs)), q)), present: null };
  }
  const present = { key: split(project("k")), value: split(project("v")) };
  const q = split(project("q"));
  const context = past ? attendWithCache(q, past, present, null, bias) : attend(q, present.key, present.value, null, bias, dropProbs);
  return { out: output(mergeHeads(context)), present };
}

/**
 * The decoder's rows [N, S, D] as its inputs' [B, N/B * S, D], for cross-attention: the rows that
 * continue one input (beams, samples) are adjacent and attend to the same encoder keys/values, so
 * they go in as more query positions of that input. The keys/values then stay one row per input
 * (`keysOfInputs`, [B, ...]) instead of being copied per beam, copies that would take memory and
 * time to gather and be read again at every step.
 */
function groupRows(x: Value, keysOfInputs: Value): Value {
  const g = x.graph;
  const inputs = op.slice(op.shapeOf(keysOfInputs), [0], [1], [0]);
  const [rows, length, b] = [x.dim(0), x.dim(1), keysOfInputs.dim(0)];
  const grouped = typeof rows === "number" && typeof length === "number" && typeof b === "number" ? (rows / b) * length : "rows_per_input*length";
  return op.reshapeTo(x, op.concat([inputs, g.ints([-1, x.dim(2) as number])], 0), [b, grouped, x.dim(2)]);
}

/** groupRows undone: back to the shape of the decoder's rows `like`. */
function ungroupRows(x: Value, like: Value): Value {
  return op.reshapeTo(x, op.shapeOf(like), like.shape);
}

function feedForward(p: Params, cfg: T5Config, x: Value, drop?: DropoutContext): Value {
  const h = norm(p.at("layer_norm"), cfg, x);
  const ff = p.at("DenseReluDense");
  const wi = (name: string) => linearLayer(ff.at(name), h, cfg.dModel, cfg.dFf, false);
  const hidden = cfg.isGatedAct ? op.mul(activation(wi("wi_0"), cfg.denseActFn), wi("wi_1")) : activation(wi("wi"), cfg.denseActFn);
  return linearLayer(ff.at("wo"), dropout(hidden, cfg.dropoutRate, drop), cfg.dFf, cfg.dModel, false);
}

/** [S, T] buckets -> [1, H, S, T] bias from the layer's `relative_attention_bias` table. */
function positionBias(p: Params, cfg: T5Config, buckets: Value): Value {
  const table = p.get("relative_attention_bias.weight", [cfg.relativeAttentionNumBuckets, cfg.numHeads]);
  return op.unsqueeze(op.transpose(op.gather(table, buckets), [2, 0, 1]), [0]);
}

/**
 * transformers' `_relative_position_bucket` for queries at positions `queries` and keys at
 * positions `keys`, with its float32 arithmetic reproduced (Math.fround) so bucket edges fall
 * identically. [queries.length * keys.length], row-major.
 */
export function relativePositionBuckets(cfg: T5Config, queries: number[], keys: number[], bidirectional: boolean): BigInt64Array {
  const queryLength = queries.length;
  const keyLength = keys.length;
  const out = new BigInt64Array(queryLength * keyLength);
  let numBuckets = cfg.relativeAttentionNumBuckets;
  if (bidirectional) numBuckets = Math.floor(numBuckets / 2);
  const maxExact = Math.floor(numBuckets / 2);
  const f = Math.fround;
  const logRatio = Math.log(cfg.relativeAttentionMaxDistance / maxExact);
  for (let i = 0; i < queryLength; i++) {
    for (let j = 0; j < keyLength; j++) {
      let rel = keys[j]! - queries[i]!;
      let bucket = 0;
      if (bidirectional) {
        if (rel > 0) bucket += numBuckets;
        rel = Math.abs(rel);
      } else {
        rel = -Math.min(rel, 0);
      }
      if (rel < maxExact) {
        bucket += rel;
      } else {
        const scaled = f(f(f(Math.log(f(rel / maxExact))) / f(logRatio)) * (numBuckets - maxExact));
        bucket += Math.min(maxExact + Math.trunc(scaled), numBuckets - 1);
      }
      out[i * keyLength + j] = BigInt(bucket);
    }
  }
  return out;
}

/** Graph inputs for the decoder's self-attention cache and the precomputed cross keys/values. */
export function t5CacheInputs(g: Graph, cfg: T5Config): { past: KeyValue[]; cross: KeyValue[] } {
  const kv = (prefix: string, len: string) =>
    Array.from({ length: cfg.numDecoderLayers }, (_, i) => ({
      key: g.input(`${prefix}.${i}.key`, "float32", ["batch", cfg.numHeads, len, cfg.dKv]),
      value: g.input(`${prefix}.${i}.value`, "float32", ["batch", cfg.numHeads, len, cfg.dKv]),
    }));
  return { past: kv("past", "capacity"), cross: kv("cross", "encoder_length") };
}
