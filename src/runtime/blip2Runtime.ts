/**
 * Runs Blip2ForConditionalGeneration's graphs: sessions are created on first use and cached.
 * This is the numeric core that generation, the API and the `dump` command share.
 */
import type * as ort from "onnxruntime-node";
import type { OptConfig, T5Config } from "../config.js";
import { Blip2Error } from "../errors.js";
import { warnOnce } from "../warn.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { embedGraph, imageGraph, optDecoderGraph, t5CrossGraph, t5DecoderGraph, t5EncoderGraph, type GraphOptions } from "../models/blip2.js";
import { relativePositionBuckets } from "../models/t5.js";
import type { Graph, Target } from "../ir/graph.js";
import { runImages, SessionCache, tensor, VISION_SESSION, type CacheHandle, type CompiledGraph, type RuntimeOptions, type SessionOptions } from "./session.js";

export type Tensors = Record<string, ort.Tensor>;

/**
 * New positions of OPT rows, as its decoder graph takes them: token ids, and where the image's
 * projected queries go (`imageIndex` k > 0: query k of the row's `image` [rows, Q, D]; 0: the
 * token's embedding). `mask` is their attention mask.
 */
export interface OptInputs {
  ids: number[][];
  imageIndex: number[][];
  image: ort.Tensor;
  mask: number[][];
}


export class Blip2Runtime {
  private readonly sessions: SessionCache;

  constructor(
    readonly checkpoint: Checkpoint,
    readonly options: RuntimeOptions & GraphOptions = {},
  ) {
    this.sessions = new SessionCache(options);
  }

  get config() {
    return this.checkpoint.config;
  }

  /** The graphs this checkpoint runs as, by session name. */
  private graphs(): Record<string, (target: Target) => Graph> {
    const ck = this.checkpoint;
    const o = (target: Target) => ({ hiddenStates: this.options.hiddenStates, target });
    const image = (t: Target) => imageGraph(ck, { ...o(t), project: true });
    // OPT's decoder embeds its tokens itself (one run per step); T5 embeds a prompt once.
    if (this.config.text.modelType === "opt") return { image, opt_decoder: (t) => optDecoderGraph(ck, this.opt, o(t)) };
    return { image, embed: (t: Target) => embedGraph(ck, o(t)), t5_encoder: (t) => t5EncoderGraph(ck, this.t5, o(t)), t5_cross: (t) => t5CrossGraph(ck, this.t5, o(t)), t5_decoder: (t) => t5DecoderGraph(ck, this.t5, o(t)) };
  }

  private session(name: string): Promise<CompiledGraph> {
    const build = this.graphs()[name];
    if (!build) throw new Blip2Error(`internal: no ${name} graph for this checkpoint`);
    return this.sessions.get(name, build, this.sessionOptions(name));
  }

  /**
   * T5's encoder and cross-attention projections run once per prompt: they drop ONNX Runtime's
   * memory arena, which would keep their largest buffers (the cross-attention keys/values) for
   * good. The decoder steps keep it (see RuntimeOptions.arena).
   */
  private sessionOptions(name: string): SessionOptions {
    if (name === "image") return VISION_SESSION;
    return name === "t5_encoder" || name === "t5_cross" ? { arena: false } : {};
  }

  /**
   * Creates every session now. ONNX Runtime creates a session synchronously in the thread that
   * asks, so those of one worker thread are created one after the other; the vision encoder's has
   * a worker of its own (see VISION_SESSION) and is created beside the others.
   */
  async prepare(): Promise<void> {
    await Promise.all(Object.keys(this.graphs()).map((name) => this.session(name)));
  }

  /** pixel_values [B, 3, H, W] -> language_model_inputs and the vision/Q-Former outputs. */
  async image(pixelValues: Float32Array, batch: number): Promise<Tensors> {
    return runImages(await this.session("image"), pixelValues, batch, this.config.vision.imageSize);
  }

  /** Token ids -> T5's input embeddings (OPT's decoder graph embeds its own tokens). */
  async embed(ids: number[][]): Promise<ort.Tensor> {
    const s = await this.session("embed");
    const width = ids[0]?.length ?? 0;
    return (await s.run({ input_ids: tensor.i64(ids.flat(), [ids.length, width]) })).inputs_embeds!;
  }

