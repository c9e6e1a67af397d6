/**
 * One batch's loss terms and the gradient of every trained tensor, without dropout or any update:
 * what `blip2 grad` writes, to compare blip2's training with another implementation's.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { Checkpoint } from "../io/checkpoint.js";
import type { WeightDType } from "../io/weightFormat.js";
import { readTensorF32 } from "../io/safetensors.js";
import type { ImageProcessorBackend } from "../image/imageProcessor.js";
import { Blip2Processor } from "../processor.js";
import { resolveDTypes } from "../quantize/dtype.js";
import { withDTypes } from "../quantize/quantize.js";
import type { RuntimeOptions } from "../runtime/session.js";
import type { Example } from "./data.js";
import { stage1Extras } from "./extras.js";
import { ImageFeatures } from "./features.js";
import { Rng } from "./rng.js";
import { stage1Trained } from "./stage1.js";
import { stage2Trained } from "./stage2.js";
import { Stage1Step, Stage2Step, type Negatives, type StepOutput } from "./steps.js";
import { Stage1Text, Stage2Text } from "./text.js";
import { checkStage, withExtras } from "./trainer.js";

/** A batch as `blip2 grad` reads it from batch.json. */
export interface GradBatch {
  /** Image paths (relative to `baseDir`, or absolute). */
  images: string[];
  texts: string[];
  prompt?: string;
  /** Token ids used as given instead of tokenizing `texts` (stage 2: with the image tokens, as the processor lays them out). */
  input_ids?: number[][];
  attention_mask?: number[][];
  /** Stage 2 labels (-100 = ignored). */
  labels?: number[][];
  /** T5: the labels' mask. */
  decoder_attention_mask?: number[][];
  /** Stage 1 hard negatives (batch indices); drawn from the ITC similarities (seed 0) when absent. */
  negatives?: { image_for_text: number[]; text_for_image: number[] };
}

export interface GradOptions {
  stage: 1 | 2;
  model: string;
  batch: GradBatch;
  /** Where relative image paths start (batch.json's folder). */
  baseDir: string;
  /** Precision of the frozen parts. */
  dtype?: WeightDType;
  blip2Cache?: string;
  runtime?: RuntimeOptions;
  /** Resizing as transformers 5 ("torchvision", default) or 4 ("pil") does it. */
  imageBackend?: ImageProcessorBackend;
}

export async function batchGradients(o: GradOptions): Promise<StepOutput> {
  const b = checkBatch(o.batch, o.stage);
  const input = Checkpoint.open(o.model);
  checkStage(input, o.stage);
  let ckpt = input;
  let decTokenId = 0;
  const initial = new Map<string, Float32Array>();
  if (o.stage === 1) {
    const extras = await stage1Extras(input, new Rng(0));
    decTokenId = extras.decTokenId;
    for (const [name, v] of extras.tensors) initial.set(name, v.data);
    ckpt = withExtras(input, extras);
  }
  ckpt = await withDTypes(ckpt, { ...resolveDTypes(o.dtype), qformer: "fp32" }, { cacheDir: o.blip2Cache });
  const trained = (name: string) => (o.stage === 1 ? stage1Trained(name) : stage2Trained(name));
  const params = new Map<string, Float32Array>();
  for (const name of ckpt.names()) if (trained(name) && !/\.(q8|q4)\.|\.fp16$/.test(name)) params.set(name, initial.get(name) ?? readTensorF32(ckpt.tensor(name)));

  const processor = await Blip2Processor.fromDirectory(input.dir, input.config, { imageBackend: o.imageBackend });
  const examples: Example[] = b.images.map((image, i) => ({ image: path.resolve(o.baseDir, image), text: b.texts[i]!, where: `batch.json images[${i}]` }));
  for (const e of examples) if (!fs.existsSync(e.image)) throw new Blip2Error(`${e.where}: image ${e.image} not found`);
  const features = new ImageFeatures(ckpt, processor.imageProcessor, o.runtime ?? {}, null);
  try {
    const imageFeatures = await features.of(examples.map((e) => e.image), examples.map((e) => e.where));
    if (o.stage === 1) {
      const text = b.input_ids ? { inputIds: b.input_ids, attentionMask: b.attention_mask!, decTokenId, padTokenId: processor.tokenizer.padTokenId ?? 0 } : new Stage1Text(processor.tokenizer, decTokenId).batch(examples);
      const negatives: Negatives | Rng = b.negatives ? { imageForText: b.negatives.image_for_text, textForImage: b.negatives.text_for_image } : new Rng(0);
      const step = new Stage1Step(ckpt, o.runtime);
      try {
        return await step.run(text, imageFeatures, params, negatives);
      } finally {
        await step.release();
      }
    }
    const text = new Stage2Text(processor, input.config.text.modelType === "opt" ? "opt" : "t5", b.prompt ?? "");
    const batch = b.input_ids ? { inputIds: b.input_ids, attentionMask: b.attention_mask!, labels: b.labels!, decoderAttentionMask: b.decoder_attention_mask } : text.batch(examples, text.lengths(examples));
    const step = new Stage2Step(ckpt, o.runtime);
    try {
      return await step.run(batch, imageFeatures, params);
    } finally {
      await step.release();
    }
  } finally {
    await features.release();
  }
}

