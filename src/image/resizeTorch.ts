/**
 * The resize of transformers 5.x's default (torchvision-backed) image processors, reproduced bit
 * for bit for 8-bit RGB images on CPU.
 *
 * What happens there: the PIL image becomes a uint8 CHW tensor (`pil_to_tensor`), and
 * `TorchvisionBackend.resize` calls torchvision's `resize(..., antialias=True)` with the Pillow
 * filter mapped by `pil_torch_interpolation_mapping` (NEAREST → NEAREST_EXACT, BILINEAR →
 * BILINEAR, BICUBIC → BICUBIC; LANCZOS is replaced by BICUBIC with a warning; BOX and HAMMING
 * cannot resize a tensor). On CPU, torchvision hands uint8 tensors straight to
 * `torch.nn.functional.interpolate` for BICUBIC always and for BILINEAR when the CPU has AVX2
 * (`_do_native_uint8_resize_on_cpu`): there is no float32 round trip. PyTorch then runs its
 * uint8 antialiased kernel (`UpSampleKernel.cpp` and its AVX2 twin
 * `UpSampleKernelAVXAntialias.h`, a port of Pillow-SIMD):
 *
 * - weights are computed in double exactly like Pillow's (`_compute_indices_min_size_weights_aa`):
 *   centre `scale * (i + 0.5)`, support `interp_size / 2 * scale` when downscaling, window
 *   `[trunc(centre - support + 0.5), trunc(centre + support + 0.5))` clipped to the image,
 *   filter (Keys' cubic with a = -0.5, or the triangle) evaluated at
 *   `(j + xmin - centre + 0.5) / scale`, normalised to sum 1;
 * - unlike Pillow (22 fixed fraction bits in int32), they are turned into int16 with a
 *   precision chosen per axis from the largest weight (`_compute_index_ranges_int16_weights`):
 *   the first p with `round(max * 2^(p+1)) >= 2^15`, at most 22. This is where it differs
 *   from Pillow, by a level or two in a small fraction of the pixels;
 * - two separable passes, horizontal (width) first, then vertical, each skipped when its size
 *   does not change; each pass sums `pixel * weight` in int32 from `2^(p-1)`, shifts right by p
 *   and clamps to 0..255, so the intermediate image is uint8.
 *
 * All of that is integer arithmetic once the weights are known, so the AVX2 and the portable
 * kernels give the same bytes, and so does this file.
 *
 * NEAREST_EXACT: source index `min(floor(float32((i + 0.5) * scale)), size - 1)` with the float32
 * scale `in / out` (`nearest_neighbor_exact_compute_source_index`; the generic kernel's
 * `area_pixel_compute_source_index` route reaches the same index for any image side below 2^22).
 */
import { Blip2Error } from "../errors.js";
import type { RgbImage } from "./decode.js";
import { RESAMPLING_NAMES, Resampling } from "./resize.js";

interface AaFilter {
  fn: (x: number) => number;
  /** PyTorch's `interp_size`: 2 for bilinear, 4 for bicubic; the support is half of it. */
  interpSize: number;
}

/** PyTorch's `HelperInterpLinear::aa_filter`. */
function triangle(x: number): number {
  x = Math.abs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

/** PyTorch's `HelperInterpCubic::aa_filter` with a = -0.5 (the antialias constant). */
function keysCubic(x: number): number {
  const a = -0.5;
  x = Math.abs(x);
  // cubic_convolution1 and cubic_convolution2 from ATen's UpSample.h.
  if (x < 1.0) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2.0) return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a;
  return 0.0;
}

const BILINEAR_AA: AaFilter = { fn: triangle, interpSize: 2 };
const BICUBIC_AA: AaFilter = { fn: keysCubic, interpSize: 4 };

/** The int16 weights of one axis: output i reads inputs start[i] .. start[i] + count[i] - 1. */
interface AxisWeights {
  /** Weights per output pixel (the stride of `weights`). */
  ksize: number;
  start: Int32Array;
  count: Int32Array;
  /** int16 weights, `ksize` per output pixel (zero past `count`). */
  weights: Int16Array;
  /** Fraction bits of the weights. */
  precision: number;
}

