/**
 * Dropout for training graphs, with masks that are a pure function of a seed.
 *
 * ONNX's Dropout and RandomUniform draw from a generator that lives inside the session: a step's
 * masks would depend on how many steps that session ran before, so a run stopped and resumed (or
 * a graph compiled anew) would not repeat them. Here each mask is computed in the graph from the
 * step's `dropout_seed` (an input the trainer draws from its own serializable generator), the
 * site's salt (its rank among the graph's dropout sites) and the element's index, by a
 * counter-based integer hash: the same seed gives the same masks bit for bit, on any run.
 *
 * The hash is Wellons's lowbias32 (a 32-bit xor-shift-multiply mixer), applied twice with the
 * site's key, in uint32 arithmetic (ONNX Runtime's CPU kernels wrap uint32 Mul and Add modulo 2^32
 * and shift uint32 right). Its top 24 bits make a uniform u in [0, 1); an element is kept when
 * u >= rate and scaled by 1 / (1 - rate), as torch's dropout does in training.
 *
 * The mask depends on nothing that is differentiated, so the gradient passes through the final
 * Mul only: d x = d y * mask, with the same mask.
 */
import { Blip2Error } from "../errors.js";
import type { Graph, Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";

/** The graph input that seeds every mask of a step. */
export const DROPOUT_SEED = "dropout_seed";

/**
 * Where a graph's dropout masks come from: its seed and a counter that gives each site a salt of
 * its own. Sites are numbered in the order the graph is built, so two graphs built the same way
 * draw the same masks from the same seed.
 */
export class DropoutContext {
  private sites = 0;

  private constructor(
    /** The seed as a uint32 scalar. */
    readonly seed: Value,
  ) {}

  /** A context fed by a new int64 scalar input `dropout_seed` (its value is taken modulo 2^32). */
  static input(g: Graph): DropoutContext {
    return new DropoutContext(op.cast(g.input(DROPOUT_SEED, "int64", []), "uint32"));
  }

  /** The next site's key: the seed mixed with the site's salt, a uint32 scalar. */
  nextKey(): Value {
    const g = this.seed.graph;
    const salt = g.constant(Uint32Array.from([lowbias32(++this.sites)]), "uint32", []);
    return lowbias32In(op.bitwiseXor(this.seed, salt));
  }
}

/**
 * `x` with each element zeroed with probability `rate` and the rest scaled by 1 / (1 - rate), or
 * `x` itself (no node added) without a context or at rate 0: inference graphs stay as they were.
 */
export function dropout(x: Value, rate: number, ctx: DropoutContext | null | undefined): Value {
  if (!(rate >= 0 && rate <= 1)) throw new Blip2Error(`internal: dropout rate must be in [0, 1], got ${rate}`);
  if (!ctx || rate === 0) return x;
  const g = x.graph;
  if (rate === 1) return op.mul(x, g.scalar(0));
  const u = uniform(ctx.nextKey(), x);
  const mask = op.where(op.less(u, g.scalar(rate)), g.scalar(0), g.scalar(1 / (1 - rate)));
  return op.mul(x, mask);
}

/** One uniform draw in [0, 1) per element of `like`, from the hash of its index under `key`. */
function uniform(key: Value, like: Value): Value {
  const g = like.graph;
  const dims = like.shape;
  if (!dims.every((d): d is number => typeof d === "number")) {
    throw new Blip2Error(`internal: dropout needs a known shape, got ${like.name} [${dims.join(", ")}] (training graphs are built for concrete shapes)`);
  }
  const count = dims.reduce((a, b) => a * b, 1);
  if (count > 2 ** 32) throw new Blip2Error(`internal: dropout over ${count} elements; the element index is 32 bits`);
  const index = op.cast(op.range(g.scalar(0, "int64"), g.scalar(count, "int64"), g.scalar(1, "int64"), count), "uint32");
  // Two keyed rounds: with one, the masks of two sites would be the same bits at indices xor-ed
  // by the difference of their keys.
  const h = lowbias32In(op.add(lowbias32In(op.bitwiseXor(index, key)), key));
  const top24 = op.cast(op.shiftRight(h, u32(g, 8)), "float32");
  return op.reshape(op.mul(top24, g.scalar(2 ** -24)), [...dims]);
}

const u32 = (g: Graph, x: number) => g.constant(Uint32Array.from([x]), "uint32", []);

/** lowbias32 in the graph, elementwise over a uint32 tensor. */
function lowbias32In(x: Value): Value {
  const g = x.graph;
  const xorShift = (v: Value, bits: number) => op.bitwiseXor(v, op.shiftRight(v, u32(g, bits)));
  let h = xorShift(x, 16);
  h = op.mul(h, u32(g, 0x7feb352d));
  h = xorShift(h, 15);
  h = op.mul(h, u32(g, 0x846ca68b));
  return xorShift(h, 16);
}

/**
 * lowbias32 (Chris Wellons, "Prospecting for Hash Functions"): a bijection on 32-bit integers whose
 * output bits each flip with probability close to 1/2 when any input bit flips. The same function
 * as `lowbias32In`, for the salts (build time) and the tests.
 */
export function lowbias32(x: number): number {
  let h = x >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  h ^= h >>> 16;
  return h >>> 0;
}

/** The uniform draw `dropout` makes for element `index` of the `site`-th site (1-based) under `seed`: for tests. */
export function dropoutUniform(seed: number, site: number, index: number): number {
  const key = lowbias32((seed >>> 0) ^ lowbias32(site));
  const h = lowbias32((lowbias32((index ^ key) >>> 0) + key) >>> 0);
  return (h >>> 8) * 2 ** -24;
}
