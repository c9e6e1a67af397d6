/**
 * Pillow's `Image.resize((w, h), resample)` for 8-bit RGB images, reproduced bit for bit.
 *
 * Convolution filters (everything but NEAREST) follow Pillow's libImaging/Resample.c:
 * - a separable two-pass resample, horizontal first, then vertical; a pass is skipped when its
 *   dimension does not change;
 * - per output pixel, the filter is evaluated at the input pixel centres, with the filter's
 *   support widened by the downscale factor (so downscaling is antialiased), the weights are
 *   normalised to sum to 1 and then turned into fixed point with 22 fractional bits;
 * - each pass accumulates integers starting from 0.5 (in fixed point), shifts right and clamps
 *   to 0..255, so the intermediate image is rounded to 8 bits exactly as Pillow does;
 * - the horizontal pass only produces the rows the vertical pass will read.
 * NEAREST follows Pillow's affine-scale path (Geometry.c), including its accumulated source
 * coordinate.
 *
 * Every double-precision expression below is written in the same order as Pillow's C code, so
 * the rounding of each step is the same.
 */
import { Blip2Error } from "../errors.js";
import type { RgbImage } from "./decode.js";

/** Pillow's `Image.Resampling` values (also used by `resample` in preprocessor configs). */
export const Resampling = {
  NEAREST: 0,
  LANCZOS: 1,
  BILINEAR: 2,
  BICUBIC: 3,
  BOX: 4,
  HAMMING: 5,
} as const;

export const RESAMPLING_NAMES: Record<number, string> = {
  0: "NEAREST",
  1: "LANCZOS",
  2: "BILINEAR",
  3: "BICUBIC",
  4: "BOX",
  5: "HAMMING",
};

interface Filter {
  /** The kernel, evaluated at a distance in input pixels (already divided by the scale). */
  fn: (x: number) => number;
  /** Half-width of the kernel at scale 1. */
  support: number;
}

const boxFilter = (x: number): number => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0);

function bilinearFilter(x: number): number {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Pillow writes these two constants as C `float` literals (0.54f, 0.46f); they are promoted to
// double, so the float32-rounded values are what enter the arithmetic.
const HAMMING_A = Math.fround(0.54);
const HAMMING_B = Math.fround(0.46);

function hammingFilter(x: number): number {
  if (x < 0.0) x = -x;
  if (x === 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * Math.PI;
  return (Math.sin(x) / x) * (HAMMING_A + HAMMING_B * Math.cos(x));
}

/** Keys' cubic convolution with a = -0.5 (Pillow's BICUBIC). */
function bicubicFilter(x: number): number {
  const a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

function sinc(x: number): number {
  if (x === 0.0) return 1.0;
  x = x * Math.PI;
  return Math.sin(x) / x;
}

/** sinc windowed by sinc over [-3, 3). */
function lanczosFilter(x: number): number {
  if (-3.0 <= x && x < 3.0) return sinc(x) * sinc(x / 3);
  return 0.0;
}

const FILTERS: Record<number, Filter> = {
  [Resampling.LANCZOS]: { fn: lanczosFilter, support: 3.0 },
  [Resampling.BILINEAR]: { fn: bilinearFilter, support: 1.0 },
  [Resampling.BICUBIC]: { fn: bicubicFilter, support: 2.0 },
  [Resampling.BOX]: { fn: boxFilter, support: 0.5 },
  [Resampling.HAMMING]: { fn: hammingFilter, support: 1.0 },
};

/**
 * Fixed-point precision of the coefficients: 8 bits are left for the pixel value and 2 more for
 * headroom, since filters with negative lobes can make partial sums exceed the 0..1 range.
 */
const PRECISION_BITS = 32 - 8 - 2;
const ONE = 1 << PRECISION_BITS;
/** 0.5 in fixed point: the accumulators start here so the final shift rounds to nearest. */
const HALF = 1 << (PRECISION_BITS - 1);

/** Coefficients of one 1-D resample: for output i, inputs start..start+count-1 with weights. */
interface Coefficients {
  /** Coefficients per output pixel (the stride of `weights`). */
  ksize: number;
  /** start[i]: first input pixel used by output pixel i. */
  start: Int32Array;
  /** count[i]: how many input pixels output i uses (the rest of its row of weights is 0). */
  count: Int32Array;
  /** Fixed-point weights, `ksize` per output pixel. */
  weights: Int32Array;
}

/**
 * Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the whole input range
 * (resize without a box: in0 = 0, in1 = inSize).
 */
function precomputeCoefficients(inSize: number, outSize: number, filter: Filter): Coefficients {
  const scale = inSize / outSize;
  // When downscaling, stretch the kernel over `scale` input pixels so every input contributes.
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const start = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  const ss = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = 0 + (xx + 0.5) * scale;
    // C's (int) cast truncates toward zero; the clamps make that equal to floor here.
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const v = filter.fn((x + xmin - center + 0.5) * ss);
      w[x] = v;
      ww += v;
    }
    const row = xx * ksize;
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0.0 ? w[x]! / ww : w[x]!;
      // Round half away from zero, then truncate, as normalize_coeffs_8bpc does.
      weights[row + x] = k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
    }
    start[xx] = xmin;
    count[xx] = xmax;
  }
  return { ksize, start, count, weights };
}

