/**
 * 8-bit weights for ONNX Runtime's integer matrix products (MatMulIntegerToFloat, see
 * models/layers.ts linearInt8): a [N, K] weight (PyTorch's [out, in]) becomes signed codes with one
 * scale per output channel, value = code * scale, where the scale maps the row's largest magnitude
 * onto 127. Symmetric codes keep zero exact and need no zero-point term in the integer product. The
 * codes are stored transposed, [K, N], the layout the kernel takes.
 */

export interface ChannelQuantized {
  n: number;
  k: number;
  /** [K, N] */
  weight: Int8Array;
  /** [N] */
  scales: Float32Array;
}

export function quantizeChannels(w: Float32Array, n: number, k: number): ChannelQuantized {
  const out: ChannelQuantized = { n, k, weight: new Int8Array(k * n), scales: new Float32Array(n) };
  for (let row = 0; row < n; row++) {
    let peak = 0;
    for (let i = 0; i < k; i++) peak = Math.max(peak, Math.abs(w[row * k + i]!));
    const scale = peak > 0 ? peak / 127 : 1;
    out.scales[row] = scale;
    const inv = 1 / scale;
    for (let i = 0; i < k; i++) out.weight[i * n + row] = Math.max(-127, Math.min(127, Math.round(w[row * k + i]! * inv)));
  }
  return out;
}

/** The [N, K] float matrix the codes stand for. */
export function dequantizeChannels(q: ChannelQuantized): Float32Array {
  const { n, k } = q;
  const out = new Float32Array(n * k);
  for (let row = 0; row < n; row++) {
    for (let i = 0; i < k; i++) out[row * k + i] = q.weight[i * n + row]! * q.scales[row]!;
  }
  return out;
}
