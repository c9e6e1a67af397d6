/**
 * The image processor against Hugging Face references: decoding, resize, rescale and normalize
 * for both backends; input kinds; user-facing errors.
 *
 * Two kinds of reference are used, one per backend, and both must match to 1e-5 (they match bit
 * for bit):
 * - `image_processor_224.safetensors`, `tiny-blip2-opt/`, `tiny-blip2-t5/` and `tiny-blip2-itm/`
 *   were made with transformers 5.x, whose default `BlipImageProcessor` is the torchvision
 *   backend: the default backend here ("torchvision").
 * - `hf-4.45/` was made with transformers 4.45, whose `BlipImageProcessor` is the PIL/NumPy one:
 *   backend "pil" (what `BlipImageProcessorPil` is in 5.x).
 * The resizes themselves are checked byte for byte in image-resize.test.ts (Pillow) and
 * image-torch.test.ts (torch).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { crc32, deflateSync } from "node:zlib";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Blip2Error } from "../src/errors.js";
import { loadImage, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE } from "../src/image/decode.js";
import {
  BlipImageProcessor,
  OPENAI_CLIP_MEAN,
  OPENAI_CLIP_STD,
  parseImageProcessorConfig,
  preprocessRgb,
} from "../src/image/imageProcessor.js";
import { resize } from "../src/image/resize.js";
import { resizeTorch } from "../src/image/resizeTorch.js";
import { fixture, loadReference, maxAbsDiff } from "./helpers.js";

const readJson = (file: string): unknown => JSON.parse(readFileSync(file, "utf8"));
const config224 = () => parseImageProcessorConfig(readJson(fixture("preprocessor_config_224.json")), "preprocessor_config_224.json");
const configTiny = () =>
  parseImageProcessorConfig(readJson(fixture("tiny-blip2-opt", "processor_config.json")), "tiny-blip2-opt/processor_config.json");

describe("224 px reference (image_processor_224.safetensors, transformers 5.x)", () => {
  const ref = loadReference(fixture("image_processor_224.safetensors"));
  const names = [...ref.keys()].filter((k) => !k.endsWith(".decoded_rgb"));

  it("covers the seven fixture images", () => {
    expect(names.sort()).toEqual(
      ["gray300x100.png", "image0.png", "image1.png", "photo640x427.jpg", "photo640x427.png", "rgba150x200.png", "tiny13x9.png"].sort(),
    );
  });

  it("the config selects the torchvision backend", () => {
    expect(config224().backend).toBe("torchvision");
  });

  for (const name of names) {
    it(`${name}: decoded RGB is identical to Pillow's`, async () => {
      const dec = ref.get(`${name}.decoded_rgb`)!;
      const img = await loadImage(fixture(name));
      expect([img.height, img.width, 3]).toEqual(dec.shape);
      expect(maxAbsDiff(img.data, dec.data)).toBe(0);
    });

    it(`${name}: pixel values match (torchvision backend)`, async () => {
      const expected = ref.get(name)!;
      const { pixelValues, shape } = await new BlipImageProcessor(config224()).preprocess(fixture(name));
      expect(shape).toEqual([1, 3, 224, 224]);
      expect(shape).toEqual(expected.shape);
      const diff = maxAbsDiff(pixelValues, expected.data);
      expect(diff).toBeLessThanOrEqual(1e-5);
      expect(diff).toBe(0); // bit for bit, in fact
    });
  }
});

describe("30 px references, transformers 5.x (torchvision backend)", () => {
  for (const variant of ["tiny-blip2-opt", "tiny-blip2-t5"]) {
    describe(variant, () => {
      const ref = loadReference(fixture(variant, "reference.safetensors"));
      const proc = () => {
        const cfg = parseImageProcessorConfig(readJson(fixture(variant, "processor_config.json")), `${variant}/processor_config.json`);
        expect(cfg.size).toEqual({ height: 30, width: 30 });
        expect(cfg.backend).toBe("torchvision");
        return new BlipImageProcessor(cfg);
      };
      // imageN: fixtures/imageN.png; caseN: image0.png with the N-th prompt; batch: images 0 and 1.
      const cases: [string, string[]][] = [
        ...[0, 1, 2].map((n): [string, string[]] => [`image${n}.pixel_values`, [`image${n}.png`]]),
        ...[0, 1, 2].map((n): [string, string[]] => [`case${n}.pixel_values`, ["image0.png"]]),
        ["batch.pixel_values", ["image0.png", "image1.png"]],
      ];
      for (const [key, files] of cases) {
        it(`${key} matches to 1e-5`, async () => {
          const expected = ref.get(key)!;
          const { pixelValues, shape } = await proc().preprocess(files.map((f) => fixture(f)));
          expect(shape).toEqual(expected.shape);
          const diff = maxAbsDiff(pixelValues, expected.data);
          expect(diff).toBeLessThanOrEqual(1e-5);
          expect(diff).toBe(0);
        });
      }
    });
  }

  it("tiny-blip2-itm pixel_values (images 0 and 1) match to 1e-5", async () => {
    const expected = loadReference(fixture("tiny-blip2-itm", "reference.safetensors")).get("pixel_values")!;
    const cfg = parseImageProcessorConfig(readJson(fixture("tiny-blip2-itm", "processor_config.json")), "processor_config.json");
    const { pixelValues, shape } = await new BlipImageProcessor(cfg).preprocess([fixture("image0.png"), fixture("image1.png")]);
    expect(shape).toEqual(expected.shape);
    expect(maxAbsDiff(pixelValues, expected.data)).toBeLessThanOrEqual(1e-5);
  });
});

describe("30 px references, transformers 4.45 (pil backend)", () => {
  for (const variant of ["opt", "t5", "itm"]) {
    it(`hf-4.45/${variant}: batch of img0, img1 matches to 1e-5`, async () => {
      const ref = loadReference(fixture("hf-4.45", variant, "reference.safetensors")).get("pixel_values")!;
      const json = readJson(fixture("hf-4.45", variant, "preprocessor_config.json"));
      // 4.45's configs say "BlipImageProcessor" like 5.x's, but that class was the PIL one then.
      expect(parseImageProcessorConfig(json, "preprocessor_config.json").backend).toBe("torchvision");
      const cfg = parseImageProcessorConfig(json, "preprocessor_config.json", { backend: "pil" });
      expect(cfg.size).toEqual({ height: 30, width: 30 });
      expect(cfg.backend).toBe("pil");
      const { pixelValues, shape } = await new BlipImageProcessor(cfg).preprocess([
        fixture("hf-4.45", "images", "img0.png"),
        fixture("hf-4.45", "images", "img1.png"),
      ]);
      expect(shape).toEqual([2, 3, 30, 30]);
      expect(ref.shape).toEqual(shape);
      const diff = maxAbsDiff(pixelValues, ref.data);
      expect(diff).toBeLessThanOrEqual(1e-5);
      expect(diff).toBe(0);
    });
  }
});

describe("backends are not interchangeable", () => {
  it("each reference is missed by the other backend", async () => {
    // 5.x reference with the pil backend: Pillow's resize is off by 1-2 levels in some bytes.
    const ref224 = loadReference(fixture("image_processor_224.safetensors")).get("photo640x427.png")!;
    const pil = await new BlipImageProcessor({ ...config224(), backend: "pil" }).preprocess(fixture("photo640x427.png"));
    expect(maxAbsDiff(pil.pixelValues, ref224.data)).toBeGreaterThan(1e-3);
    // 4.45 reference with the torchvision backend: at least the arithmetic differs in the last bit.
    const ref445 = loadReference(fixture("hf-4.45", "opt", "reference.safetensors")).get("pixel_values")!;
    const cfg445 = parseImageProcessorConfig(readJson(fixture("hf-4.45", "opt", "preprocessor_config.json")), "p.json");
    const tv = await new BlipImageProcessor(cfg445).preprocess([fixture("hf-4.45", "images", "img0.png"), fixture("hf-4.45", "images", "img1.png")]);
    expect(maxAbsDiff(tv.pixelValues, ref445.data)).toBeGreaterThan(0);
  });
});

describe("rescale and normalize arithmetic", () => {
  const f = Math.fround;
  /** Every byte value in every channel: a 256 x 1 image of grey pixels (v, v, v). */
  const allBytes = { data: Uint8Array.from({ length: 256 * 3 }, (_, i) => Math.floor(i / 3)), width: 256, height: 1 };
  /** Float64 rescale cast to float32, then float32 (x - mean) / std (NumPy, transformers 4.x). */
  const pilValue = (v: number, c: number, factor: number) => f(f(f(v * factor) - f(OPENAI_CLIP_MEAN[c]!)) / f(OPENAI_CLIP_STD[c]!));
  /** Fused: (x - mean * float32(1/factor)) / (std * float32(1/factor)), all float32 (torchvision). */
  const torchValue = (v: number, c: number, factor: number) => {
    const inv = f(1 / factor);
    return f(f(v - f(f(OPENAI_CLIP_MEAN[c]!) * inv)) / f(f(OPENAI_CLIP_STD[c]!) * inv));
  };

  it("pil: float64 rescale cast to float32, then float32 (x - mean) / std, channel first", () => {
    const cfg = { ...config224(), doResize: false, backend: "pil" as const };
    const img = { data: Uint8Array.from([0, 128, 255, 1, 2, 3]), width: 2, height: 1 };
    const out = preprocessRgb(img, cfg);
    const expected = [0, 1, 128, 2, 255, 3].map((v, i) => pilValue(v, Math.floor(i / 2), cfg.rescaleFactor));
    expect(Array.from(out)).toEqual(expected);
    // Spot value, float32 of (255/255 - 0.48145466) / 0.26862954 ...
    expect(out[0]).toBeCloseTo(-1.7922625, 6);
    expect(out[4]).toBeCloseTo((1 - 0.40821073) / 0.27577711, 5);
    const all = preprocessRgb(allBytes, cfg);
    expect(Array.from(all)).toEqual(Array.from(all, (_, i) => pilValue(i % 256, Math.floor(i / 256), cfg.rescaleFactor)));
  });

  it("torchvision: rescale fused into mean and std, float32 throughout", () => {
    const cfg = { ...config224(), doResize: false };
    expect(cfg.backend).toBe("torchvision");
    const out = preprocessRgb(allBytes, cfg);
    const expected = Array.from(out, (_, i) => torchValue(i % 256, Math.floor(i / 256), cfg.rescaleFactor));
    expect(Array.from(out)).toEqual(expected);
    // The two orders differ in the last bit for some values, so the backends are told apart here.
    const slow = Array.from(out, (_, i) => pilValue(i % 256, Math.floor(i / 256), cfg.rescaleFactor));
    const differing = expected.filter((v, i) => v !== slow[i]).length;
    expect(differing).toBeGreaterThan(0);
    expect(maxAbsDiff(expected, slow)).toBeLessThan(1e-6);
  });

  it("honours do_rescale / do_normalize switches in both backends", () => {
    const img = { data: Uint8Array.from([0, 51, 255]), width: 1, height: 1 };
    for (const backend of ["pil", "torchvision"] as const) {
      const base = { ...config224(), doResize: false, backend };
      expect(Array.from(preprocessRgb(img, { ...base, doRescale: false, doNormalize: false }))).toEqual([0, 51, 255]);
      const rescaled = [0, 51, 255].map((v) => (backend === "pil" ? f(v * base.rescaleFactor) : f(v * f(base.rescaleFactor))));
      expect(Array.from(preprocessRgb(img, { ...base, doNormalize: false }))).toEqual(rescaled);
      const normalizeOnly = Array.from(preprocessRgb(img, { ...base, doRescale: false }));
      expect(normalizeOnly).toEqual([0, 51, 255].map((v, c) => f(f(v - f(OPENAI_CLIP_MEAN[c]!)) / f(OPENAI_CLIP_STD[c]!))));
    }
    // The two rescales differ: 51 / 255 is float32(0.2) with pil, one ulp above with torchvision.
    const rescaleOnly = { ...config224(), doResize: false, doNormalize: false };
    expect(preprocessRgb(img, { ...rescaleOnly, backend: "pil" })[1]).toBe(f(0.2));
    expect(preprocessRgb(img, rescaleOnly)[1]).toBeGreaterThan(f(0.2));
  });
});

