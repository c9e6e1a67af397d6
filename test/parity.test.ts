/**
 * Every model part against transformers: the tiny 5.17 fixtures and the independent 4.45 set,
 * per-layer hidden states included. Tolerance: max |diff| <= 1e-4 * max(1, max |ref|).
 */
import fs from "node:fs";
import type * as ort from "onnxruntime-node";
import { afterAll, describe, expect, it } from "vitest";
import { Checkpoint } from "../src/io/checkpoint.js";
import { Blip2Runtime, type Tensors } from "../src/runtime/blip2Runtime.js";
import { itcSimilarity, RetrievalRuntime } from "../src/runtime/retrievalRuntime.js";
import { tensor } from "../src/runtime/session.js";
import { expectClose, fixture, loadReference, type RefTensor } from "./helpers.js";

const runtimes: { release(): Promise<void> }[] = [];
afterAll(async () => Promise.all(runtimes.map((r) => r.release())));

function open<T extends { release(): Promise<void> }>(r: T): T {
  runtimes.push(r);
  return r;
}

const json = (...p: string[]) => JSON.parse(fs.readFileSync(fixture(...p), "utf8"));
const close = (name: string, t: ort.Tensor | undefined, ref: RefTensor | undefined) => {
  expect(t, `${name} computed`).toBeDefined();
  expect(ref, `${name} in reference`).toBeDefined();
  expectClose(name, { shape: t!.dims, data: t!.data as Float32Array }, ref!);
};
const rows = (ref: RefTensor) => {
  const [b, n] = ref.shape as [number, number];
  return Array.from({ length: b }, (_, i) => Array.from(ref.data.subarray(i * n, (i + 1) * n)));
};

/** Runs the language model on prepared inputs; returns its outputs (logits, hidden states). */
async function languageModel(rt: Blip2Runtime, image: Tensors, inputIds: number[][], attentionMask: number[][], decoderInputIds?: number[][]): Promise<Tensors> {
  return rt.forward(inputIds, attentionMask, image.language_model_inputs!, { decoderInputIds });
}

describe.each(["tiny-blip2-opt", "tiny-blip2-t5"])("%s (transformers 5.17)", (name) => {
  const ref = loadReference(fixture(name, "reference.safetensors"));
  const cases = json(name, "reference.json").cases as Record<string, { input_ids: number[]; attention_mask: number[]; decoder_input_ids?: number[] }>;
  const rt = open(new Blip2Runtime(Checkpoint.open(fixture(name))));

  it.each(["0", "1", "2"])("case %s: vision, Q-Former and logits", async (c) => {
    const image = await rt.image(ref.get(`case${c}.pixel_values`)!.data, 1);
    for (const k of ["vision_last_hidden_state", "vision_pooler_output", "qformer_last_hidden_state"]) close(`case${c}.${k}`, image[k], ref.get(`case${c}.${k}`));
    const cs = cases[c]!;
    const out = await languageModel(rt, image, [cs.input_ids], [cs.attention_mask], cs.decoder_input_ids && [cs.decoder_input_ids]);
    close(`case${c}.logits`, out.logits, ref.get(`case${c}.logits`));
  });
});

describe.each(["opt", "t5"])("hf-4.45/%s (transformers 4.45), every hidden state", (variant) => {
  const ref = loadReference(fixture("hf-4.45", variant, "reference.safetensors"));
  const rt = open(new Blip2Runtime(Checkpoint.open(fixture("hf-4.45", variant)), { hiddenStates: true }));

  it("matches every reference tensor of the forward pass", async () => {
    const image = await rt.image(ref.get("pixel_values")!.data, 2);
    const out = await languageModel(rt, image, rows(ref.get("input_ids")!), rows(ref.get("attention_mask")!), ref.has("decoder_input_ids") ? rows(ref.get("decoder_input_ids")!) : undefined);
    const all = { ...image, ...out };
    const names = [...ref.keys()].filter((k) => /hidden_state|pooler|language_model_inputs|^logits$/.test(k));
    expect(names.length).toBeGreaterThanOrEqual(variant === "opt" ? 13 : 16);
    for (const k of names) close(k, all[k], ref.get(k));
  });
});

describe("tiny-blip2-itm (transformers 5.17)", () => {
  const ref = loadReference(fixture("tiny-blip2-itm", "reference.safetensors"));
  const meta = json("tiny-blip2-itm", "reference.json");
  const rt = open(new RetrievalRuntime(Checkpoint.open(fixture("tiny-blip2-itm"))));

  it("ITC embeddings and similarities, ITM logits", async () => {
    const images = await rt.images(ref.get("pixel_values")!.data, 2);
    const texts = await rt.texts(meta.input_ids, meta.attention_mask);
    close("itc.image_embeds", images.image_embeds, ref.get("itc.image_embeds"));
    close("itc.text_embeds", texts.text_embeds, ref.get("itc.text_embeds"));
    const sim = itcSimilarity(images.image_embeds!, texts.text_embeds!);
    expectClose("itc.logits_per_image", { shape: [2, 2], data: sim }, ref.get("itc.logits_per_image")!);
    const perText = new Float32Array([sim[0]!, sim[2]!, sim[1]!, sim[3]!]);
    expectClose("itc.logits_per_text", { shape: [2, 2], data: perText }, ref.get("itc.logits_per_text")!);
    const itm = await rt.itm(images.vision_last_hidden_state!, meta.input_ids, meta.attention_mask);
    close("itm.logits_per_image", itm.itm_logits, ref.get("itm.logits_per_image"));
  });

  it("ITC over 2 images x 3 texts", async () => {
    const images = await rt.images(ref.get("pixel_values")!.data, 2);
    const ids = meta.itc3_input_ids as number[][];
    const texts = await rt.texts(ids, ids.map((r) => r.map((t) => (t === 0 ? 0 : 1))));
    expectClose("itc3.logits_per_image", { shape: [2, 3], data: itcSimilarity(images.image_embeds!, texts.text_embeds!) }, ref.get("itc3.logits_per_image")!);
  });
});

