/**
 * Stage 1 against PyTorch (test/fixtures/train/stage1.*, see its README): every loss term within
 * 1e-5 relative, every trained tensor's gradient within 1e-4 of the reference relative to that
 * tensor's largest value.
 */
import path from "node:path";
import * as ort from "onnxruntime-node";
import { describe, expect, it } from "vitest";
import { Checkpoint } from "../src/io/checkpoint.js";
import { readTensorF32 } from "../src/io/safetensors.js";
import { CompiledGraph } from "../src/runtime/session.js";
import { shiftedTargets } from "../src/train/losses.js";
import { multimodalCausalBias, stage1Graph } from "../src/train/stage1.js";
import { dir, expectClose, fixture } from "./trainFixtures.js";

const ints = (rows: number[][]) => new ort.Tensor("int64", BigInt64Array.from(rows.flat().map(BigInt)), [rows.length, rows[0]!.length]);

describe("stage 1 (ITC + ITM + ITG) against PyTorch", () => {
  it("gives the loss terms and every trained tensor's gradient", async () => {
    const f = fixture("stage1");
    const ckpt = Checkpoint.open(path.join(dir, "stage1-itm"));
    const ids = f.json.input_ids as number[][];
    const mask = f.json.attention_mask as number[][];
    const labels = f.json.itg_labels as number[][];
    const negatives = f.json.negatives as { image_for_text: number[]; text_for_image: number[] };
    const [batch, length] = [ids.length, ids[0]!.length];
    const graph = stage1Graph(ckpt, { batch, length }, { logits: true, negatives: "given" });
    const s = await CompiledGraph.create(graph, { worker: false });
    const features = f.get("vision_hidden_before_layernorm");
    const itg = shiftedTargets(labels);
    const q = ckpt.config.numQueryTokens;
    const feeds: Record<string, ort.Tensor> = {
      image_features: new ort.Tensor("float32", features.data, features.shape),
      input_ids: ints(ids),
      attention_mask: ints(mask),
      decoder_input_ids: ints(f.json.decoder_input_ids as number[][]),
      itg_bias: new ort.Tensor("float32", multimodalCausalBias(mask, q), [batch, 1, q + length, q + length]),
      itg_targets: new ort.Tensor("int64", itg.targets, itg.shape),
      itg_weights: new ort.Tensor("float32", itg.weights, itg.shape),
      image_for_text: new ort.Tensor("int64", BigInt64Array.from(negatives.image_for_text.map(BigInt)), [batch]),
      text_for_image: new ort.Tensor("int64", BigInt64Array.from(negatives.text_for_image.map(BigInt)), [batch]),
    };
    for (const [name, v] of graph.trained) feeds[name] = new ort.Tensor("float32", readTensorF32(ckpt.tensor(name)), v.shape as number[]);
    const out = await s.run(feeds);
    for (const term of ["loss", "loss_itc", "loss_itm", "loss_itg"]) {
      const expected = f.get(term).data[0]!;
      expect(Math.abs(Number(out[term]!.data[0]) - expected) / Math.abs(expected), term).toBeLessThanOrEqual(1e-5);
    }
    for (const name of ["sim_i2t", "sim_t2i", "itm_logits", "itg_logits"]) expectClose(name, out[name]!.data as Float32Array, f.get(name).data, 1e-5);
    const trainable = f.json.trainable as string[];
    expect([...graph.trained.keys()].sort()).toEqual([...trainable].sort());
    for (const name of trainable) expectClose(`grad.${name}`, out[`grad.${name}`]!.data as Float32Array, f.get(`grad.${name}`).data, 1e-4);
    await s.release();
  });
});
