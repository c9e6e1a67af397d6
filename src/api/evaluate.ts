/**
 * Evaluating a trained BLIP-2 on a data set (the trainer's formats):
 * - a stage-1 (retrieval) model: image→text and text→image recall@1/5/10, ranking by ITC, then
 *   re-ranking each query's top k by ITM + ITC as LAVIS's retrieval evaluation does;
 * - a stage-2 model: the mean language-modelling loss per labelled token, its perplexity and, when
 *   asked, generated captions and their exact-match rate against the data's captions.
 */
import fs from "node:fs";
import * as ort from "onnxruntime-node";
import { Checkpoint } from "../io/checkpoint.js";
import { readTensorF32 } from "../io/safetensors.js";
import { Blip2Processor } from "../processor.js";
import { loadExamples, type Example } from "../train/data.js";
import { ImageFeatures } from "../train/features.js";
import { stage2Trained } from "../train/stage2.js";
import { Stage2Step } from "../train/steps.js";
import { Stage2Text } from "../train/text.js";
import { Blip2ForImageTextRetrieval } from "./retrieval.js";
import { Blip2 } from "./tasks.js";
import type { ModelLoadOptions } from "./conditionalGeneration.js";

export interface RetrievalRecall {
  images: number;
  texts: number;
  /** Image→text: the share of images with one of their captions in the top k. */
  imageToText: Record<"r1" | "r5" | "r10", number>;
  /** Text→image: the share of captions whose image is in the top k. */
  textToImage: Record<"r1" | "r5" | "r10", number>;
  /** The same with ITC alone (no re-ranking). */
  itcImageToText: Record<"r1" | "r5" | "r10", number>;
  itcTextToImage: Record<"r1" | "r5" | "r10", number>;
}

export interface LanguageModelScore {
  examples: number;
  /** Mean cross-entropy per labelled token. */
  loss: number;
  perplexity: number;
  /** With `generate`: each image's caption and whether it equals one of the data's captions (case and spaces ignored). */
  captions?: { image: string; caption: string; exact: boolean }[];
  exactMatch?: number;
}

export interface EvaluateOptions extends ModelLoadOptions {
  /** Stage 1: how many ITC candidates ITM re-ranks per query (default 128, as LAVIS's k_test for Flickr). */
  rerank?: number;
  /** Stage 2: also generate a caption per image. */
  generate?: boolean;
  /** Stage 2: the prompt the model was trained with. */
  prompt?: string;
  batchSize?: number;
}

/** Recall@1/5/10 of a retrieval checkpoint over `data` (images with one or more captions each). */
export async function evaluateRetrieval(model: string, data: string, options: EvaluateOptions = {}): Promise<RetrievalRecall> {
  const examples = loadExamples(data);
  const images = [...new Set(examples.map((e) => e.image))];
  const texts = examples.map((e) => e.text);
  const imageOfText = examples.map((e) => images.indexOf(e.image));
  const retrieval = await Blip2ForImageTextRetrieval.fromPretrained(model, options);
  try {
    const itc = await retrieval.similarity(images, texts, { batchSize: options.batchSize });
    const k = Math.min(options.rerank ?? 128, Math.max(images.length, texts.length));
    const [ids, mask] = retrieval.tokenize(texts);
    const features = await retrieval.imageFeatures(images, { batchSize: options.batchSize });
    const featureOf = (i: number) => {
      let at = i;
      for (const f of features) {
        if (at < f.dims[0]!) return { f, row: at };
        at -= f.dims[0]!;
      }
      throw new Error(`internal: image ${i} out of range`);
    };
    // Every ITM score a re-ranking needs, computed once per (image, text).
    const itm = new Map<string, number>();
    const needed = new Map<number, Set<number>>();
    const need = (i: number, t: number) => (needed.get(i) ?? needed.set(i, new Set()).get(i)!).add(t);
    const topK = (scores: number[], n: number) => scores.map((s, j) => [s, j] as const).sort((a, b) => b[0] - a[0]).slice(0, n).map(([, j]) => j);
    const i2tTop = images.map((_, i) => topK(itc[i]!, k));
    const t2iTop = texts.map((_, t) => topK(images.map((_, i) => itc[i]![t]!), k));
    i2tTop.forEach((ts, i) => ts.forEach((t) => need(i, t)));
    t2iTop.forEach((is, t) => is.forEach((i) => need(i, t)));
    for (const [i, ts] of needed) {
      const list = [...ts];
      const { f, row } = featureOf(i);
      const logits = await retrieval.matchFeatures(sliceRow(f, row), list.map((t) => ids[t]!), list.map((t) => mask[t]!));
      list.forEach((t, j) => itm.set(`${i},${t}`, logits[0]![j]![1]));
    }
    const rerankedI2t = images.map((_, i) => i2tTop[i]!.map((t) => [itm.get(`${i},${t}`)! + itc[i]![t]!, t] as const).sort((a, b) => b[0] - a[0]).map(([, t]) => t));
    const rerankedT2i = texts.map((_, t) => t2iTop[t]!.map((i) => [itm.get(`${i},${t}`)! + itc[i]![t]!, i] as const).sort((a, b) => b[0] - a[0]).map(([, i]) => i));
    const recall = (ranked: number[][], hit: (q: number, c: number) => boolean) => {
      const at = (n: number) => ranked.filter((r, q) => r.slice(0, n).some((c) => hit(q, c))).length / ranked.length;
      return { r1: at(1), r5: at(5), r10: at(10) };
    };
    const textHit = (i: number, t: number) => imageOfText[t] === i;
    const imageHit = (t: number, i: number) => imageOfText[t] === i;
    return {
      images: images.length,
      texts: texts.length,
      imageToText: recall(rerankedI2t, textHit),
      textToImage: recall(rerankedT2i, imageHit),
      itcImageToText: recall(images.map((_, i) => topK(itc[i]!, texts.length)), textHit),
      itcTextToImage: recall(texts.map((_, t) => topK(images.map((_, i) => itc[i]![t]!), images.length)), imageHit),
    };
  } finally {
    await retrieval.dispose();
  }
}