  /**
   * Where a prompt's positions take the image's projected queries. As in transformers, the config
   * decides: with an `image_token_index`, the queries replace the embeddings at the `<image>` tokens
   * (a prompt without them leaves the image unused, which transformers does silently and we warn
   * about); without one ("legacy" checkpoints), the queries go before the text and the mask is
   * extended to cover them. Per row: `slots`, each position's query (k > 0: query k; 0: none), and
   * `queries`, how many leading positions were added for them.
   */
  private imagePlacement(inputIds: number[][], attentionMask: number[][], languageModelInputs: ort.Tensor): { slots: number[][]; queries: number; mask: number[][] } {
    const [batch, queries] = languageModelInputs.dims as [number, number];
    if (batch !== inputIds.length) throw new Blip2Error(`${batch} images but ${inputIds.length} prompts`);
    const imageToken = this.config.imageTokenIndex;
    if (imageToken === null) {
      const slots = inputIds.map((row) => [...Array.from({ length: queries }, (_, k) => k + 1), ...row.map(() => 0)]);
      return { slots, queries, mask: attentionMask.map((row) => [...new Array(queries).fill(1), ...row]) };
    }
    const slots = inputIds.map((row, b) => {
      const count = row.filter((t) => t === imageToken).length;
      if (count === 0) warnOnce(`prompt has no <image> tokens (id ${imageToken}) although the checkpoint expects ${queries}: the image is not used (prepare prompts with Blip2Processor)`);
      else if (count !== queries) throw new Blip2Error(`prompt ${b} has ${count} <image> tokens, expected ${queries} (num_query_tokens)`);
      let k = 0;
      return row.map((t) => (t === imageToken && count === queries ? ++k : 0));
    });
    return { slots, queries: 0, mask: attentionMask };
  }

  /** OPT's inputs for whole prompts and their images' projected queries [B, Q, D]. */
  optPrompt(inputIds: number[][], attentionMask: number[][], languageModelInputs: ort.Tensor): OptInputs {
    const { slots, queries, mask } = this.imagePlacement(inputIds, attentionMask, languageModelInputs);
    // Positions added for the queries take no token: id 0 is a placeholder that the query replaces.
    const ids = inputIds.map((row) => [...new Array(queries).fill(0), ...row]);
    return { ids, imageIndex: slots, image: languageModelInputs, mask };
  }

  /** OPT's inputs for one new token per row (a decoding step): no image. */
  optStep(tokens: number[]): OptInputs {
    const d = this.opt.wordEmbedProjDim;
    return { ids: tokens.map((t) => [t]), imageIndex: tokens.map(() => [0]), image: tensor.f32(new Float32Array(0), [tokens.length, 0, d]), mask: tokens.map(() => [1]) };
  }

  /** The language model's input embeddings for a prompt (T5's encoder input), the queries placed as in `imagePlacement`. */
  async inputsEmbeds(inputIds: number[][], attentionMask: number[][], languageModelInputs: ort.Tensor): Promise<{ embeds: ort.Tensor; mask: number[][] }> {
    const { slots, queries, mask } = this.imagePlacement(inputIds, attentionMask, languageModelInputs);
    const tokens = (await this.embed(inputIds)).data as Float32Array;
    const features = languageModelInputs.data as Float32Array;
    const [batch, q, d] = languageModelInputs.dims as [number, number, number];
    const width = slots[0]!.length;
    const text = width - queries;
    const token = (b: number, s: number) => tokens.subarray((b * text + s - queries) * d, (b * text + s - queries + 1) * d);
    const query = (b: number, k: number) => features.subarray((b * q + k - 1) * d, (b * q + k) * d);
    const out = new Float32Array(batch * width * d);
    slots.forEach((row, b) => row.forEach((k, s) => out.set(k > 0 ? query(b, k) : token(b, s), (b * width + s) * d)));
    return { embeds: tensor.f32(out, [batch, width, d]), mask };
  }

  private get opt(): OptConfig {
    if (this.config.text.modelType !== "opt") throw new Blip2Error("internal: not an OPT checkpoint");
    return this.config.text;
  }

  private get t5(): T5Config {
    if (this.config.text.modelType !== "t5") throw new Blip2Error("internal: not a T5 checkpoint");
    return this.config.text;
  }

  /**
   * A key/value cache for `rows` sequences and `capacity` positions (at least 1). T5's decoder also
   * needs the cross-attention inputs: see t5Cache.
   */
  async newCache(rows: number, capacity: number): Promise<CacheHandle> {
    const t = this.config.text;
    const decoder = await this.session(t.modelType === "opt" ? "opt_decoder" : "t5_decoder");
    return t.modelType === "opt"
      ? decoder.newCache({ layers: t.numHiddenLayers, rows, heads: t.numAttentionHeads, capacity, headDim: t.hiddenSize / t.numAttentionHeads })
      : decoder.newCache({ layers: t.numDecoderLayers, rows, heads: t.numHeads, capacity, headDim: t.dKv });
  }

  /**
   * OPT over new positions (see OptInputs) after those in `cache`, which receives their keys and
   * values. Logits of all new positions, or with `lastOnly` of the last one (all
   * that generation needs). The rows of a prompt run together, as many as keep the run's new
   * keys/values within PROMPT_KEY_VALUE_BYTES (`rowsPerRun` overrides): each pass streams every
   * weight from memory, so rows together cost little more than one, while ONNX Runtime's arena
   * keeps a run's largest outputs, those keys/values.
   */
  async optDecode(inputs: OptInputs, cache: CacheHandle, lastOnly = false, rowsPerRun = promptRowsPerRun(this.opt, inputs.ids[0]!.length)): Promise<Tensors> {
    const s = await this.session("opt_decoder");
    const { ids, imageIndex, image, mask } = inputs;
    const dims = [ids.length, ids[0]!.length];
    const feeds = { input_ids: tensor.i64(ids.flat(), dims), image_embeds: image, image_index: tensor.i64(imageIndex.flat(), dims), logits_positions: logitsPositions(dims[1]!, lastOnly) };
    const chunks = { rows: rowsPerRun, feeds: ["input_ids", "image_embeds", "image_index"] };
    return s.run(feeds, { cache, mask, chunks });
  }