describe("input kinds give the same pixel values", () => {
  const cfg = () => parseImageProcessorConfig({ size: { height: 64, width: 48 } }, "inline");

  it("path, Buffer, Uint8Array, raw RGB and raw RGBA", async () => {
    const file = fixture("rgba150x200.png");
    const proc = new BlipImageProcessor(cfg());
    const bytes = readFileSync(file);
    const rgba = await sharp(file).ensureAlpha().raw().toBuffer({ resolveWithObject: true });
    expect(rgba.info.channels).toBe(4);
    const rgb = await loadImage(file);
    const inputs = {
      path: file,
      buffer: bytes,
      uint8array: new Uint8Array(bytes),
      rawRgb: { data: rgb.data, width: rgb.width, height: rgb.height, channels: 3 as const },
      rawRgba: { data: new Uint8ClampedArray(rgba.data), width: rgba.info.width, height: rgba.info.height, channels: 4 as const },
    };
    const { pixelValues: reference, shape } = await proc.preprocess(file);
    expect(shape).toEqual([1, 3, 64, 48]);
    for (const [kind, input] of Object.entries(inputs)) {
      const { pixelValues } = await proc.preprocess(input);
      expect(maxAbsDiff(pixelValues, reference), kind).toBe(0);
    }
    // A batch of all of them is five copies.
    const batch = await proc.preprocess(Object.values(inputs));
    expect(batch.shape).toEqual([5, 3, 64, 48]);
    for (let i = 0; i < 5; i++) expect(maxAbsDiff(batch.pixelValues.subarray(i * reference.length, (i + 1) * reference.length), reference)).toBe(0);
  });

  it("raw greyscale (1 and 2 channels) is replicated to RGB", async () => {
    const file = fixture("gray300x100.png");
    const grey = await sharp(file).extractChannel(0).raw().toBuffer({ resolveWithObject: true });
    expect(grey.info.channels).toBe(1);
    const fromFile = await loadImage(file);
    const fromGrey = await loadImage({ data: grey.data, width: grey.info.width, height: grey.info.height, channels: 1 });
    expect(maxAbsDiff(fromGrey.data, fromFile.data)).toBe(0);
    const la = new Uint8Array(grey.data.length * 2);
    grey.data.forEach((g, i) => la.set([g, 77], i * 2));
    const fromLa = await loadImage({ data: la, width: grey.info.width, height: grey.info.height, channels: 2 });
    expect(maxAbsDiff(fromLa.data, fromFile.data)).toBe(0);
  });
});

