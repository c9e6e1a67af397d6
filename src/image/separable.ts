/**
 * The separable resampling that Pillow (libImaging/Resample.c) and PyTorch's uint8 antialiased
 * interpolation (a port of Pillow-SIMD) share: per output pixel a window of input pixels weighted
 * by a kernel whose support widens with the downscale factor, the weights turned into fixed
 * point, and two integer passes (width, then height; a pass is skipped when its size does not
 * change), each rounding to 8 bits. The two differ only in the fixed-point precision.
 */
import type { RgbImage } from "./decode.js";

export interface Kernel {
  /** The kernel, evaluated at a distance in input pixels (already divided by the scale). */
  fn: (x: number) => number;
  /** Half-width of the kernel at scale 1. */
  support: number;
}

/** One axis: output i reads inputs start[i] .. start[i] + count[i] - 1 with `ksize` weights per output. */
export interface Windows {
  ksize: number;
  start: Int32Array;
  count: Int32Array;
  /** Normalised to sum 1 (zero past `count`). */
  weights: Float64Array;
}

/**
 * Pillow's `precompute_coeffs` (= PyTorch's `_compute_indices_min_size_weights_aa`), in double
 * precision with every expression in the C code's order, so each rounding is the same.
 */
export function filterWindows(inSize: number, outSize: number, kernel: Kernel): Windows {
  const scale = inSize / outSize;
  // When downscaling, stretch the kernel over `scale` input pixels so every input contributes.
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = kernel.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const invscale = 1.0 / filterscale;
  const start = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Float64Array(outSize * ksize);
  for (let i = 0; i < outSize; i++) {
    const center = (i + 0.5) * scale;
    // C's (int) cast truncates toward zero; the clamps make that equal to floor here.
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const n = Math.min(Math.max(Math.min(Math.trunc(center + support + 0.5), inSize) - xmin, 0), ksize);
    const row = i * ksize;
    let total = 0.0;
    for (let j = 0; j < n; j++) total += weights[row + j] = kernel.fn((j + xmin - center + 0.5) * invscale);
    if (total !== 0.0) for (let j = 0; j < n; j++) weights[row + j] = weights[row + j]! / total;
    start[i] = xmin;
    count[i] = n;
  }
  return { ksize, start, count, weights };
}

export interface FixedWeights extends Omit<Windows, "weights"> {
  weights: Int32Array | Int16Array;
  /** Fraction bits. */
  precision: number;
}

/** Weights in fixed point: each rounded half away from zero, then truncated, as the C code does. */
export function fixedPoint(w: Windows, precision: number, int16: boolean): FixedWeights {
  const one = 2 ** precision;
  const weights = int16 ? new Int16Array(w.weights.length) : new Int32Array(w.weights.length);
  for (let k = 0; k < w.weights.length; k++) {
    const v = w.weights[k]! * one;
    weights[k] = v < 0 ? Math.trunc(-0.5 + v) : Math.trunc(0.5 + v);
  }
  return { ksize: w.ksize, start: w.start, count: w.count, weights, precision };
}

/**
 * Resize with the weights `weightsFor(inSize, outSize)` gives per axis. The width pass only
 * produces the rows the height pass reads (Pillow's crop; PyTorch computes them all, to the same
 * bytes).
 */
export function separableResize(img: RgbImage, width: number, height: number, weightsFor: (inSize: number, outSize: number) => FixedWeights): RgbImage {
  const vertical = weightsFor(img.height, height);
  const firstRow = vertical.start[0]!;
  const lastRow = vertical.start[height - 1]! + vertical.count[height - 1]!;
  let data = img.data;
  let rowOffset = 0;
  if (width !== img.width) {
    data = horizontalPass(img.data, img.width, firstRow, lastRow - firstRow, width, weightsFor(img.width, width));
    rowOffset = firstRow;
    if (height === img.height) return { data, width, height };
  }
  return { data: verticalPass(data, width, rowOffset, height, vertical), width, height };
}

/**
 * `rows` output rows of width `outW` from input rows `firstRow`... Sums start at one half (so the
 * shift rounds) and stay well inside int32, so doubles hold them exactly and `>>` sees the same
 * integer C does.
 */
function horizontalPass(src: Uint8Array, srcW: number, firstRow: number, rows: number, outW: number, c: FixedWeights): Uint8Array {
  const out = new Uint8Array(outW * rows * 3);
  const { ksize, start, count, weights, precision } = c;
  const half = 2 ** (precision - 1);
  for (let y = 0; y < rows; y++) {
    const inRow = (y + firstRow) * srcW * 3;
    const outRow = y * outW * 3;
    for (let x = 0; x < outW; x++) {
      const k0 = x * ksize;
      const n = count[x]!;
      let p = inRow + start[x]! * 3;
      let r = half;
      let g = half;
      let b = half;
      for (let j = 0; j < n; j++, p += 3) {
        const k = weights[k0 + j]!;
        r += src[p]! * k;
        g += src[p + 1]! * k;
        b += src[p + 2]! * k;
      }
      const o = outRow + x * 3;
      out[o] = clip8(r, precision);
      out[o + 1] = clip8(g, precision);
      out[o + 2] = clip8(b, precision);
    }
  }
  return out;
}

/** `outH` output rows of width `w`; input row indices are `start[i] - rowOffset`. */
function verticalPass(src: Uint8Array, w: number, rowOffset: number, outH: number, c: FixedWeights): Uint8Array {
  const stride = w * 3;
  const out = new Uint8Array(stride * outH);
  const { ksize, start, count, weights, precision } = c;
  const half = 2 ** (precision - 1);
  for (let y = 0; y < outH; y++) {
    const k0 = y * ksize;
    const n = count[y]!;
    const first = (start[y]! - rowOffset) * stride;
    const outRow = y * stride;
    for (let i = 0; i < stride; i++) {
      let acc = half;
      for (let j = 0, p = first + i; j < n; j++, p += stride) acc += src[p]! * weights[k0 + j]!;
      out[outRow + i] = clip8(acc, precision);
    }
  }
  return out;
}

/** Fixed-point sum -> byte: drop the fraction bits, clamp to 0..255. */
function clip8(acc: number, precision: number): number {
  const v = acc >> precision;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}
