/**
 * The torchvision-backend resize (src/image/resizeTorch.ts) against transformers 5.x references,
 * byte for byte, and its edge cases.
 *
 * `image_processor_224.safetensors` holds float pixel values, not bytes; but with the torchvision
 * backend's fused normalize every byte value of a channel maps to a distinct float32, so the
 * resized bytes torch produced can be read back exactly from the reference and compared with
 * ours, independently of the rescale/normalize arithmetic.
 */
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { Blip2Error } from "../src/errors.js";
import { loadImage, type RgbImage } from "../src/image/decode.js";
import { OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, parseImageProcessorConfig } from "../src/image/imageProcessor.js";
import { resize, Resampling } from "../src/image/resize.js";
import { resizeTorch } from "../src/image/resizeTorch.js";
import { fixture, loadReference } from "./helpers.js";

const f = Math.fround;

/** The HWC bytes behind CHW pixel values made by the torchvision backend with CLIP mean/std. */
function bytesFromPixelValues(values: Float32Array, width: number, height: number, rescaleFactor: number): Uint8Array {
  const plane = width * height;
  const out = new Uint8Array(plane * 3);
  const inverse = f(1 / rescaleFactor);
  for (let c = 0; c < 3; c++) {
    const mean = f(f(OPENAI_CLIP_MEAN[c]!) * inverse);
    const std = f(f(OPENAI_CLIP_STD[c]!) * inverse);
    const byteOf = new Map<number, number>();
    for (let v = 0; v < 256; v++) byteOf.set(f(f(v - mean) / std), v);
    expect(byteOf.size).toBe(256);
    for (let i = 0; i < plane; i++) {
      const byte = byteOf.get(values[c * plane + i]!);
      if (byte === undefined) throw new Error(`value ${values[c * plane + i]} (channel ${c}, pixel ${i}) is no byte's`);
      out[i * 3 + c] = byte;
    }
  }
  return out;
}

function byteDiff(a: Uint8Array, b: Uint8Array): { count: number; max: number } {
  expect(a.length).toBe(b.length);
  let count = 0;
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (d > 0) count++;
    max = Math.max(max, d);
  }
  return { count, max };
}

const image = (width: number, height: number, fill: (x: number, y: number, c: number) => number): RgbImage => {
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) for (let c = 0; c < 3; c++) data[(y * width + x) * 3 + c] = fill(x, y, c);
  return { data, width, height };
};

describe("bicubic resize matches transformers 5.x byte for byte (224 px fixtures)", () => {
  const ref = loadReference(fixture("image_processor_224.safetensors"));
  const cfg = parseImageProcessorConfig(JSON.parse(readFileSync(fixture("preprocessor_config_224.json"), "utf8")), "preprocessor_config_224.json");
  const names = [...ref.keys()].filter((k) => !k.endsWith(".decoded_rgb"));

  for (const name of names) {
    it(name, async () => {
      const img = await loadImage(fixture(name));
      const expected = bytesFromPixelValues(ref.get(name)!.data, 224, 224, cfg.rescaleFactor);
      const ours = resizeTorch(img, 224, 224, Resampling.BICUBIC);
      expect(byteDiff(ours.data, expected)).toEqual({ count: 0, max: 0 });
      // Pillow's resize differs by a level or two in a small fraction of the bytes (the int16
      // weights of torch against Pillow's 22-bit ones): the reason for two backends.
      const pillow = byteDiff(resize(img, 224, 224, Resampling.BICUBIC).data, expected);
      expect(pillow.max).toBeLessThanOrEqual(2);
      expect(pillow.count).toBeLessThanOrEqual(0.005 * expected.length);
    });
  }

  it("Pillow's resize is not torch's on these images (the test above can fail)", async () => {
    const img = await loadImage(fixture("photo640x427.png"));
    const expected = bytesFromPixelValues(ref.get("photo640x427.png")!.data, 224, 224, cfg.rescaleFactor);
    expect(byteDiff(resize(img, 224, 224, Resampling.BICUBIC).data, expected).count).toBeGreaterThan(0);
  });
});

