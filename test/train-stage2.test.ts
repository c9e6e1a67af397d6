/**
 * Stage 2 against PyTorch (test/fixtures/train/stage2-*, see its README): OPT and T5, with and
 * without a prompt: the loss within 1e-5 relative, every trained tensor's gradient within 1e-4 of
 * the reference relative to that tensor's largest value.
 */
import * as ort from "onnxruntime-node";
import { describe, expect, it } from "vitest";
import { readTensorF32 } from "../src/io/safetensors.js";
import { CompiledGraph } from "../src/runtime/session.js";
import { stage2Feeds, stage2Graph } from "../src/train/stage2.js";
import { expectClose, stage2Reference } from "./trainFixtures.js";

describe("stage 2 (language modelling through the frozen LM) against PyTorch", () => {
  for (const name of ["stage2-opt-caption", "stage2-opt-prompted", "stage2-t5-caption", "stage2-t5-prompted"]) {
    it(name, async () => {
      const { f, ckpt, features, batch } = await stage2Reference(name);
      const { shape, feeds } = stage2Feeds(ckpt.config, batch);
      const graph = stage2Graph(ckpt, shape);
      const s = await CompiledGraph.create(graph, { worker: false });
      for (const [n, v] of graph.trained) feeds[n] = new ort.Tensor("float32", readTensorF32(ckpt.tensor(n)), v.shape as number[]);
      const out = await s.run({ ...feeds, image_features: features });
      const expected = f.get("loss").data[0]!;
      expect(Math.abs(Number(out.loss!.data[0]) - expected) / expected).toBeLessThanOrEqual(1e-5);
      const trainable = f.json.trainable as string[];
      expect([...graph.trained.keys()].sort()).toEqual([...trainable].sort());
      for (const n of trainable) expectClose(`grad.${n}`, out[`grad.${n}`]!.data as Float32Array, f.get(`grad.${n}`).data, 1e-4);
      await s.release();
    });
  }
});