/** The batch's fields, checked: one text per image, ids/masks/labels of matching shapes. */
function checkBatch(batch: GradBatch, stage: 1 | 2): GradBatch {
  const fail = (what: string) => new Blip2Error(`batch.json: ${what}`);
  const strings = (v: unknown) => Array.isArray(v) && v.every((s) => typeof s === "string");
  if (!strings(batch.images) || batch.images.length === 0) throw fail("images must be a non-empty list of paths");
  if (!strings(batch.texts) || batch.texts.length !== batch.images.length) throw fail(`texts must be a list of ${batch.images.length} strings (one per image)`);
  batch.texts.forEach((t, i) => {
    if (!t.trim()) throw fail(`texts[${i}] is empty`);
  });
  if (batch.prompt !== undefined && typeof batch.prompt !== "string") throw fail("prompt must be a string");
  const n = batch.images.length;
  const matrix = (name: keyof GradBatch, rows: number) => {
    const v = batch[name] as unknown;
    if (v === undefined) return;
    if (!Array.isArray(v) || v.length !== rows || !v.every((r) => Array.isArray(r) && r.every(Number.isInteger) && r.length === (v[0] as unknown[]).length)) {
      throw fail(`${name} must be ${rows} rows of integers of one length`);
    }
  };
  for (const name of ["input_ids", "attention_mask", "labels", "decoder_attention_mask"] as const) matrix(name, n);
  if (batch.input_ids && !batch.attention_mask) throw fail("input_ids needs attention_mask");
  if (batch.input_ids && batch.attention_mask![0]!.length !== batch.input_ids[0]!.length) throw fail("attention_mask must have the length of input_ids");
  if (stage === 2 && batch.input_ids && !batch.labels) throw fail("stage 2 with input_ids needs labels");
  if (stage === 1 && batch.labels) throw fail("labels are for stage 2 (stage 1 derives ITG's labels from input_ids)");
  if (stage === 1 && n < 2) throw fail("stage 1 needs at least 2 image-text pairs");
  if (batch.negatives !== undefined) {
    if (stage !== 1) throw fail("negatives are for stage 1");
    for (const key of ["image_for_text", "text_for_image"] as const) {
      const v = batch.negatives[key] as unknown;
      if (!Array.isArray(v) || v.length !== n || !v.every((x) => Number.isInteger(x) && x >= 0 && x < n)) throw fail(`negatives.${key} must be ${n} batch indices in [0, ${n})`);
    }
  }
  return batch;
}
