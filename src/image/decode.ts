/**
 * Image decoding that behaves like Pillow's `Image.open(x).convert("RGB")`, which is what the
 * Hugging Face BLIP image processor sees:
 *
 * - EXIF orientation is NOT applied (Pillow's `open` never rotates).
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
import { Blip2Error } from "../errors.js";

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

/** Largest accepted width or height, in pixels. */
export const MAX_IMAGE_SIDE = 32768;
/** Largest accepted pixel count: Pillow raises DecompressionBombError above this (2 x 89,478,485). */
export const MAX_IMAGE_PIXELS = 178_956_970;

/** Formats we hand to sharp (as sharp's metadata names them). */
const SHARP_FORMATS = new Set(["jpeg", "png", "webp", "tiff", "heif"]);

/** `label` is a phrase naming the input: `image "cat.jpg"`, `image buffer`, `raw image`. */
function fail(label: string, problem: string, cause?: unknown): never {
  throw new Blip2Error(`cannot load ${label}: ${problem}`, cause === undefined ? undefined : { cause });
}

/** First line of a library error message, trimmed, for embedding in our one-line errors. */
function firstLine(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return (msg.split("\n")[0] ?? "").trim().replace(/:$/, "");
}

function checkDimensions(label: string, width: number, height: number): void {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width <= 0 || height <= 0) {
    fail(label, `empty image, ${width}x${height} px (width and height must be at least 1 px)`);
  }
  if (width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE) {
    fail(label, `too large: ${width}x${height} px (the limit is ${MAX_IMAGE_SIDE} px a side)`);
  }
  if (width * height > MAX_IMAGE_PIXELS) {
    fail(label, `too large: ${width}x${height} px = ${width * height} pixels (the limit is ${MAX_IMAGE_PIXELS} pixels)`);
  }
}

/**
 * Load an image as 8-bit RGB. `label` names the image in error messages; it defaults to the
 * file path for a path, "image buffer" for bytes and "raw image" for raw pixels.
 */
