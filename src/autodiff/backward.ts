/**
 * Reverse-mode automatic differentiation over the graph IR. `gradients` appends to a forward graph
 * the nodes that compute d loss / d x for the values asked for, walking the forward nodes backwards
 * and applying each op's vector-Jacobian rule (rules.ts), all in standard ONNX ops, so that one
 * ONNX Runtime session runs forward and backward together.
 *
 * Only what needs it is differentiated: a node gets a rule applied only when one of its outputs
 * carries a gradient towards the loss and one of its inputs depends on a value asked for. Frozen
 * weights (initializers) therefore never get weight gradients; the inputs gradients that pass
 * through frozen parts to trained ones are computed, nothing else.
 *
 * Training graphs are built for concrete shapes (a batch size and a text length), so every shape
 * the rules see is known at build time.
 */
import { Blip2Error } from "../errors.js";
import type { Graph, Node, Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { ruleFor } from "./rules.js";

/** Values whose gradient is defined as zero (torch's `.detach()`), by the Identity that detaches them. */
const detached = new WeakSet<Value>();

/** `x` as a value gradients do not flow through (torch's `x.detach()`). */
export function detach(x: Value): Value {
  const y = op.identity(x);
  detached.add(y);
  return y;
}

/**
 * A vector-Jacobian product given for one value in place of the rules of the nodes that compute it:
 * e.g. a linear layer whose weight is quantized, whose forward runs integer kernels but whose
 * derivative with respect to its input is that of `x @ W^T`. `vjp` gets the gradient of `value` and
 * returns gradients for the values it names (those inputs that do not need one are ignored).
 */
export type CustomVjp = (grad: Value) => Map<Value, Value>;
const customVjps = new WeakMap<Value, { inputs: Value[]; vjp: CustomVjp }>();

export function defineVjp(value: Value, inputs: Value[], vjp: CustomVjp): void {
  customVjps.set(value, { inputs, vjp });
}

/**
 * Appends to `loss`'s graph the gradient of `loss` (seeded with `seed`, ones by default: `loss` is
 * usually a scalar) with respect to each of `wrt`. A value of `wrt` the loss does not depend on gets
 * a zero gradient.
 */
export function gradients(loss: Value, wrt: Value[], seed?: Value): Value[] {
  const g = loss.graph;
  const seedGrad = seed ?? op.expand(g.scalar(1), g.ints(concrete(loss).slice()), loss.shape);
  const grads = backprop(g, [[loss, seedGrad]], wrt);
  return wrt.map((x) => grads.get(x) ?? zerosLike(x));
}

/** The backward pass from several seeded values at once; returns the gradients of `wrt` reached. */
export function backprop(g: Graph, seeds: [Value, Value][], wrt: Value[]): Map<Value, Value> {
  const needs = dependsOn(g, wrt);
  const pending = new Map<Value, Value[]>();
  const add = (v: Value, grad: Value) => {
    const list = pending.get(v);
    if (list) list.push(grad);
    else pending.set(v, [grad]);
  };
  for (const [v, s] of seeds) add(v, s);
  const nodes = g.nodes.slice();
  for (let i = nodes.length - 1; i >= 0; i--) {
    const node = nodes[i]!;
    if (!node.outputs.some((o) => pending.has(o))) continue;
    const outGrads = node.outputs.map((o) => sumGrads(pending.get(o)));
    const custom = node.outputs.length === 1 ? customVjps.get(node.outputs[0]!) : undefined;
    if (custom) {
      // The custom rule replaces the nodes computing this value; its own inputs get its gradients.
      // It runs only where one of them needs one: a nested pass (MultiHeadAttention's rule) reaches
      // values whose own inputs it was not asked about.
      if (custom.inputs.some((x) => needs.has(x))) {
        for (const [input, grad] of custom.vjp(outGrads[0]!)) if (needs.has(input)) add(input, grad);
      }
      continue;
    }
    if (node.outputs.length === 1 && detached.has(node.outputs[0]!)) continue;
    const wanted = node.inputs.map((x) => x !== null && needs.has(x));
    if (!wanted.some(Boolean)) continue;
    const rule = ruleFor(node.op);
    if (!rule) throw new Blip2Error(`autodiff: no vector-Jacobian rule for ${node.domain ? `${node.domain}.` : ""}${node.op} (node producing ${node.outputs[0]?.name})`);
    const inGrads = rule({ node, outGrads, wanted });
    node.inputs.forEach((x, j) => {
      const grad = inGrads[j];
      if (x && wanted[j] && grad) add(x, grad);
    });
  }
  const result = new Map<Value, Value>();
  for (const x of wrt) {
    const list = pending.get(x);
    if (list) result.set(x, sumGrads(list)!);
  }
  return result;
}

/** The values that depend on any of `wrt` through float operations (and so may need gradients). */
function dependsOn(g: Graph, wrt: Value[]): Set<Value> {
  const set = new Set<Value>(wrt);
  // Custom rules reach their inputs directly: whatever those depend on counts through the value.
  for (const node of g.nodes) {
    if (node.outputs.length === 1 && detached.has(node.outputs[0]!)) continue;
    if (node.inputs.some((x) => x !== null && set.has(x))) {
      for (const o of node.outputs) if (o.dtype === "float32") set.add(o);
    }
  }
  return set;
}

function sumGrads(list: Value[] | undefined): Value | null {
  if (!list || list.length === 0) return null;
  return list.reduce((a, b) => op.add(a, b));
}

/** A value's shape as numbers; training graphs have no symbolic dimensions. */
export function concrete(v: Value): number[] {
  for (const d of v.shape) {
    if (typeof d !== "number") throw new Blip2Error(`autodiff: ${v.name} has symbolic shape [${v.shape.join(", ")}]; training graphs are built for concrete shapes`);
  }
  return v.shape as number[];
}

export function zerosLike(x: Value): Value {
  const g = x.graph;
  return op.expand(g.scalar(0), g.ints(concrete(x)), x.shape);
}

export type { Node };
