/**
 * Building blocks shared by the model parts: checkpoint parameters under a name prefix, linear and
 * norm layers, activations, and multi-head attention.
 */
import { Blip2Error } from "../errors.js";
import type { Checkpoint } from "../io/checkpoint.js";
import type { Dim, Graph, Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { defineVjp } from "../autodiff/backward.js";

/** Checkpoint tensors under a name prefix, turned into graph values with their expected shapes. */
export class Params {
  constructor(
    readonly graph: Graph,
    readonly checkpoint: Checkpoint,
    readonly prefix = "",
  ) {}

  at(sub: string | number): Params {
    return new Params(this.graph, this.checkpoint, `${this.prefix}${sub}.`);
  }

  name(name: string): string {
    return this.prefix + name;
  }

  get(name: string, shape: readonly number[]): Value {
    return this.graph.weight(this.checkpoint.tensor(this.prefix + name, shape));
  }

  has(name: string): boolean {
    return this.checkpoint.has(this.prefix + name);
  }
}

/** nn.Linear: weight [out, in], optional bias [out]. */
export function linearLayer(p: Params, x: Value, inFeatures: number, outFeatures: number, bias = true): Value {
  return linearWith(p, "weight", x, inFeatures, outFeatures, bias ? p.get("bias", [outFeatures]) : null);
}

/**
 * `x @ W^T + bias` with the weight `weightName` [out, in] in its part's precision: float32 (fp16
 * copies are widened at load), 8-bit channels run in integer arithmetic, or 4-bit blocks run by
 * MatMulNBits. In a training graph the quantized layers pass gradients to `x` through the same
 * quantized weight (see linearInt8, linearNBits); their weights cannot be trained.
 */
export function linearWith(p: Params, weightName: string, x: Value, inFeatures: number, outFeatures: number, bias: Value | null): Value {
  const full = p.name(weightName);
  const dtype = p.checkpoint.dtypeOf(full);
  if ((dtype === "q8" || dtype === "q4") && p.graph.trainable?.(full)) {
    throw new Blip2Error(`${full} is trained but its weights are ${dtype}: load the part it belongs to in fp32 to train it`);
  }
  const stored = (suffix: string) => p.graph.weight(p.checkpoint.tensor(`${full}.${dtype}.${suffix}`), null);
  if (dtype === "q8") return linearInt8(x, stored("weight"), stored("scales"), bias);
  if (dtype === "q4") {
    const blockSize = (p.checkpoint.tensor(`${full}.q4.weight`).shape[2]! * 8) / 4;
    return linearNBits(x, { weight: stored("weight"), scales: stored("scales"), zeroPoints: stored("zero_points") }, bias, { k: inFeatures, n: outFeatures, blockSize });
  }
  return op.linear(x, p.get(dtype === "fp16" ? `${weightName}.fp16` : weightName, [outFeatures, inFeatures]), bias);
}

/**
 * `x @ W^T + bias` for W in 8-bit channels (quantize/channelQuant.ts: int8 codes [in, out] and one
 * scale per output), in integer arithmetic. Each row of `x` is quantized on the fly, symmetric with
 * its own scale (so a row's result never depends on the other rows of a batch), as uint8 codes
 * around 128; the int32 sums come back as floats times the channel's scale, then the row's. Rows
 * keep their leading dimensions: reshaping into a matrix and back would add six small ops per
 * product, which a decoding step of one row is dominated by. On CPUs with int8 matrix units (AMX)
 * this runs the many rows of an image faster than MatMulNBits's 8-bit blocks, and one row as fast
 * (docs/performance.md). A graph for a GPU widens the weight to float32 on the device instead and
 * multiplies in float (see Graph's Target).
 */
export function linearInt8(x: Value, codes: Value, scales: Value, bias: Value | null): Value {
  const g = x.graph;
  if (g.target === "gpu") {
    const y = op.matmul(x, op.dequantizeColumns(codes, scales));
    return bias ? op.add(y, bias) : y;
  }
  const zeroPoint = g.constant(Uint8Array.from([128]), "uint8", []);
  const peak = op.max(op.reduceMax(x, [-1]), op.neg(op.reduceMin(x, [-1])));
  const rowScale = op.max(op.mul(peak, g.scalar(1 / 127)), g.scalar(1e-30));
  const rowCodes = op.quantizeRows(x, rowScale, op.expand(zeroPoint, op.shapeOf(rowScale), rowScale.shape));
  const product = op.mul(op.matMulIntegerToFloat(rowCodes, codes, g.scalar(1), scales, zeroPoint), rowScale);
  const y = bias ? op.add(product, bias) : product;
  // Backward, straight through the rounding of the rows (taken as the identity, as quantized
  // training does): d x = d y @ W with W the same 8-bit weight, dequantized to [K, N] = W^T for
  // this product only. Gemm reads it transposed in place; a MatMul by its transpose would let ONNX
  // Runtime move the transpose onto the codes and keep a second, transposed copy of every weight.
  defineVjp(y, [x], (dy) => new Map([[x, op.linear(dy, op.dequantizeColumns(orderedAfter(codes, dy), scales), null)]]));
  return y;
}

/**
 * `weight` as it is, but computed only once `dependency` is. ONNX Runtime may run a node whose
 * inputs are all weights at any time before its result is used, and ran every layer's backward
 * dequantization during the forward pass, so that all of them (a float copy of the model) were
 * held until the backward reached them. Reshaping the weight to its own shape, given as an empty
 * slice of `dependency`'s shape joined to the weight's, makes the dequantization wait for the
 * gradient it multiplies. Training sessions do not fold constants (see runtime/session.ts), which
 * would fold that shape.
 */
function orderedAfter(weight: Value, dependency: Value): Value {
  const nothing = op.slice(op.shapeOf(dependency), [0], [0], [0]);
  return op.reshapeTo(weight, op.concat([nothing, weight.graph.ints(weight.shape as number[])], 0), weight.shape);
}

/** A weight in MatMulNBits's 4-bit blocks (quantize/blockQuant.ts), as stored in the checkpoint. */
export interface NBitsWeight {
  /** [N, K / blockSize, blockSize / 2]: two codes per byte, low bits first. */
  weight: Value;
  /** [N * K / blockSize] */
  scales: Value;
  /** [N * ceil(K / blockSize / 2)]: two per byte along each row's blocks, low bits first. */
  zeroPoints: Value;
}

/**
 * `x @ W^T + bias` for W [N, K] in 4-bit blocks, run by MatMulNBits. Its gradient with respect to
 * `x` is d y @ W with W the same blocks dequantized (`dequantizeNBits`), for this product only.
 */
export function linearNBits(x: Value, w: NBitsWeight, bias: Value | null, o: { k: number; n: number; blockSize: number }): Value {
  const y = op.matMulNBits(x, w.weight, w.scales, w.zeroPoints, bias, { ...o, bits: 4, accuracyLevel: 4 });
  defineVjp(y, [x], (dy) => new Map([[x, op.matmul(dy, dequantizeNBits({ ...w, weight: orderedAfter(w.weight, dy) }, o))]]));
  return y;
}

/**
 * The [N, K] float matrix a 4-bit weight stands for, in standard ONNX ops: the codes and zero
 * points unpacked from their bytes, then (code - zero point) x scale per block.
 */
export function dequantizeNBits(w: NBitsWeight, o: { k: number; n: number; blockSize: number }): Value {
  const blocks = o.k / o.blockSize;
  const codes = op.reshape(unpackNibbles(w.weight), [o.n, o.k]);
  const zeroPoints = op.slice(unpackNibbles(op.reshape(w.zeroPoints, [o.n, -1])), [0], [blocks], [1]);
  return op.dequantizeBlocks(codes, op.reshape(w.scales, [o.n, blocks]), zeroPoints, o.blockSize);
}

/** uint8 [..., B] holding two 4-bit values per byte, low bits first -> those values, [..., 2B]. */
function unpackNibbles(bytes: Value): Value {
  const g = bytes.graph;
  const last = bytes.rank;
  const low = op.bitwiseAnd(bytes, g.constant(Uint8Array.from([15]), "uint8", []));
  const high = op.shiftRight(bytes, g.constant(Uint8Array.from([4]), "uint8", []));
  const pairs = op.concat([op.unsqueeze(low, [last]), op.unsqueeze(high, [last])], last);
  return op.reshape(pairs, [...(bytes.shape.slice(0, -1) as number[]), 2 * (bytes.dim(-1) as number)]);
}

export function layerNormLayer(p: Params, x: Value, dim: number, eps: number, affine = true): Value {
  if (!affine) {
    const g = x.graph;
    return op.layerNorm(x, g.constant(new Float32Array(dim).fill(1), "float32", [dim]), null, eps);
  }
  return op.layerNorm(x, p.get("weight", [dim]), p.get("bias", [dim]), eps);
}

/** T5's RMS norm: no mean subtraction, no bias. */
export function rmsNorm(p: Params, x: Value, dim: number, eps: number): Value {
  const g = x.graph;
  const variance = op.reduceMean(op.mul(x, x), [-1]);
  const inv = op.div(g.scalar(1), op.sqrt(op.add(variance, g.scalar(eps))));
  return op.mul(p.get("weight", [dim]), op.mul(x, inv));
}

/** The activations transformers names in configs (ACT2FN). */
export function activation(x: Value, name: string): Value {
  switch (name) {
    case "relu":
      return op.relu(x);
    case "gelu":
      return op.gelu(x, "none");
    case "gelu_new":
    case "gelu_pytorch_tanh":
    case "gelu_fast":
      return op.gelu(x, "tanh");
    case "silu":
    case "swish":
      return op.mul(x, op.sigmoid(x));
    case "quick_gelu":
      return op.mul(x, op.sigmoid(op.mul(x, x.graph.scalar(1.702))));
    case "tanh":
      return op.tanh(x);
    default:
      throw new Blip2Error(`config.json: activation ${JSON.stringify(name)} is not supported (relu, gelu, gelu_new, silu, quick_gelu, tanh)`);
  }
}

/** [B, S, H*Dh] -> [B, H, S, Dh] */
export function splitHeads(x: Value, heads: number): Value {
  const dim = x.dim(-1);
  if (typeof dim !== "number" || dim % heads !== 0) throw new Blip2Error(`graph build: cannot split ${dim} features into ${heads} heads`);
  return op.transpose(op.reshape(x, [0, 0, heads, dim / heads]), [0, 2, 1, 3]);
}

/** [B, H, S, Dh] -> [B, S, H*Dh] */
export function mergeHeads(x: Value): Value {
  const h = x.dim(1);
  const dh = x.dim(3);
  return op.reshape(op.transpose(x, [0, 2, 1, 3]), [0, 0, (h as number) * (dh as number)]);
}

/**
 * softmax(q k^T * scale + bias) v over [B, H, S, Dh] tensors. `bias` is an additive mask and/or
 * position bias broadcastable to [B, H, S, T]. `dropProbs`, in training, drops attention
 * probabilities before they weight the values (BERT's attention dropout).
 */
export function attend(q: Value, k: Value, v: Value, scale: number | null, bias: Value | null, dropProbs?: (probs: Value) => Value): Value {
  let scores = op.matmul(q, op.transpose(k, [0, 1, 3, 2]));
  if (scale !== null) scores = op.mul(scores, q.graph.scalar(scale));
  if (bias) scores = op.add(scores, bias);
  const probs = op.softmax(scores, -1);
  return op.matmul(dropProbs ? dropProbs(probs) : probs, v);
}

/**
 * Turn a [B, T] 0/1 attention mask into an additive [B, 1, 1, T] bias: 0 where attended, `negative`
 * where masked (transformers uses -10000 in the Q-Former and the dtype's minimum elsewhere).
 */
export function paddingBias(mask: Value, negative: number): Value {
  const g = mask.graph;
  const m = op.cast(op.unsqueeze(mask, [1, 2]), "float32");
  return op.mul(op.sub(g.scalar(1), m), g.scalar(negative));
}

export const FLOAT32_MIN = -3.4028234663852886e38;

/** Expand a [1, N, D] parameter to the batch size of `like` ([B, ...]). */
export function expandToBatch(param: Value, like: Value): Value {
  const g = param.graph;
  const batch = op.slice(op.shapeOf(like), [0], [1], [0]);
  const rest = g.ints(param.shape.slice(1) as number[]);
  return op.expand(param, op.concat([batch, rest], 0), [like.dim(0), ...param.shape.slice(1)] as Dim[]);
}

/**
 * Additive [B, 1, S, T] bias for decoders: new position i (at T - S + i) sees key j when
 * j <= T - S + i and the mask has a 1 there. Masked entries get float32's minimum, as transformers
 * does. `newTokens` is any [B, S, ...] value of the new positions.
 */
export function causalBias(attentionMask: Value, newTokens: Value): Value {
  const g = attentionMask.graph;
  const one = g.scalar(1, "int64");
  const total = op.squeeze(op.slice(op.shapeOf(attentionMask), [1], [2], [0]), [0]);
  const newLength = op.squeeze(op.slice(op.shapeOf(newTokens), [1], [2], [0]), [0]);
  const queryPos = op.unsqueeze(op.range(op.sub(total, newLength), total, one, newTokens.dim(1)), [1]);
  const keyPos = op.unsqueeze(op.range(g.scalar(0, "int64"), total, one, attentionMask.dim(1)), [0]);
  const causal = op.not(op.less(queryPos, keyPos));
  const notPad = op.equal(op.unsqueeze(attentionMask, [1, 2]), one);
  return op.where(op.and(causal, notPad), g.scalar(0), g.scalar(FLOAT32_MIN));
}

/**
 * Attention over a key/value cache and the new positions without concatenating them: the scores
 * of both are joined (small), the values are weighted separately and summed, so the cache is only
 * read. `cache` is [B, H, L, Dh], `fresh` [B, H, S, Dh]; `bias` covers L + S keys.
 */
export function attendWithCache(q: Value, cache: KeyValue, fresh: KeyValue, scale: number | null, bias: Value): Value {
  const scores = (k: Value) => op.matmul(q, op.transpose(k, [0, 1, 3, 2]));
  let s = op.concat([scores(cache.key), scores(fresh.key)], -1);
  if (scale !== null) s = op.mul(s, q.graph.scalar(scale));
  const probs = op.softmax(op.add(s, bias), -1);
  const capacity = op.slice(op.shapeOf(cache.key), [2], [3], [0]);
  const [b, h, len] = probs.shape;
  const g = q.graph;
  const probsCache = op.sliceDynamic(probs, g.ints([0]), capacity, [3], [b!, h!, len!, cache.key.dim(2)]);
  const probsFresh = op.sliceDynamic(probs, capacity, g.ints([2 ** 62]), [3], [b!, h!, len!, fresh.key.dim(2)]);
  return op.add(op.matmul(probsCache, cache.value), op.matmul(probsFresh, fresh.value));
}

/**
 * The same attention in ONNX Runtime's fused MultiHeadAttention, for OPT: `q` is the new positions'
 * projection [B, S, H*Dh], `fresh` [B, H, S, Dh], the cache [B, H, L, Dh]; returns [B, S, H*Dh]. One
 * kernel in place of some twenty small ops per layer (splitting and merging heads, scores, mask,
 * softmax), which a quantized decoding step is otherwise dominated by. The cache is joined with
 * the new keys/values first (a copy per layer and step, small beside the weights): given as the
 * kernel's `past`, ONNX Runtime 1.30's CPU kernel errs unless its joined `present` outputs are
 * declared, which then stay allocated through the run and raise the peak. T5's steps (per-head
 * position bias, few slots) ran slower with it and keep `attendWithCache` (docs/performance.md).
 */
export function attendWithCacheFused(q: Value, cache: KeyValue, fresh: KeyValue, heads: number, scale: number, bias: Value): Value {
  const join = (past: Value, now: Value) => op.concat([past, now], 2);
  return op.multiHeadAttention(q, join(cache.key, fresh.key), join(cache.value, fresh.value), bias, { heads, scale });
}

export interface KeyValue {
  key: Value;
  value: Value;
}