describe("parseImageProcessorConfig", () => {
  it("reads the 224 config", () => {
    const cfg = config224();
    expect(cfg).toEqual({
      doResize: true,
      size: { height: 224, width: 224 },
      resample: 3,
      doRescale: true,
      rescaleFactor: 0.00392156862745098,
      doNormalize: true,
      imageMean: [0.48145466, 0.4578275, 0.40821073],
      imageStd: [0.26862954, 0.26130258, 0.27577711],
      doConvertRgb: true,
      backend: "torchvision",
    });
  });

  it("picks the backend as transformers 5.x does, with an override", () => {
    expect(parseImageProcessorConfig({}, "p.json").backend).toBe("torchvision");
    expect(parseImageProcessorConfig({ image_processor_type: "BlipImageProcessor" }, "p.json").backend).toBe("torchvision");
    expect(parseImageProcessorConfig({ image_processor_type: "BlipImageProcessorPil" }, "p.json").backend).toBe("pil");
    const nested = { image_processor: { image_processor_type: "BlipImageProcessorPil" }, processor_class: "Blip2Processor" };
    expect(parseImageProcessorConfig(nested, "p.json").backend).toBe("pil");
    expect(parseImageProcessorConfig(nested, "p.json", { backend: "torchvision" }).backend).toBe("torchvision");
    expect(parseImageProcessorConfig({}, "p.json", { backend: "pil" }).backend).toBe("pil");
    expect(parseImageProcessorConfig({}, "p.json", {}).backend).toBe("torchvision");
    expect(() => parseImageProcessorConfig({}, "p.json", { backend: "numpy" as never })).toThrow(/backend must be "torchvision" or "pil", got the string "numpy"/);
  });

  it("the backend decides the resize", () => {
    const img = { data: Uint8Array.from({ length: 40 * 30 * 3 }, (_, i) => (i * 37) % 256), width: 40, height: 30 };
    const base = parseImageProcessorConfig({ size: { height: 7, width: 9 }, do_rescale: false, do_normalize: false }, "p.json");
    const chw = (r: { data: Uint8Array; width: number; height: number }) =>
      Array.from({ length: r.data.length }, (_, i) => r.data[(i % (r.width * r.height)) * 3 + Math.floor(i / (r.width * r.height))]);
    expect(Array.from(preprocessRgb(img, base))).toEqual(chw(resizeTorch(img, 9, 7, 3)));
    expect(Array.from(preprocessRgb(img, { ...base, backend: "pil" }))).toEqual(chw(resize(img, 9, 7, 3)));
  });

  it("rejects filters the torchvision backend cannot use, not the pil one", () => {
    for (const resample of [4, 5]) {
      const cfg = parseImageProcessorConfig({ resample }, "p.json");
      expect(() => new BlipImageProcessor(cfg)).toThrow(Blip2Error);
      expect(() => new BlipImageProcessor(cfg)).toThrow(/torchvision backend.*use the "pil" backend/);
      expect(() => new BlipImageProcessor({ ...cfg, backend: "pil" })).not.toThrow();
      expect(() => new BlipImageProcessor({ ...cfg, doResize: false })).not.toThrow();
    }
    expect(() => new BlipImageProcessor({ ...parseImageProcessorConfig({}, "p.json"), backend: "cv2" as never })).toThrow(/backend must be/);
  });

  it("applies BlipImageProcessor's defaults to absent or null fields", () => {
    const cfg = parseImageProcessorConfig({ image_processor_type: "BlipImageProcessor", size: null }, "p.json");
    expect(cfg.size).toEqual({ height: 384, width: 384 });
    expect(cfg.resample).toBe(3);
    expect(cfg.rescaleFactor).toBe(1 / 255);
    expect(cfg.imageMean).toEqual(OPENAI_CLIP_MEAN);
    expect(cfg.imageStd).toEqual(OPENAI_CLIP_STD);
    expect([cfg.doResize, cfg.doRescale, cfg.doNormalize, cfg.doConvertRgb]).toEqual([true, true, true, true]);
  });

  it("accepts the legacy size forms get_size_dict accepts and a scalar mean/std", () => {
    expect(parseImageProcessorConfig({ size: 224 }, "p.json").size).toEqual({ height: 224, width: 224 });
    expect(parseImageProcessorConfig({ size: [30, 40] }, "p.json").size).toEqual({ height: 30, width: 40 });
    const cfg = parseImageProcessorConfig({ image_mean: 0.5, image_std: [0.25] }, "p.json");
    expect(cfg.imageMean).toEqual([0.5, 0.5, 0.5]);
    expect(cfg.imageStd).toEqual([0.25, 0.25, 0.25]);
  });

  it("rejects wrong types with the file, the field, expected and got", () => {
    const cases: [unknown, RegExp][] = [
      [{ do_resize: "yes" }, /p\.json: field "do_resize" must be true or false, got the string "yes"/],
      [{ size: { height: 0, width: 10 } }, /p\.json: field "size\.height" must be a positive integer, got number 0/],
      [{ size: { shortest_edge: 224 } }, /p\.json: field "size" must have "height" and "width".*got keys: shortest_edge/],
      [{ size: "big" }, /p\.json: field "size" must be/],
      [{ resample: 9 }, /p\.json: field "resample" must be a Pillow filter number 0-5.*got number 9/],
      [{ rescale_factor: "1/255" }, /p\.json: field "rescale_factor" must be a number, got the string/],
      [{ image_mean: [0.5, 0.5] }, /p\.json: field "image_mean" must be 3 numbers \(or one\), got an array of 2/],
      [{ image_std: [0.5, 0, 0.5] }, /p\.json: field "image_std" must be 3 positive numbers/],
      [[1, 2], /p\.json: field "\(root\)" must be a JSON object, got an array of 2/],
      [{ image_processor_type: 3 }, /p\.json: field "image_processor_type" must be a string, got number 3/],
    ];
    for (const [json, message] of cases) {
      expect(() => parseImageProcessorConfig(json, "p.json")).toThrow(Blip2Error);
      expect(() => parseImageProcessorConfig(json, "p.json")).toThrow(message);
    }
  });
});

