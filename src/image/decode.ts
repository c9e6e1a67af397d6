/**
 * Image decoding that behaves like Pillow's `Image.open(x).convert("RGB")`, which is what the
 * Hugging Face BLIP image processor sees:
 *
 * - EXIF orientation is NOT applied (Pillow's `open` never rotates), unless asked for
 *   (`exifOrientation`): then the image is turned upright as transformers' `load_image` does
 *   (Pillow's `ImageOps.exif_transpose`), which the CLI and the `Blip2` helpers ask for.
 * - Embedded ICC profiles are ignored (Pillow does not colour-manage on open), so sharp is told
 *   `ignoreIcc`.
 * - Alpha is dropped without compositing onto a background; greyscale is replicated to three
 *   channels; palette images come out as their palette colours.
 * - Only the first frame of an animated GIF/WebP or a multi-page TIFF is used.
 *
 * JPEG, PNG, WebP, TIFF (and AVIF/HEIF where the sharp build has it) are decoded by sharp, which
 * gives the same bytes as Pillow for them. Two formats are decoded here instead:
 * - BMP, because sharp's libvips build has no BMP reader (uncompressed 1/4/8-bit palette, 24-bit
 *   and 32-bit files; RLE and 16-bit BMPs are rejected with a clear error);
 * - GIF, because sharp turns transparent pixels black while Pillow keeps the palette colour of
 *   the transparent index (and fills the canvas outside the first frame with that index).
 * CMYK images are converted with Pillow's plain formula rather than through an ICC profile.
 * 16-bit greyscale images are clamped to 0..255 as Pillow's "I;16" → "RGB" conversion does
 * (sharp would scale them by 1/256 instead); 16-bit colour images keep the high byte, as both do.
 *
 * Limits (checked on the header, before any pixel is decoded, so a hostile header cannot make us
 * allocate gigabytes): each side at most {@link MAX_IMAGE_SIDE} px and at most
 * {@link MAX_IMAGE_PIXELS} pixels in all (Pillow's decompression-bomb error threshold).
 */
import { readFile } from "node:fs/promises";
import sharp, { type Metadata, type OutputInfo } from "sharp";
import { decodeBmp } from "./bmp.js";
import { checkDimensions, fail, MAX_IMAGE_PIXELS } from "./limits.js";
import { decodeGif } from "./gif.js";

/** 8-bit interleaved pixels (HWC) with 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels. */
export interface RawImage {
  data: Uint8Array | Uint8ClampedArray;
  width: number;
  height: number;
  channels: 1 | 2 | 3 | 4;
}

/** 8-bit RGB pixels, HWC (row-major, 3 bytes per pixel). */
export interface RgbImage {
  data: Uint8Array;
  width: number;
  height: number;
}

/** A file path, the encoded bytes of an image file, or raw pixels. */
export type ImageInput = string | Buffer | Uint8Array | RawImage;

export interface LoadImageOptions {
  /**
   * Turn the image upright by its EXIF orientation (a phone photo stored sideways), as
   * transformers' `load_image` does; default false, as Pillow's `open` (and so the processor).
   */
  exifOrientation?: boolean;
}

export { MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE } from "./limits.js";

/** Formats we hand to sharp (as sharp's metadata names them). */
const SHARP_FORMATS = new Set(["jpeg", "png", "webp", "tiff", "heif"]);

/** First line of a library error message, trimmed, for embedding in our one-line errors. */
function firstLine(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return (msg.split("\n")[0] ?? "").trim().replace(/:$/, "");
}


/**
 * Load an image as 8-bit RGB. `label` names the image in error messages; it defaults to the
 * file path for a path, "image buffer" for bytes and "raw image" for raw pixels.
 */
export async function loadImage(input: ImageInput, label?: string, options: LoadImageOptions = {}): Promise<RgbImage> {
  if (typeof input === "string") {
    const name = `image ${JSON.stringify(label ?? input)}`;
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(input) && !/^file:\/\//i.test(input)) {
      fail(name, "URLs are not supported; pass a local file path or the image bytes");
    }
    let bytes: Buffer;
    try {
      bytes = await readFile(input.startsWith("file://") ? new URL(input) : input);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") fail(name, "file not found");
      if (code === "EISDIR") fail(name, "is a directory, not an image file");
      if (code === "EACCES" || code === "EPERM") fail(name, "permission denied");
      fail(name, firstLine(err), err);
    }
    return decodeBytes(bytes, name, options);
  }
  if (input instanceof Uint8Array) {
    return decodeBytes(input, label === undefined ? "image buffer" : `image ${JSON.stringify(label)}`, options);
  }
  if (input !== null && typeof input === "object" && "data" in input) {
    return rawToRgb(input, label === undefined ? "raw image" : `image ${JSON.stringify(label)}`);
  }
  fail(label === undefined ? "input" : `image ${JSON.stringify(label)}`, `expected a file path, a Buffer/Uint8Array or a raw image {data, width, height, channels}, got ${describeValue(input)}`);
}

