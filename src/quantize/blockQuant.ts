/**
 * 4-bit block-wise weight quantization in the layout of ONNX Runtime's MatMulNBits: a [N, K] weight
 * (PyTorch's [out, in]) becomes, per row and per block of `blockSize` values along K, unsigned codes
 * q with value = (q - zero_point) * scale. Codes are packed two per byte, low bits first; zero
 * points are packed the same way along the blocks of a row.
 *
 * The range of each block is its min and max widened to include 0 (so zero is exact), mapped onto
 * [0, 15].
 */
import { Blip2Error } from "../errors.js";

export interface QuantizedMatrix {
  blockSize: number;
  n: number;
  k: number;
  /** [N, kBlocks, blockSize / 2] */
  weight: Uint8Array;
  /** [N * kBlocks] */
  scales: Float32Array;
  /** [N * ceil(kBlocks / 2)] */
  zeroPoints: Uint8Array;
}

const MAX_CODE = 15;

export const zeroPointBytesPerRow = (kBlocks: number) => Math.ceil(kBlocks / 2);

export function quantizeMatrix(w: Float32Array, n: number, k: number, blockSize: number): QuantizedMatrix {
  if (k % blockSize !== 0) throw new Blip2Error(`cannot quantize a matrix with ${k} columns in blocks of ${blockSize}`);
  const kBlocks = k / blockSize;
  const blob = blockSize / 2;
  const zpRow = zeroPointBytesPerRow(kBlocks);
  const out: QuantizedMatrix = {
    blockSize, n, k,
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
      const scale = hi > lo ? (hi - lo) / MAX_CODE : 1;
      const zero = Math.min(MAX_CODE, Math.max(0, Math.round(-lo / scale)));
      out.scales[row * kBlocks + b] = scale;
      out.zeroPoints[row * zpRow + (b >> 1)]! |= zero << ((b & 1) * 4);
      const at = (row * kBlocks + b) * blob;
      const inv = 1 / scale;
      for (let i = 0; i < blockSize; i++) {
        const q = Math.min(MAX_CODE, Math.max(0, Math.round(w[start + i]! * inv + zero)));
        out.weight[at + (i >> 1)]! |= q << ((i & 1) * 4);
      }
    }
  }
  return out;
}

/** The float matrix a quantized one stands for (what MatMulNBits multiplies by). */
export function dequantizeMatrix(q: QuantizedMatrix): Float32Array {
  const { n, k, blockSize } = q;
  const kBlocks = k / blockSize;
  const blob = blockSize / 2;
  const zpRow = zeroPointBytesPerRow(kBlocks);
  const out = new Float32Array(n * k);
  for (let row = 0; row < n; row++) {
    for (let b = 0; b < kBlocks; b++) {
      const scale = q.scales[row * kBlocks + b]!;
      const zero = (q.zeroPoints[row * zpRow + (b >> 1)]! >> ((b & 1) * 4)) & 15;
      const at = (row * kBlocks + b) * blob;
      for (let i = 0; i < blockSize; i++) {
        const code = (q.weight[at + (i >> 1)]! >> ((i & 1) * 4)) & 15;
        out[row * k + b * blockSize + i] = (code - zero) * scale;
      }
    }
  }
  return out;
}
