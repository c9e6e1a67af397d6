/**
 * Block-wise weight quantization in the layout of ONNX Runtime's MatMulNBits: a [N, K] weight
 * (PyTorch's [out, in]) becomes, per row and per block of `blockSize` values along K, unsigned
 * codes q with value = (q - zero_point) * scale. Codes are packed low bits first (two per byte at
 * 4 bits); 4-bit zero points are packed two per byte along the blocks of a row.
 *
 * The range of each block is its min and max widened to include 0 (so zero is exact), mapped onto
 * [0, 2^bits - 1].
 */
import { Blip2Error } from "../errors.js";

export interface QuantizedMatrix {
  bits: 4 | 8;
  blockSize: number;
  n: number;
  k: number;
  /** [N, kBlocks, blockSize * bits / 8] */
  weight: Uint8Array;
  /** [N * kBlocks] */
  scales: Float32Array;
  /** [N * ceil(kBlocks * bits / 8)] */
  zeroPoints: Uint8Array;
}

export const zeroPointBytesPerRow = (kBlocks: number, bits: 4 | 8) => (bits === 4 ? Math.ceil(kBlocks / 2) : kBlocks);

export function quantizeMatrix(w: Float32Array, n: number, k: number, bits: 4 | 8, blockSize: number): QuantizedMatrix {
  if (k % blockSize !== 0) throw new Blip2Error(`cannot quantize a matrix with ${k} columns in blocks of ${blockSize}`);
  const kBlocks = k / blockSize;
  const blob = (blockSize * bits) / 8;
  const maxCode = (1 << bits) - 1;
  const zpRow = zeroPointBytesPerRow(kBlocks, bits);
  const out: QuantizedMatrix = {
    bits, blockSize, n, k,
    weight: new Uint8Array(n * kBlocks * blob),
    scales: new Float32Array(n * kBlocks),
    zeroPoints: new Uint8Array(n * zpRow),
  };
  for (let row = 0; row < n; row++) {
    for (let b = 0; b < kBlocks; b++) {
      const start = row * k + b * blockSize;
      let lo = 0;
      let hi = 0;
      for (let i = 0; i < blockSize; i++) {
        const v = w[start + i]!;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      const scale = hi > lo ? (hi - lo) / maxCode : 1;
      const zero = Math.min(maxCode, Math.max(0, Math.round(-lo / scale)));
      out.scales[row * kBlocks + b] = scale;
      if (bits === 4) out.zeroPoints[row * zpRow + (b >> 1)]! |= zero << ((b & 1) * 4);
      else out.zeroPoints[row * zpRow + b] = zero;
      const at = (row * kBlocks + b) * blob;
      const inv = 1 / scale;
      for (let i = 0; i < blockSize; i++) {
        const q = Math.min(maxCode, Math.max(0, Math.round(w[start + i]! * inv + zero)));
        if (bits === 4) out.weight[at + (i >> 1)]! |= q << ((i & 1) * 4);
        else out.weight[at + i] = q;
      }
    }
  }
  return out;
}

/** The float matrix a quantized one stands for (what MatMulNBits multiplies by). */
export function dequantizeMatrix(q: QuantizedMatrix): Float32Array {
  const { n, k, bits, blockSize } = q;
  const kBlocks = k / blockSize;
  const blob = (blockSize * bits) / 8;
  const zpRow = zeroPointBytesPerRow(kBlocks, bits);
  const out = new Float32Array(n * k);
  for (let row = 0; row < n; row++) {
    for (let b = 0; b < kBlocks; b++) {
      const scale = q.scales[row * kBlocks + b]!;
      const zero = bits === 4 ? (q.zeroPoints[row * zpRow + (b >> 1)]! >> ((b & 1) * 4)) & 15 : q.zeroPoints[row * zpRow + b]!;
      const at = (row * kBlocks + b) * blob;
      for (let i = 0; i < blockSize; i++) {
        const code = bits === 4 ? (q.weight[at + (i >> 1)]! >> ((i & 1) * 4)) & 15 : q.weight[at + i]!;
        out[row * k + b * blockSize + i] = (code - zero) * scale;
      }
    }
  }
  return out;
}
