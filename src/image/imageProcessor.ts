/**
 * Hugging Face's BLIP image processor: decode → convert to RGB → resize → rescale → normalize →
 * channels first, in one of the two flavours transformers has:
 *
 * - `"torchvision"`: transformers 5.x's default `BlipImageProcessor` (`TorchvisionBackend`, the
 *   "fast" processor of 4.x). The image is resized as a uint8 tensor by torch's antialiased
 *   kernel ({@link resizeTorch}), then rescale and normalize are fused
 *   (`_fuse_mean_std_and_rescale_factor`): mean and std become float32 tensors multiplied by
 *   float32(1 / rescale_factor), and torchvision's `normalize` computes (x - mean') / std' in
 *   float32 on the uint8 values cast to float32.
 * - `"pil"`: transformers 4.x's `BlipImageProcessor` and 5.x's `BlipImageProcessorPil`
 *   (`PilBackend`). Pillow resizes ({@link resize}); `image_transforms.rescale` multiplies the
 *   uint8 value as float64 by the factor and casts to float32; `normalize` computes
 *   (x - mean) / std in float32 with float32 mean and std.
 *
 * The two resizes differ by a level or two in a fraction of a percent of the bytes, and the two
 * rescale/normalize orders by a float32 ulp here and there, so each backend is reproduced on its
 * own, bit for bit.
 */
import { Blip2Error } from "../errors.js";
import { loadImage, type ImageInput, type LoadImageOptions, type RgbImage } from "./decode.js";
import { resize, RESAMPLING_NAMES, Resampling } from "./resize.js";
import { resizeTorch, torchInterpolationFor } from "./resizeTorch.js";

/** Which transformers image processor to reproduce; see the file comment. */
export type ImageProcessorBackend = "torchvision" | "pil";

const BACKENDS: readonly ImageProcessorBackend[] = ["torchvision", "pil"];

export interface ImageProcessorConfig {
  doResize: boolean;
  size: { height: number; width: number };
  resample: number;
  doRescale: boolean;
  rescaleFactor: number;
  doNormalize: boolean;
  imageMean: [number, number, number];
  imageStd: [number, number, number];
  doConvertRgb: boolean;
  /**
   * `"torchvision"` (transformers 5.x's default `BlipImageProcessor`) or `"pil"` (transformers
   * 4.x's `BlipImageProcessor`, 5.x's `BlipImageProcessorPil`).
   */
  backend: ImageProcessorBackend;
}

/** OpenAI CLIP statistics, BlipImageProcessor's defaults. */
export const OPENAI_CLIP_MEAN: [number, number, number] = [0.48145466, 0.4578275, 0.40821073];
export const OPENAI_CLIP_STD: [number, number, number] = [0.26862954, 0.26130258, 0.27577711];

/** The values BlipImageProcessor uses for fields a config leaves out (transformers 5.x's backend). */
export function defaultImageProcessorConfig(): ImageProcessorConfig {
  return {
    doResize: true,
    size: { height: 384, width: 384 },
    resample: Resampling.BICUBIC,
    doRescale: true,
    rescaleFactor: 1 / 255,
    doNormalize: true,
    imageMean: [...OPENAI_CLIP_MEAN],
    imageStd: [...OPENAI_CLIP_STD],
    doConvertRgb: true,
    backend: "torchvision",
  };
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return `an array of ${v.length}`;
  if (typeof v === "string") return `the string ${JSON.stringify(v.length > 40 ? v.slice(0, 40) + "..." : v)}`;
  if (typeof v === "number" || typeof v === "boolean") return `${typeof v} ${String(v)}`;
  return typeof v;
}

/**
 * Read the image-processor fields of a Hugging Face `preprocessor_config.json` (or of a
 * `processor_config.json`, where they sit under `image_processor`). Absent (or null) fields get
 * BlipImageProcessor's defaults. `size` may be `{height, width}`, a single int (square) or a
 * `[height, width]` pair, as transformers' `get_size_dict` accepts; `{shortest_edge}` is rejected
 * because BlipImageProcessor.resize requires height and width. `image_mean`/`image_std` may be a
 * single number (used for all channels) or three numbers.
 *
 * The backend is what transformers 5.x would pick: `"pil"` for `image_processor_type`
 * `"BlipImageProcessorPil"`, else `"torchvision"` (for `"BlipImageProcessor"` or no type).
 * `options.backend` overrides it, e.g. `"pil"` to match transformers 4.x, whose
 * `BlipImageProcessor` was the PIL one and whose configs say `"BlipImageProcessor"` too.
 */
