/**
 * Every vector-Jacobian rule against central finite differences: for a small graph y = f(x...) with
 * random inputs, the backward graph's d(sum(y * r))/dx (r fixed and random) must match
 * (L(x + h e) - L(x - h e)) / 2h element by element.
 */
import * as ort from "onnxruntime-node";
import { describe, expect, it } from "vitest";
import { defineVjp, detach, gradients } from "../src/autodiff/backward.js";
import { differentiableOps } from "../src/autodiff/rules.js";
import { attr, Graph, type Value } from "../src/ir/graph.js";
import { serializeGraph } from "../src/ir/onnx.js";
import * as op from "../src/ir/ops.js";

/** A small deterministic generator for the test's inputs. */
function random(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296 - 0.5;
  };
}

interface Case {
  inputs: { name: string; shape: number[]; values?: (i: number) => number }[];
  /** Builds y from the graph inputs (float32, in the order given). */
  build: (xs: Value[], g: Graph) => Value;
  /** Inputs not differentiated (ids, masks): name -> tensor. */
  fixed?: Record<string, { dtype: "int64"; shape: number[]; data: number[] }>;
  tolerance?: number;
}

async function session(g: Graph) {
  return ort.InferenceSession.create(serializeGraph(g, { externalLocation: (f) => f }), { graphOptimizationLevel: "disabled" });
}

async function check(c: Case): Promise<void> {
  const rand = random(7);
  const g = new Graph("fd");
  const fixedValues: Value[] = [];
  for (const [name, f] of Object.entries(c.fixed ?? {})) fixedValues.push(g.input(name, f.dtype, f.shape));
  const xs = c.inputs.map((i) => g.input(i.name, "float32", i.shape));
  const y = c.build([...xs, ...fixedValues], g);
  const yShape = y.shape as number[];
  const r = Float32Array.from({ length: yShape.reduce((a, b) => a * b, 1) }, () => rand());
  const rv = g.constant(r, "float32", yShape);
  const loss = op.reduceSum(op.mul(y, rv), [...yShape.keys()], false);
  g.output(loss, "loss");
  const grads = gradients(loss, xs);
  grads.forEach((gr, i) => g.output(gr, `grad_${i}`));
  const s = await session(g);

  const values = c.inputs.map((i) => Float32Array.from({ length: i.shape.reduce((a, b) => a * b, 1) }, (_, k) => (i.values ? i.values(k) : rand() * 2)));
  const feeds = (vals: Float32Array[]) => {
    const f: Record<string, ort.Tensor> = {};
    c.inputs.forEach((i, k) => (f[i.name] = new ort.Tensor("float32", vals[k]!, i.shape)));
    for (const [name, fx] of Object.entries(c.fixed ?? {})) f[name] = new ort.Tensor("int64", BigInt64Array.from(fx.data.map(BigInt)), fx.shape);
    return f;
  };
  const out = await s.run(feeds(values));
  const lossAt = async (vals: Float32Array[]) => Number((await s.run(feeds(vals))).loss!.data[0]);
  const h = 1e-2;
  const tol = c.tolerance ?? 2e-2;
  for (let k = 0; k < c.inputs.length; k++) {
    const analytic = out[`grad_${k}`]!.data as Float32Array;
    expect(analytic.length).toBe(values[k]!.length);
    const scale = Math.max(1, ...Array.from(analytic, Math.abs));
    for (let e = 0; e < values[k]!.length; e++) {
      const plus = values.map((v) => v.slice());
      const minus = values.map((v) => v.slice());
      plus[k]![e]! += h;
      minus[k]![e]! -= h;
      const numeric = ((await lossAt(plus)) - (await lossAt(minus))) / (2 * h);
      if (Math.abs(numeric - analytic[e]!) > tol * scale) {
        throw new Error(`input ${c.inputs[k]!.name}[${e}]: analytic ${analytic[e]} vs numeric ${numeric}`);
      }
    }
  }
}

const ids = (shape: number[], data: number[]) => ({ dtype: "int64" as const, shape, data });
const positive = (i: number) => 0.5 + ((i * 37) % 11) / 7;