function describeValue(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return typeof v;
}

/**
 * Convert raw 8-bit pixels with 1-4 channels to RGB (grey replicated, alpha dropped).
 * `label` is the phrase used in errors, e.g. `raw image` or `image "frame 3"`.
 */
export function rawToRgb(raw: RawImage, label = "raw image"): RgbImage {
  const { data, width, height, channels } = raw;
  if (!(data instanceof Uint8Array || data instanceof Uint8ClampedArray)) {
    fail(label, `raw image data must be a Uint8Array or Uint8ClampedArray, got ${describeValue(data)}`);
  }
  if (channels !== 1 && channels !== 2 && channels !== 3 && channels !== 4) {
    fail(label, `raw image channels must be 1, 2, 3 or 4, got ${String(channels)}`);
  }
  checkDimensions(label, width, height);
  const expected = width * height * channels;
  if (data.length !== expected) {
    fail(label, `raw image data has ${data.length} bytes, expected ${width}x${height}x${channels} = ${expected}`);
  }
  return toRgb(data, width, height, channels);
}

/** Interleaved 8-bit pixels with 1-4 channels → a fresh RGB buffer. */
function toRgb(data: Uint8Array | Uint8ClampedArray, width: number, height: number, channels: number): RgbImage {
  const n = width * height;
  const out = new Uint8Array(n * 3);
  if (channels === 3) {
    out.set(data.subarray(0, n * 3));
  } else if (channels === 1 || channels === 2) {
    for (let i = 0, j = 0; i < n; i++, j += channels) {
      const g = data[j]!;
      out[i * 3] = g;
      out[i * 3 + 1] = g;
      out[i * 3 + 2] = g;
    }
  } else {
    for (let i = 0, j = 0; i < n; i++, j += channels) {
      out[i * 3] = data[j]!;
      out[i * 3 + 1] = data[j + 1]!;
      out[i * 3 + 2] = data[j + 2]!;
    }
  }
  return { data: out, width, height };
}

