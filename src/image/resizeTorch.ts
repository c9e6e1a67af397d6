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
import { filterWindows, fixedPoint, separableResize, type FixedWeights, type Kernel } from "./separable.js";

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

// PyTorch's interp_size is 2 (bilinear) and 4 (bicubic): the support is half of it.
const BILINEAR_AA: Kernel = { fn: triangle, support: 1 };
const BICUBIC_AA: Kernel = { fn: keysCubic, support: 2 };

/**
 * `_compute_index_ranges_int16_weights`: the weights in int16 with the most fraction bits for
 * which the largest weight still fits (at most 22).
 */
function int16Weights(inSize: number, outSize: number, kernel: Kernel): FixedWeights {
  const windows = filterWindows(inSize, outSize, kernel);
  const largest = windows.weights.reduce((m, w) => Math.max(m, w), 0);
  let precision = 0;
  while (precision < 22 && Math.trunc(0.5 + largest * 2 ** (precision + 1)) < 1 << 15) precision++;
  return fixedPoint(windows, precision, true);
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

  const kernel = mode === "bicubic" ? BICUBIC_AA : BILINEAR_AA;
  return separableResize(img, width, height, (inSize, outSize) => int16Weights(inSize, outSize, kernel));
}