const CASES: Record<string, Case> = {
  Add: { inputs: [{ name: "a", shape: [2, 3] }, { name: "b", shape: [3] }], build: ([a, b]) => op.add(a!, b!) },
  Sub: { inputs: [{ name: "a", shape: [2, 1] }, { name: "b", shape: [2, 3] }], build: ([a, b]) => op.sub(a!, b!) },
  Mul: { inputs: [{ name: "a", shape: [2, 3] }, { name: "b", shape: [1, 3] }], build: ([a, b]) => op.mul(a!, b!) },
  Div: { inputs: [{ name: "a", shape: [2, 3] }, { name: "b", shape: [2, 3], values: positive }], build: ([a, b]) => op.div(a!, b!) },
  Pow: { inputs: [{ name: "a", shape: [5], values: positive }], build: ([a], g) => op.pow(a!, g.scalar(3)) },
  Max: { inputs: [{ name: "a", shape: [6] }, { name: "b", shape: [6] }], build: ([a, b]) => op.max(a!, b!) },
  Min: { inputs: [{ name: "a", shape: [6] }, { name: "b", shape: [1] }], build: ([a, b]) => op.min(a!, b!) },
  Neg: { inputs: [{ name: "a", shape: [4] }], build: ([a]) => op.neg(a!) },
  Identity: { inputs: [{ name: "a", shape: [4] }], build: ([a]) => op.identity(a!) },
  Sqrt: { inputs: [{ name: "a", shape: [5], values: positive }], build: ([a]) => op.sqrt(a!) },
  Exp: { inputs: [{ name: "a", shape: [5] }], build: ([a]) => op.exp(a!) },
  Log: { inputs: [{ name: "a", shape: [5], values: positive }], build: ([a]) => op.log(a!) },
  Tanh: { inputs: [{ name: "a", shape: [5] }], build: ([a]) => op.tanh(a!) },
  Sigmoid: { inputs: [{ name: "a", shape: [5] }], build: ([a]) => op.sigmoid(a!) },
  Relu: { inputs: [{ name: "a", shape: [7], values: (i) => (i - 3) * 0.3 + 0.05 }], build: ([a]) => op.relu(a!) },
  Abs: { inputs: [{ name: "a", shape: [6], values: (i) => (i - 3) * 0.3 + 0.05 }], build: ([a]) => op.abs(a!) },
  Erf: { inputs: [{ name: "a", shape: [5] }], build: ([a]) => op.erf(a!) },
  Gelu: { inputs: [{ name: "a", shape: [2, 4] }], build: ([a]) => op.add(op.gelu(a!, "none"), op.gelu(a!, "tanh")) },
  Cast: { inputs: [{ name: "a", shape: [3] }], build: ([a]) => op.cast(a!, "float32") },
  Where: {
    inputs: [{ name: "a", shape: [2, 3] }, { name: "b", shape: [3] }],
    build: ([a, b], g) => op.where(g.constant(Uint8Array.from([1, 0, 1, 0, 0, 1]), "bool", [2, 3]), a!, b!),
  },
  MatMul: { inputs: [{ name: "a", shape: [2, 2, 3] }, { name: "b", shape: [3, 4] }], build: ([a, b]) => op.matmul(a!, b!) },
  Gemm: {
    inputs: [{ name: "x", shape: [2, 3, 4] }, { name: "w", shape: [5, 4] }, { name: "bias", shape: [5] }],
    build: ([x, w, b]) => op.linear(x!, w!, b!),
  },
  Softmax: { inputs: [{ name: "a", shape: [2, 5] }], build: ([a]) => op.softmax(a!, -1) },
  LogSoftmax: { inputs: [{ name: "a", shape: [2, 5] }], build: ([a]) => a!.graph.addNode("LogSoftmax", [a!], { axis: attr.int(-1) }, [{ dtype: "float32", shape: a!.shape }])[0]! },
  LayerNormalization: {
    inputs: [{ name: "x", shape: [2, 3, 6] }, { name: "scale", shape: [6] }, { name: "bias", shape: [6] }],
    build: ([x, s, b]) => op.layerNorm(x!, s!, b!, 1e-5),
  },
  ReduceSum: { inputs: [{ name: "a", shape: [2, 3, 4] }], build: ([a]) => op.reduceSum(a!, [1], false) },
  ReduceMean: { inputs: [{ name: "a", shape: [2, 3, 4] }], build: ([a]) => op.reduceMean(a!, [0, 2], true) },
  ReduceMax: { inputs: [{ name: "a", shape: [3, 4] }], build: ([a]) => op.reduceMax(a!, [-1], false) },
  ReduceMin: { inputs: [{ name: "a", shape: [3, 4] }], build: ([a]) => op.reduceMin(a!, [0], true) },
  Reshape: { inputs: [{ name: "a", shape: [2, 6] }], build: ([a]) => op.mul(op.reshape(a!, [3, -1]), a!.graph.constant(Float32Array.from([1, 2, 3, 4]), "float32", [4])) },
  Squeeze: { inputs: [{ name: "a", shape: [2, 1, 3] }], build: ([a]) => op.squeeze(a!, [1]) },
  Unsqueeze: { inputs: [{ name: "a", shape: [2, 3] }], build: ([a]) => op.unsqueeze(a!, [0, 2]) },
  Transpose: { inputs: [{ name: "a", shape: [2, 3, 4] }], build: ([a]) => op.transpose(a!, [2, 0, 1]) },
  Expand: { inputs: [{ name: "a", shape: [1, 3] }], build: ([a], g) => op.expand(a!, g.ints([4, 3]), [4, 3]) },
  Concat: { inputs: [{ name: "a", shape: [2, 1] }, { name: "b", shape: [2, 3] }], build: ([a, b]) => op.concat([a!, b!], -1) },
  Slice: { inputs: [{ name: "a", shape: [3, 5] }], build: ([a]) => op.slice(a!, [1, -4], [2 ** 62, 4], [0, 1]) },
  Gather: {
    inputs: [{ name: "table", shape: [4, 3] }],
    fixed: { ids: ids([2, 3], [0, 2, 2, 3, 0, 0]) },
    build: ([t, i]) => op.gather(t!, i!, 0),
  },
  GatherElements: {
    inputs: [{ name: "x", shape: [3, 4] }],
    fixed: { at: ids([3, 2], [1, 1, 0, 3, 2, 2]) },
    build: ([x, at]) => x!.graph.addNode("GatherElements", [x!, at!], { axis: attr.int(1) }, [{ dtype: "float32", shape: [3, 2] }])[0]!,
  },
  Conv: {
    // A patch embedding (stride = kernel); 7 x 6 leaves a row and a column no patch reaches.
    inputs: [{ name: "x", shape: [2, 2, 7, 6] }, { name: "w", shape: [3, 2, 3, 3] }, { name: "bias", shape: [3] }],
    build: ([x, w, b]) => op.conv(x!, w!, b!, 3),
  },
  MultiHeadAttention: {
    inputs: [{ name: "q", shape: [1, 3, 4] }, { name: "k", shape: [1, 2, 3, 2] }, { name: "v", shape: [1, 2, 3, 2] }],
    build: ([q, k, v], g) => op.multiHeadAttention(q!, k!, v!, g.constant(Float32Array.from([0, -1e9, -1e9, 0, 0, -1e9, 0, 0, 0]), "float32", [1, 1, 3, 3]), { heads: 2, scale: 0.7 }),
  },
};

