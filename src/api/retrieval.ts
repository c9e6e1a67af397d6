/**
 * Blip2ForImageTextRetrieval (`Salesforce/blip2-itm-vit-g`, `-coco`): BLIP-2's first-stage
 * Q-Former as an image-text matcher. ITC: normalized embeddings of images (one per query) and texts,
 * scored by the best query; ITM: a [no-match, match] classifier over an image and a text together.
 */
import type * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import type { ImageInput } from "../image/decode.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { Blip2Processor } from "../processor.js";
import { rowView } from "../runtime/kvCache.js";
import { itcSimilarity, RetrievalRuntime } from "../runtime/retrievalRuntime.js";
import { tensor } from "../runtime/session.js";
import { warnOnce } from "../warn.js";
import { loadCheckpoint, runtimeOptions, type ModelLoadOptions } from "./load.js";

/** Row-major embeddings: `data` holds `dims[0]` rows of `dims.slice(1)` values. */
export interface Embeddings {
  data: Float32Array;
  dims: number[];
}

export interface MatchResult {
  /** [images][texts] softmax probability of "match". */
  probability: number[][];
  /** [images][texts][2] raw [no-match, match] logits. */
  logits: [number, number][][];
}

export interface RetrievalOptions {
  /** Images per ONNX Runtime run (default 8). */
  batchSize?: number;
}

export class Blip2ForImageTextRetrieval {
  private constructor(
    readonly checkpoint: Checkpoint,
    readonly processor: Blip2Processor,
    private readonly runtime: RetrievalRuntime,
  ) {}

  static async fromPretrained(src: string, options: ModelLoadOptions = {}): Promise<Blip2ForImageTextRetrieval> {
    const checkpoint = await loadCheckpoint(src, options);
    const runtime = new RetrievalRuntime(checkpoint, runtimeOptions(options));
    return new Blip2ForImageTextRetrieval(checkpoint, await Blip2Processor.fromDirectory(checkpoint.dir, checkpoint.config, options), runtime);
  }

  get config() {
    return this.checkpoint.config;
  }

  /** Per image, its normalized query embeddings: [N, numQueries, image_text_hidden_size]. */
  async embedImages(images: ImageInput[], options: RetrievalOptions = {}): Promise<Embeddings> {
    return concatRows(await this.imageBatches(images, options, (out) => out.image_embeds!));
  }

  /** Per text, its normalized [CLS] embedding: [T, image_text_hidden_size]. */
  async embedTexts(texts: string[]): Promise<Embeddings> {
    const t = (await this.runtime.texts(...this.tokenize(texts))).text_embeds!;
    return { data: t.data as Float32Array, dims: [...t.dims] };
  }

  /** ITC: [images][texts], the best query's cosine similarity (transformers' logits_per_image). */
  async similarity(images: ImageInput[], texts: string[], options: RetrievalOptions = {}): Promise<number[][]> {
    const image = await this.embedImages(images, options);
    const text = await this.embedTexts(texts);
    return toRows(itcSimilarity(tensor.f32(image.data, image.dims), tensor.f32(text.data, text.dims)), texts.length);
  }

  /** ITM for every (image, text) pair: logits averaged over the query outputs, and P(match). */
  async match(images: ImageInput[], texts: string[], options: RetrievalOptions = {}): Promise<MatchResult> {
    const [ids, mask] = this.tokenize(texts);
    const logits: [number, number][][] = [];
    for (const features of await this.imageBatches(images, options, (out) => out.vision_last_hidden_state!)) {
      logits.push(...(await this.matchFeatures(features, ids, mask)));
    }
    return { logits, probability: logits.map((row) => row.map(([no, yes]) => 1 / (1 + Math.exp(no - yes)))) };
  }

  /**
   * ITM logits of each image's vision features [B, N, D] against every tokenized text: one run per
   * image, which the graph broadcasts over the texts (see itmGraph), so memory grows with the
   * texts' tokens only.
   */
  async matchFeatures(features: ort.Tensor, ids: number[][], mask: number[][]): Promise<[number, number][][]> {
    const rows: [number, number][][] = [];
    for (let i = 0; i < features.dims[0]!; i++) {
      const out = (await this.runtime.itm(rowView(features, i, 1), ids, mask)).itm_logits!.data as Float32Array;
      rows.push(Array.from({ length: ids.length }, (_, t) => [out[t * 2]!, out[t * 2 + 1]!]));
    }
    return rows;
  }

  /** Vision features of images [B, N, D] (what ITM cross-attends to), in batches. */
  imageFeatures(images: ImageInput[], options: RetrievalOptions = {}): Promise<ort.Tensor[]> {
    return this.imageBatches(images, options, (out) => out.vision_last_hidden_state!);
  }

  /** Token ids and mask of texts, padded, cut to the Q-Former's positions. */
  tokenize(texts: string[]): [number[][], number[][]] {
    if (!texts.length) throw new Blip2Error("give at least one text");
    const max = this.config.qformer.maxPositionEmbeddings;
    const tokenizer = this.processor.tokenizer;
    const encoded = texts.map((t) => {
      const ids = tokenizer.encode(t);
      if (ids.length <= max) return ids;
      warnOnce(`a text of ${ids.length} tokens was cut to the Q-Former's ${max} positions`);
      return [...ids.slice(0, max - 1), ids[ids.length - 1]!];
    });
    const { inputIds, attentionMask } = tokenizer.pad(encoded, "right");
    return [inputIds, attentionMask];
  }

  private async imageBatches(images: ImageInput[], options: RetrievalOptions, pick: (out: Record<string, ort.Tensor>) => ort.Tensor): Promise<ort.Tensor[]> {
    if (!images.length) throw new Blip2Error("give at least one image");
    const size = options.batchSize ?? 8;
    const out: ort.Tensor[] = [];
    for (let i = 0; i < images.length; i += size) {
      const batch = images.slice(i, i + size);
      const { pixelValues } = await this.processor.imageProcessor.preprocess(batch);
      out.push(pick(await this.runtime.images(pixelValues, batch.length)));
    }
    return out;
  }

  dispose(): Promise<void> {
    return this.runtime.release();
  }
}

function concatRows(parts: ort.Tensor[]): Embeddings {
  const dims = [...parts[0]!.dims];
  dims[0] = parts.reduce((n, p) => n + p.dims[0]!, 0);
  const data = new Float32Array(parts.reduce((n, p) => n + p.data.length, 0));
  parts.reduce((at, p) => (data.set(p.data as Float32Array, at), at + p.data.length), 0);
  return { data, dims };
}

function toRows(flat: Float32Array, width: number): number[][] {
  return Array.from({ length: flat.length / width }, (_, i) => Array.from(flat.subarray(i * width, (i + 1) * width)));
}
