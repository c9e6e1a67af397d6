/**
 * One builder function per ONNX op. Each checks what it can at build time (dtypes, ranks, known
 * dimensions) and computes the output's shape, symbolic where the input is symbolic.
 */
import { Blip2Error } from "../errors.js";
import { attr, isFloat, onnxDataType, type Attr, type DType, type Dim, type Shape, type Value } from "./graph.js";

function fail(op: string, message: string): never {
  throw new Blip2Error(`graph build: ${op}: ${message}`);
}

const fmt = (s: Shape) => `[${s.join(", ")}]`;

function node(op: string, inputs: (Value | null)[], attrs: Record<string, Attr>, dtype: DType, shape: Shape, domain = ""): Value {
  const g = inputs.find((v): v is Value => v !== null)!.graph;
  return g.addNode(op, inputs, attrs, [{ dtype, shape }], domain)[0]!;
}

let freshSymbol = 0;
/** A new symbolic dimension for results whose size only the runtime knows. */
const unknownDim = (hint: string): Dim => `${hint}?${++freshSymbol}`;

function sameDtype(op: string, a: Value, b: Value): void {
  if (a.dtype !== b.dtype) fail(op, `dtypes differ: ${a.name} is ${a.dtype}, ${b.name} is ${b.dtype}`);
}

/** Numpy-style broadcasting of two shapes; fails on two different known sizes. */
export function broadcastShapes(op: string, a: Shape, b: Shape): Dim[] {
  const n = Math.max(a.length, b.length);
  const out: Dim[] = [];
  for (let i = 0; i < n; i++) {
    const da = a[a.length - n + i] ?? 1;
    const db = b[b.length - n + i] ?? 1;
    if (da === db || db === 1) out.push(da);
    else if (da === 1) out.push(db);
    else if (typeof da === "number" && typeof db === "number") fail(op, `cannot broadcast ${fmt(a)} with ${fmt(b)}`);
    else out.push(typeof da === "number" ? da : db);
  }
  return out;
}

function binary(op: string, a: Value, b: Value, outDtype?: DType): Value {
  sameDtype(op, a, b);
  return node(op, [a, b], {}, outDtype ?? a.dtype, broadcastShapes(op, a.shape, b.shape));
}

export const add = (a: Value, b: Value) => binary("Add", a, b);
export const sub = (a: Value, b: Value) => binary("Sub", a, b);
export const mul = (a: Value, b: Value) => binary("Mul", a, b);
export const div = (a: Value, b: Value) => binary("Div", a, b);
export const pow = (a: Value, b: Value) => binary("Pow", a, b);
export const max = (a: Value, b: Value) => binary("Max", a, b);
export const min = (a: Value, b: Value) => binary("Min", a, b);
export const equal = (a: Value, b: Value) => binary("Equal", a, b, "bool");
export const less = (a: Value, b: Value) => binary("Less", a, b, "bool");
export const and = (a: Value, b: Value) => binary("And", a, b, "bool");

/** Bitwise xor of two integer tensors (opset 18). */
export function bitwiseXor(a: Value, b: Value): Value {
  if (isFloat(a.dtype) || a.dtype === "bool") fail("BitwiseXor", `expects integer tensors, got ${a.dtype}`);
  return binary("BitwiseXor", a, b);
}

/** Bitwise and of two integer tensors (opset 18). */
export function bitwiseAnd(a: Value, b: Value): Value {
  if (isFloat(a.dtype) || a.dtype === "bool") fail("BitwiseAnd", `expects integer tensors, got ${a.dtype}`);
  return binary("BitwiseAnd", a, b);
}

/** Logical right shift of unsigned integers (ONNX Runtime runs BitShift on uint8, uint32 and uint64 only). */
export function shiftRight(x: Value, bits: Value): Value {
  if (x.dtype !== "uint8" && x.dtype !== "uint32") fail("BitShift", `expects an unsigned integer tensor, got ${x.dtype}`);
  sameDtype("BitShift", x, bits);
  return node("BitShift", [x, bits], { direction: attr.string("RIGHT") }, x.dtype, broadcastShapes("BitShift", x.shape, bits.shape));
}

function unary(op: string, x: Value, floatOnly = true): Value {
  if (floatOnly && !isFloat(x.dtype)) fail(op, `expects a float tensor, got ${x.dtype}`);
  return node(op, [x], {}, x.dtype, x.shape);
}

