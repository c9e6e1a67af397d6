/**
 * AdamW as `torch.optim.AdamW` (PyTorch 1.13, `_single_tensor_adamw`): decoupled weight decay and
 * bias-corrected moments, on float32 master copies of the trained tensors. Per tensor, per step t:
 *
 *   p  *= 1 - lr * wd                                 (decay first, on the old value)
 *   m   = b1 * m + (1 - b1) * g
 *   v   = b2 * v + (1 - b2) * g * g
 *   p  -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 *
 * Each new m, v and p is stored in float32, its expression computed in double: our values track
 * PyTorch's float32 ones to an ulp or two (not bit for bit; its vectorised kernels round each
 * operation, and may fuse multiply-adds), and far faster than rounding every intermediate was.
 * Like PyTorch, each tensor keeps its own step count and a tensor without a gradient in a step is
 * left alone (not decayed, its moments and count unchanged).
 *
 * Also here: the global gradient norm, clipping by it (`torch.nn.utils.clip_grad_norm_`) and a
 * gradient accumulator for micro-batches.
 */
import { Blip2Error } from "../errors.js";

/** A trained tensor: the float32 master copy the optimizer updates in place. */
export interface Param {
  name: string;
  shape: number[];
  value: Float32Array;
}

export interface AdamWOptions {
  /** Moment decay rates (b1, b2); default [0.9, 0.999]. */
  betas?: [number, number];
  /** Added to the denominator; default 1e-8. */
  eps?: number;
  /** Decoupled weight decay; default 0.05 (BLIP-2's). Applied only where `decays` says so. */
  weightDecay?: number;
  /** Which tensors get weight decay; default `decays` below. */
  decays?: (name: string, shape: readonly number[]) => boolean;
}

/** One tensor's optimizer state (PyTorch's `step`, `exp_avg`, `exp_avg_sq`). */
export interface AdamWTensorState {
  step: number;
  expAvg: Float32Array;
  expAvgSq: Float32Array;
}

/** Everything needed to resume exactly: per tensor, its step count and both moments. */
export interface AdamWState {
  tensors: Record<string, AdamWTensorState>;
}

/**
 * Whether a tensor gets weight decay: not vectors and scalars (biases, LayerNorm gains, the ITC
 * temperature), nor any tensor whose name says bias or norm (any case) or is `temp`. These are the
 * fixtures' rule (test/fixtures/train/README.md); LAVIS's `optim_params` tests rank < 2 and the
 * substrings "bias", "ln", "bn" of its own names, which on BLIP-2 selects the same tensors.
 */
export function decays(name: string, shape: readonly number[]): boolean {
  if (shape.length < 2) return false;
  const lower = name.toLowerCase();
  if (lower.includes("bias") || lower.includes("norm")) return false;
  return name !== "temp" && !name.endsWith(".temp");
}

export class AdamW {
  readonly params: readonly Param[];
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  private readonly byName = new Map<string, Param>();
  private readonly decayed = new Set<string>();
  private tensors = new Map<string, AdamWTensorState>();

  constructor(params: readonly Param[], options: AdamWOptions = {}) {
    [this.beta1, this.beta2] = options.betas ?? [0.9, 0.999];
    this.eps = options.eps ?? 1e-8;
    this.weightDecay = options.weightDecay ?? 0.05;
    for (const [what, v, ok] of [
      ["betas[0]", this.beta1, this.beta1 >= 0 && this.beta1 < 1],
      ["betas[1]", this.beta2, this.beta2 >= 0 && this.beta2 < 1],
      ["eps", this.eps, this.eps >= 0],
      ["weight decay", this.weightDecay, this.weightDecay >= 0],
    ] as const) {
      if (!ok) throw new Blip2Error(`AdamW: ${what} must be ${what.startsWith("betas") ? "in [0, 1)" : ">= 0"}, got ${v}`);
    }
    const decaysFn = options.decays ?? decays;
    for (const p of params) {
      if (this.byName.has(p.name)) throw new Blip2Error(`AdamW: tensor ${p.name} is listed twice`);
      const size = p.shape.reduce((a, b) => a * b, 1);
      if (size !== p.value.length) {
        throw new Blip2Error(`AdamW: tensor ${p.name} has shape [${p.shape.join(", ")}] (${size} values) but ${p.value.length} values`);
      }
      this.byName.set(p.name, p);
      if (decaysFn(p.name, p.shape)) this.decayed.add(p.name);
    }
    this.params = params;
  }

  /** Whether `name` is weight-decayed by this optimizer. */
  isDecayed(name: string): boolean {
    return this.decayed.has(name);
  }

  /** One update with learning rate `lr`; `grads` by tensor name (a missing name: not updated). */
  step(grads: ReadonlyMap<string, Float32Array>, lr: number): void {
    if (!Number.isFinite(lr) || lr < 0) throw new Blip2Error(`AdamW: learning rate must be a finite number >= 0, got ${lr}`);
    for (const [name, grad] of grads) {
      const p = this.byName.get(name);
      if (!p) throw new Blip2Error(`AdamW: gradient for ${name}, which is not a trained tensor`);
      if (grad.length !== p.value.length) {
        throw new Blip2Error(`AdamW: gradient for ${name} has ${grad.length} values, the tensor ${p.value.length}`);
      }
    }
    for (const p of this.params) {
      const grad = grads.get(p.name);
      if (grad) this.update(p, grad, lr);
    }
  }