export async function loadImage(input: ImageInput, label?: string): Promise<RgbImage> {
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
    return decodeBytes(bytes, name);
  }
  if (input instanceof Uint8Array) {
    return decodeBytes(input, label === undefined ? "image buffer" : `image ${JSON.stringify(label)}`);
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

async function decodeBytes(bytes: Uint8Array, label: string): Promise<RgbImage> {
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
  if (cmyk) {
    if (info.channels !== 4) fail(label, `decoder returned ${info.channels} channels for a CMYK image`);
    return cmykToRgb(data, info.width, info.height);
  }
  return toRgb(data, info.width, info.height, info.channels);
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

// ---------------------------------------------------------------------------------------------
// BMP (sharp's libvips build has no BMP loader)

/**
 * Decode an uncompressed Windows BMP: 1/4/8-bit palette, 24-bit BGR and 32-bit BGRX/BGRA
 * (BI_RGB, or BI_BITFIELDS with byte-aligned masks). Alpha is dropped, as convert("RGB") does.
 * RLE-compressed and 16-bit files are rejected with a clear error.
 */
function decodeBmp(bytes: Uint8Array, label: string): RgbImage {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const corrupt = (what: string): never => fail(label, `corrupt or truncated BMP image (${what})`);
  if (bytes.length < 26) corrupt("file shorter than its header");
  const pixelOffset = view.getUint32(10, true);
  const headerSize = view.getUint32(14, true);
  let width: number;
  let rawHeight: number;
  let bpp: number;
  let compression = 0;
  let colorsUsed = 0;
  let paletteEntrySize = 4;
  if (headerSize === 12) {
    // OS/2 BITMAPCOREHEADER: 16-bit sizes, 3-byte palette entries.
    width = view.getUint16(18, true);
    rawHeight = view.getInt16(20, true);
    bpp = view.getUint16(24, true);
    paletteEntrySize = 3;
  } else if (headerSize >= 40) {
    if (bytes.length < 14 + 40) corrupt("file shorter than its header");
    width = view.getInt32(18, true);
    rawHeight = view.getInt32(22, true);
    bpp = view.getUint16(28, true);
    compression = view.getUint32(30, true);
    colorsUsed = view.getUint32(46, true);
  } else {
    return fail(label, `unsupported BMP header size ${headerSize}`);
  }
  // A negative height means the rows are stored top-down instead of bottom-up.
  const topDown = rawHeight < 0;
  const height = Math.abs(rawHeight);
  checkDimensions(label, width, height);

  const BI_RGB = 0;
  const BI_BITFIELDS = 3;
  const BI_ALPHABITFIELDS = 6;
  let shifts = [16, 8, 0]; // R, G, B byte positions within a 32-bit little-endian pixel
  if (compression === BI_BITFIELDS || compression === BI_ALPHABITFIELDS) {
    if (bpp !== 32) fail(label, `unsupported BMP: ${bpp}-bit bitfields`);
    // Masks follow a 40-byte header directly, or sit inside a V2+ header at the same offset.
    if (bytes.length < 14 + 40 + 12) corrupt("missing colour masks");
    const masks = [view.getUint32(54, true), view.getUint32(58, true), view.getUint32(62, true)];
    const shiftOf = (m: number): number => {
      for (const s of [0, 8, 16, 24]) if (m >>> 0 === (0xff << s) >>> 0) return s;
      return fail(label, `unsupported BMP colour mask 0x${m.toString(16)}`);
    };
    shifts = masks.map(shiftOf);
  } else if (compression !== BI_RGB) {
    const names: Record<number, string> = { 1: "RLE8", 2: "RLE4", 4: "JPEG", 5: "PNG" };
    fail(label, `unsupported BMP compression ${names[compression] ?? compression} (only uncompressed BMP is supported)`);
  }
  if (bpp !== 1 && bpp !== 4 && bpp !== 8 && bpp !== 24 && bpp !== 32) {
    fail(label, `unsupported BMP: ${bpp} bits per pixel (supported: 1, 4, 8, 24, 32)`);
  }

  // Palette: right after the info header (and after the masks of a 40-byte BITFIELDS header).
  let palette: Uint8Array | null = null;
  if (bpp <= 8) {
    const count = colorsUsed > 0 && colorsUsed <= 1 << bpp ? colorsUsed : 1 << bpp;
    const start = 14 + headerSize;
    palette = new Uint8Array(256 * 3); // indices past the palette read as black
    for (let i = 0; i < count; i++) {
      const p = start + i * paletteEntrySize;
      if (p + 3 > bytes.length || p + 3 > pixelOffset) break;
      palette[i * 3] = bytes[p + 2]!;
      palette[i * 3 + 1] = bytes[p + 1]!;
      palette[i * 3 + 2] = bytes[p]!;
    }
  }

  const stride = Math.floor((width * bpp + 31) / 32) * 4; // rows are padded to 4 bytes
  if (pixelOffset + stride * height > bytes.length) {
    corrupt(`pixel data needs ${stride * height} bytes at offset ${pixelOffset}, file has ${bytes.length}`);
  }
  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    const row = pixelOffset + (topDown ? y : height - 1 - y) * stride;
    let o = y * width * 3;
    if (bpp === 24) {
      for (let x = 0, p = row; x < width; x++, p += 3, o += 3) {
        out[o] = bytes[p + 2]!;
        out[o + 1] = bytes[p + 1]!;
        out[o + 2] = bytes[p]!;
      }
    } else if (bpp === 32) {
      const [rs, gs, bs] = shifts as [number, number, number];
      for (let x = 0, p = row; x < width; x++, p += 4, o += 3) {
        out[o] = bytes[p + rs / 8]!;
        out[o + 1] = bytes[p + gs / 8]!;
        out[o + 2] = bytes[p + bs / 8]!;
      }
    } else {
      const pal = palette!;
      const perByte = 8 / bpp;
      const mask = (1 << bpp) - 1;
      for (let x = 0; x < width; x++, o += 3) {
        const byte = bytes[row + Math.floor(x / perByte)]!;
        // The leftmost pixel sits in the most significant bits.
        const idx = (byte >> (8 - bpp * ((x % perByte) + 1))) & mask;
        out[o] = pal[idx * 3]!;
        out[o + 1] = pal[idx * 3 + 1]!;
        out[o + 2] = pal[idx * 3 + 2]!;
      }
    }
  }
  return { data: out, width, height };
}

// ---------------------------------------------------------------------------------------------
// GIF (first frame only)

/**
 * Decode the first frame of a GIF the way Pillow's GifImagePlugin does before `convert("RGB")`:
 * the canvas is the logical screen (grown if the frame sticks out), filled with the frame's
 * transparent index if it has one and with index 0 otherwise; the frame's pixels are LZW-decoded
 * into its rectangle; indices become colours through the local palette, else the global one,
 * else they are grey levels. Transparency is ignored (convert("RGB") drops it), so transparent
 * pixels show their palette colour. Indices past the end of the palette are black.
 */
function decodeGif(bytes: Uint8Array, label: string): RgbImage {
  const corrupt = (what: string): never => fail(label, `corrupt or truncated GIF image (${what})`);
  const u16 = (p: number): number => bytes[p]! | (bytes[p + 1]! << 8);
  if (bytes.length < 13) corrupt("file shorter than its header");
  let width = u16(6);
  let height = u16(8);
  const screenFlags = bytes[10]!;
  let pos = 13;
  let globalPalette: Uint8Array | null = null;
  if (screenFlags & 0x80) {
    const size = 3 << ((screenFlags & 7) + 1);
    if (pos + size > bytes.length) corrupt("global palette cut short");
    globalPalette = bytes.subarray(pos, pos + size);
    pos += size;
  }

  // Sub-blocks: a length byte, that many bytes, ..., a zero length. Returns the end offset.
  const skipSubBlocks = (p: number): number => {
    for (;;) {
      if (p >= bytes.length) corrupt("data cut short");
      const n = bytes[p]!;
      p += 1 + n;
      if (n === 0) return p;
    }
  };

  let transparency: number | null = null;
  for (;;) {
    if (pos >= bytes.length) corrupt("no image before the end of the file");
    const tag = bytes[pos]!;
    if (tag === 0x3b) return fail(label, "GIF file contains no image");
    if (tag === 0x21) {
      // Extension. A Graphic Control Extension (0xF9) may name a transparent index.
      const kind = bytes[pos + 1];
      if (kind === 0xf9 && pos + 6 < bytes.length && bytes[pos + 2]! >= 4) {
        transparency = bytes[pos + 3]! & 1 ? bytes[pos + 6]! : null;
      }
      pos = skipSubBlocks(pos + 2);
      continue;
    }
    if (tag !== 0x2c) return corrupt(`unexpected block 0x${tag.toString(16)}`);
    break;
  }

  // Image descriptor.
  if (pos + 10 > bytes.length) corrupt("image descriptor cut short");
  const fx = u16(pos + 1);
  const fy = u16(pos + 3);
  const fw = u16(pos + 5);
  const fh = u16(pos + 7);
  const flags = bytes[pos + 9]!;
  pos += 10;
  const interlaced = (flags & 0x40) !== 0;
  let palette = globalPalette;
  if (flags & 0x80) {
    const size = 3 << ((flags & 7) + 1);
    if (pos + size > bytes.length) corrupt("local palette cut short");
    palette = bytes.subarray(pos, pos + size);
    pos += size;
  }
  width = Math.max(width, fx + fw);
  height = Math.max(height, fy + fh);
  checkDimensions(label, width, height);

  if (pos >= bytes.length) corrupt("image data missing");
  const minCodeSize = bytes[pos++]!;
  if (minCodeSize < 1 || minCodeSize > 11) corrupt(`bad LZW code size ${minCodeSize}`);

  const canvas = new Uint8Array(width * height).fill(transparency ?? 0);
  const framePixels = fw * fh;
  if (framePixels > 0) decodeLzw(bytes, pos, minCodeSize, framePixels, corrupt, (i, index) => {
    // i-th decoded pixel → frame row (interlaced GIFs store rows in four passes) and column.
    const col = i % fw;
    let row = (i - col) / fw;
    if (interlaced) row = interlacedRow(row, fh);
    canvas[(fy + row) * width + fx + col] = index;
  });

  const out = new Uint8Array(width * height * 3);
  const entries = palette ? palette.length / 3 : 0;
  for (let i = 0; i < canvas.length; i++) {
    const idx = canvas[i]!;
    if (palette === null) {
      out[i * 3] = out[i * 3 + 1] = out[i * 3 + 2] = idx;
    } else if (idx < entries) {
      out[i * 3] = palette[idx * 3]!;
      out[i * 3 + 1] = palette[idx * 3 + 1]!;
      out[i * 3 + 2] = palette[idx * 3 + 2]!;
    }
  }
  return { data: out, width, height };
}

/** The stored row `n` of an interlaced image of `h` rows is this display row. */
function interlacedRow(n: number, h: number): number {
  // Pass 1: rows 0, 8, 16...; pass 2: 4, 12...; pass 3: 2, 6...; pass 4: 1, 3, 5...
  const pass1 = Math.ceil(h / 8);
  if (n < pass1) return n * 8;
  n -= pass1;
  const pass2 = Math.ceil((h - 4) / 8);
  if (n < pass2) return 4 + n * 8;
  n -= pass2;
  const pass3 = Math.ceil((h - 2) / 4);
  if (n < pass3) return 2 + n * 4;
  n -= pass3;
  return 1 + n * 2;
}

/**
 * GIF's variable-width LZW. Emits up to `count` indices through `put`; stops early at the end
 * code (the rest of the frame keeps the canvas fill). Running out of data first is an error.
 */
function decodeLzw(
  bytes: Uint8Array,
  start: number,
  minCodeSize: number,
  count: number,
  corrupt: (what: string) => never,
  put: (i: number, index: number) => void,
): void {
  const clearCode = 1 << minCodeSize;
  const endCode = clearCode + 1;
  // Each table entry is (prefix code, last byte); `first` caches an entry's first byte.
  const prefix = new Int16Array(4096);
  const suffix = new Uint8Array(4096);
  const first = new Uint8Array(4096);
  const lengths = new Uint16Array(4096);
  for (let c = 0; c < clearCode; c++) {
    suffix[c] = c;
    first[c] = c;
    lengths[c] = 1;
    prefix[c] = -1;
  }
  const stack = new Uint8Array(4096);
  let codeSize = minCodeSize + 1;
  let next = endCode + 1;
  let prev = -1;
  let written = 0;

  // Bit reader over the chain of sub-blocks.
  let p = start;
  let blockLeft = 0;
  let bitBuf = 0;
  let bitCount = 0;
  const readCode = (): number => {
    while (bitCount < codeSize) {
      if (blockLeft === 0) {
        if (p >= bytes.length) corrupt("image data cut short");
        blockLeft = bytes[p++]!;
        if (blockLeft === 0) return -1; // the data ended (block terminator) before the end code
      }
      if (p >= bytes.length) corrupt("image data cut short");
      bitBuf |= bytes[p++]! << bitCount;
      bitCount += 8;
      blockLeft--;
    }
    const code = bitBuf & ((1 << codeSize) - 1);
    bitBuf >>>= codeSize;
    bitCount -= codeSize;
    return code;
  };

  while (written < count) {
    const code = readCode();
    if (code < 0) corrupt("image data ended early");
    if (code === clearCode) {
      codeSize = minCodeSize + 1;
      next = endCode + 1;
      prev = -1;
      continue;
    }
    if (code === endCode) return;
    let entry: number;
    if (prev < 0) {
      if (code >= clearCode) corrupt("bad LZW code");
      entry = code;
    } else if (code < next) {
      entry = code;
      if (next < 4096) {
        prefix[next] = prev;
        suffix[next] = first[code]!;
        first[next] = first[prev]!;
        lengths[next] = lengths[prev]! + 1;
        next++;
      }
    } else if (code === next && next < 4096) {
      // The KwKwK case: the new entry is prev + first byte of prev.
      prefix[next] = prev;
      suffix[next] = first[prev]!;
      first[next] = first[prev]!;
      lengths[next] = lengths[prev]! + 1;
      entry = next;
      next++;
    } else {
      return corrupt("bad LZW code");
    }
    // Unwind the entry (stored back to front) and emit it.
    let n = 0;
    for (let c = entry; c >= 0; c = prefix[c]!) stack[n++] = suffix[c]!;
    while (n > 0 && written < count) put(written++, stack[--n]!);
    prev = entry;
    if (next === 1 << codeSize && codeSize < 12) codeSize++;
  }
}