export function parseImageProcessorConfig(
  json: unknown,
  file: string,
  options: { backend?: ImageProcessorBackend } = {},
): ImageProcessorConfig {
  const bad = (field: string, expected: string, got: unknown): never => {
    throw new Blip2Error(`${file}: field "${field}" must be ${expected}, got ${typeName(got)}`);
  };
  if (json === null || typeof json !== "object" || Array.isArray(json)) bad("(root)", "a JSON object", json);
  let obj = json as Record<string, unknown>;
  const nested = obj["image_processor"];
  if (nested !== null && typeof nested === "object" && !Array.isArray(nested)) obj = nested as Record<string, unknown>;

  const cfg = defaultImageProcessorConfig();
  const get = (key: string): unknown => (obj[key] === null ? undefined : obj[key]);

  const bool = (key: string, fallback: boolean): boolean => {
    const v = get(key);
    if (v === undefined) return fallback;
    if (typeof v !== "boolean") bad(key, "true or false", v);
    return v as boolean;
  };
  const positiveInt = (key: string, v: unknown): number => {
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1) bad(key, "a positive integer", v);
    return v as number;
  };
  const triple = (key: string, fallback: [number, number, number], positive: boolean): [number, number, number] => {
    const v = get(key);
    if (v === undefined) return fallback;
    const ok = (x: unknown): x is number => typeof x === "number" && Number.isFinite(x) && (!positive || x > 0);
    const expected = positive ? "3 positive numbers (or one)" : "3 numbers (or one)";
    if (ok(v)) return [v, v, v];
    if (!Array.isArray(v) || !(v.length === 3 || v.length === 1) || !v.every(ok)) return bad(key, expected, v);
    const xs = v as number[];
    return xs.length === 1 ? [xs[0]!, xs[0]!, xs[0]!] : [xs[0]!, xs[1]!, xs[2]!];
  };

  cfg.doResize = bool("do_resize", cfg.doResize);
  cfg.doRescale = bool("do_rescale", cfg.doRescale);
  cfg.doNormalize = bool("do_normalize", cfg.doNormalize);
  cfg.doConvertRgb = bool("do_convert_rgb", cfg.doConvertRgb);

  const size = get("size");
  if (size !== undefined) {
    if (typeof size === "number") {
      const s = positiveInt("size", size);
      cfg.size = { height: s, width: s };
    } else if (Array.isArray(size)) {
      if (size.length !== 2) bad("size", "{height, width}, an integer or [height, width]", size);
      cfg.size = { height: positiveInt("size[0]", size[0]), width: positiveInt("size[1]", size[1]) };
    } else if (typeof size === "object") {
      const s = size as Record<string, unknown>;
      if (s["height"] === undefined || s["width"] === undefined) {
        const keys = Object.keys(s).join(", ") || "none";
        throw new Blip2Error(
          `${file}: field "size" must have "height" and "width" (BlipImageProcessor resizes to a fixed size), got keys: ${keys}`,
        );
      }
      cfg.size = { height: positiveInt("size.height", s["height"]), width: positiveInt("size.width", s["width"]) };
    } else {
      bad("size", "{height, width}, an integer or [height, width]", size);
    }
  }

  const resample = get("resample");
  if (resample !== undefined) {
    if (typeof resample !== "number" || !Number.isInteger(resample) || RESAMPLING_NAMES[resample] === undefined) {
      bad("resample", "a Pillow filter number 0-5 (0 NEAREST, 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING)", resample);
    }
    cfg.resample = resample as number;
  }

  const factor = get("rescale_factor");
  if (factor !== undefined) {
    if (typeof factor !== "number" || !Number.isFinite(factor)) bad("rescale_factor", "a number", factor);
    cfg.rescaleFactor = factor as number;
  }

  cfg.imageMean = triple("image_mean", cfg.imageMean, false);
  cfg.imageStd = triple("image_std", cfg.imageStd, true);

  const type = get("image_processor_type");
  if (type !== undefined && typeof type !== "string") bad("image_processor_type", "a string", type);
  cfg.backend = type === "BlipImageProcessorPil" ? "pil" : "torchvision";
  if (options.backend !== undefined) {
    if (!BACKENDS.includes(options.backend)) {
      throw new Blip2Error(`image processor backend must be "torchvision" or "pil", got ${typeName(options.backend)}`);
    }
    cfg.backend = options.backend;
  }
  return cfg;
}

/**
 * PilBackend's (and transformers 4.x's) arithmetic for one channel, byte → float32:
 * `image_transforms.rescale` multiplies the uint8 value as float64 by the factor and casts to
 * float32; `normalize` subtracts and divides by float32 arrays of mean and std, in float32 (a
 * float32 operation is the fround of the exact double result). Without rescale, normalize sees
 * the byte cast to float32.
 */
function pilRescaleNormalize(c: ImageProcessorConfig, ch: number): (byte: number) => number {
  const f = c.rescaleFactor;
  const mean = Math.fround(c.imageMean[ch]!);
  const std = Math.fround(c.imageStd[ch]!);
  return (byte) => {
    let v = c.doRescale ? Math.fround(byte * f) : byte;
    if (c.doNormalize) v = Math.fround(Math.fround(v - mean) / std);
    return v;
  };
}

/**
 * TorchvisionBackend's `_rescale_and_normalize` for one channel, byte → float32. With both steps
 * it fuses them: `mean' = torch.tensor(mean) * (1.0 / rescale_factor)` (a float32 tensor times a
 * Python float, which torch casts to float32 first), likewise std', then torchvision's
 * `normalize` on the uint8 image cast to float32: `(x - mean') / std'`, each op in float32.
 * Rescale alone is `uint8 tensor * rescale_factor`, again float32 x float32(factor). Normalize
 * alone uses float32(mean) and float32(std). With neither, the bytes pass through unchanged.
 */