  /** T5 encoder over inputs_embeds with the encoder's bidirectional position buckets. */
  async t5Encode(embeds: ort.Tensor, attentionMask: number[][]): Promise<Tensors> {
    const s = await this.session("t5_encoder");
    const length = embeds.dims[1]!;
    const positions = Array.from({ length }, (_, i) => i);
    return s.run({
      inputs_embeds: embeds,
      attention_mask: tensor.i64(attentionMask.flat(), [attentionMask.length, length]),
      position_buckets: tensor.i64(relativePositionBuckets(this.t5, positions, positions, true), [length, length]),
    });
  }

  /**
   * T5's decoder cache for the encoder's output (one row per input), `rows` decoding rows (a
   * multiple of the inputs: beams and samples of an input are adjacent rows) and `capacity` new
   * positions: it holds every layer's cross-attention keys/values (`cross.{i}.key`), computed here
   * once per input.
   */
  async t5Cache(encoderHidden: ort.Tensor, capacity: number, rows = encoderHidden.dims[0]!): Promise<CacheHandle> {
    if (rows % encoderHidden.dims[0]! !== 0) throw new Blip2Error(`internal: ${rows} decoding rows for ${encoderHidden.dims[0]} inputs`);
    const cache = await this.newCache(rows, capacity);
    await (await this.session("t5_cross")).runIntoCache({ encoder_hidden_states: encoderHidden }, cache);
    return cache;
  }

  /**
   * T5 decoder over new tokens after those in `cache` (which receives their keys and values, and
   * holds the cross-attention ones). `encoderMask` has a row per input, `decoderInputIds` per
   * decoding row.
   */
  async t5Decode(decoderInputIds: number[][], encoderMask: number[][], cache: CacheHandle): Promise<Tensors> {
    const s = await this.session("t5_decoder");
    const length = decoderInputIds[0]!.length;
    // Slot j of the cache holds position j; the new tokens follow the filled slots.
    const queries = Array.from({ length }, (_, i) => cache.length + i);
    const keys = [...Array.from({ length: cache.fedSlots }, (_, j) => j), ...queries];
    const mask = decoderInputIds.map((row) => row.map(() => 1));
    const feeds = {
      decoder_input_ids: tensor.i64(decoderInputIds.flat(), [decoderInputIds.length, length]),
      position_buckets: tensor.i64(relativePositionBuckets(this.t5, queries, keys, false), [length, keys.length]),
      encoder_attention_mask: tensor.i64(encoderMask.flat(), [encoderMask.length, encoderMask[0]!.length]),
      logits_positions: logitsPositions(length, false),
    };
    return s.run(feeds, { cache, mask });
  }

  /**
   * One pass of the language model over whole prompts and their images' projected queries, without
   * generating: OPT over them; T5's encoder over them, then its decoder over `decoderInputIds`
   * (default: the start token). The cache holds this pass only. T5's outputs include the encoder's.
   */
  async forward(inputIds: number[][], attentionMask: number[][], languageModelInputs: ort.Tensor, options: { decoderInputIds?: number[][]; lastOnly?: boolean } = {}): Promise<Tensors> {
    if (this.config.text.modelType === "opt") {
      const prompt = this.optPrompt(inputIds, attentionMask, languageModelInputs);
      return this.optDecode(prompt, await this.newCache(prompt.ids.length, prompt.ids[0]!.length), options.lastOnly);
    }
    const { embeds, mask } = await this.inputsEmbeds(inputIds, attentionMask, languageModelInputs);
    const encoder = await this.t5Encode(embeds, mask);
    const ids = options.decoderInputIds ?? mask.map(() => [this.t5.decoderStartTokenId]);
    return { ...encoder, ...(await this.t5Decode(ids, mask, await this.t5Cache(encoder.last_hidden_state!, ids[0]!.length))) };
  }

  release(): Promise<void> {
    return this.sessions.release();
  }
}

/**
 * The most new keys/values one OPT pass returns: 4 rows of 64 positions of OPT-2.7B (a batch of
 * captions or questions) run together, a long chat context of one row alone.
 */
const PROMPT_KEY_VALUE_BYTES = 192 * 2 ** 20;

/** How many rows of `length` new positions one OPT pass takes (at least one). */
export function promptRowsPerRun(cfg: Pick<OptConfig, "numHiddenLayers" | "hiddenSize">, length: number): number {
  const bytesPerRow = length * cfg.numHiddenLayers * 2 * cfg.hiddenSize * Float32Array.BYTES_PER_ELEMENT;
  return Math.max(1, Math.floor(PROMPT_KEY_VALUE_BYTES / bytesPerRow));
}

function logitsPositions(length: number, lastOnly: boolean): ort.Tensor {
  return lastOnly ? tensor.i64([length - 1], [1]) : tensor.i64(Array.from({ length }, (_, i) => i), [length]);
}
