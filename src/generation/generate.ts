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
import type { Blip2Runtime, OptInputs } from "../runtime/blip2Runtime.js";
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
  /** OPT, one prompt and one sequence, `imageFeatures` given: a cache to continue from and keep (a conversation). */
  keptCache?: KeptCache;
}

/**
 * A conversation's key/value cache, kept from one generation to the next: what its filled slots
 * hold (the image's features, and per position the id fed there, -1 for queries placed before the
 * text). A prompt with the same image that starts with the same ids runs only the positions after
 * them: a chat's next turn runs its new question and the previous answer, not the whole context.
 */
export interface KeptCache {
  handle: CacheHandle | null;
  image: ort.Tensor | null;
  ids: number[];
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
  /** Checked before each run of the language model: once aborted, the generation throws its reason (and frees its cache). */
  signal?: AbortSignal;
}

export async function generateIds(rt: Blip2Runtime, inputs: GenerateInputs, g: ResolvedGeneration, hooks: GenerateHooks = {}): Promise<SearchResult> {
  // Every session of a generation at once, rather than each on first use: the vision encoder's
  // worker creates its session while the language model's are created (see Blip2Runtime.prepare).
  await rt.prepare();
  const batch = inputs.inputIds.length;
  const image = await imageFeatures(rt, inputs);
  // Beam search and multiple samples run one row per beam/sample, rows of an input adjacent. The
  // copies of a prompt are the same, so each prompt runs once and its results are copied.
  const copies = g.numBeams > 1 ? g.numBeams : g.numReturnSequences;
  const rows = repeatRows(Array.from({ length: batch }, (_, i) => i), copies);
  let decoding: OptDecoding | T5Decoding;
  let prompts: number[][];
  if (rt.config.text.modelType === "opt") {
    const prompt = rt.optPrompt(inputs.inputIds, inputs.attentionMask, image);
    const kept = inputs.keptCache && rows.length === 1 && inputs.imageFeatures ? inputs.keptCache : undefined;
    decoding = new OptDecoding(rt, prompt, rows, g.maxNewTokens, kept && { kept, image: inputs.imageFeatures!, ids: promptPositions(inputs.inputIds[0]!, prompt.ids[0]!.length) });
    prompts = rows.map((r) => inputs.inputIds[r]!);
  } else {
    const { embeds, mask } = await rt.inputsEmbeds(inputs.inputIds, inputs.attentionMask, image);
    const encoder = await rt.t5Encode(embeds, mask);
    decoding = new T5Decoding(rt, encoder.last_hidden_state!, rows.length, mask, g.decoderStartTokenId, g.maxNewTokens);
    prompts = rows.map(() => [g.decoderStartTokenId]);
  }
  let model: DecodingModel = hooks.onLogits ? observeLogits(decoding, hooks.onLogits) : decoding;
  if (hooks.signal) model = stoppable(model, hooks.signal);
  let completed = false;
  try {
    const result = g.numBeams > 1 ? await beamSearch(model, prompts, g) : await sampleOrGreedy(model, prompts, g, hooks.onToken);
    completed = true;
    return result;
  } finally {
    // The key/value cache lives beside the sessions (maybe in the worker): free it now, unless kept.
    await decoding.release(completed);
  }
}

/** The id at each position of an OPT prompt: -1 for the queries placed before the text (legacy checkpoints). */
function promptPositions(ids: number[], length: number): number[] {
  return [...new Array(length - ids.length).fill(-1), ...ids];
}