function sliceRow(f: ort.Tensor, row: number): ort.Tensor {
  const per = f.data.length / f.dims[0]!;
  return new ort.Tensor("float32", (f.data as Float32Array).slice(row * per, (row + 1) * per), [1, ...f.dims.slice(1)]);
}

/** The mean loss and perplexity of a stage-2 checkpoint over `data`, and with `generate` its captions. */
export async function evaluateLanguageModel(model: string, data: string, options: EvaluateOptions = {}): Promise<LanguageModelScore> {
  const examples = loadExamples(data);
  const ckpt = Checkpoint.open(model);
  const processor = await Blip2Processor.fromDirectory(ckpt.dir, ckpt.config, options);
  const text = new Stage2Text(processor, ckpt.config.text.modelType === "opt" ? "opt" : "t5", options.prompt ?? "");
  const size = text.lengths(examples);
  const params = new Map<string, Float32Array>();
  for (const name of ckpt.names()) if (stage2Trained(name)) params.set(name, readTensorF32(ckpt.tensor(name)));
  const features = new ImageFeatures(ckpt, processor.imageProcessor, { threads: options.threads }, null);
  const step = new Stage2Step(ckpt, { threads: options.threads });
  let weighted = 0;
  let tokens = 0;
  try {
    const batchSize = options.batchSize ?? 8;
    for (let i = 0; i < examples.length; i += batchSize) {
      const chunk: Example[] = examples.slice(i, i + batchSize);
      const batch = text.batch(chunk, size);
      const labelled = countLabelled(batch.labels, ckpt.config.text.modelType === "opt");
      const out = await step.run(batch, await features.of(chunk.map((e) => e.image), chunk.map((e) => e.where)), params, { lossOnly: true });
      weighted += out.losses.loss! * labelled;
      tokens += labelled;
    }
  } finally {
    await Promise.all([step.release(), features.release()]);
  }
  const loss = weighted / tokens;
  const score: LanguageModelScore = { examples: examples.length, loss, perplexity: Math.exp(loss) };
  if (options.generate) {
    const blip2 = await Blip2.load(model, options);
    try {
      const norm = (s: string) => s.toLowerCase().replace(/\s+/g, " ").trim();
      const truths = new Map<string, Set<string>>();
      for (const e of examples) (truths.get(e.image) ?? truths.set(e.image, new Set()).get(e.image)!).add(norm(e.text));
      score.captions = [];
      for (const [image, captions] of truths) {
        const caption = await blip2.caption(fs.readFileSync(image), options.prompt ? { prompt: options.prompt } : {});
        score.captions.push({ image, caption, exact: captions.has(norm(caption)) });
      }
      score.exactMatch = score.captions.filter((c) => c.exact).length / score.captions.length;
    } finally {
      await blip2.dispose();
    }
  }
  return score;
}

/** Labelled tokens as the loss counts them: OPT's labels are shifted by one, T5's are not. */
function countLabelled(labels: number[][], shifted: boolean): number {
  return labels.reduce((n, row) => n + (shifted ? row.slice(1) : row).filter((id) => id !== -100).length, 0);
}
