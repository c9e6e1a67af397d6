/**
 * A seeded, serializable pseudo-random generator for training: data shuffling, hard-negative
 * sampling, fresh weight init. xoshiro128** (Blackman & Vigna 2018): 128 bits of state, period
 * 2^128 - 1, fast in 32-bit integer arithmetic (which is what JavaScript has), and its whole state
 * is four integers, so a checkpoint can save it and a resumed run continues the same stream.
 *
 * The stream is deterministic across runs and machines (only 32-bit integer operations and
 * IEEE doubles); it is not the stream of torch.Generator, so a draw here never reproduces one there.
 */
import { Blip2Error } from "../errors.js";

/** Everything needed to continue a stream exactly: the generator's words and Box–Muller's spare. */
export interface RngState {
  s: [number, number, number, number];
  /** The second normal of the last Box–Muller pair, not yet returned (null when none). */
  spare: number | null;
}

const TWO_POW_32 = 4294967296;

export class Rng {
  private s = new Uint32Array(4);
  private spare: number | null = null;

  /** `seed`: any safe integer (>= 0); equal seeds give equal streams. */
  constructor(seed: number) {
    if (!Number.isSafeInteger(seed) || seed < 0) {
      throw new Blip2Error(`random seed must be a non-negative integer, got ${seed}`);
    }
    // SplitMix32 spreads the seed over the four words, as Vigna recommends: nearby seeds give
    // unrelated states, and the state is never all zero (the one state xoshiro must avoid).
    let x = (seed >>> 0) ^ Math.imul(Math.floor(seed / TWO_POW_32), 0x9e3779b9);
    for (let i = 0; i < 4; i++) {
      x = (x + 0x9e3779b9) | 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      this.s[i] = z ^ (z >>> 16);
    }
    if ((this.s[0] | this.s[1] | this.s[2] | this.s[3]) === 0) this.s[0] = 1;
  }

  /** The next 32 random bits, as an unsigned integer (xoshiro128**). */
  nextUint32(): number {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits (two 32-bit draws, as a double needs). */
  uniform(): number {
    const hi = this.nextUint32() >>> 5; // 27 bits
    const lo = this.nextUint32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  /** Uniform integer in [0, n), unbiased (rejection of the top, incomplete range). */
  int(n: number): number {
    if (!Number.isInteger(n) || n < 1 || n > TWO_POW_32) {
      throw new Blip2Error(`Rng.int(n) needs an integer n in [1, 2^32], got ${n}`);
    }
    const limit = TWO_POW_32 - (TWO_POW_32 % n);
    for (;;) {
      const x = this.nextUint32();
      if (x < limit) return x % n;
    }
  }

  /** Shuffles `array` in place (Fisher–Yates) and returns it. */
  shuffle<T>(array: T[]): T[] {
    for (let i = array.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const tmp = array[i]!;
      array[i] = array[j]!;
      array[j] = tmp;
    }
    return array;
  }

  /**
   * One index drawn with probability proportional to `weights` (torch.multinomial with one
   * sample): zero weights are never drawn; negative or non-finite weights, or all zeros, are errors.
   */
  multinomial(weights: ArrayLike<number>): number {
    let total = 0;
    for (let i = 0; i < weights.length; i++) {
      const w = weights[i]!;
      if (!(w >= 0) || w === Infinity) {
        throw new Blip2Error(`multinomial: weight ${i} is ${w}; weights must be finite and >= 0`);
      }
      total += w;
    }
    if (total === 0) throw new Blip2Error(`multinomial: all ${weights.length} weights are zero; nothing to draw`);
    const u = this.uniform() * total;
    let cumulative = 0;
    let last = -1;
    for (let i = 0; i < weights.length; i++) {
      const w = weights[i]!;
      if (w === 0) continue; // never drawn, even where rounding puts u on a boundary
      cumulative += w;
      last = i;
      if (u < cumulative) return i;
    }
    // u < total in exact arithmetic; the running sum can round just below it.
    return last;
  }

  /** A standard normal draw (Box–Muller; the pair's second value is kept for the next call). */
  normal(): number {
    if (this.spare !== null) {
      const z = this.spare;
      this.spare = null;
      return z;
    }
    const u1 = 1 - this.uniform(); // (0, 1]: log stays finite
    const u2 = this.uniform();
    const r = Math.sqrt(-2 * Math.log(u1));
    this.spare = r * Math.sin(2 * Math.PI * u2);
    return r * Math.cos(2 * Math.PI * u2);
  }

  /** A copy of the state, plain JSON. */
  state(): RngState {
    return { s: [this.s[0], this.s[1], this.s[2], this.s[3]], spare: this.spare };
  }

  /** Continue from a state taken by `state()` (of this or any other Rng). */
  restore(state: RngState): void {
    const s = state?.s;
    const valid = Array.isArray(s) && s.length === 4 && s.every((w) => Number.isInteger(w) && w >= 0 && w < TWO_POW_32);
    if (!valid || (s[0] | s[1] | s[2] | s[3]) === 0) {
      throw new Blip2Error(`random generator state must be four 32-bit unsigned integers, not all zero; got ${JSON.stringify(s)}`);
    }
    const spare = state.spare ?? null;
    if (spare !== null && !Number.isFinite(spare)) {
      throw new Blip2Error(`random generator state has an invalid spare normal ${JSON.stringify(spare)}`);
    }
    this.s.set(s);
    this.spare = spare;
  }

  /** A generator restored from `state`. */
  static fromState(state: RngState): Rng {
    const rng = new Rng(0);
    rng.restore(state);
    return rng;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
