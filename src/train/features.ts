/**
 * The frozen image encoder's output for training, computed once per image: its last hidden state
 * before `post_layernorm` (which training updates, so it cannot be part of what is cached). Cached on
 * disk under the blip2 cache, keyed by the image encoder's weights, the preprocessing and the image's
 * bytes, so later epochs and later runs only read it.
 *
 * With augmentation (LAVIS's training transform: a random resized crop of 50-100% of the area and a
 * horizontal flip) every epoch sees other pixels, so nothing is cached.
 */
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { readTensorBytes } from "../io/safetensors.js";
import { loadImage, type RgbImage } from "../image/decode.js";
import type { BlipImageProcessor } from "../image/imageProcessor.js";
import { CompiledGraph, type RuntimeOptions } from "../runtime/session.js";
import type { Rng } from "./rng.js";
import { imageFeaturesGraph } from "./stage2.js";

export class ImageFeatures {
  private session: Promise<CompiledGraph> | null = null;
  private readonly folder: string | null;
  /** Features per token row: [tokens, hidden]. */
  readonly rowShape: [number, number];
  /** Images run through the encoder so far (the rest came from the cache). */
  computed = 0;

  constructor(
    private readonly checkpoint: Checkpoint,
    private readonly processor: BlipImageProcessor,
    private readonly runtime: RuntimeOptions,
    /** The blip2 cache's root, or null for no disk cache. */
    cacheDir: string | null,
  ) {
    const v = checkpoint.config.vision;
    this.rowShape = [(v.imageSize / v.patchSize) ** 2 + 1, v.hiddenSize];
    this.folder = cacheDir ? path.join(cacheDir, "features", encoderKey(checkpoint, processor)) : null;
  }

  /**
   * Features of `images` (paths) as one [N, tokens, hidden] tensor; `augment` draws a crop and
   * flip per image from `rng`. `where` names each image's data line for errors.
   */
  async of(images: string[], where: string[], augment: Rng | null = null): Promise<ort.Tensor> {
    const per = this.rowShape[0] * this.rowShape[1];
    const out = new Float32Array(per * images.length);
    const missing: number[] = [];
    const keys: (string | null)[] = [];
    for (let i = 0; i < images.length; i++) {
      const key = augment ? null : this.keyOf(images[i]!, where[i]!);
      keys.push(key);
      const cached = key ? this.read(key, per) : null;
      if (cached) out.set(cached, i * per);
      else missing.push(i);
    }
    if (missing.length) {
      const size = this.checkpoint.config.vision.imageSize;
      const pixels = new Float32Array(3 * size * size * missing.length);
      for (let k = 0; k < missing.length; k++) {
        const i = missing[k]!;
        let rgb: RgbImage;
        try {
          rgb = await loadImage(images[i]!);
        } catch (err) {
          throw new Blip2Error(`${where[i]}: ${err instanceof Error ? err.message : String(err)}`);
        }
        if (augment) rgb = randomResizedCropAndFlip(rgb, augment);
        pixels.set(this.processor.preprocessRgb(rgb), k * 3 * size * size);
      }
      const session = await (this.session ??= CompiledGraph.create(imageFeaturesGraph(this.checkpoint), this.runtime));
      const result = (await session.run({ pixel_values: new ort.Tensor("float32", pixels, [missing.length, 3, size, size]) })).image_features!;
      const data = result.data as Float32Array;
      this.computed += missing.length;
      missing.forEach((i, k) => {
        const row = data.subarray(k * per, (k + 1) * per);
        out.set(row, i * per);
        const key = keys[i];
        if (key) this.write(key, row);
      });
    }
    return new ort.Tensor("float32", out, [images.length, ...this.rowShape]);
  }