export const neg = (x: Value) => unary("Neg", x, false);
export const sqrt = (x: Value) => unary("Sqrt", x);
export const exp = (x: Value) => unary("Exp", x);
export const log = (x: Value) => unary("Log", x);
export const tanh = (x: Value) => unary("Tanh", x);
export const erf = (x: Value) => unary("Erf", x);
export const relu = (x: Value) => unary("Relu", x);
export const sigmoid = (x: Value) => unary("Sigmoid", x);
export const abs = (x: Value) => unary("Abs", x, false);
export const identity = (x: Value) => unary("Identity", x, false);

export function not(x: Value): Value {
  if (x.dtype !== "bool") fail("Not", `expects bool, got ${x.dtype}`);
  return node("Not", [x], {}, "bool", x.shape);
}

/** GELU: exact (erf) or the tanh approximation ("gelu_new"). */
export function gelu(x: Value, approximate: "none" | "tanh" = "none"): Value {
  if (!isFloat(x.dtype)) fail("Gelu", `expects a float tensor, got ${x.dtype}`);
  return node("Gelu", [x], { approximate: attr.string(approximate) }, x.dtype, x.shape);
}

export function cast(x: Value, to: DType): Value {
  if (x.dtype === to) return x;
  return node("Cast", [x], { to: attr.int(onnxDataType(to)) }, to, x.shape);
}

export function where(cond: Value, a: Value, b: Value): Value {
  if (cond.dtype !== "bool") fail("Where", `condition must be bool, got ${cond.dtype}`);
  sameDtype("Where", a, b);
  return node("Where", [cond, a, b], {}, a.dtype, broadcastShapes("Where", cond.shape, broadcastShapes("Where", a.shape, b.shape)));
}

/** Batched matrix product with numpy broadcasting of the leading dimensions. */
export function matmul(a: Value, b: Value): Value {
  sameDtype("MatMul", a, b);
  if (a.rank < 2 || b.rank < 2) fail("MatMul", `needs rank >= 2, got ${fmt(a.shape)} x ${fmt(b.shape)}`);
  const k1 = a.dim(-1);
  const k2 = b.dim(-2);
  if (typeof k1 === "number" && typeof k2 === "number" && k1 !== k2) {
    fail("MatMul", `inner dimensions differ: ${a.name} ${fmt(a.shape)} x ${b.name} ${fmt(b.shape)}`);
  }
  const batch = broadcastShapes("MatMul", a.shape.slice(0, -2), b.shape.slice(0, -2));
  return node("MatMul", [a, b], {}, a.dtype, [...batch, a.dim(-2), b.dim(-1)]);
}

/**
 * `x @ weight^T + bias` for a weight stored as [out, in] (PyTorch's nn.Linear layout). Gemm reads
 * the weight transposed in place, so no transposed copy of the checkpoint tensor is ever made.
 */
export function linear(x: Value, weight: Value, bias: Value | null): Value {
  if (weight.rank !== 2) fail("linear", `weight ${weight.name} must be 2-D, got ${fmt(weight.shape)}`);
  const [outF, inF] = weight.shape as [Dim, Dim];
  const k = x.dim(-1);
  if (typeof k === "number" && typeof inF === "number" && k !== inF) {
    fail("linear", `input ${x.name} ${fmt(x.shape)} has ${k} features but weight ${weight.name} is ${fmt(weight.shape)}`);
  }
  if (bias && (bias.rank !== 1 || (typeof bias.shape[0] === "number" && bias.shape[0] !== outF))) {
    fail("linear", `bias ${bias.name} ${fmt(bias.shape)} does not match weight ${weight.name} ${fmt(weight.shape)}`);
  }
  return byRows(x, outF as number, (rows) => node("Gemm", bias ? [rows, weight, bias] : [rows, weight], { transB: attr.int(1) }, x.dtype, [rows.dim(0), outF]));
}

/**
 * `f` applied to `x` [..., K] seen as a matrix of rows [rows, K], its [rows, n] result given back
 * `x`'s leading dimensions: for ops that take matrices only.
 */
export function byRows(x: Value, n: number, f: (rows: Value) => Value): Value {
  if (x.rank === 2) return f(x);
  const k = x.dim(-1);
  if (typeof k !== "number") fail("byRows", `${x.name} ${fmt(x.shape)} has no known last dimension`);
  const out = f(reshape(x, [-1, k]));
  return reshapeTo(out, concat([slice(shapeOf(x), [0], [x.rank - 1], [0]), x.graph.ints([n])], 0), [...x.shape.slice(0, -1), n]);
}

