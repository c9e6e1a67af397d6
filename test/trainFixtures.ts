/** The training references in test/fixtures/train (see its README). */
import fs from "node:fs";
import path from "node:path";
import { expect } from "vitest";
import * as ort from "onnxruntime-node";
import { Checkpoint } from "../src/io/checkpoint.js";
import { readSafetensorsHeader, readTensorF32 } from "../src/io/safetensors.js";
import { CompiledGraph } from "../src/runtime/session.js";
import { imageFeaturesGraph, type Stage2Batch } from "../src/train/stage2.js";

export const dir = path.join(import.meta.dirname, "fixtures/train");

export function fixture(name: string) {
  const json = JSON.parse(fs.readFileSync(path.join(dir, `${name}.json`), "utf8")) as Record<string, unknown>;
  const tensors = readSafetensorsHeader(path.join(dir, `${name}.safetensors`)).tensors;
  const get = (key: string) => {
    const info = tensors.get(key);
    if (!info) throw new Error(`fixture ${name} has no ${key}`);
    return { data: readTensorF32(info), shape: [...info.shape] };
  };
  return { json, tensors, get };
}

/**
 * |a - b| <= tol * max|b| over the whole tensor. The scale has a floor of 1e-3: attention key biases
 * have a gradient of exactly zero (a softmax does not change when every score of a row moves
 * together), so their references are float32 rounding noise (~1e-8) and are compared absolutely.
 */
export function expectClose(name: string, actual: Float32Array, expected: Float32Array, tol: number): void {
  expect(actual.length, name).toBe(expected.length);
  const scale = Math.max(...Array.from(expected, Math.abs), 1e-3);
  let worst = 0;
  for (let i = 0; i < expected.length; i++) worst = Math.max(worst, Math.abs(actual[i]! - expected[i]!) / scale);
  expect(worst, `${name}: worst error relative to its largest value`).toBeLessThanOrEqual(tol);
}


/**
 * A stage-2 reference: its checkpoint (`checkpoint_path`, relative to test/fixtures), the frozen
 * image encoder's features of its pixel values, and its batch as token ids.
 */
export async function stage2Reference(name: string) {
  const f = fixture(name);
  const ckpt = Checkpoint.open(path.join(dir, "..", f.json.checkpoint_path as string));
  const pixels = f.get("pixel_values");
  const vision = await CompiledGraph.create(imageFeaturesGraph(ckpt), { worker: false });
  const features = (await vision.run({ pixel_values: new ort.Tensor("float32", pixels.data, pixels.shape) })).image_features!;
  await vision.release();
  const batch: Stage2Batch = {
    inputIds: f.json.input_ids as number[][],
    attentionMask: f.json.attention_mask as number[][],
    labels: f.json.labels as number[][],
    decoderAttentionMask: f.json.decoder_attention_mask as number[][] | undefined,
  };
  return { f, ckpt, features, batch };
}
