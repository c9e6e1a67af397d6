/**
 * The benchmarks' synthetic checkpoints (scripts/synthetic-checkpoint.ts), written with zero
 * weights as sparse files: only their names, shapes and configs are checked here.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { syntheticCheckpoint } from "../scripts/synthetic-checkpoint.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { stage1Extras } from "../src/train/extras.js";
import { Rng } from "../src/train/rng.js";
import { stage1Graph, stage1Trained } from "../src/train/stage1.js";

const root = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-synthetic-"));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

describe("the itm-vit-g synthetic checkpoint (stage 1's benchmark)", () => {
  const dir = syntheticCheckpoint("itm-vit-g", root, { zeros: true });
  const ckpt = Checkpoint.open(dir);

  it("has Salesforce/blip2-itm-vit-g's text side and heads at the released shapes", () => {
    expect(ckpt.config.architectures).toEqual(["Blip2ForImageTextRetrieval"]);
    const shape = (name: string) => [...ckpt.tensor(name).shape];
    expect(shape("embeddings.word_embeddings.weight")).toEqual([30523, 768]);
    expect(shape("embeddings.position_embeddings.weight")).toEqual([512, 768]);
    expect(shape("vision_projection.weight")).toEqual([256, 768]);
    expect(shape("text_projection.weight")).toEqual([256, 768]);
    expect(shape("itm_head.weight")).toEqual([2, 768]);
    expect(shape("cls.predictions.transform.dense.weight")).toEqual([768, 768]);
    expect(shape("cls.predictions.bias")).toEqual([30523]);
    expect(shape("temp")).toEqual([]);
    expect(shape("query_tokens")).toEqual([1, 32, 768]);
    expect(shape("qformer.encoder.layer.11.intermediate.dense.weight")).toEqual([3072, 768]);
    expect(shape("qformer.encoder.layer.11.output.dense.weight")).toEqual([768, 3072]);
    expect(shape("qformer.encoder.layer.10.crossattention.attention.key.weight")).toEqual([768, 1408]);
    expect(ckpt.has("qformer.encoder.layer.11.crossattention.attention.key.weight")).toBe(false);
    // The Q-Former with its text side and heads: the 186.7M trained parameters.
    const qformer = ckpt.names().filter((n) => !n.startsWith("vision_model.")).reduce((s, n) => s + ckpt.tensor(n).shape.reduce((a, b) => a * b, 1), 0);
    expect(Math.round(qformer / 1e5) / 10).toBe(186.7);
  });

  it("holds exactly what the stage-1 graph reads, all of it trained, and needs no stage-1 extras", async () => {
    expect(ckpt.names().every(stage1Trained)).toBe(true);
    const graph = stage1Graph(ckpt, { batch: 2, length: 4 });
    expect([...graph.trained.keys()].sort()).toEqual([...ckpt.names()].sort());
    expect(graph.initializers.filter((i) => i.kind === "external")).toEqual([]);
    const extras = await stage1Extras(ckpt, new Rng(0));
    expect(extras.notice).toBeNull();
    expect(extras.tensors.size).toBe(0);
    expect(extras.decTokenId).toBe(30522);
  });

  it("takes no room on disk with zero weights (a sparse file of the full length)", () => {
    const file = path.join(dir, "model-00001-of-00001.safetensors");
    const { size, blocks } = fs.statSync(file);
    const length = Buffer.alloc(8);
    const fd = fs.openSync(file, "r");
    fs.readSync(fd, length, 0, 8, 0);
    fs.closeSync(fd);
    const header = Number(length.readBigUInt64LE(0));
    expect(size).toBe(8 + header + 186_705_470 * 4);
    expect(blocks * 512).toBeLessThan(1 << 20);
  });
});