async function decodeBytes(bytes: Uint8Array, label: string, options: LoadImageOptions): Promise<RgbImage> {
  if (bytes.length === 0) fail(label, "empty (0 bytes), not an image");
  if (bytes.length >= 2 && bytes[0] === 0x42 && bytes[1] === 0x4d) return decodeBmp(bytes, label);
  if (bytes.length >= 6 && (ascii(bytes, 0, 6) === "GIF87a" || ascii(bytes, 0, 6) === "GIF89a")) return decodeGif(bytes, label);
  const buf = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);

  // Read the header first: it tells the format and size without decoding any pixel.
  let meta: Metadata;
  try {
    meta = await sharp(buf, { limitInputPixels: false }).metadata();
  } catch (err) {
    const msg = firstLine(err);
    if (/unsupported image format/i.test(msg)) {
      fail(label, "not a recognised image file (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)", err);
    }
    fail(label, `corrupt or unreadable image (${msg})`, err);
  }
  const format = meta.format ?? "unknown";
  if (!SHARP_FORMATS.has(format)) {
    fail(label, `unsupported image format "${format}" (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)`);
  }
  // For multi-page inputs sharp reports the page height in pageHeight; we only decode page 0.
  const width = meta.width ?? 0;
  const height = meta.pageHeight ?? meta.height ?? 0;
  checkDimensions(label, width, height);

  // Pillow opens 16-bit greyscale as "I;16" and converts it to RGB by clamping to 255, where
  // sharp would keep the high byte: decode those at 16 bits and clamp ourselves.
  const grey16 = meta.channels === 1 && meta.depth === "ushort";
  // CMYK (JPEG, TIFF): Pillow converts with its plain formula, not through an ICC profile, so
  // take the decoded CMYK values from sharp untouched and convert them the same way.
  const cmyk = meta.space === "cmyk" && meta.channels === 4;
  let decoded: { data: Buffer; info: OutputInfo };
  try {
    const image = sharp(buf, {
      // Pillow raises on a truncated file (LOAD_TRUNCATED_IMAGES is off by default) but lets
      // decoder warnings pass, and so does "truncated": no half-grey images, no needless errors.
      failOn: "truncated",
      limitInputPixels: MAX_IMAGE_PIXELS,
      ignoreIcc: true,
      pages: 1,
      page: 0,
    });
    const pipeline = grey16
      ? image.toColourspace("grey16").raw({ depth: "ushort" })
      : cmyk
        ? image.pipelineColourspace("cmyk").toColourspace("cmyk").raw({ depth: "uchar" })
        : image.raw({ depth: "uchar" });
    decoded = await pipeline.toBuffer({ resolveWithObject: true });
  } catch (err) {
    const msg = firstLine(err);
    fail(label, `corrupt or truncated ${format.toUpperCase()} image (${msg})`, err);
  }
  const { info } = decoded;
  let data: Uint8Array = decoded.data;
  const bytesPerSample = grey16 ? 2 : 1;
  if (info.width !== width || info.height !== height || data.length !== info.width * info.height * info.channels * bytesPerSample) {
    fail(label, `decoder returned ${info.width}x${info.height}x${info.channels} for a ${width}x${height} image`);
  }
  if (grey16) {
    const samples = new Uint16Array(data.buffer, data.byteOffset, data.length / 2); // native (little) endian
    data = new Uint8Array(samples.length);
    for (let i = 0; i < samples.length; i++) data[i] = Math.min(samples[i]!, 255);
  }
  if (cmyk && info.channels !== 4) fail(label, `decoder returned ${info.channels} channels for a CMYK image`);
  const rgb = cmyk ? cmykToRgb(data, info.width, info.height) : toRgb(data, info.width, info.height, info.channels);
  return options.exifOrientation ? orient(rgb, meta.orientation ?? 1) : rgb;
}

/**
 * The image as EXIF `orientation` says to show it, as Pillow's `ImageOps.exif_transpose`: 2 mirrors
 * it, 3 turns it half round, 4 flips it, 5 transposes it, 6 turns it a quarter clockwise, 7
 * transverses it, 8 turns it a quarter anticlockwise. Each maps an output pixel (x, y) of the
 * output size to the source pixel it shows.
 */
export function orient(img: RgbImage, orientation: number): RgbImage {
  const { width: w, height: h } = img;
  const source: Record<number, (x: number, y: number) => [number, number]> = {
    2: (x, y) => [w - 1 - x, y],
    3: (x, y) => [w - 1 - x, h - 1 - y],
    4: (x, y) => [x, h - 1 - y],
    5: (x, y) => [y, x],
    6: (x, y) => [y, h - 1 - x],
    7: (x, y) => [w - 1 - y, h - 1 - x],
    8: (x, y) => [w - 1 - y, x],
  };
  const from = source[orientation];
  if (!from) return img;
  const [width, height] = orientation >= 5 ? [h, w] : [w, h];
  const out = new Uint8Array(img.data.length);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const [sx, sy] = from(x, y);
      const s = (sy * w + sx) * 3;
      const o = (y * width + x) * 3;
      out[o] = img.data[s]!;
      out[o + 1] = img.data[s + 1]!;
      out[o + 2] = img.data[s + 2]!;
    }
  }
  return { data: out, width, height };
}

/**
 * Pillow's CMYK → RGB: with nk = 255 - K, each channel is nk - round(C * nk / 255), where the
 * division by 255 is Pillow's integer approximation ((t >> 8) + t) >> 8 with t = C * nk + 128.
 */
function cmykToRgb(data: Uint8Array, width: number, height: number): RgbImage {
  const n = width * height;
  const out = new Uint8Array(n * 3);
  for (let i = 0; i < n; i++) {
    const nk = 255 - data[i * 4 + 3]!;
    for (let c = 0; c < 3; c++) {
      const t = data[i * 4 + c]! * nk + 128;
      const v = nk - (((t >> 8) + t) >> 8);
      out[i * 3 + c] = v < 0 ? 0 : v > 255 ? 255 : v;
    }
  }
  return { data: out, width, height };
}

function ascii(bytes: Uint8Array, start: number, end: number): string {
  return String.fromCharCode(...bytes.subarray(start, end));
}
