/**
 * One vector-Jacobian rule per op: given the gradients of a node's outputs, the gradients of its
 * inputs, built from standard ONNX ops. A rule returns null for inputs that take no gradient (ids,
 * shapes, masks) and is asked only for the inputs marked `wanted`.
 */
import { Blip2Error } from "../errors.js";
import { attr, type Attr, type DType, type Graph, type Node, type Shape, type Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { backprop, concrete } from "./backward.js";

export interface RuleContext {
  node: Node;
  /** The gradient of each output (null where none reaches it). */
  outGrads: (Value | null)[];
  /** Which inputs need a gradient. */
  wanted: boolean[];
}

export type Rule = (ctx: RuleContext) => (Value | null)[];

const RULES: Record<string, Rule> = {};

export function ruleFor(opType: string): Rule | undefined {
  return RULES[opType];
}

/** The op types that have a rule (for the tests). */
export function differentiableOps(): string[] {
  return Object.keys(RULES).sort();
}

// ---- helpers ---------------------------------------------------------------------------------

const input = (ctx: RuleContext, i: number): Value => ctx.node.inputs[i]!;
const output = (ctx: RuleContext, i = 0): Value => ctx.node.outputs[i]!;
const grad = (ctx: RuleContext): Value => ctx.outGrads[0]!;

function raw(g: Graph, opType: string, inputs: (Value | null)[], attrs: Record<string, Attr>, dtype: DType, shape: Shape): Value {
  return g.addNode(opType, inputs, attrs, [{ dtype, shape }])[0]!;
}

/** The int64 values of a constant (an inline initializer), e.g. a Slice's bounds. */
export function constInts(v: Value): number[] {
  const init = v.graph.initializers.find((i) => i.name === v.name);
  if (!init || init.kind !== "inline" || !(init.data instanceof BigInt64Array)) {
    throw new Blip2Error(`autodiff: ${v.name} must be a constant of the graph to differentiate through it`);
  }
  return Array.from(init.data, Number);
}

function attrInt(node: Node, name: string, fallback: number): number {
  const a = node.attrs[name];
  return a && a.kind === "int" ? a.value : fallback;
}

/**
 * Sums `grad` down to `shape` (undoing numpy broadcasting): over its extra leading axes and over
 * the axes where `shape` has a 1.
 */
export function sumTo(grad: Value, shape: Shape): Value {
  const from = concrete(grad);
  const to = shape as number[];
  if (from.length === to.length && from.every((d, i) => d === to[i])) return grad;
  const lead = from.length - to.length;
  const axes: number[] = [];
  from.forEach((d, i) => {
    if (i < lead || (to[i - lead] === 1 && d !== 1)) axes.push(i);
  });
  const summed = axes.length ? op.reduceSum(grad, axes, true) : grad;
  return op.reshape(summed, to.length ? to : []);
}

const like = (v: Value, x: number) => v.graph.scalar(x);
const sq = (x: Value) => op.mul(x, x);
const greater = (a: Value, b: Value) => op.less(b, a);
const whereElse = (cond: Value, a: Value, zero: Value) => op.where(cond, a, zero);
/** The last two axes swapped. */
const swapLast = (x: Value) => op.transpose(x, [...Array(x.rank - 2).keys(), x.rank - 1, x.rank - 2]);

// ---- elementwise -----------------------------------------------------------------------------

RULES.Add = (ctx) => [sumTo(grad(ctx), input(ctx, 0).shape), sumTo(grad(ctx), input(ctx, 1).shape)];
RULES.Sub = (ctx) => [sumTo(grad(ctx), input(ctx, 0).shape), ctx.wanted[1] ? sumTo(op.neg(grad(ctx)), input(ctx, 1).shape) : null];
RULES.Mul = (ctx) => {
  const [a, b] = [input(ctx, 0), input(ctx, 1)];
  return [ctx.wanted[0] ? sumTo(op.mul(grad(ctx), b), a.shape) : null, ctx.wanted[1] ? sumTo(op.mul(grad(ctx), a), b.shape) : null];
};
RULES.Div = (ctx) => {
  const [a, b] = [input(ctx, 0), input(ctx, 1)];
  const g = grad(ctx);
  return [ctx.wanted[0] ? sumTo(op.div(g, b), a.shape) : null, ctx.wanted[1] ? sumTo(op.neg(op.div(op.mul(g, output(ctx)), b)), b.shape) : null];
};
RULES.Pow = (ctx) => {
  const [a, b] = [input(ctx, 0), input(ctx, 1)];
  if (ctx.wanted[1]) throw new Blip2Error("autodiff: Pow with a trained exponent is not supported");
  // d a^b / da = b a^(b-1)
  return [sumTo(op.mul(grad(ctx), op.mul(b, op.pow(a, op.sub(b, like(b, 1))))), a.shape), null];
};
/** Max/Min: the gradient goes to the chosen input; on a tie to the first (torch's clamp_min passes it to x). */
function choose(first: (a: Value, b: Value) => Value): Rule {
  return (ctx) => {
    const [a, b] = [input(ctx, 0), input(ctx, 1)];
    const g = grad(ctx);
    const zero = like(g, 0);
    const pickA = first(a, b);
    return [
      ctx.wanted[0] ? sumTo(whereElse(pickA, g, zero), a.shape) : null,
      ctx.wanted[1] ? sumTo(whereElse(op.not(pickA), g, zero), b.shape) : null,
    ];
  };
}
RULES.Max = choose((a, b) => op.not(op.less(a, b)));
RULES.Min = choose((a, b) => op.not(greater(a, b)));

RULES.Neg = (ctx) => [op.neg(grad(ctx))];
RULES.Identity = (ctx) => [grad(ctx)];
RULES.Sqrt = (ctx) => [op.div(op.mul(grad(ctx), like(grad(ctx), 0.5)), output(ctx))];
RULES.Exp = (ctx) => [op.mul(grad(ctx), output(ctx))];
RULES.Log = (ctx) => [op.div(grad(ctx), input(ctx, 0))];
RULES.Tanh = (ctx) => [op.mul(grad(ctx), op.sub(like(grad(ctx), 1), sq(output(ctx))))];
RULES.Sigmoid = (ctx) => {
  const y = output(ctx);
  return [op.mul(grad(ctx), op.mul(y, op.sub(like(y, 1), y)))];
};
RULES.Relu = (ctx) => [whereElse(greater(input(ctx, 0), like(grad(ctx), 0)), grad(ctx), like(grad(ctx), 0))];
RULES.Abs = (ctx) => {
  const x = input(ctx, 0);
  return [op.mul(grad(ctx), raw(x.graph, "Sign", [x], {}, x.dtype, x.shape))];
};
RULES.Erf = (ctx) => {
  const x = input(ctx, 0);
  return [op.mul(grad(ctx), op.mul(like(x, 2 / Math.sqrt(Math.PI)), op.exp(op.neg(sq(x)))))];
};
RULES.Gelu = (ctx) => {
  const x = input(ctx, 0);
  const approx = ctx.node.attrs.approximate;
  const g = grad(ctx);
  if (approx && approx.kind === "string" && approx.value === "tanh") {
    // 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3): d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)
    const c = Math.sqrt(2 / Math.PI);
    const x2 = sq(x);
    const t = op.tanh(op.mul(like(x, c), op.add(x, op.mul(like(x, 0.044715), op.mul(x2, x)))));
    const left = op.mul(like(x, 0.5), op.add(like(x, 1), t));
    const du = op.mul(like(x, c), op.add(like(x, 1), op.mul(like(x, 3 * 0.044715), x2)));
    const right = op.mul(op.mul(like(x, 0.5), x), op.mul(op.sub(like(x, 1), sq(t)), du));
    return [op.mul(g, op.add(left, right))];
  }
  // x Φ(x): d/dx = Φ(x) + x φ(x)
  const cdf = op.mul(like(x, 0.5), op.add(like(x, 1), op.erf(op.mul(x, like(x, Math.SQRT1_2)))));
  const pdf = op.mul(like(x, 1 / Math.sqrt(2 * Math.PI)), op.exp(op.mul(like(x, -0.5), sq(x))));
  return [op.mul(g, op.add(cdf, op.mul(x, pdf)))];
};
RULES.Cast = (ctx) => [op.cast(grad(ctx), input(ctx, 0).dtype)];
RULES.Where = (ctx) => {
  const [c, a, b] = [input(ctx, 0), input(ctx, 1), input(ctx, 2)];
  const g = grad(ctx);
  const zero = like(g, 0);
  return [null, ctx.wanted[1] ? sumTo(op.where(c, g, zero), a.shape) : null, ctx.wanted[2] ? sumTo(op.where(c, zero, g), b.shape) : null];
};

// ---- products --------------------------------------------------------------------------------

RULES.MatMul = (ctx) => {
  const [a, b] = [input(ctx, 0), input(ctx, 1)];
  const g = grad(ctx);
  return [ctx.wanted[0] ? sumTo(op.matmul(g, swapLast(b)), a.shape) : null, ctx.wanted[1] ? sumTo(op.matmul(swapLast(a), g), b.shape) : null];
};

/** Gemm as the models emit it: y = x W^T (+ bias), x [rows, K], W [N, K] (transB = 1). */
RULES.Gemm = (ctx) => {
  const n = ctx.node;
  if (attrInt(n, "transA", 0) !== 0 || attrInt(n, "transB", 0) !== 1 || (n.attrs.alpha && n.attrs.alpha.value !== 1) || (n.attrs.beta && n.attrs.beta.value !== 1)) {
    throw new Blip2Error("autodiff: Gemm is differentiated only in the form x W^T + b");
  }
  const [x, w] = [input(ctx, 0), input(ctx, 1)];
  const g = grad(ctx);
  return [
    ctx.wanted[0] ? op.matmul(g, w) : null,
    ctx.wanted[1] ? op.matmul(op.transpose(g, [1, 0]), x) : null,
    ctx.wanted[2] ? op.reduceSum(g, [0], false) : null,
  ];
};

// ---- normalization and softmax ---------------------------------------------------------------

RULES.Softmax = (ctx) => {
  const axis = attrInt(ctx.node, "axis", -1);
  const y = output(ctx);
  const g = grad(ctx);
  return [op.mul(y, op.sub(g, op.reduceSum(op.mul(g, y), [axis])))];
};

RULES.LogSoftmax = (ctx) => {
  const axis = attrInt(ctx.node, "axis", -1);
  const g = grad(ctx);
  return [op.sub(g, op.mul(op.exp(output(ctx)), op.reduceSum(g, [axis])))];
};

/** LayerNormalization over the last axis; mean and 1/std are recomputed (the forward node keeps only its first output). */
RULES.LayerNormalization = (ctx) => {
  const [x, scale, bias] = [input(ctx, 0), input(ctx, 1), ctx.node.inputs[2] ?? null];
  if (attrInt(ctx.node, "axis", -1) !== -1 && attrInt(ctx.node, "axis", -1) !== x.rank - 1) throw new Blip2Error("autodiff: LayerNormalization is differentiated over the last axis only");
  const eps = (ctx.node.attrs.epsilon?.value as number | undefined) ?? 1e-5;
  const g = grad(ctx);
  const centered = op.sub(x, op.reduceMean(x, [-1]));
  const invStd = op.div(like(x, 1), op.sqrt(op.add(op.reduceMean(sq(centered), [-1]), like(x, eps))));
  const xHat = op.mul(centered, invStd);
  const leading = [...Array(x.rank - 1).keys()];
  const out: (Value | null)[] = [null, null, null];
  if (ctx.wanted[0]) {
    const gHat = op.mul(g, scale);
    const inner = op.sub(op.sub(gHat, op.reduceMean(gHat, [-1])), op.mul(xHat, op.reduceMean(op.mul(gHat, xHat), [-1])));
    out[0] = op.mul(invStd, inner);
  }
  if (ctx.wanted[1]) out[1] = op.reduceSum(op.mul(g, xHat), leading, false);
  if (bias && ctx.wanted[2]) out[2] = op.reduceSum(g, leading, false);
  return out;
};

// ---- reductions ------------------------------------------------------------------------------

/** The reduction's gradient broadcast back over the reduced axes. */
function unreduce(ctx: RuleContext, g: Value): Value {
  const x = input(ctx, 0);
  const axes = ctx.node.inputs[1] ? constInts(ctx.node.inputs[1]).map((a) => (a < 0 ? x.rank + a : a)) : [...x.shape.keys()];
  const kept = attrInt(ctx.node, "keepdims", 1) === 1 ? g : op.unsqueeze(g, axes);
  return op.expand(kept, x.graph.ints(concrete(x)), x.shape);
}

function reducedCount(ctx: RuleContext): number {
  const x = input(ctx, 0);
  const dims = concrete(x);
  const axes = ctx.node.inputs[1] ? constInts(ctx.node.inputs[1]).map((a) => (a < 0 ? x.rank + a : a)) : [...dims.keys()];
  return axes.reduce((n, a) => n * dims[a]!, 1);
}

RULES.ReduceSum = (ctx) => [unreduce(ctx, grad(ctx)), null];
RULES.ReduceMean = (ctx) => [unreduce(ctx, op.mul(grad(ctx), like(grad(ctx), 1 / reducedCount(ctx)))), null];
/** Max/Min over axes: the gradient goes to the elements equal to the extreme (all of them on a tie). */
function extremeRule(ctx: RuleContext): (Value | null)[] {
  const x = input(ctx, 0);
  const fakeGrad = (v: Value) => unreduce(ctx, v);
  const hit = op.equal(x, fakeGrad(output(ctx)));
  return [op.where(hit, fakeGrad(grad(ctx)), like(x, 0)), null];
}
RULES.ReduceMax = extremeRule;
RULES.ReduceMin = extremeRule;

// ---- shapes ----------------------------------------------------------------------------------

const reshapeBack = (ctx: RuleContext): (Value | null)[] => [op.reshape(grad(ctx), concrete(input(ctx, 0))), null];
RULES.Reshape = reshapeBack;
RULES.Squeeze = reshapeBack;
RULES.Unsqueeze = reshapeBack;

RULES.Transpose = (ctx) => {
  const perm = ctx.node.attrs.perm!.value as number[];
  const inverse = perm.map((_, i) => perm.indexOf(i));
  return [op.transpose(grad(ctx), inverse)];
};

RULES.Expand = (ctx) => [sumTo(grad(ctx), input(ctx, 0).shape), null];

RULES.Concat = (ctx) => {
  const out = output(ctx);
  const axisRaw = attrInt(ctx.node, "axis", 0);
  const axis = axisRaw < 0 ? out.rank + axisRaw : axisRaw;
  let at = 0;
  return ctx.node.inputs.map((x, i) => {
    const size = concrete(x!)[axis]!;
    const start = at;
    at += size;
    return ctx.wanted[i] ? op.slice(grad(ctx), [start], [start + size], [axis]) : null;
  });
};

/** Slice with constant bounds and steps of 1: the gradient padded back with zeros. */
RULES.Slice = (ctx) => {
  const x = input(ctx, 0);
  const dims = concrete(x);
  const [startsV, endsV, axesV, stepsV] = ctx.node.inputs.slice(1);
  const starts = constInts(startsV!);
  const ends = constInts(endsV!);
  const axes = axesV ? constInts(axesV) : starts.map((_, i) => i);
  if (stepsV && constInts(stepsV).some((s) => s !== 1)) throw new Blip2Error("autodiff: Slice is differentiated with steps of 1 only");
  const before = new Array<number>(x.rank).fill(0);
  const after = new Array<number>(x.rank).fill(0);
  axes.forEach((axisRaw, i) => {
    const axis = axisRaw < 0 ? x.rank + axisRaw : axisRaw;
    const d = dims[axis]!;
    const clamp = (v: number) => Math.min(Math.max(v < 0 ? d + v : v, 0), d);
    const lo = clamp(starts[i]!);
    const hi = Math.max(clamp(ends[i]!), lo);
    before[axis] = lo;
    after[axis] = d - hi;
  });
  const g = x.graph;
  return [raw(g, "Pad", [grad(ctx), g.ints([...before, ...after])], { mode: attr.string("constant") }, x.dtype, x.shape), null, null, null, null];
};

/** Gather: the gradient scattered (summed) into the rows it was taken from. */
RULES.Gather = (ctx) => {
  const [data, indices] = [input(ctx, 0), input(ctx, 1)];
  const axisRaw = attrInt(ctx.node, "axis", 0);
  const axis = axisRaw < 0 ? data.rank + axisRaw : axisRaw;
  const dims = concrete(data);
  const g = data.graph;
  // Scatter along the first axis: data [A, rest], grad [indices..., rest].
  let gradOut = grad(ctx);
  const idxRank = indices.rank;
  if (axis !== 0) {
    // grad is [data[:axis], indices..., data[axis+1:]]: bring the indices' axes first.
    const r = gradOut.rank;
    const idxAxes = [...Array(idxRank).keys()].map((i) => axis + i);
    gradOut = op.transpose(gradOut, [...idxAxes, ...[...Array(r).keys()].filter((i) => !idxAxes.includes(i))]);
  }
  const restShape = concrete(gradOut).slice(idxRank);
  const count = concrete(indices).reduce((a, b) => a * b, 1);
  const updates = op.reshape(gradOut, [count, ...restShape]);
  const idx = op.reshape(op.cast(indices, "int64"), [count, 1]);
  const frontDims = [dims[axis]!, ...restShape];
  const zeros = op.expand(g.scalar(0), g.ints(frontDims), frontDims);
  let scattered = raw(g, "ScatterND", [zeros, idx, updates], { reduction: attr.string("add") }, "float32", frontDims);
  if (axis !== 0) {
    // back from [A, data[:axis], data[axis+1:]] to data's order
    const perm = [...Array(data.rank).keys()].map((i) => (i < axis ? i + 1 : i === axis ? 0 : i));
    scattered = op.transpose(scattered, perm);
  }
  return [scattered, null];
};

/** GatherElements: the gradient scattered (summed) back to the positions it was taken from. */
RULES.GatherElements = (ctx) => {
  const [data, indices] = [input(ctx, 0), input(ctx, 1)];
  const g = data.graph;
  const dims = concrete(data);
  const zeros = op.expand(g.scalar(0), g.ints(dims), dims);
  return [raw(g, "ScatterElements", [zeros, indices, grad(ctx)], { axis: ctx.node.attrs.axis ?? attr.int(0), reduction: attr.string("add") }, "float32", data.shape), null];
};

// ---- fused inference ops, differentiated through their standard equivalents ------------------

/**
 * com.microsoft.MultiHeadAttention (q [B, S, H*Dh], keys/values [B, H, T, Dh], additive bias):
 * recomputed in standard ops and differentiated there.
 */
RULES.MultiHeadAttention = (ctx) => {
  const [q, keys, values] = [input(ctx, 0), input(ctx, 1), input(ctx, 2)];
  const bias = ctx.node.inputs[5] ?? null;
  const heads = attrInt(ctx.node, "num_heads", 1);
  const scale = ctx.node.attrs.scale!.value as number;
  const [b, s, hd] = concrete(q);
  const qh = op.transpose(op.reshape(q, [b!, s!, heads, hd! / heads]), [0, 2, 1, 3]);
  let scores = op.mul(op.matmul(qh, op.transpose(keys, [0, 1, 3, 2])), q.graph.scalar(scale));
  if (bias) scores = op.add(scores, bias);
  const context = op.matmul(op.softmax(scores, -1), values);
  const out = op.reshape(op.transpose(context, [0, 2, 1, 3]), [b!, s!, hd!]);
  const wrt = [q, keys, values].filter((_, i) => ctx.wanted[i]);
  const grads = backprop(q.graph, [[out, grad(ctx)]], wrt);
  return ctx.node.inputs.map((x, i) => (i < 3 && ctx.wanted[i] ? (grads.get(x!) ?? null) : null));
};

/**
 * Conv as the ViT's patch embedding uses it: stride equal to the kernel, no padding, dilation 1,
 * one group, so the patches do not overlap. Recomputed as a product over patches ([B, C, H, W] ->
 * [B, patches, C*kh*kw] @ W^T reshaped, plus the bias) and differentiated there: rows and columns
 * the last patch does not reach get zero gradient, as in the convolution.
 */
RULES.Conv = (ctx) => {
  const n = ctx.node;
  const [x, w] = [input(ctx, 0), input(ctx, 1)];
  const bias = n.inputs[2] ?? null;
  const [outC, inC, kh, kw] = concrete(w);
  const ints = (name: string) => (n.attrs[name]?.value as number[] | undefined) ?? null;
  const strides = ints("strides") ?? [1, 1];
  const pads = ints("pads") ?? [0, 0, 0, 0];
  const dilations = ints("dilations") ?? [1, 1];
  const autoPad = n.attrs.auto_pad?.value ?? "NOTSET";
  if (strides[0] !== kh || strides[1] !== kw || pads.some((p) => p !== 0) || dilations.some((d) => d !== 1) || attrInt(n, "group", 1) !== 1 || autoPad !== "NOTSET") {
    throw new Blip2Error("autodiff: Conv is differentiated only as a patch embedding (stride = kernel, no padding, dilation 1, one group)");
  }
  const [b, , h, wd] = concrete(x);
  const [gh, gw] = [Math.floor(h! / kh!), Math.floor(wd! / kw!)];
  const covered = gh * kh! === h && gw * kw! === wd ? x : op.slice(x, [0, 0], [gh * kh!, gw * kw!], [2, 3]);
  const blocks = op.reshape(covered, [b!, inC!, gh, kh!, gw, kw!]);
  const patches = op.reshape(op.transpose(blocks, [0, 2, 4, 1, 3, 5]), [b!, gh * gw, inC! * kh! * kw!]);
  let y = op.matmul(patches, op.transpose(op.reshape(w, [outC!, inC! * kh! * kw!]), [1, 0]));
  if (bias) y = op.add(y, bias);
  const out = op.transpose(op.reshape(y, [b!, gh, gw, outC!]), [0, 3, 1, 2]);
  const wrt = [x, w, bias].filter((v, i): v is Value => v !== null && ctx.wanted[i] === true);
  const grads = backprop(x.graph, [[out, grad(ctx)]], wrt);
  return n.inputs.map((v, i) => (v && ctx.wanted[i] ? (grads.get(v) ?? null) : null));
};
