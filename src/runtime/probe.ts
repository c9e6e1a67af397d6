/**
 * A check that a packed copy computes what packing in memory computes. ONNX Runtime maps a saved
 * copy's packed weights as they are, without checking them; one Flan-T5-XL q8 copy once gave logits
 * with a cosine of 0.2 to float32, silently, where packing again gave 0.9985. So the session that
 * saves a copy also runs a probe (one small run from made-up inputs), whose outputs are sampled into
 * the copy's record, and every session opened from the copy runs the probe again and is compared.
 */
import * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import type { Dim, Graph } from "../ir/graph.js";

/** Values kept of each output: evenly spaced, enough to see any damage to the weights feeding it. */
const SAMPLES = 64;

/**
 * How far the samples may move, relative to their norm: the same packed weights give the same
 * numbers up to the order of float sums (threads), while damaged ones gave a relative error of 1.3.
 */
const TOLERANCE = 0.02;

/**
 * Each output's element count and its sampled values; those not finite as strings ("NaN",
 * "Infinity"), which JSON would write as null.
 */
export type ProbeRecord = Record<string, { size: number; sample: (number | string)[] }>;

/**
 * One position each: one row, one new position, one cache slot. The attention mask covers the
 * cache's slots and the new positions (`total` = `capacity` + `length`).
 */
const SIZES: Record<string, number> = { total: 2 };
const size = (d: Dim) => (typeof d === "number" ? d : (SIZES[d] ?? 1));

/**
 * The probe's inputs for a graph: masks of ones, other integers (token ids, positions, buckets)
 * zero, floats a fixed pattern of both signs.
 */
export function probeFeeds(graph: Graph): Record<string, ort.Tensor> {
  const feeds: Record<string, ort.Tensor> = {};
  for (const input of graph.inputs) {
    const dims = input.shape.map(size);
    const count = dims.reduce((a, b) => a * b, 1);
    if (input.dtype === "int64") feeds[input.name] = new ort.Tensor("int64", new BigInt64Array(count).fill(input.name.includes("mask") ? 1n : 0n), dims);
    else if (input.dtype === "float32") feeds[input.name] = new ort.Tensor("float32", Float32Array.from({ length: count }, (_, i) => Math.sin(i + 1)), dims);
    else throw new Blip2Error(`internal: no probe value for input ${input.name} of ${input.dtype}`);
  }
  return feeds;
}

/** The probe's float outputs as kept in a record. */
export function sampleOutputs(outputs: Record<string, ort.Tensor>): ProbeRecord {
  const record: ProbeRecord = {};
  for (const [name, t] of Object.entries(outputs)) {
    if (t.type !== "float32") continue;
    const data = t.data as Float32Array;
    const step = Math.max(1, Math.floor(data.length / SAMPLES));
    const sample: (number | string)[] = [];
    for (let i = 0; i < data.length && sample.length < SAMPLES; i += step) sample.push(Number.isFinite(data[i]) ? data[i]! : String(data[i]));
    record[name] = { size: data.length, sample };
  }
  return record;
}

/**
 * Where `got` departs from `expected`, in words; null where they agree. Values that are not finite
 * must be the same in both (a model whose probe overflows is still checked on its finite values).
 */
export function probeDifference(expected: ProbeRecord, got: ProbeRecord): string | null {
  for (const [name, e] of Object.entries(expected)) {
    const g = got[name];
    if (!g || g.size !== e.size || g.sample.length !== e.sample.length) return `${name}: ${g ? `${g.size} values` : "missing"}, expected ${e.size}`;
    let diff = 0;
    let norm = 0;
    for (let i = 0; i < e.sample.length; i++) {
      const want = Number(e.sample[i]);
      const have = Number(g.sample[i]);
      if (!Number.isFinite(want) || !Number.isFinite(have)) {
        if (!Object.is(want, have)) return `${name}: ${have} where the saving session gave ${want}`;
        continue;
      }
      diff += (have - want) ** 2;
      norm += want * want;
    }
    if (Math.sqrt(diff) > TOLERANCE * Math.sqrt(norm) + 1e-6) return `${name}: relative error ${(Math.sqrt(diff) / Math.sqrt(norm)).toPrecision(3)}`;
  }
  return null;
}
