/**
 * OPT's attention over a key/value cache (ONNX Runtime's fused MultiHeadAttention) against the
 * same attention in standard ops: softmax(q k^T * scale + bias) v over the cache and the new
 * positions.
 */
import * as ort from "onnxruntime-node";
import { describe, expect, it } from "vitest";
import { Graph, type Value } from "../src/ir/graph.js";
import * as op from "../src/ir/ops.js";
import { attend, attendWithCacheFused, mergeHeads, splitHeads } from "../src/models/layers.js";
import { CompiledGraph } from "../src/runtime/session.js";

const B = 2, H = 3, Dh = 4, L = 5;
const D = H * Dh;

function random(n: number, seed: number): Float32Array {
  let s = seed;
  return Float32Array.from({ length: n }, () => ((s = (s * 16807) % 2147483647) / 2147483647) * 2 - 1);
}

async function bothWays(S: number, biasHeads: number, scale: number) {
  const g = new Graph("attention");
  const [q, k, v] = ["q", "k", "v"].map((n) => g.input(n, "float32", [B, S, D])) as [Value, Value, Value];
  const cache = { key: g.input("past_key", "float32", [B, H, L, Dh]), value: g.input("past_value", "float32", [B, H, L, Dh]) };
  const bias = g.input("bias", "float32", [B, biasHeads, S, L + S]);
  g.output(attendWithCacheFused(q, cache, { key: splitHeads(k, H), value: splitHeads(v, H) }, H, scale, bias), "fused");
  const keys = op.concat([cache.key, splitHeads(k, H)], 2);
  const values = op.concat([cache.value, splitHeads(v, H)], 2);
  g.output(mergeHeads(attend(splitHeads(q, H), keys, values, scale, bias)), "standard");
  const session = await CompiledGraph.create(g, { threads: 1, worker: false });
  // Empty slots and some keys are masked, as the decoders' biases do.
  const biasData = random(B * biasHeads * S * (L + S), 7).map((x, i) => (i % (L + S) === 1 || i % 4 === 0 ? -3.4028234663852886e38 : x));
  const feeds = {
    q: new ort.Tensor("float32", random(B * S * D, 1), [B, S, D]),
    k: new ort.Tensor("float32", random(B * S * D, 2), [B, S, D]),
    v: new ort.Tensor("float32", random(B * S * D, 3), [B, S, D]),
    past_key: new ort.Tensor("float32", random(B * H * L * Dh, 4), [B, H, L, Dh]),
    past_value: new ort.Tensor("float32", random(B * H * L * Dh, 5), [B, H, L, Dh]),
    bias: new ort.Tensor("float32", biasData, [B, biasHeads, S, L + S]),
  };
  const out = await session.run(feeds);
  await session.release();
  return { fused: out.fused!.data as Float32Array, standard: out.standard!.data as Float32Array };
}

describe("attention over a key/value cache", () => {
  for (const [S, biasHeads, scale] of [[1, 1, 0.5], [3, 1, 0.5], [1, H, 1], [3, H, 1]] as const) {
    it(`${S} new position(s), a bias for ${biasHeads === 1 ? "all heads" : "each head"}, scale ${scale}`, async () => {
      const { fused, standard } = await bothWays(S, biasHeads, scale);
      expect(fused.length).toBe(B * S * D);
      fused.forEach((x, i) => expect(x).toBeCloseTo(standard[i]!, 5));
    });
  }
});