/**
 * `_compute_index_ranges_weights` (antialias branch) followed by
 * `_compute_index_ranges_int16_weights`, for a resize by size (no scale factor given, no
 * align_corners).
 */
function computeAxisWeights(inSize: number, outSize: number, filter: AaFilter): AxisWeights {
  // area_pixel_compute_scale<double>: input_size / output_size.
  const scale = inSize / outSize;
  const support = scale >= 1.0 ? filter.interpSize * 0.5 * scale : filter.interpSize * 0.5;
  const ksize = Math.ceil(support) * 2 + 1;
  const invscale = scale >= 1.0 ? 1.0 / scale : 1.0;

  const start = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const w = new Float64Array(outSize * ksize);
  let wtMax = 0.0;
  for (let i = 0; i < outSize; i++) {
    const center = scale * (i + 0.5);
    // static_cast<int64_t> truncates toward zero.
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    let xsize = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    xsize = Math.min(Math.max(xsize, 0), ksize);
    const row = i * ksize;
    let total = 0.0;
    for (let j = 0; j < xsize; j++) {
      const v = filter.fn((j + xmin - center + 0.5) * invscale);
      w[row + j] = v;
      total += v;
    }
    if (total !== 0.0) {
      for (let j = 0; j < xsize; j++) {
        w[row + j] = w[row + j]! / total;
        wtMax = Math.max(wtMax, w[row + j]!);
      }
    }
    start[i] = xmin;
    count[i] = xsize;
  }

  // The most fraction bits for which the largest weight still fits in int16.
  let precision = 0;
  for (; precision < 22; precision++) {
    const next = Math.trunc(0.5 + wtMax * 2 ** (precision + 1));
    if (next >= 1 << 15) break;
  }
  const one = 2 ** precision;
  const weights = new Int16Array(outSize * ksize);
  for (let k = 0; k < w.length; k++) {
    const v = w[k]! * one;
    // Round half away from zero, then truncate, as the C code does.
    weights[k] = v < 0 ? Math.trunc(-0.5 + v) : Math.trunc(0.5 + v);
  }
  return { ksize, start, count, weights, precision };
}

/** One pass along x: `basic_loop_aa_horizontal<uint8_t>` for every row and channel. */
function passHorizontal(src: Uint8Array, inW: number, rows: number, outW: number, c: AxisWeights): Uint8Array {
  const out = new Uint8Array(outW * rows * 3);
  const { ksize, start, count, weights, precision } = c;
  const half = 1 << (precision - 1);
  for (let y = 0; y < rows; y++) {
    const inRow = y * inW * 3;
    const outRow = y * outW * 3;
    for (let x = 0; x < outW; x++) {
      const k0 = x * ksize;
      const n = count[x]!;
      const first = inRow + start[x]! * 3;
      for (let ch = 0; ch < 3; ch++) {
        let acc = half;
        for (let j = 0, p = first + ch; j < n; j++, p += 3) acc += src[p]! * weights[k0 + j]!;
        const v = acc >> precision;
        out[outRow + x * 3 + ch] = v < 0 ? 0 : v > 255 ? 255 : v;
      }
    }
  }
  return out;
}

/** One pass along y: `basic_loop_aa_vertical<uint8_t>` for every column and channel. */
function passVertical(src: Uint8Array, w: number, outH: number, c: AxisWeights): Uint8Array {
  const stride = w * 3;
  const out = new Uint8Array(stride * outH);
  const { ksize, start, count, weights, precision } = c;
  const half = 1 << (precision - 1);
  for (let y = 0; y < outH; y++) {
    const k0 = y * ksize;
    const n = count[y]!;
    const first = start[y]! * stride;
    const outRow = y * stride;
    for (let i = 0; i < stride; i++) {
      let acc = half;
      for (let j = 0, p = first + i; j < n; j++, p += stride) acc += src[p]! * weights[k0 + j]!;
      const v = acc >> precision;
      out[outRow + i] = v < 0 ? 0 : v > 255 ? 255 : v;
    }
  }
  return out;
}