  private keyOf(image: string, where: string): string {
    let bytes: Buffer;
    try {
      bytes = fs.readFileSync(image);
    } catch (err) {
      throw new Blip2Error(`${where}: cannot read image ${image} (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
    return createHash("sha256").update(bytes).digest("hex").slice(0, 32);
  }

  private read(key: string, values: number): Float32Array | null {
    if (!this.folder) return null;
    try {
      const buf = fs.readFileSync(path.join(this.folder, `${key}.f32`));
      if (buf.byteLength !== values * 4) return null;
      return new Float32Array(buf.buffer, buf.byteOffset, values);
    } catch {
      return null;
    }
  }

  /** Written under a temporary name and renamed, so a killed run never leaves a short file. */
  private write(key: string, row: Float32Array): void {
    if (!this.folder) return;
    try {
      fs.mkdirSync(this.folder, { recursive: true });
      const file = path.join(this.folder, `${key}.f32`);
      const tmp = `${file}.${process.pid}.partial`;
      fs.writeFileSync(tmp, new Uint8Array(row.buffer, row.byteOffset, row.byteLength));
      fs.renameSync(tmp, file);
    } catch {
      // A cache that cannot be written (full disk, read-only) costs time, not correctness.
    }
  }

  async release(): Promise<void> {
    if (this.session) await (await this.session).release();
    this.session = null;
  }
}

/**
 * Identifies what the cached features depend on: the image encoder's config and weights (names,
 * shapes, dtypes and a sample of each tensor's bytes; post_layernorm excluded, it is applied after
 * the cache) and the preprocessing settings.
 */
function encoderKey(checkpoint: Checkpoint, processor: BlipImageProcessor): string {
  const hash = createHash("sha256");
  hash.update(JSON.stringify(checkpoint.config.vision)).update(JSON.stringify(processor.config));
  hash.update(JSON.stringify(checkpoint.dtypes.vision));
  for (const name of checkpoint.names().filter((n) => n.startsWith("vision_model.") && !n.startsWith("vision_model.post_layernorm.")).sort()) {
    const info = checkpoint.tensor(name);
    hash.update(`${name}|${info.dtype}|${info.shape.join(",")}|`);
    const bytes = readTensorBytes({ ...info, byteLength: Math.min(info.byteLength, 4096) });
    hash.update(bytes);
  }
  return hash.digest("hex").slice(0, 32);
}

/**
 * torchvision's RandomResizedCrop(scale=(0.5, 1), ratio=(3/4, 4/3)) and RandomHorizontalFlip, as
 * LAVIS's BLIP training transform: up to 10 tries for a crop of the drawn area and aspect ratio
 * that fits, else the whole image cropped to the nearest allowed ratio; the resize to the encoder's
 * size is the processor's.
 */
export function randomResizedCropAndFlip(img: RgbImage, rng: Rng): RgbImage {
  const { width, height } = img;
  const area = width * height;
  let box: { x: number; y: number; w: number; h: number } | null = null;
  for (let attempt = 0; attempt < 10 && !box; attempt++) {
    const target = area * (0.5 + 0.5 * rng.uniform());
    const ratio = Math.exp(Math.log(3 / 4) + (Math.log(4 / 3) - Math.log(3 / 4)) * rng.uniform());
    const w = Math.round(Math.sqrt(target * ratio));
    const h = Math.round(Math.sqrt(target / ratio));
    if (w > 0 && h > 0 && w <= width && h <= height) box = { x: rng.int(width - w + 1), y: rng.int(height - h + 1), w, h };
  }
  if (!box) {
    const ratio = width / height;
    const w = ratio < 3 / 4 ? width : ratio > 4 / 3 ? Math.round(height * (4 / 3)) : width;
    const h = ratio < 3 / 4 ? Math.round(width / (3 / 4)) : height;
    box = { x: Math.floor((width - w) / 2), y: Math.floor((height - h) / 2), w, h };
  }
  const flip = rng.uniform() < 0.5;
  const data = new Uint8Array(box.w * box.h * 3);
  for (let y = 0; y < box.h; y++) {
    for (let x = 0; x < box.w; x++) {
      const sx = box.x + (flip ? box.w - 1 - x : x);
      const from = ((box.y + y) * width + sx) * 3;
      const to = (y * box.w + x) * 3;
      data[to] = img.data[from]!;
      data[to + 1] = img.data[from + 1]!;
      data[to + 2] = img.data[from + 2]!;
    }
  }
  return { data, width: box.w, height: box.h };
}