describe("hf-4.45/itm (transformers 4.45)", () => {
  const ref = loadReference(fixture("hf-4.45", "itm", "reference.safetensors"));
  const rt = open(new RetrievalRuntime(Checkpoint.open(fixture("hf-4.45", "itm"))));

  it("matches every reference tensor", async () => {
    const ids = rows(ref.get("input_ids")!);
    const mask = rows(ref.get("attention_mask")!);
    const images = await rt.images(ref.get("pixel_values")!.data, 2);
    const texts = await rt.texts(ids, mask);
    close("vision_last_hidden_state", images.vision_last_hidden_state, ref.get("vision_last_hidden_state"));
    close("qformer_last_hidden_state", images.qformer_last_hidden_state, ref.get("qformer_last_hidden_state"));
    close("itc_image_embeds", images.image_embeds, ref.get("itc_image_embeds"));
    close("itc_text_embeds", texts.text_embeds, ref.get("itc_text_embeds"));
    close("itc_text_last_hidden_state", texts.text_last_hidden_state, ref.get("itc_text_last_hidden_state"));
    const sim = itcSimilarity(images.image_embeds!, texts.text_embeds!);
    expectClose("itc_logits_per_image", { shape: [2, 2], data: sim }, ref.get("itc_logits_per_image")!);

    const imageIndex = Array.from(ref.get("itm_pair_image_index")!.data);
    const textIndex = Array.from(ref.get("itm_pair_text_index")!.data);
    const [, n, d] = images.vision_last_hidden_state!.dims as number[];
    const vis = images.vision_last_hidden_state!.data as Float32Array;
    const pairs = new Float32Array(imageIndex.length * n! * d!);
    imageIndex.forEach((i, p) => pairs.set(vis.subarray(i * n! * d!, (i + 1) * n! * d!), p * n! * d!));
    const itm = await rt.itm(tensor.f32(pairs, [imageIndex.length, n!, d!]), textIndex.map((t) => ids[t]!), textIndex.map((t) => mask[t]!));
    close("itm_logits", itm.itm_logits, ref.get("itm_logits"));
    close("itm_qformer_last_hidden_state", itm.itm_qformer_last_hidden_state, ref.get("itm_qformer_last_hidden_state"));
  });
});

describe("legacy checkpoints (no image_token_index): queries concatenated before the text", () => {
  it("gives the same logits as the image-token path at the same positions", async () => {
    const ckpt = Checkpoint.open(fixture("tiny-blip2-opt"));
    const ref = loadReference(fixture("tiny-blip2-opt", "reference.safetensors"));
    const cs = json("tiny-blip2-opt", "reference.json").cases["2"];
    const legacy = open(new Blip2Runtime(ckpt.withConfig({ imageTokenIndex: null })));
    const image = await legacy.image(ref.get("case2.pixel_values")!.data, 1);
    const text = cs.input_ids.slice(4);
    const out = await languageModel(legacy, image, [text], [text.map(() => 1)]);
    close("case2.logits via concatenation", out.logits, ref.get("case2.logits"));
  });
});

describe("half-precision checkpoints (F16, BF16)", () => {
  it.each(["F16", "BF16"] as const)("%s weights load (widened to float32 at load) and stay close to the float32 results", async (dtype) => {
    const { copyFixture } = await import("./helpers.js");
    const { readSafetensorsHeader, readTensorF32, floatToHalf } = await import("../src/io/safetensors.js");
    const dir = copyFixture("tiny-blip2-opt");
    const file = `${dir}/model.safetensors`;
    const { tensors } = readSafetensorsHeader(file);
    // Rewrite every tensor in half precision.
    const half = (x: number) => (dtype === "F16" ? floatToHalf(x) : new Uint32Array(Float32Array.of(x).buffer)[0]! >>> 16);
    const raw = new Map<string, Uint16Array>();
    for (const [name, info] of tensors) raw.set(name, Uint16Array.from(readTensorF32(info), half));
    const fs = await import("node:fs");
    const header: Record<string, unknown> = {};
    let offset = 0;
    for (const [name, data] of raw) {
      header[name] = { dtype, shape: tensors.get(name)!.shape, data_offsets: [offset, offset + data.byteLength] };
      offset += data.byteLength;
    }
    const json = Buffer.from(JSON.stringify(header));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    fs.writeFileSync(file, Buffer.concat([len, json, ...[...raw.values()].map((d) => Buffer.from(d.buffer))]));
    const rt = open(new Blip2Runtime(Checkpoint.open(dir)));
    const ref = loadReference(fixture("tiny-blip2-opt", "reference.safetensors"));
    const image = await rt.image(ref.get("case1.pixel_values")!.data, 1);
    // Half precision rounds every weight: a looser bound than the float32 parity.
    const tol = dtype === "F16" ? 5e-3 : 5e-2;
    expectClose("vision_last_hidden_state", { shape: image.vision_last_hidden_state!.dims, data: image.vision_last_hidden_state!.data as Float32Array }, ref.get("case1.vision_last_hidden_state")!, tol);
    expectClose("qformer_last_hidden_state", { shape: image.qformer_last_hidden_state!.dims, data: image.qformer_last_hidden_state!.data as Float32Array }, ref.get("case1.qformer_last_hidden_state")!, tol);
  });
});
