/** GIF decoding, first frame only, as Pillow does it. */
import type { RgbImage } from "./decode.js";
import { checkDimensions, fail } from "./limits.js";

/**
 * Decode the first frame of a GIF the way Pillow's GifImagePlugin does before `convert("RGB")`:
 * the canvas is the logical screen (grown if the frame sticks out), filled with the frame's
 * transparent index if it has one and with index 0 otherwise; the frame's pixels are LZW-decoded
 * into its rectangle; indices become colours through the local palette, else the global one,
 * else they are grey levels. Transparency is ignored (convert("RGB") drops it), so transparent
 * pixels show their palette colour. Indices past the end of the palette are black.
 */
export function decodeGif(bytes: Uint8Array, label: string): RgbImage {
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
