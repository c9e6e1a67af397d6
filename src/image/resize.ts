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
import { filterWindows, fixedPoint, separableResize, type Kernel } from "./separable.js";

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

const FILTERS: Record<number, Kernel> = {
  [Resampling.LANCZOS]: { fn: lanczosFilter, support: 3.0 },
  [Resampling.BILINEAR]: { fn: bilinearFilter, support: 1.0 },
  [Resampling.BICUBIC]: { fn: bicubicFilter, support: 2.0 },
  [Resampling.BOX]: { fn: boxFilter, support: 0.5 },
  [Resampling.HAMMING]: { fn: hammingFilter, support: 1.0 },
};

/**
 * Fixed-point precision of Pillow's coefficients: 8 bits are left for the pixel value and 2 more
 * for headroom, since filters with negative lobes can make partial sums exceed the 0..1 range.
 */
const PRECISION_BITS = 32 - 8 - 2;

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

  // Pillow's normalize_coeffs_8bpc: 22 fraction bits in int32.
  return separableResize(img, width, height, (inSize, outSize) => fixedPoint(filterWindows(inSize, outSize, filter), PRECISION_BITS, false));
}