function torchRescaleNormalize(c: ImageProcessorConfig, ch: number): (byte: number) => number {
  const f32 = Math.fround;
  if (c.doRescale && c.doNormalize) {
    const inverse = f32(1.0 / c.rescaleFactor);
    const mean = f32(f32(c.imageMean[ch]!) * inverse);
    const std = f32(f32(c.imageStd[ch]!) * inverse);
    return (byte) => f32(f32(byte - mean) / std);
  }
  if (c.doRescale) {
    const factor = f32(c.rescaleFactor);
    return (byte) => f32(byte * factor);
  }
  if (c.doNormalize) {
    const mean = f32(c.imageMean[ch]!);
    const std = f32(c.imageStd[ch]!);
    return (byte) => f32(f32(byte - mean) / std);
  }
  return (byte) => byte;
}

/**
 * BlipImageProcessor. Images are always converted to RGB (the vision model takes 3 channels), so
 * `doConvertRgb` is kept for completeness but has no effect here.
 */
export class BlipImageProcessor {
  readonly config: ImageProcessorConfig;
  /** Turn images upright by their EXIF orientation (see loadImage); off by default, as in transformers' processor. */
  readonly exifOrientation: boolean;

  constructor(config: ImageProcessorConfig, options: LoadImageOptions = {}) {
    this.exifOrientation = options.exifOrientation ?? false;
    this.config = {
      ...config,
      size: { ...config.size },
      imageMean: [...config.imageMean],
      imageStd: [...config.imageStd],
    };
    if (!BACKENDS.includes(config.backend)) {
      throw new Blip2Error(`image processor: backend must be "torchvision" or "pil", got ${typeName(config.backend)}`);
    }
    if (config.doResize) {
      if (RESAMPLING_NAMES[config.resample] === undefined) {
        throw new Blip2Error(`image processor: unsupported resample filter ${config.resample} (expected 0-5)`);
      }
      const mode = config.backend === "torchvision" ? torchInterpolationFor(config.resample) : undefined;
      if (typeof mode === "object") throw new Blip2Error(`image processor: ${mode.error}`);
    }
  }

  /**
   * One RGB image → float32 CHW pixel values (3 x H x W). H x W is the configured size when
   * `doResize`, else the image's own size.
   */
  preprocessRgb(img: RgbImage): Float32Array {
    const c = this.config;
    const resizeFn = c.backend === "pil" ? resize : resizeTorch;
    const { data, width, height } = c.doResize ? resizeFn(img, c.size.width, c.size.height, c.resample) : img;
    const plane = width * height;
    const out = new Float32Array(plane * 3);
    for (let ch = 0; ch < 3; ch++) {
      const value = c.backend === "pil" ? pilRescaleNormalize(c, ch) : torchRescaleNormalize(c, ch);
      const base = ch * plane;
      for (let i = 0, p = ch; i < plane; i++, p += 3) out[base + i] = value(data[p]!);
    }
    return out;
  }

  /**
   * Load and preprocess images into one NCHW float32 batch. All images must come out the same
   * size, which is always so with `doResize`.
   */
  async preprocess(images: ImageInput[] | ImageInput): Promise<{ pixelValues: Float32Array; shape: [number, 3, number, number] }> {
    const list = Array.isArray(images) ? images : [images];
    if (list.length === 0) throw new Blip2Error("image processor: no images given");
    const many = list.length > 1;
    const results: { values: Float32Array; height: number; width: number }[] = [];
    for (let i = 0; i < list.length; i++) {
      const input = list[i]!;
      // Name images in a batch by index so an error says which one failed.
      const label = many && typeof input !== "string" ? (input instanceof Uint8Array ? `buffer #${i}` : `raw pixels #${i}`) : undefined;
      const rgb = await loadImage(input, label, { exifOrientation: this.exifOrientation });
      const height = this.config.doResize ? this.config.size.height : rgb.height;
      const width = this.config.doResize ? this.config.size.width : rgb.width;
      results.push({ values: this.preprocessRgb(rgb), height, width });
    }
    const { height, width } = results[0]!;
    for (let i = 1; i < results.length; i++) {
      const r = results[i]!;
      if (r.height !== height || r.width !== width) {
        throw new Blip2Error(
          `image processor: images have different sizes (${width}x${height} and ${r.width}x${r.height}) and do_resize is off, so they cannot be batched`,
        );
      }
    }
    const per = 3 * height * width;
    const pixelValues = new Float32Array(per * results.length);
    results.forEach((r, i) => pixelValues.set(r.values, i * per));
    return { pixelValues, shape: [results.length, 3, height, width] };
  }
}

/**
 * Standalone form of {@link BlipImageProcessor.preprocessRgb}: one RGB image → CHW float32.
 */
export function preprocessRgb(img: RgbImage, config: ImageProcessorConfig): Float32Array {
  return new BlipImageProcessor(config).preprocessRgb(img);
}