/** Fixed-point accumulator → byte: drop the fraction bits, clamp to 0..255 (Pillow's clip8). */
function clip8(acc: number): number {
  const v = acc >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/**
 * Horizontal pass: `rows` output rows of width `outW`, reading input rows from `firstRow`.
 * The sums stay well inside int32 (|sum| < 255 * 1.3 * 2^22), so doubles hold them exactly and
 * `>>` sees the same integer C does.
 */
function resampleHorizontal(src: Uint8Array, srcW: number, firstRow: number, rows: number, outW: number, c: Coefficients): Uint8Array {
  const out = new Uint8Array(outW * rows * 3);
  const { ksize, start, count, weights } = c;
  for (let y = 0; y < rows; y++) {
    const inRow = (y + firstRow) * srcW * 3;
    const outRow = y * outW * 3;
    for (let xx = 0; xx < outW; xx++) {
      const k0 = xx * ksize;
      const n = count[xx]!;
      let p = inRow + start[xx]! * 3;
      let r = HALF;
      let g = HALF;
      let b = HALF;
      for (let x = 0; x < n; x++, p += 3) {
        const k = weights[k0 + x]!;
        r += src[p]! * k;
        g += src[p + 1]! * k;
        b += src[p + 2]! * k;
      }
      const o = outRow + xx * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
    }
  }
  return out;
}

/** Vertical pass: output rows `outH` of width `w`; input row indices are `start[i] - rowOffset`. */
function resampleVertical(src: Uint8Array, w: number, rowOffset: number, outH: number, c: Coefficients): Uint8Array {
  const out = new Uint8Array(w * outH * 3);
  const { ksize, start, count, weights } = c;
  const stride = w * 3;
  for (let yy = 0; yy < outH; yy++) {
    const k0 = yy * ksize;
    const n = count[yy]!;
    const first = (start[yy]! - rowOffset) * stride;
    const outRow = yy * stride;
    for (let i = 0; i < stride; i += 3) {
      let r = HALF;
      let g = HALF;
      let b = HALF;
      for (let y = 0, p = first + i; y < n; y++, p += stride) {
        const k = weights[k0 + y]!;
        r += src[p]! * k;
        g += src[p + 1]! * k;
        b += src[p + 2]! * k;
      }
      out[outRow + i] = clip8(r);
      out[outRow + i + 1] = clip8(g);
      out[outRow + i + 2] = clip8(b);
    }
  }
  return out;
}

/**
 * Pillow's NEAREST resize: an affine scale whose source coordinate starts at half a step and is
 * advanced by repeated addition (so its floating-point drift matches Pillow's), truncated to an
 * index. Output pixels whose source falls outside the image stay black, as with Pillow's fill.
 */
function resizeNearest(img: RgbImage, outW: number, outH: number): RgbImage {
  const { data, width: inW, height: inH } = img;
  const a0 = inW / outW;
  const a4 = inH / outH;
  const xin = new Int32Array(outW);
  let xo = 0 + a0 * 0.5;
  for (let x = 0; x < outW; x++) {
    xin[x] = xo < 0.0 ? -1 : Math.trunc(xo);
    xo += a0;
  }
  const out = new Uint8Array(outW * outH * 3);
  let yo = 0 + a4 * 0.5;
  for (let y = 0; y < outH; y++) {
    const yi = yo < 0.0 ? -1 : Math.trunc(yo);
    yo += a4;
    if (yi < 0 || yi >= inH) continue;
    const inRow = yi * inW * 3;
    const outRow = y * outW * 3;
    for (let x = 0; x < outW; x++) {
      const xi = xin[x]!;
      if (xi < 0 || xi >= inW) continue;
      const p = inRow + xi * 3;
      const o = outRow + x * 3;
      out[o] = data[p]!;
      out[o + 1] = data[p + 1]!;
      out[o + 2] = data[p + 2]!;
    }
  }
  return { data: out, width: outW, height: outH };
}

/**
 * Resize an 8-bit RGB image to `width` x `height` exactly as Pillow's
 * `Image.resize((width, height), resample)` does (no box, no reducing_gap).
 * `resample` is one of {@link Resampling}. A same-size resize returns a copy.
 */
export function resize(img: RgbImage, width: number, height: number, resample: number): RgbImage {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new Blip2Error(`resize: target size must be positive integers, got ${width}x${height}`);
  }
  if (img.data.length !== img.width * img.height * 3 || img.width < 1 || img.height < 1) {
    throw new Blip2Error(`resize: expected ${img.width}x${img.height}x3 RGB bytes, got ${img.data.length}`);
  }
  if (width === img.width && height === img.height) {
    return { data: img.data.slice(), width, height };
  }
  if (resample === Resampling.NEAREST) return resizeNearest(img, width, height);
  const filter = FILTERS[resample];
  if (filter === undefined) {
    throw new Blip2Error(`resize: unsupported resample filter ${resample} (expected 0-5: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING)`);
  }

  const needHorizontal = width !== img.width;
  const needVertical = height !== img.height;
  // Vertical coefficients come first: they say which source rows the horizontal pass must produce.
  const vert = precomputeCoefficients(img.height, height, filter);
  const firstRow = vert.start[0]!;
  const lastRow = vert.start[height - 1]! + vert.count[height - 1]!; // exclusive

  let data = img.data;
  let rowOffset = 0;
  if (needHorizontal) {
    const horiz = precomputeCoefficients(img.width, width, filter);
    data = resampleHorizontal(img.data, img.width, firstRow, lastRow - firstRow, width, horiz);
    // The intermediate image starts at source row `firstRow`.
    rowOffset = firstRow;
    if (!needVertical) return { data, width, height };
  }
  data = resampleVertical(data, width, rowOffset, height, vert);
  return { data, width, height };
}