  private update(p: Param, g: Float32Array, lr: number): void {
    let s = this.tensors.get(p.name);
    if (!s) {
      s = { step: 0, expAvg: new Float32Array(g.length), expAvgSq: new Float32Array(g.length) };
      this.tensors.set(p.name, s);
    }
    s.step += 1;
    const f = Math.fround;
    const { beta1, beta2, eps } = this;
    // Python computes these scalars in double; the float32 kernels then use them as float32.
    const keep = f(1 - lr * (this.decayed.has(p.name) ? this.weightDecay : 0));
    const b1 = f(beta1), oneMinusB1 = f(1 - beta1);
    const b2 = f(beta2), oneMinusB2 = f(1 - beta2);
    const stepSize = f(lr / (1 - beta1 ** s.step));
    const bc2Sqrt = f(Math.sqrt(1 - beta2 ** s.step));
    const eps32 = f(eps);
    const value = p.value, m = s.expAvg, v = s.expAvgSq;
    for (let i = 0; i < value.length; i++) {
      const gi = g[i]!;
      m[i] = m[i]! * b1 + gi * oneMinusB1;
      v[i] = v[i]! * b2 + gi * gi * oneMinusB2;
      value[i] = value[i]! * keep - (stepSize * m[i]!) / (Math.sqrt(v[i]!) / bc2Sqrt + eps32);
    }
  }

  /** A copy of the optimizer state (safe to keep while training goes on). */
  state(): AdamWState {
    const tensors: Record<string, AdamWTensorState> = {};
    for (const [name, s] of this.tensors) {
      tensors[name] = { step: s.step, expAvg: s.expAvg.slice(), expAvgSq: s.expAvgSq.slice() };
    }
    return { tensors };
  }

  /** Continue from a state taken by `state()`; every tensor it names must be trained here, same size. */
  load(state: AdamWState): void {
    const loaded = new Map<string, AdamWTensorState>();
    for (const [name, s] of Object.entries(state?.tensors ?? {})) {
      const p = this.byName.get(name);
      if (!p) throw new Blip2Error(`AdamW state: tensor ${name} is not trained by this optimizer`);
      if (!Number.isSafeInteger(s.step) || s.step < 1) throw new Blip2Error(`AdamW state: tensor ${name} has step ${s.step}, expected an integer >= 1`);
      for (const [what, arr] of [["exp_avg", s.expAvg], ["exp_avg_sq", s.expAvgSq]] as const) {
        if (!(arr instanceof Float32Array) || arr.length !== p.value.length) {
          throw new Blip2Error(`AdamW state: ${what} of ${name} has ${arr?.length} values, the tensor ${p.value.length}`);
        }
      }
      loaded.set(name, { step: s.step, expAvg: s.expAvg.slice(), expAvgSq: s.expAvgSq.slice() });
    }
    this.tensors = loaded;
  }
}

/** sqrt of the sum of squares of every gradient value, accumulated in float64. */
export function globalNorm(grads: ReadonlyMap<string, Float32Array> | Iterable<Float32Array>): number {
  const arrays = grads instanceof Map ? grads.values() : (grads as Iterable<Float32Array>);
  let sum = 0;
  for (const g of arrays) for (let i = 0; i < g.length; i++) sum += g[i] * g[i];
  return Math.sqrt(sum);
}

/**
 * `torch.nn.utils.clip_grad_norm_`: when the global norm exceeds `maxNorm`, scale every gradient
 * in place by maxNorm / (norm + 1e-6). Returns the norm before clipping. A non-finite norm leaves
 * the gradients as they are (PyTorch would scale them by NaN or 0): the caller should skip the step.
 */
export function clipByGlobalNorm(grads: ReadonlyMap<string, Float32Array>, maxNorm: number): number {
  if (!(maxNorm > 0)) throw new Blip2Error(`gradient clipping: max norm must be > 0, got ${maxNorm}`);
  const norm = globalNorm(grads);
  const coef = maxNorm / (norm + 1e-6);
  if (Number.isFinite(norm) && coef < 1) {
    const c = Math.fround(coef);
    for (const g of grads.values()) for (let i = 0; i < g.length; i++) g[i] *= c;
  }
  return norm;
}

/**
 * Sums the gradients of several micro-batches and gives their mean: the gradient of the mean of
 * the micro-batch losses (equal to the whole batch's gradient when every micro-batch's loss is a
 * mean over the same number of terms). A tensor missing from a micro-batch counts as zero there.
 */
export class GradAccumulator {
  private sums = new Map<string, Float32Array>();
  private n = 0;

  /** Micro-batches added since the last reset. */
  get count(): number {
    return this.n;
  }

  add(grads: ReadonlyMap<string, Float32Array>): void {
    for (const [name, g] of grads) {
      const sum = this.sums.get(name);
      if (!sum) {
        this.sums.set(name, g.slice());
      } else if (sum.length !== g.length) {
        throw new Blip2Error(`gradient accumulation: ${name} has ${g.length} values in this micro-batch, ${sum.length} before`);
      } else {
        for (let i = 0; i < g.length; i++) sum[i] += g[i];
      }
    }
    this.n += 1;
  }

  /** The mean over the micro-batches added (new arrays). */
  mean(): Map<string, Float32Array> {
    if (this.n === 0) throw new Blip2Error("gradient accumulation: no micro-batch was added");
    const out = new Map<string, Float32Array>();
    for (const [name, sum] of this.sums) {
      const mean = new Float32Array(sum.length);
      for (let i = 0; i < sum.length; i++) mean[i] = sum[i] / this.n;
      out.set(name, mean);
    }
    return out;
  }

  reset(): void {
    this.sums.clear();
    this.n = 0;
  }
}