/** interpolate(mode="nearest-exact") on a uint8 image. */
function resizeNearestExact(img: RgbImage, outW: number, outH: number): RgbImage {
  const { data, width: inW, height: inH } = img;
  const index = (inSize: number, outSize: number): Int32Array => {
    // compute_scales_value<float>: float(input_size) / output_size, in float32.
    const scale = Math.fround(inSize / outSize);
    const idx = new Int32Array(outSize);
    for (let i = 0; i < outSize; i++) {
      // (i + 0.5) * scale is exact in double; floorf sees it rounded to float32.
      idx[i] = Math.min(Math.floor(Math.fround((i + 0.5) * scale)), inSize - 1);
    }
    return idx;
  };
  const xs = index(inW, outW);
  const ys = index(inH, outH);
  const out = new Uint8Array(outW * outH * 3);
  for (let y = 0; y < outH; y++) {
    const inRow = ys[y]! * inW * 3;
    const outRow = y * outW * 3;
    for (let x = 0; x < outW; x++) {
      const p = inRow + xs[x]! * 3;
      const o = outRow + x * 3;
      out[o] = data[p]!;
      out[o + 1] = data[p + 1]!;
      out[o + 2] = data[p + 2]!;
    }
  }
  return { data: out, width: outW, height: outH };
}

/**
 * Which torchvision interpolation transformers 5.x uses for a Pillow filter number, or an error
 * message when the torchvision backend cannot resize with it.
 */
export function torchInterpolationFor(resample: number): "nearest-exact" | "bilinear" | "bicubic" | { error: string } {
  switch (resample) {
    case Resampling.NEAREST:
      return "nearest-exact";
    case Resampling.BILINEAR:
      return "bilinear";
    case Resampling.BICUBIC:
    case Resampling.LANCZOS: // transformers warns and uses BICUBIC instead
      return "bicubic";
    default: {
      const name = RESAMPLING_NAMES[resample];
      return {
        error:
          name === undefined
            ? `unsupported resample filter ${resample} (expected 0-5)`
            : `resample ${resample} (${name}) cannot be done by the torchvision backend (torch's interpolate has no ${name} mode); use the "pil" backend`,
      };
    }
  }
}

/**
 * Resize an 8-bit RGB image to `width` x `height` as transformers 5.x's torchvision backend does
 * on CPU: `torchvision.transforms.v2.functional.resize(uint8 tensor, (height, width),
 * interpolation, antialias=True)`. `resample` is a Pillow filter number ({@link Resampling}):
 * BICUBIC (and LANCZOS, which transformers maps to it), BILINEAR (the uint8 path torchvision
 * takes on AVX2 CPUs) or NEAREST (NEAREST_EXACT). A same-size resize returns a copy.
 */
export function resizeTorch(img: RgbImage, width: number, height: number, resample: number): RgbImage {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new Blip2Error(`resize: target size must be positive integers, got ${width}x${height}`);
  }
  if (img.data.length !== img.width * img.height * 3 || img.width < 1 || img.height < 1) {
    throw new Blip2Error(`resize: expected ${img.width}x${img.height}x3 RGB bytes, got ${img.data.length}`);
  }
  const mode = torchInterpolationFor(resample);
  if (typeof mode !== "string") throw new Blip2Error(`resize: ${mode.error}`);
  if (width === img.width && height === img.height) {
    return { data: img.data.slice(), width, height };
  }
  if (mode === "nearest-exact") return resizeNearestExact(img, width, height);

  const filter = mode === "bicubic" ? BICUBIC_AA : BILINEAR_AA;
  let data = img.data;
  if (width !== img.width) {
    data = passHorizontal(data, img.width, img.height, width, computeAxisWeights(img.width, width, filter));
  }
  if (height !== img.height) {
    data = passVertical(data, width, height, computeAxisWeights(img.height, height, filter));
  }
  return { data, width, height };
}