describe("resizeTorch", () => {
  const gradient = image(37, 23, (x, y, c) => (x * 7 + y * 13 + c * 50) % 256);

  it("same size: a copy", () => {
    const out = resizeTorch(gradient, 37, 23, Resampling.BICUBIC);
    expect(out.data).toEqual(gradient.data);
    expect(out.data).not.toBe(gradient.data);
  });

  it("horizontal pass first, uint8 in between: equals width-only then height-only", () => {
    for (const resample of [Resampling.BICUBIC, Resampling.BILINEAR]) {
      for (const [w, h] of [
        [11, 9],
        [80, 50],
        [15, 60],
      ] as const) {
        const both = resizeTorch(gradient, w, h, resample);
        const staged = resizeTorch(resizeTorch(gradient, w, gradient.height, resample), w, h, resample);
        expect(both.data).toEqual(staged.data);
      }
    }
  });

  it("a constant image stays constant, down and up", () => {
    for (const value of [0, 1, 128, 254, 255]) {
      const flat = image(19, 13, () => value);
      for (const resample of [Resampling.BICUBIC, Resampling.BILINEAR, Resampling.NEAREST]) {
        for (const [w, h] of [
          [5, 4],
          [50, 41],
          [19, 3],
        ] as const) {
          expect(resizeTorch(flat, w, h, resample).data.every((b) => b === value)).toBe(true);
        }
      }
    }
  });

  it("bilinear 4 -> 2 by hand: weights 3/7, 3/7, 1/7 as int16 with 16 fraction bits", () => {
    // Output 0: centre 1, inputs 0..2, triangle weights 0.75, 0.75, 0.25 normalised; the largest
    // (3/7) fits int16 with 16 fraction bits: 28087, 28087, 9362. Output 1 mirrors it.
    const row = image(4, 1, (x) => [10, 20, 30, 40][x]!);
    const out = resizeTorch(row, 2, 1, Resampling.BILINEAR);
    const half = 1 << 15;
    const expected = [(half + 10 * 28087 + 20 * 28087 + 30 * 9362) >> 16, (half + 20 * 9362 + 30 * 28087 + 40 * 28087) >> 16];
    expect(expected).toEqual([17, 33]);
    expect(Array.from(out.data.filter((_, i) => i % 3 === 0))).toEqual(expected);
  });

  it("nearest is NEAREST_EXACT: floor(float32((i + 0.5) * float32(in / out)))", () => {
    const row = image(5, 1, (x) => x * 10);
    expect(Array.from(resizeTorch(row, 3, 1, Resampling.NEAREST).data.filter((_, i) => i % 3 === 0))).toEqual([0, 20, 40]);
    const two = image(2, 1, (x) => x * 10);
    expect(Array.from(resizeTorch(two, 5, 1, Resampling.NEAREST).data.filter((_, i) => i % 3 === 0))).toEqual([0, 0, 10, 10, 10]);
    const column = image(1, 7, (_, y) => y);
    expect(Array.from(resizeTorch(column, 1, 3, Resampling.NEAREST).data.filter((_, i) => i % 3 === 0))).toEqual([1, 3, 5]);
  });

  it("LANCZOS is done as BICUBIC, as transformers does; BOX and HAMMING are refused", () => {
    expect(resizeTorch(gradient, 10, 8, Resampling.LANCZOS).data).toEqual(resizeTorch(gradient, 10, 8, Resampling.BICUBIC).data);
    for (const resample of [Resampling.BOX, Resampling.HAMMING, 9]) {
      expect(() => resizeTorch(gradient, 10, 8, resample)).toThrow(Blip2Error);
    }
    expect(() => resizeTorch(gradient, 10, 8, Resampling.BOX)).toThrow(/BOX.*use the "pil" backend/);
  });

  it("rejects bad sizes and inconsistent images", () => {
    expect(() => resizeTorch(gradient, 0, 5, Resampling.BICUBIC)).toThrow(/positive integers/);
    expect(() => resizeTorch(gradient, 2.5, 5, Resampling.BICUBIC)).toThrow(/positive integers/);
    expect(() => resizeTorch({ data: new Uint8Array(5), width: 2, height: 2 }, 1, 1, Resampling.BICUBIC)).toThrow(/expected 2x2x3 RGB bytes/);
  });
});
