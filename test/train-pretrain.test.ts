/**
 * The unimodal pretrainings of the synthetic world's BLIP-2: fresh checkpoints in Hugging Face
 * layouts, the world's tokenizers, a short vision run and a short text run whose losses fall and
 * whose folders blip2 opens (the retrieval copy as a checkpoint, the OPT folder through compose).
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Checkpoint } from "../src/io/checkpoint.js";
import { readSafetensorsHeader, readTensorF32 } from "../src/io/safetensors.js";
import { Blip2Tokenizer } from "../src/tokenizer/tokenizer.js";
import { composeStage2 } from "../src/train/compose.js";
import { writeFreshModels } from "../src/train/fresh.js";
import { encodeSequence, pretrainText, textOfScene } from "../src/train/language.js";
import { Rng } from "../src/train/rng.js";
import { placeLabels, pretrainVision } from "../src/train/vision.js";
import { learnMerges } from "../src/train/worldTokenizers.js";
import { generateScene, sceneSeed } from "../src/world/scene.js";
import { COLOURS, COUNT_WORDS, POSITIONS, SHAPES, SIZES } from "../src/world/vocabulary.js";

let dir: string;
const at = (name: string) => path.join(dir, name);
const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

// Small enough for tens of steps in seconds on two cores.
const vision = { hiddenSize: 32, numHiddenLayers: 2, numAttentionHeads: 2, intermediateSize: 64, imageSize: 32, patchSize: 8 };
const qformer = { hiddenSize: 32, numHiddenLayers: 2, numAttentionHeads: 2, intermediateSize: 64, crossAttentionFrequency: 2, numQueryTokens: 4, imageTextHiddenSize: 16, maxPositionEmbeddings: 40 };
const opt = { hiddenSize: 32, numHiddenLayers: 2, numAttentionHeads: 2, ffnDim: 64, maxPositionEmbeddings: 64 };

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-pretrain-"));
  writeFreshModels({ retrieval: at("fresh"), languageModel: at("opt"), seed: 3, vision, qformer, opt });
}, 60_000);
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe("fresh checkpoints", () => {
  it("a Blip2ForImageTextRetrieval checkpoint with every tensor its config implies, initialised as transformers", () => {
    const ckpt = Checkpoint.open(at("fresh"));
    expect(ckpt.config.architectures).toEqual(["Blip2ForImageTextRetrieval"]);
    expect(ckpt.config.qformer.useQformerTextInput).toBe(true);
    expect(ckpt.config.vision).toMatchObject({ hiddenSize: 32, imageSize: 32, patchSize: 8 });
    expect(ckpt.tensor("vision_model.embeddings.position_embedding").shape).toEqual([1, 17, 32]);
    expect(ckpt.tensor("vision_model.encoder.layers.1.self_attn.qkv.weight").shape).toEqual([96, 32]);
    // Cross-attention every second layer: layer 0 has it, layer 1 not.
    expect(ckpt.has("qformer.encoder.layer.0.crossattention.attention.key.weight")).toBe(true);
    expect(ckpt.has("qformer.encoder.layer.1.crossattention.attention.key.weight")).toBe(false);
    const ln = readTensorF32(ckpt.tensor("qformer.layernorm.weight"));
    expect(Array.from(ln).every((x) => x === 1)).toBe(true);
    const w = readTensorF32(ckpt.tensor("qformer.encoder.layer.0.attention.attention.query.weight"));
    const std = Math.sqrt(mean(Array.from(w, (x) => x * x)));
    expect(std).toBeGreaterThan(0.017);
    expect(std).toBeLessThan(0.023);
    // Query tokens differ from each other (transformers would zero them).
    const queries = readTensorF32(ckpt.tensor("query_tokens"));
    expect(queries[0]).not.toBe(queries[32]);
  });

  it("an OPTForCausalLM folder whose padding row is zero and whose head is tied", () => {
    const config = JSON.parse(fs.readFileSync(at("opt/config.json"), "utf8"));
    expect(config).toMatchObject({ architectures: ["OPTForCausalLM"], model_type: "opt", hidden_size: 32, tie_word_embeddings: true, pad_token_id: 1 });
    const tensors = readSafetensorsHeader(at("opt/model.safetensors")).tensors;
    expect(tensors.has("lm_head.weight")).toBe(false);
    expect(tensors.get("model.decoder.embed_positions.weight")!.shape).toEqual([66, 32]);
    const embed = readTensorF32(tensors.get("model.decoder.embed_tokens.weight")!);
    expect(embed.subarray(32, 64).every((x) => x === 0)).toBe(true);
    expect(tensors.get("model.decoder.embed_tokens.weight")!.shape[0]).toBe(config.vocab_size);
  });
});

describe("the world's tokenizers", () => {
  it("the OPT BPE gives every word of the world one token, and still encodes any text", async () => {
    const t = await Blip2Tokenizer.fromDirectory(at("opt"));
    for (const word of [...SHAPES, ...COLOURS, ...SIZES, ...POSITIONS, ...COUNT_WORDS, "yes", "no"]) {
      expect(t.encode(` ${word}`, { addSpecialTokens: false })).toHaveLength(1);
    }
    const text = "Question: what colour is the circle? Answer: blue\n";
    expect(t.decode(t.encode(text), { skipSpecialTokens: true })).toBe(text);
    expect(t.decode(t.encode("zebra 😀"), { skipSpecialTokens: true })).toBe("zebra 😀");
  });

  it("the Q-Former's WordPiece knows the world's words and has [DEC] as bos_token", async () => {
    const t = await Blip2Tokenizer.fromDirectory(at("fresh"));
    expect(t.tokenize("a small red circle on the left")).toEqual(["[CLS]", "a", "small", "red", "circle", "on", "the", "left", "[SEP]"]);
    expect(t.specialTokenMap.bos_token).toBe("[DEC]");
    expect(t.tokenToId("[DEC]")).toBe(t.vocabSize - 1);
  });

  it("BPE merges the most frequent pair first until none repeats", () => {
    // "aaab", " aaab", " ab": (a, a) occurs 4 times, then (a, b) 3, then (aa, ab) 2; the rest once.
    expect(learnMerges(["aaab aaab ab"])).toEqual([["a", "a"], ["a", "b"], ["aa", "ab"]]);
  });
});

describe("vision pretraining", () => {
  it("labels each place with the object there, or none", () => {
    const scene = generateScene(sceneSeed("train", 0));
    const labels = placeLabels(scene);
    expect(labels).toHaveLength(5);
    for (const [p, position] of POSITIONS.entries()) {
      const o = scene.objects.find((x) => x.position === position);
      expect(labels[p]).toEqual(o ? [SHAPES.indexOf(o.shape), COLOURS.indexOf(o.colour), SIZES.indexOf(o.size)] : [6, 8, 2]);
    }
  });

  it("the loss falls in tens of steps; writes a Blip2VisionModel folder and the retrieval copy with the trained encoder", async () => {
    const losses: number[] = [];
    const result = await pretrainVision({ model: at("fresh"), out: at("vision"), retrievalOut: at("retrieval"), steps: 30, batchSize: 8, warmupSteps: 5, evalScenes: 16, onStep: (s) => losses.push(s.loss) });
    expect(losses).toHaveLength(30);
    expect(mean(losses.slice(-5))).toBeLessThan(mean(losses.slice(0, 3)) - 0.5);
    expect(result.valAccuracy.places).toBeGreaterThan(0);
    expect(result.cpu).toMatch(/cores?$/);

    const fresh = Checkpoint.open(at("fresh"));
    const tensors = readSafetensorsHeader(at("vision/model.safetensors")).tensors;
    const visionNames = fresh.names().filter((n) => n.startsWith("vision_model.")).map((n) => n.slice("vision_model.".length)).sort();
    expect([...tensors.keys()].sort()).toEqual(visionNames);
    for (const name of visionNames) expect(tensors.get(name)!.shape).toEqual(fresh.tensor(`vision_model.${name}`).shape);
    expect(JSON.parse(fs.readFileSync(at("vision/config.json"), "utf8"))).toMatchObject({ architectures: ["Blip2VisionModel"], model_type: "blip_2_vision_model", hidden_size: 32, patch_size: 8 });

    const retrieval = Checkpoint.open(at("retrieval"));
    expect(retrieval.names().sort()).toEqual(fresh.names().sort());
    const trained = readTensorF32(retrieval.tensor("vision_model.embeddings.patch_embedding.weight"));
    expect(Array.from(trained)).toEqual(Array.from(readTensorF32(tensors.get("embeddings.patch_embedding.weight")!)));
    expect(Array.from(trained)).not.toEqual(Array.from(readTensorF32(fresh.tensor("vision_model.embeddings.patch_embedding.weight"))));
    expect(Array.from(readTensorF32(retrieval.tensor("query_tokens")))).toEqual(Array.from(readTensorF32(fresh.tensor("query_tokens"))));
    expect(fs.readFileSync(at("retrieval/tokenizer.json"), "utf8")).toBe(fs.readFileSync(at("fresh/tokenizer.json"), "utf8"));
  }, 120_000);

  it("refuses an output folder that is not empty, before training", async () => {
    fs.mkdirSync(at("taken"));
    fs.writeFileSync(at("taken/notes.txt"), "mine");
    await expect(pretrainVision({ model: at("fresh"), out: at("taken"), retrievalOut: at("other"), steps: 1 })).rejects.toThrow(/taken: is not empty/);
    expect(fs.readFileSync(at("taken/notes.txt"), "utf8")).toBe("mine");
    expect(fs.existsSync(at("other"))).toBe(false);
  });
});

describe("text pretraining", () => {
  it("the loss falls in tens of steps; compose takes the OPTForCausalLM folder it writes", async () => {
    const losses: number[] = [];
    const result = await pretrainText({ model: at("opt"), out: at("lm"), steps: 30, batchSize: 8, warmupSteps: 5, evalScenes: 4, onStep: (s) => losses.push(s.loss) });
    expect(mean(losses.slice(-5))).toBeLessThan(mean(losses.slice(0, 3)) - 0.5);
    expect(Number.isFinite(result.valLoss)).toBe(true);
    expect(result.valAnswerAccuracy).toBeGreaterThanOrEqual(0);

    const before = readSafetensorsHeader(at("opt/model.safetensors")).tensors;
    const after = readSafetensorsHeader(at("lm/model.safetensors")).tensors;
    expect([...after.keys()].sort()).toEqual([...before.keys()].sort());
    expect(Array.from(readTensorF32(after.get("model.decoder.layers.0.fc1.weight")!))).not.toEqual(Array.from(readTensorF32(before.get("model.decoder.layers.0.fc1.weight")!)));

    const lines = await composeStage2({ stage1: at("fresh"), languageModel: at("lm"), out: at("stage2"), rng: new Rng(0) });
    expect(lines[0]).toMatch(/OPTForCausalLM/);
    const composed = Checkpoint.open(at("stage2"));
    expect(composed.config.text).toMatchObject({ modelType: "opt", hiddenSize: 32 });
    expect(Array.from(readTensorF32(composed.tensor("language_model.model.decoder.layers.0.fc1.weight")))).toEqual(Array.from(readTensorF32(after.get("model.decoder.layers.0.fc1.weight")!)));
  }, 120_000);

  it("with context: a description before BOS in three quarters of the mix, never a target, nor a question's prompt", async () => {
    const tokenizer = await Blip2Tokenizer.fromDirectory(at("opt"));
    const rng = new Rng(3);
    const kinds = { captionAfter: 0, questionAfter: 0, plain: 0, questionInside: 0 };
    const n = 800;
    for (let i = 0; i < n; i++) {
      const seq = textOfScene("train", i, rng, true);
      const { ids, targets } = encodeSequence(tokenizer, seq);
      const context = seq.context === undefined ? [] : tokenizer.encode(seq.context, { addSpecialTokens: false });
      // The context's ids come first, then BOS and the text; none of the context is a target.
      expect(ids.slice(0, context.length)).toEqual(context);
      expect(ids[context.length]).toBe(tokenizer.bosTokenId);
      expect(targets.slice(0, context.length).every((t) => !t)).toBe(true);
      const targetText = tokenizer.decode(ids.filter((_, j) => targets[j]), { skipSpecialTokens: true });
      if (seq.type) {
        // A question: the answer and the newline are targets, the prompt "Question: … Answer:" is not.
        expect(targetText.endsWith(`${seq.text.slice(seq.answerAt!)}`)).toBe(true);
        expect(targetText).not.toMatch(/Question|Answer/);
        if (seq.context !== undefined) kinds.questionAfter++;
        else kinds.questionInside++;
      } else {
        expect(targetText).toBe(seq.text);
        if (seq.context !== undefined) kinds.captionAfter++;
        else kinds.plain++;
      }
    }
    expect(kinds.captionAfter / n).toBeCloseTo(1 / 4, 1);
    expect(kinds.questionAfter / n).toBeCloseTo(1 / 2, 1);
    expect(kinds.plain / n).toBeCloseTo(1 / 8, 1);
    expect(kinds.questionInside / n).toBeCloseTo(1 / 8, 1);
  });
});