export function softmax(x: Value, axis = -1): Value {
  return node("Softmax", [x], { axis: attr.int(axis) }, x.dtype, x.shape);
}

/** LayerNormalization over the last axis. */
export function layerNorm(x: Value, scale: Value, bias: Value | null, epsilon: number): Value {
  const d = x.dim(-1);
  for (const p of bias ? [scale, bias] : [scale]) {
    if (p.rank !== 1 || (typeof d === "number" && p.shape[0] !== d)) fail("LayerNormalization", `parameter ${p.name} ${fmt(p.shape)} does not match input ${fmt(x.shape)}`);
  }
  return node("LayerNormalization", bias ? [x, scale, bias] : [x, scale], { axis: attr.int(-1), epsilon: attr.float(epsilon) }, x.dtype, x.shape);
}

function reduce(op: string, x: Value, axes: number[], keepdims: boolean): Value {
  const norm = axes.map((a) => (a < 0 ? x.rank + a : a));
  const shape = x.shape.flatMap((d, i) => (norm.includes(i) ? (keepdims ? [1] : []) : [d]));
  return node(op, [x, x.graph.ints(axes)], { keepdims: attr.int(keepdims ? 1 : 0) }, x.dtype, shape);
}

export const reduceMean = (x: Value, axes: number[], keepdims = true) => reduce("ReduceMean", x, axes, keepdims);
export const reduceSum = (x: Value, axes: number[], keepdims = true) => reduce("ReduceSum", x, axes, keepdims);
export const reduceMax = (x: Value, axes: number[], keepdims = true) => reduce("ReduceMax", x, axes, keepdims);
export const reduceMin = (x: Value, axes: number[], keepdims = true) => reduce("ReduceMin", x, axes, keepdims);

/** Reshape with ONNX semantics for constant targets: 0 copies the input dimension, -1 is inferred. */
export function reshape(x: Value, dims: number[]): Value {
  const known = x.shape.every((d) => typeof d === "number");
  const out: Dim[] = dims.map((d, i) => (d === 0 ? x.dim(i) : d));
  const inferAt = out.indexOf(-1);
  if (inferAt >= 0) {
    if (known) {
      const total = (x.shape as number[]).reduce((a, b) => a * b, 1);
      const rest = out.filter((_, i) => i !== inferAt).reduce<number>((a, b) => a * (typeof b === "number" ? b : NaN), 1);
      out[inferAt] = Number.isNaN(rest) ? unknownDim("reshape") : total / rest;
    } else {
      out[inferAt] = unknownDim("reshape");
    }
  }
  if (known && out.every((d) => typeof d === "number")) {
    const a = (x.shape as number[]).reduce((p, q) => p * q, 1);
    const b = (out as number[]).reduce((p, q) => p * q, 1);
    if (a !== b) fail("Reshape", `cannot reshape ${x.name} ${fmt(x.shape)} to ${fmt(dims)}`);
  }
  return node("Reshape", [x, x.graph.ints(dims)], {}, x.dtype, out);
}

/** Reshape to a runtime shape tensor; `shape` is what the caller knows of the result. */
export function reshapeTo(x: Value, target: Value, shape: Shape): Value {
  if (target.dtype !== "int64" || target.rank !== 1) fail("Reshape", `target shape must be a 1-D int64 tensor, got ${target.dtype} ${fmt(target.shape)}`);
  return node("Reshape", [x, target], {}, x.dtype, shape);
}

export function transpose(x: Value, perm: number[]): Value {
  if (perm.length !== x.rank) fail("Transpose", `permutation ${fmt(perm)} does not fit ${x.name} ${fmt(x.shape)}`);
  return node("Transpose", [x], { perm: attr.ints(perm) }, x.dtype, perm.map((p) => x.dim(p)));
}

export function concat(values: Value[], axis: number): Value {
  const first = values[0];
  if (!first) fail("Concat", "needs at least one input");
  const ax = axis < 0 ? first.rank + axis : axis;
  let total: Dim = 0;
  for (const v of values) {
    sameDtype("Concat", first, v);
    if (v.rank !== first.rank) fail("Concat", `ranks differ: ${fmt(first.shape)} and ${fmt(v.shape)}`);
    v.shape.forEach((d, i) => {
      const f = first.shape[i]!;
      if (i !== ax && typeof d === "number" && typeof f === "number" && d !== f) fail("Concat", `shapes ${fmt(first.shape)} and ${fmt(v.shape)} differ off axis ${axis}`);
    });
    const d = v.dim(ax);
    total = typeof total === "number" && typeof d === "number" ? total + d : `${total}+${d}`;
  }
  const shape = first.shape.map((d, i) => (i === ax ? total : d));
  return node("Concat", values, { axis: attr.int(axis) }, first.dtype, shape);
}

