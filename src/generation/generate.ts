/**
 * BLIP-2's generate: image -> projected queries -> language-model input embeddings, then a
 * decoding loop with the key/value cache. OPT decodes after the prompt (one token's work per step);
 * T5 encodes the prompt once, precomputes every layer's cross-attention keys/values, and decodes
 * from the decoder start token.
 *
 * Returned ids follow transformers 5.x: for OPT the prompt ids (image tokens, BOS, text) followed
 * by the new tokens; for T5 the decoder start token followed by the new tokens.
 */
import type * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import type { Blip2Runtime } from "../runtime/blip2Runtime.js";
import { gatherRows } from "../runtime/kvCache.js";
import type { CacheHandle } from "../runtime/session.js";
import { tensor } from "../runtime/session.js";
import type { ResolvedGeneration } from "./options.js";
import { beamSearch, sampleOrGreedy, type DecodingModel, type SearchResult, type TokenCallback } from "./search.js";

export interface GenerateInputs {
  /** [B, 3, H, W] pixel values, B = number of prompts... */
  pixelValues?: Float32Array;
  /** ...or the image's language-model inputs [B, Q, D] computed before (e.g. once per chat). */
  imageFeatures?: ort.Tensor;
  inputIds: number[][];
  attentionMask: number[][];
}

/** The projected queries for the images of `inputs`. */
async function imageFeatures(rt: Blip2Runtime, inputs: GenerateInputs): Promise<ort.Tensor> {
  if (inputs.imageFeatures) return inputs.imageFeatures;
  if (!inputs.pixelValues) throw new Blip2Error("generate needs pixel values or image features");
  return (await rt.image(inputs.pixelValues, inputs.inputIds.length)).language_model_inputs!;
}

export interface GenerateHooks {
  /** Each step's new token per row (greedy and sampling). */
  onToken?: TokenCallback;
  /** Each step's raw language-model logits of the last position, [rows * vocab], before any processor. */
  onLogits?: (logits: Float32Array) => void;
}

export async function generateIds(rt: Blip2Runtime, inputs: GenerateInputs, g: ResolvedGeneration, hooks: GenerateHooks = {}): Promise<SearchResult> {
  // Every session of a generation at once, rather than each on first use: the vision encoder's
  // worker creates its session while the language model's are created (see Blip2Runtime.prepare).
  await rt.prepare();
  const batch = inputs.inputIds.length;
  const { embeds, mask } = await rt.inputsEmbeds(inputs.inputIds, inputs.attentionMask, await imageFeatures(rt, inputs));
  // Beam search and multiple samples run one row per beam/sample, rows of an input adjacent. The
  // copies of a prompt are the same, so each prompt runs once and its results are copied.
  const copies = g.numBeams > 1 ? g.numBeams : g.numReturnSequences;
  const rows = repeatRows(Array.from({ length: batch }, (_, i) => i), copies);
  let decoding: OptDecoding | T5Decoding;
  let prompts: number[][];
  if (rt.config.text.modelType === "opt") {
    decoding = new OptDecoding(rt, embeds, mask, rows, g.maxNewTokens);
    prompts = rows.map((r) => inputs.inputIds[r]!);
  } else {
    const encoder = await rt.t5Encode(embeds, mask);
    decoding = new T5Decoding(rt, encoder.last_hidden_state!, rows, rows.map((r) => mask[r]!), g.decoderStartTokenId, g.maxNewTokens);
    prompts = rows.map(() => [g.decoderStartTokenId]);
  }
  const model: DecodingModel = hooks.onLogits ? observeLogits(decoding, hooks.onLogits) : decoding;
  try {
    return g.numBeams > 1 ? await beamSearch(model, prompts, g) : await sampleOrGreedy(model, prompts, g, hooks.onToken);
  } finally {
    // The key/value cache lives beside the sessions (maybe in the worker): free it now.
    await decoding.release();
  }
}

function observeLogits(model: DecodingModel, onLogits: (logits: Float32Array) => void): DecodingModel {
  const seen = (logits: Float32Array) => (onLogits(logits.slice()), logits);
  return {
    vocabSize: model.vocabSize,
    prefill: async () => seen(await model.prefill()),
    step: async (tokens) => seen(await model.step(tokens)),
    reorder: (index) => model.reorder(index),
  };
}

function repeatRows(rows: number[], copies: number): number[] {
  return rows.flatMap((r) => new Array(copies).fill(r));
}

/** Logits of the last position of every row: [rows, S, V] -> [rows * V]. */
function lastPosition(logits: ort.Tensor): Float32Array {
  const [rows, length, vocab] = logits.dims as [number, number, number];
  const data = logits.data as Float32Array;
  if (length === 1) return data;
  const out = new Float32Array(rows * vocab);
  for (let r = 0; r < rows; r++) out.set(data.subarray((r * length + length - 1) * vocab, (r * length + length) * vocab), r * vocab);
  return out;
}

class OptDecoding implements DecodingModel {
  private cache: CacheHandle | null = null;

  /** `rows`: the prompt (of `embeds` and `promptMask`) each decoding row continues. */
  constructor(
    private readonly rt: Blip2Runtime,
    private readonly embeds: ort.Tensor,
    private readonly promptMask: number[][],
    private readonly rows: number[],
    private readonly maxNewTokens: number,
  ) {}

  get vocabSize(): number {
    return this.rt.config.text.vocabSize;
  }

  /** Each prompt once, into the cache's first rows, which are then copied to the rows that continue it. */
  async prefill(): Promise<Float32Array> {
    this.cache = await this.rt.newCache(this.rows.length, this.embeds.dims[1]! + this.maxNewTokens);
    const logits = lastPosition((await this.rt.optDecode(this.embeds, this.promptMask, this.cache, true)).logits!);
    await this.cache.reorder(this.rows);
    return gatherRows(tensor.f32(logits, [this.promptMask.length, this.vocabSize]), this.rows).data as Float32Array;
  }

  async step(tokens: number[]): Promise<Float32Array> {
    const embeds = await this.rt.embed(tokens.map((t) => [t]));
    return lastPosition((await this.rt.optDecode(embeds, tokens.map(() => [1]), this.cache!, true)).logits!);
  }

  reorder(index: number[]): Promise<void> {
    return this.cache!.reorder(index);
  }

  async release(): Promise<void> {
    await this.cache?.drop();
  }
}

class T5Decoding implements DecodingModel {
  private cache: CacheHandle | null = null;

  /** `rows`: the input (of `encoderHidden`) each decoding row continues; `encoderMask` is per decoding row. */
  constructor(
    private readonly rt: Blip2Runtime,
    private readonly encoderHidden: ort.Tensor,
    private readonly rows: number[],
    private readonly encoderMask: number[][],
    private readonly startToken: number,
    private readonly maxNewTokens: number,
  ) {}

  get vocabSize(): number {
    return this.rt.config.text.vocabSize;
  }

  async prefill(): Promise<Float32Array> {
    this.cache = await this.rt.t5Cache(this.encoderHidden, 1 + this.maxNewTokens, this.rows);
    return this.step(this.encoderMask.map(() => this.startToken));
  }

  async step(tokens: number[]): Promise<Float32Array> {
    return lastPosition((await this.rt.t5Decode(tokens.map((t) => [t]), this.encoderMask, this.cache!)).logits!);
  }

  /** Beams of one input share its encoder output, so only the self-attention cache moves. */
  reorder(index: number[]): Promise<void> {
    return this.cache!.reorder(index);
  }

  async release(): Promise<void> {
    await this.cache?.drop();
  }
}