function commonPrefix(a: number[], b: number[]): number {
  let n = 0;
  while (n < a.length && n < b.length && a[n] === b[n]) n++;
  return n;
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

function stoppable(model: DecodingModel, signal: AbortSignal): DecodingModel {
  return {
    vocabSize: model.vocabSize,
    prefill: async () => (signal.throwIfAborted(), model.prefill()),
    step: async (tokens) => (signal.throwIfAborted(), model.step(tokens)),
    reorder: (index) => model.reorder(index),
  };
}

function repeatRows(rows: number[], copies: number): number[] {
  return rows.flatMap((r) => new Array(copies).fill(r));
}

/** Logits of the last position of every row: [rows, S, V] -> [rows * V]. */
function lastPosition(logits: ort.Tensor): Float32Array {
  return sliceLength(logits, logits.dims[1]! - 1).data as Float32Array;
}

class OptDecoding implements DecodingModel {
  private cache: CacheHandle | null = null;

  /**
   * `rows`: the prompt (of `prompt`) each decoding row continues. `conversation` (one prompt, one
   * row): the kept cache, and the image and ids of this prompt's positions, to which each step's
   * token is added.
   */
  constructor(
    private readonly rt: Blip2Runtime,
    private readonly prompt: OptInputs,
    private readonly rows: number[],
    private readonly maxNewTokens: number,
    private readonly conversation?: { kept: KeptCache; image: ort.Tensor; ids: number[] },
  ) {}

  get vocabSize(): number {
    return this.rt.config.text.vocabSize;
  }

  /** Each prompt once, into the cache's first rows, which are then copied to the rows that continue it. */
  async prefill(): Promise<Float32Array> {
    const [cache, from] = await this.promptCache(this.promptLength + this.maxNewTokens);
    this.cache = cache;
    const logits = lastPosition((await this.rt.optDecode(positionsFrom(this.prompt, from), cache, true)).logits!);
    await cache.reorder(this.rows);
    return gatherRows(tensor.f32(logits, [this.prompt.ids.length, this.vocabSize]), this.rows).data as Float32Array;
  }

  /** Positions of a prompt, image queries included. */
  private get promptLength(): number {
    return this.prompt.ids[0]!.length;
  }

  /**
   * A cache of `capacity` slots, and how many of the prompt's positions it holds already: the kept
   * cache's common start with this prompt (same image), all but the last position at most, which
   * must run for its logits.
   */
  private async promptCache(capacity: number): Promise<[CacheHandle, number]> {
    const c = this.conversation;
    const kept = c?.kept.handle;
    if (!c || !kept || c.kept.image !== c.image) return [await this.rt.newCache(this.rows.length, capacity), 0];
    const from = Math.min(commonPrefix(c.kept.ids, c.ids), c.ids.length - 1);
    // This generation owns it now: released (kept again, or dropped) with it.
    c.kept.handle = null;
    try {
      await kept.resize(capacity, from);
    } catch (err) {
      await kept.drop().catch(() => undefined);
      throw err;
    }
    return [kept, from];
  }

  async step(tokens: number[]): Promise<Float32Array> {
    const logits = lastPosition((await this.rt.optDecode(this.rt.optStep(tokens), this.cache!, true)).logits!);
    this.conversation?.ids.push(tokens[0]!);
    return logits;
  }

  /** Beams move within their prompt's rows, which hold the same prompt slots. */
  reorder(index: number[]): Promise<void> {
    return this.cache!.reorder(index, this.promptLength);
  }

  /** Drops the cache, or keeps it for the conversation's next prompt when the generation completed. */
  async release(completed: boolean): Promise<void> {
    const c = this.conversation;
    if (c && completed && this.cache) {
      await c.kept.handle?.drop();
      Object.assign(c.kept, { handle: this.cache, image: c.image, ids: c.ids });
    } else {
      await this.cache?.drop();
    }
  }
}

/** Positions `from`.. of a [B, S, D] tensor (the tensor itself from 0). */
function sliceLength(t: ort.Tensor, from: number): ort.Tensor {
  if (from === 0) return t;
  const [batch, length, d] = t.dims as [number, number, number];
  const src = t.data as Float32Array;
  const out = new Float32Array(batch * (length - from) * d);
  for (let b = 0; b < batch; b++) out.set(src.subarray((b * length + from) * d, (b + 1) * length * d), b * (length - from) * d);
  return tensor.f32(out, [batch, length - from, d]);
}

/** Positions `from`.. of OPT's inputs (the image stays whole: the positions name its queries). */
function positionsFrom(inputs: OptInputs, from: number): OptInputs {
  if (from === 0) return inputs;
  const cut = (rows: number[][]) => rows.map((row) => row.slice(from));
  return { ids: cut(inputs.ids), imageIndex: cut(inputs.imageIndex), image: inputs.image, mask: cut(inputs.mask) };
}

class T5Decoding implements DecodingModel {
  private cache: CacheHandle | null = null;

  /** `rows` decoding rows, those of an input adjacent; `encoderMask` has a row per input (of `encoderHidden`). */
  constructor(
    private readonly rt: Blip2Runtime,
    private readonly encoderHidden: ort.Tensor,
    private readonly rows: number,
    private readonly encoderMask: number[][],
    private readonly startToken: number,
    private readonly maxNewTokens: number,
  ) {}

  get vocabSize(): number {
    return this.rt.config.text.vocabSize;
  }

  async prefill(): Promise<Float32Array> {
    this.cache = await this.rt.t5Cache(this.encoderHidden, 1 + this.maxNewTokens, this.rows);
    return this.step(new Array<number>(this.rows).fill(this.startToken));
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