/** Slice with constant bounds (ONNX clamps ends past the dimension). */
export function slice(x: Value, starts: number[], ends: number[], axes: number[]): Value {
  const shape = [...x.shape];
  axes.forEach((axis, i) => {
    const a = axis < 0 ? x.rank + axis : axis;
    const d = shape[a]!;
    const s = starts[i]!;
    const e = ends[i]!;
    if (typeof d === "number") {
      const lo = Math.min(Math.max(s < 0 ? d + s : s, 0), d);
      const hi = Math.min(Math.max(e < 0 ? d + e : e, 0), d);
      shape[a] = Math.max(hi - lo, 0);
    } else {
      shape[a] = s >= 0 && e >= 0 && e < 2 ** 40 ? e - s : unknownDim("slice");
    }
  });
  const g = x.graph;
  return node("Slice", [x, g.ints(starts), g.ints(ends), g.ints(axes)], {}, x.dtype, shape);
}

/** Slice with runtime bounds (1-D int64 tensors). */
export function sliceDynamic(x: Value, starts: Value, ends: Value, axes: number[], shape: Shape): Value {
  return node("Slice", [x, starts, ends, x.graph.ints(axes)], {}, x.dtype, shape);
}

export function gather(data: Value, indices: Value, axis = 0): Value {
  if (indices.dtype !== "int64" && indices.dtype !== "int32") fail("Gather", `indices must be int64/int32, got ${indices.dtype}`);
  const a = axis < 0 ? data.rank + axis : axis;
  const shape = [...data.shape.slice(0, a), ...indices.shape, ...data.shape.slice(a + 1)];
  return node("Gather", [data, indices], { axis: attr.int(axis) }, data.dtype, shape);
}

export function unsqueeze(x: Value, axes: number[]): Value {
  const rank = x.rank + axes.length;
  const norm = axes.map((a) => (a < 0 ? rank + a : a));
  const shape: Dim[] = [];
  let j = 0;
  for (let i = 0; i < rank; i++) shape.push(norm.includes(i) ? 1 : x.shape[j++]!);
  return node("Unsqueeze", [x, x.graph.ints(axes)], {}, x.dtype, shape);
}

export function squeeze(x: Value, axes: number[]): Value {
  const norm = axes.map((a) => (a < 0 ? x.rank + a : a));
  for (const a of norm) if (x.shape[a] !== 1 && typeof x.shape[a] === "number") fail("Squeeze", `axis ${a} of ${fmt(x.shape)} is not 1`);
  return node("Squeeze", [x, x.graph.ints(axes)], {}, x.dtype, x.shape.filter((_, i) => !norm.includes(i)));
}

/** Broadcast `x` to a runtime shape; `shape` is what the caller knows of the result. */
export function expand(x: Value, target: Value, shape: Shape): Value {
  broadcastShapes("Expand", x.shape, shape);
  return node("Expand", [x, target], {}, x.dtype, shape);
}

export function shapeOf(x: Value): Value {
  return node("Shape", [x], {}, "int64", [x.rank]);
}

export function cumsum(x: Value, axis: number): Value {
  return node("CumSum", [x, x.graph.scalar(axis, "int64")], {}, x.dtype, x.shape);
}

/** Inclusive integer range [start, limit) with step 1, all scalars of the same dtype. */
export function range(start: Value, limit: Value, delta: Value, length: Dim): Value {
  return node("Range", [start, limit, delta], {}, start.dtype, [length]);
}

/** 2-D convolution with a square kernel, stride = `stride`, no padding (the ViT patch embedding). */
export function conv(x: Value, weight: Value, bias: Value | null, stride: number): Value {
  if (x.rank !== 4 || weight.rank !== 4) fail("Conv", `expects 4-D input and weight, got ${fmt(x.shape)} and ${fmt(weight.shape)}`);
  const [outC, inC, kh, kw] = weight.shape as number[];
  if (typeof x.dim(1) === "number" && x.dim(1) !== inC) fail("Conv", `input ${fmt(x.shape)} has ${x.dim(1)} channels, weight ${weight.name} expects ${inC}`);
  const out = (d: Dim, k: number): Dim => (typeof d === "number" ? Math.floor((d - k) / stride) + 1 : unknownDim("conv"));
  const attrs = { kernel_shape: attr.ints([kh!, kw!]), strides: attr.ints([stride, stride]) };
  return node("Conv", bias ? [x, weight, bias] : [x, weight], attrs, x.dtype, [x.dim(0), outC!, out(x.dim(2), kh!), out(x.dim(3), kw!)]);
}

