/** BMP decoding (sharp's libvips build has no BMP loader). */
import type { RgbImage } from "./decode.js";
import { checkDimensions, fail } from "./limits.js";

/**
 * Decode an uncompressed Windows BMP: 1/4/8-bit palette, 24-bit BGR and 32-bit BGRX/BGRA
 * (BI_RGB, or BI_BITFIELDS with byte-aligned masks). Alpha is dropped, as convert("RGB") does.
 * RLE-compressed and 16-bit files are rejected with a clear error.
 */
export function decodeBmp(bytes: Uint8Array, label: string): RgbImage {
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