describe("vector-Jacobian rules against finite differences", () => {
  it("has a case for every rule", () => {
    expect(Object.keys(CASES).sort()).toEqual(differentiableOps());
  });
  for (const [name, c] of Object.entries(CASES)) it(name, () => check(c));

  it("Gather along axis 1 (logits at chosen positions)", () =>
    check({ inputs: [{ name: "x", shape: [2, 4, 3] }], fixed: { at: ids([3], [3, 1, 3]) }, build: ([x, at]) => op.gather(x!, at!, 1) }));

  it("a chain through a layer: linear, gelu, layer norm, softmax", () =>
    check({
      inputs: [{ name: "x", shape: [2, 3] }, { name: "w", shape: [4, 3] }, { name: "s", shape: [4] }],
      build: ([x, w, s]) => op.softmax(op.layerNorm(op.gelu(op.linear(x!, w!, null)), s!, null, 1e-5), -1),
    }));
});

describe("backward graph", () => {
  it("detach stops the gradient, and a value used twice sums both paths", async () => {
    const g = new Graph("detach");
    const x = g.input("x", "float32", [3]);
    const loss = op.reduceSum(op.add(op.mul(x, x), op.mul(detach(x), x)), [0], false);
    g.output(loss, "loss");
    const [dx] = gradients(loss, [x]);
    g.output(dx!, "dx");
    const s = await session(g);
    const out = await s.run({ x: new ort.Tensor("float32", Float32Array.from([1, -2, 3]), [3]) });
    // d/dx (x^2 + c x) with c = x held constant: 2x + x = 3x
    expect(Array.from(out.dx!.data as Float32Array)).toEqual([3, -6, 9]);
  });

  it("a custom rule replaces the nodes that compute its value", async () => {
    const g = new Graph("custom");
    const x = g.input("x", "float32", [2]);
    const y = op.relu(op.mul(x, g.scalar(4)));
    defineVjp(y, [x], (gy) => new Map([[x, op.mul(gy, g.scalar(10))]]));
    const loss = op.reduceSum(y, [0], false);
    g.output(loss, "loss");
    g.output(gradients(loss, [x])[0]!, "dx");
    const out = await (await session(g)).run({ x: new ort.Tensor("float32", Float32Array.from([1, -1]), [2]) });
    expect(Array.from(out.dx!.data as Float32Array)).toEqual([10, 10]);
  });

  it("values the loss does not depend on get zeros, and a missing rule is named", async () => {
    const g = new Graph("zeros");
    const x = g.input("x", "float32", [2]);
    const unused = g.input("u", "float32", [3]);
    const loss = op.reduceSum(op.mul(x, x), [0], false);
    const [, du] = gradients(loss, [x, unused]);
    g.output(du!, "du");
    g.output(loss, "loss");
    const out = await (await session(g)).run({ x: new ort.Tensor("float32", Float32Array.from([1, 2]), [2]), u: new ort.Tensor("float32", new Float32Array(3), [3]) });
    expect(Array.from(out.du!.data as Float32Array)).toEqual([0, 0, 0]);

    const h = new Graph("norule");
    const a = h.input("a", "float32", [2, 3]);
    expect(() => gradients(op.reduceSum(op.cumsum(a, 1), [0, 1], false), [a])).toThrow(/no vector-Jacobian rule for CumSum/);
  });

  it("Conv is differentiated only as a patch embedding (stride = kernel)", () => {
    const h = new Graph("overlapping");
    const a = h.input("a", "float32", [1, 1, 4, 4]);
    const conv = op.conv(a, h.constant(new Float32Array(4), "float32", [1, 1, 2, 2]), null, 1);
    expect(() => gradients(op.reduceSum(conv, [0, 1, 2, 3], false), [a])).toThrow(/Conv is differentiated only as a patch embedding/);
  });
});