export interface AttentionOptions {
  heads: number;
  /** Multiplies q k^T (the model's attention scaling). */
  scale: number;
}

/**
 * ONNX Runtime's com.microsoft.MultiHeadAttention: per head, softmax(q k^T * scale + bias) v, where
 * `q` is [B, S, H*Dh] (heads split and merged inside the kernel) and `keys`, `values` are
 * [B, H, T, Dh]. `bias` is [B, 1 or H, S, T]. Returns [B, S, H*Dh]. Its vector-Jacobian rule is
 * that of the standard-op attention it fuses (matmuls and a softmax).
 */
export function multiHeadAttention(q: Value, keys: Value, values: Value, bias: Value, o: AttentionOptions): Value {
  const op = "MultiHeadAttention";
  if (q.rank !== 3 || q.dtype !== "float32") fail(op, `query ${q.name} ${fmt(q.shape)} ${q.dtype} is not a [batch, length, features] float32 projection`);
  const features = q.dim(-1);
  if (typeof features !== "number" || features % o.heads !== 0) fail(op, `cannot split ${features} features into ${o.heads} heads`);
  const headDim = features / o.heads;
  for (const x of [keys, values]) {
    if (x.rank !== 4 || x.dim(1) !== o.heads || x.dim(3) !== headDim) fail(op, `${x.name} ${fmt(x.shape)} is not [batch, ${o.heads}, keys, ${headDim}]`);
  }
  if (bias.rank !== 4) fail(op, `bias ${bias.name} ${fmt(bias.shape)} is not [batch, heads, length, keys]`);
  const attrs = { num_heads: attr.int(o.heads), scale: attr.float(o.scale) };
  return node(op, [q, keys, values, null, null, bias], attrs, q.dtype, q.shape, "com.microsoft");
}

/**
 * ONNX's QuantizeLinear with one scale per row of `x` [..., K]: uint8 codes round(x / scale) +
 * zeroPoint, rounded half to even and saturated to [0, 255]. `scales` and `zeroPoints` are
 * [..., 1]: blocked quantization (opset 21) with one block of K along the last axis, so `x` needs no
 * reshaping into a matrix first.
 */
export function quantizeRows(x: Value, scales: Value, zeroPoints: Value): Value {
  const op = "QuantizeLinear";
  const k = x.dim(-1);
  if (x.rank < 2 || x.dtype !== "float32" || typeof k !== "number") fail(op, `expects float32 rows [..., K] with K known, got ${x.name} ${fmt(x.shape)} ${x.dtype}`);
  for (const v of [scales, zeroPoints]) {
    if (v.rank !== x.rank || v.dim(-1) !== 1) fail(op, `${v.name} ${fmt(v.shape)} is not one value per row of ${x.name} ${fmt(x.shape)}`);
  }
  if (zeroPoints.dtype !== "uint8") fail(op, `zero points ${zeroPoints.name} must be uint8, got ${zeroPoints.dtype}`);
  return node(op, [x, scales, zeroPoints], { axis: attr.int(-1), block_size: attr.int(k) }, "uint8", x.shape);
}

/** ONNX's DequantizeLinear with one scale per column of an int8 matrix `codes` [K, N] (axis 1): codes x scale. */
export function dequantizeColumns(codes: Value, scales: Value): Value {
  const op = "DequantizeLinear";
  if (codes.rank !== 2 || codes.dtype !== "int8") fail(op, `expects an int8 matrix, got ${codes.name} ${fmt(codes.shape)} ${codes.dtype}`);
  if (scales.rank !== 1 || scales.dim(0) !== codes.dim(1)) fail(op, `scales ${scales.name} ${fmt(scales.shape)} are not one per column of ${codes.name} ${fmt(codes.shape)}`);
  return node(op, [codes, scales], { axis: attr.int(1) }, "float32", codes.shape);
}

/**
 * ONNX's DequantizeLinear in blocks along the rows of a uint8 matrix `codes` [N, K] (opset 21's
 * blocked quantization, axis 1): (code - zero point) x scale, with one scale and zero point per
 * block of `blockSize` values, `scales` and `zeroPoints` [N, K / blockSize].
 */