describe("errors name the input and the problem", () => {
  let dir = "";
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), "blip2-image-test-"));
  });
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  async function loadError(input: Parameters<typeof loadImage>[0], label?: string): Promise<Blip2Error> {
    try {
      await loadImage(input, label);
    } catch (err) {
      expect(err).toBeInstanceOf(Blip2Error);
      const msg = (err as Error).message;
      expect(msg).not.toContain("\n");
      return err as Blip2Error;
    }
    throw new Error("expected loadImage to fail");
  }

  /** A PNG with valid chunks (and CRCs) whose header claims `width` x `height`. */
  function pngWithSize(width: number, height: number): Buffer {
    const chunk = (type: string, data: Buffer): Buffer => {
      const len = Buffer.alloc(4);
      len.writeUInt32BE(data.length);
      const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
      const crc = Buffer.alloc(4);
      crc.writeUInt32BE(crc32(body));
      return Buffer.concat([len, body, crc]);
    };
    const ihdr = Buffer.alloc(13);
    ihdr.writeUInt32BE(width, 0);
    ihdr.writeUInt32BE(height, 4);
    ihdr[8] = 8; // bit depth
    ihdr[9] = 2; // RGB
    const signature = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    return Buffer.concat([signature, chunk("IHDR", ihdr), chunk("IDAT", deflateSync(Buffer.alloc(1000))), chunk("IEND", Buffer.alloc(0))]);
  }

  it("missing file", async () => {
    const file = path.join(dir, "no-such-image.png");
    const err = await loadError(file);
    expect(err.message).toBe(`cannot load image ${JSON.stringify(file)}: file not found`);
  });

  it("a file that is not an image", async () => {
    const file = fixture("preprocessor_config_224.json");
    const err = await loadError(file);
    expect(err.message).toContain(file);
    expect(err.message).toMatch(/not a recognised image file \(supported: JPEG, PNG, WebP, GIF, BMP, TIFF\)/);
    expect((await loadError(Buffer.from("just some text"))).message).toMatch(/^cannot load image buffer: not a recognised image file/);
  });

  it("truncated PNG and JPEG", async () => {
    for (const name of ["photo640x427.png", "photo640x427.jpg"]) {
      const bytes = readFileSync(fixture(name));
      const file = path.join(dir, `truncated-${name}`);
      writeFileSync(file, bytes.subarray(0, Math.floor(bytes.length / 2)));
      const err = await loadError(file);
      expect(err.message).toContain(file);
      expect(err.message).toMatch(name.endsWith(".png") ? /corrupt or truncated PNG image/ : /corrupt or truncated JPEG image/);
    }
    // Cut inside the header: still a clear one-line error.
    const head = readFileSync(fixture("photo640x427.jpg")).subarray(0, 200);
    expect((await loadError(head, "photo head")).message).toMatch(/^cannot load image "photo head": corrupt or unreadable image/);
  });

  it("truncated GIF and BMP (our own decoders)", async () => {
    const gif = Buffer.from("R0lGODlhAgABAIAAAP8AAAD/ACwAAAAAAgABAAACAkQKADs=", "base64");
    expect((await loadImage(gif)).data.length).toBe(6);
    expect((await loadError(gif.subarray(0, 30))).message).toMatch(/corrupt or truncated GIF image/);
    const bmpHeader = Buffer.alloc(54);
    bmpHeader.write("BM", 0, "ascii");
    bmpHeader.writeUInt32LE(54, 10);
    bmpHeader.writeUInt32LE(40, 14);
    bmpHeader.writeInt32LE(10, 18);
    bmpHeader.writeInt32LE(10, 22);
    bmpHeader.writeUInt16LE(24, 28);
    expect((await loadError(bmpHeader, "x.bmp")).message).toMatch(/^cannot load image "x\.bmp": corrupt or truncated BMP image \(pixel data needs 320 bytes/);
  });

  it("zero-size and inconsistent raw images", async () => {
    const zero = await loadError({ data: new Uint8Array(0), width: 0, height: 4, channels: 3 });
    expect(zero.message).toBe("cannot load raw image: empty image, 0x4 px (width and height must be at least 1 px)");
    const short = await loadError({ data: new Uint8Array(10), width: 2, height: 2, channels: 3 }, "frame 7");
    expect(short.message).toBe('cannot load image "frame 7": raw image data has 10 bytes, expected 2x2x3 = 12');
    const channels = await loadError({ data: new Uint8Array(5), width: 1, height: 1, channels: 5 as never });
    expect(channels.message).toMatch(/channels must be 1, 2, 3 or 4, got 5/);
    expect((await loadError(new Uint8Array(0))).message).toBe("cannot load image buffer: empty (0 bytes), not an image");
  });

  it("a 100,000 px wide image is refused from its header, quickly", async () => {
    const file = path.join(dir, "wide.png");
    writeFileSync(file, pngWithSize(100_000, 2));
    const t0 = performance.now();
    const err = await loadError(file);
    expect(performance.now() - t0).toBeLessThan(2000);
    expect(err.message).toBe(`cannot load image ${JSON.stringify(file)}: too large: 100000x2 px (the limit is ${MAX_IMAGE_SIDE} px a side)`);
    // Within the side limit but over the pixel budget (Pillow's decompression-bomb limit).
    const bomb = await loadError(pngWithSize(20_000, 20_000));
    expect(bomb.message).toBe(`cannot load image buffer: too large: 20000x20000 px = 400000000 pixels (the limit is ${MAX_IMAGE_PIXELS} pixels)`);
    const raw = await loadError({ data: new Uint8Array(3), width: 100_000, height: 1, channels: 3 });
    expect(raw.message).toMatch(/^cannot load raw image: too large: 100000x1 px/);
  });

  it("URLs are refused with a hint", async () => {
    for (const url of ["https://example.com/cat.jpg", "http://example.com/cat.jpg"]) {
      const err = await loadError(url);
      expect(err.message).toBe(`cannot load image ${JSON.stringify(url)}: URLs are not supported; pass a local file path or the image bytes`);
    }
  });

  it("preprocess names the failing image of a batch", async () => {
    const proc = new BlipImageProcessor(configTiny());
    await expect(proc.preprocess([fixture("image0.png"), Buffer.from("nope")])).rejects.toThrow(/^cannot load image "buffer #1": not a recognised image/);
    await expect(proc.preprocess([])).rejects.toThrow(/no images given/);
  });
});