export function dequantizeBlocks(codes: Value, scales: Value, zeroPoints: Value, blockSize: number): Value {
  const op = "DequantizeLinear";
  const [n, k] = codes.shape;
  if (codes.rank !== 2 || codes.dtype !== "uint8" || typeof k !== "number" || k % blockSize !== 0) fail(op, `expects a uint8 matrix of rows in blocks of ${blockSize}, got ${codes.name} ${fmt(codes.shape)} ${codes.dtype}`);
  for (const v of [scales, zeroPoints]) {
    if (v.rank !== 2 || v.dim(0) !== n || v.dim(1) !== k / blockSize) fail(op, `${v.name} ${fmt(v.shape)} is not one value per block of ${codes.name} ${fmt(codes.shape)} ([${n}, ${k / blockSize}])`);
  }
  if (zeroPoints.dtype !== "uint8") fail(op, `zero points ${zeroPoints.name} must be uint8, got ${zeroPoints.dtype}`);
  return node(op, [codes, scales, zeroPoints], { axis: attr.int(1), block_size: attr.int(blockSize) }, "float32", codes.shape);
}

/**
 * ONNX Runtime's com.microsoft.MatMulIntegerToFloat: (a - aZeroPoint) @ b in int32 sums, times
 * aScale (a scalar) and bScale (one per column of b), as float32. `a` is uint8 rows [..., K], `b`
 * int8 [K, N]: the unsigned-by-signed form ONNX Runtime's CPU kernels run fast (int8 by int8 through
 * MatMulInteger ran some 25 times slower).
 */
export function matMulIntegerToFloat(a: Value, b: Value, aScale: Value, bScale: Value, aZeroPoint: Value): Value {
  const op = "MatMulIntegerToFloat";
  if (a.dtype !== "uint8" || a.rank < 2) fail(op, `expects uint8 rows [..., K], got ${a.name} ${fmt(a.shape)} ${a.dtype}`);
  if (b.dtype !== "int8" || b.rank !== 2) fail(op, `weight ${b.name} ${fmt(b.shape)} ${b.dtype} is not a 2-D int8 matrix`);
  if (a.dim(-1) !== b.dim(0)) fail(op, `inner dimensions differ: ${a.name} ${fmt(a.shape)} x ${b.name} ${fmt(b.shape)}`);
  if (aScale.rank !== 0 || aZeroPoint.rank !== 0 || aZeroPoint.dtype !== "uint8") fail(op, `expects a scalar scale and a uint8 scalar zero point for ${a.name}`);
  if (bScale.rank !== 1 || bScale.dim(0) !== b.dim(1)) fail(op, `scales ${bScale.name} ${fmt(bScale.shape)} are not one per column of ${b.name} ${fmt(b.shape)}`);
  return node(op, [a, b, aScale, bScale, aZeroPoint], {}, "float32", [...a.shape.slice(0, -1), b.dim(1)], "com.microsoft");
}

export interface NBitsOptions {
  k: number;
  n: number;
  bits: 4 | 8;
  blockSize: number;
  /** 4: activations quantized to int8 on the fly (the fast CPU path). */
  accuracyLevel: number;
}

/**
 * x @ dequant(W)^T + bias with W block-quantized as ONNX Runtime's com.microsoft.MatMulNBits expects
 * (see quantize/blockQuant.ts).
 */
export function matMulNBits(x: Value, weight: Value, scales: Value, zeroPoints: Value | null, bias: Value | null, o: NBitsOptions): Value {
  const kBlocks = o.k / o.blockSize;
  const blob = (o.blockSize * o.bits) / 8;
  if (weight.dtype !== "uint8" || weight.rank !== 3 || weight.shape[0] !== o.n || weight.shape[1] !== kBlocks || weight.shape[2] !== blob) {
    fail("MatMulNBits", `weight ${weight.name} ${fmt(weight.shape)} ${weight.dtype} is not [${o.n}, ${kBlocks}, ${blob}] uint8`);
  }
  const k = x.dim(-1);
  if (typeof k === "number" && k !== o.k) fail("MatMulNBits", `input ${x.name} ${fmt(x.shape)} has ${k} features, weight ${weight.name} expects ${o.k}`);
  const attrs = { K: attr.int(o.k), N: attr.int(o.n), bits: attr.int(o.bits), block_size: attr.int(o.blockSize), accuracy_level: attr.int(o.accuracyLevel) };
  return node("MatMulNBits", [x, weight, scales, zeroPoints, null, bias], attrs, x.dtype, [...x.shape.slice(0, -1), o.n], "com.microsoft");
}
