/**
 * The tasks of the BLIP-2 demo in one call each: zero-shot and prompted captioning, visual question
 * answering, multi-turn chat kept inside the language model's context window, and an
 * `image-to-text` pipeline as transformers.js offers it.
 */
import type * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import type { KeptCache } from "../generation/generate.js";
import type { GenerationOptions } from "../generation/options.js";
import { languageModelPositions } from "../generation/limits.js";
import type { ImageInput } from "../image/decode.js";
import { Blip2Processor } from "../processor.js";
import { Blip2ForConditionalGeneration, type ModelLoadOptions } from "./conditionalGeneration.js";

export interface CaptionOptions extends GenerationOptions {
  /** Text the caption continues, e.g. "this is a cartoon of" (default: none). */
  prompt?: string;
  onToken?: (tokens: number[], finished: boolean[]) => void | Promise<void>;
}

export interface CaptionResult {
  /** What `generate` returned (see Blip2ForConditionalGeneration.generate). */
  ids: number[];
  /** transformers' decode of `ids` with special tokens skipped (includes an OPT prompt). */
  text: string;
  /** The generated words only, trimmed. */
  caption: string;
}

/** The Visual Question Answering prompt of the BLIP-2 paper and demo. */
export const vqaPrompt = (question: string) => `Question: ${question} Answer:`;

export class Blip2 {
  constructor(
    readonly processor: Blip2Processor,
    readonly model: Blip2ForConditionalGeneration,
  ) {}

  static async load(src: string, options: ModelLoadOptions = {}): Promise<Blip2> {
    const model = await Blip2ForConditionalGeneration.fromPretrained(src, options);
    // Photos are shown upright, as transformers' pipelines (load_image) show them.
    return new Blip2(await Blip2Processor.fromDirectory(model.checkpoint.dir, model.config, { ...options, exifOrientation: options.exifOrientation ?? true }), model);
  }

  /** Caption one image (zero-shot, or continuing `options.prompt`). */
  async caption(image: ImageInput, options: CaptionOptions = {}): Promise<string> {
    return (await this.captionAll([image], options))[0]!.caption;
  }

  /** Caption several images in one batch (one result per returned sequence). */
  async captionAll(images: ImageInput[], options: CaptionOptions = {}): Promise<CaptionResult[]> {
    const inputs = await this.processor.process({ images, text: options.prompt ?? "", paddingSide: "left" });
    const ids = await this.model.generate({ ...options, pixelValues: inputs.pixelValues, inputIds: inputs.inputIds, attentionMask: inputs.attentionMask });
    const perPrompt = ids.length / inputs.inputIds.length;
    return ids.map((seq, i) => this.result(seq, inputs.inputIds[Math.floor(i / perPrompt)]!));
  }

  /** Answer a question about an image (the prompt `Question: {q} Answer:`). */
  async ask(image: ImageInput, question: string, options: GenerationOptions & Pick<CaptionOptions, "onToken"> = {}): Promise<string> {
    return this.caption(image, { ...options, prompt: vqaPrompt(question) });
  }

  /** A conversation about one image. */
  async chat(image: ImageInput, options: ChatOptions = {}): Promise<Chat> {
    const { pixelValues } = await this.processor.imageProcessor.preprocess([image]);
    return new Chat(this, await this.model.imageFeatures(pixelValues, 1), options);
  }

  /** The new words of a generated sequence, decoded. */
  result(ids: number[], promptIds: number[]): CaptionResult {
    const text = this.processor.decode(ids, { skipSpecialTokens: true });
    const fresh = this.model.config.text.modelType === "opt" ? ids.slice(promptIds.length) : ids;
    return { ids, text, caption: this.processor.decode(fresh, { skipSpecialTokens: true }).trim() };
  }

  dispose(): Promise<void> {
    return this.model.dispose();
  }
}

export interface ChatOptions {
  /** Tokens the language model may see: image tokens + prompt + tokens to generate (default 512, or the model's positions if fewer; at most those). */
  contextWindow?: number;
  /** Told, when a turn drops more of the oldest turns to fit the window, how many are now left out. */
  onDrop?: (droppedTurns: number) => void;
  /**
   * When turns must be dropped, drop the oldest until the prompt and the tokens to generate take at
   * most this share of the window (default 1: only what must go). Dropped turns stay out, so a lower
   * share lets the next turns fit without dropping again: with OPT, a turn that drops runs its whole
   * context again, where one that only adds runs its new positions (docs/performance.md gives the times).
   * The model then sees fewer of the earlier turns.
   */
  dropTo?: number;
  /**
   * Keep the language model's key/value cache from one turn to the next (OPT; default true): a
   * turn then runs only the positions after those its prompt shares with the last one (the image
   * and the earlier turns, unless some were dropped), not the whole context.
   */
  keepCache?: boolean;
}

export interface Turn {
  question: string;
  answer: string;
}

export interface ChatReply {
  answer: string;
  /** Oldest turns left out of this prompt to stay within the window. */
  droppedTurns: number;
}

/**
 * Multi-turn VQA as in the BLIP-2 demo: the prompt is the earlier turns as
 * `Question: {q} Answer: {a}.` followed by ` Question: {q} Answer:`. When the prompt, the image
 * tokens and the tokens to generate would exceed the window, the oldest turns are dropped (and
 * reported); a question that cannot fit even alone is an error.
 */
export class Chat {
  readonly history: Turn[] = [];
  readonly contextWindow: number;
  /** See ChatOptions.dropTo. */
  private readonly dropTo: number;
  /** Turns before this one were dropped and stay out of the prompts. */
  private firstTurn = 0;
  private readonly kept: KeptCache = { handle: null, image: null, ids: [] };
  /** The turn being answered: questions are answered one after the other, in the order asked. */
  private turn: Promise<unknown> = Promise.resolve();
  private disposed = false;

  constructor(
    private readonly blip2: Blip2,
    private readonly imageFeatures: ort.Tensor,
    private readonly options: ChatOptions,
  ) {
    // The window never exceeds what the language model takes: a larger one would let a long
    // question through to a model that cannot run it (or to T5's attention, growing with its square).
    const positions = languageModelPositions(blip2.model.config);
    this.contextWindow = options.contextWindow ?? Math.min(512, positions);
    if (!(Number.isInteger(this.contextWindow) && this.contextWindow > 0 && this.contextWindow <= positions)) {
      throw new Blip2Error(`chat: the context window must be a whole number of tokens from 1 to the language model's ${positions} positions, got ${options.contextWindow}`);
    }
    this.dropTo = options.dropTo ?? 1;
    if (!(this.dropTo > 0 && this.dropTo <= 1)) throw new Blip2Error(`chat: dropTo must be a share of the window in (0, 1], got ${options.dropTo}`);
    keptCaches.register(this, this.kept, this);
  }

  /**
   * The prompt for `question` under the window, and how many old turns it leaves out: those dropped
   * before, and when it does not fit with them, the oldest until it fits in `dropTo` of the window
   * (or in the window, for a question too long for that share).
   */
  prompt(question: string, maxNewTokens: number): { text: string; inputIds: number[]; droppedTurns: number } {
    const processor = this.blip2.processor;
    // Legacy checkpoints put the queries in front of the text instead of image tokens: count them too.
    const extra = processor.numQueryTokens === null ? this.blip2.model.config.numQueryTokens : 0;
    const fits = (dropped: number, window: number) => {
      const text = [...this.history.slice(dropped).map((t) => `${vqaPrompt(t.question)} ${t.answer}.`), vqaPrompt(question)].join(" ");
      const inputIds = processor.tokenize([text]).inputIds[0]!;
      return inputIds.length + extra + maxNewTokens <= window ? { text, inputIds, droppedTurns: dropped } : null;
    };
    const kept = fits(this.firstTurn, this.contextWindow);
    if (kept) return kept;
    const share = Math.floor(this.dropTo * this.contextWindow);
    for (const window of share < this.contextWindow ? [share, this.contextWindow] : [this.contextWindow]) {
      for (let dropped = this.firstTurn + 1; dropped <= this.history.length; dropped++) {
        const prompt = fits(dropped, window);
        if (prompt) return prompt;
      }
    }
    const alone = processor.tokenize([vqaPrompt(question)]).inputIds[0]!.length + extra;
    throw new Blip2Error(`the question does not fit the ${this.contextWindow}-token window: ${alone} prompt tokens (image tokens included) + ${maxNewTokens} to generate`);
  }

  ask(question: string, options: GenerationOptions & Pick<CaptionOptions, "onToken"> = {}): Promise<ChatReply> {
    if (this.disposed) return Promise.reject(new Blip2Error("this chat was disposed: start another with blip2.chat(image)"));
    const reply = this.turn.then(() => this.answer(question, options));
    this.turn = reply.catch(() => undefined);
    return reply;
  }

  private async answer(question: string, options: GenerationOptions & Pick<CaptionOptions, "onToken">): Promise<ChatReply> {
    // As every generation: the option, else the checkpoint's generation_config.json, else 20.
    const maxNewTokens = this.blip2.model.generationConfig(options).maxNewTokens;
    const { inputIds, droppedTurns } = this.prompt(question, maxNewTokens);
    if (droppedTurns > this.firstTurn) this.options.onDrop?.(droppedTurns);
    this.firstTurn = droppedTurns;
    const keptCache = this.options.keepCache === false ? undefined : this.kept;
    const [ids] = await this.blip2.model.generate({ ...options, maxNewTokens, numReturnSequences: 1, imageFeatures: this.imageFeatures, inputIds: [inputIds], attentionMask: [inputIds.map(() => 1)], keptCache });
    const answer = this.blip2.result(ids!, inputIds).caption;
    this.history.push({ question, answer });
    return { answer, droppedTurns };
  }

  /** Forgets the turns (the kept cache stays: the next prompt still shares the image with it). */
  reset(): void {
    this.history.length = 0;
    this.firstTurn = 0;
  }

  /** Frees the kept key/value cache now (also done when the chat is garbage collected). */
  async dispose(): Promise<void> {
    this.disposed = true;
    keptCaches.unregister(this);
    await this.turn;
    await dropKept(this.kept);
  }
}

async function dropKept(kept: KeptCache): Promise<void> {
  const handle = kept.handle;
  kept.handle = null;
  await handle?.drop();
}

/** Drops the caches of chats that were let go without dispose (the cache lives beside the sessions, maybe in a worker). */
const keptCaches = new FinalizationRegistry<KeptCache>((kept) => void dropKept(kept).catch(() => undefined));

export type ImageToTextOutput = { generated_text: string }[];

export interface ImageToTextPipeline {
  (images: ImageInput, options?: CaptionOptions): Promise<ImageToTextOutput>;
  (images: ImageInput[], options?: CaptionOptions): Promise<ImageToTextOutput[]>;
  readonly blip2: Blip2;
  dispose(): Promise<void>;
}

/** transformers.js-style `pipeline("image-to-text", model)`: `[{ generated_text }]` per image. */
export async function pipeline(task: "image-to-text", src: string, options: ModelLoadOptions = {}): Promise<ImageToTextPipeline> {
  if (task !== "image-to-text") throw new Blip2Error(`pipeline: unsupported task ${JSON.stringify(task)} (supported: "image-to-text")`);
  const blip2 = await Blip2.load(src, options);
  const run = async (images: ImageInput | ImageInput[], opts: CaptionOptions = {}) => {
    const list = Array.isArray(images) ? images : [images];
    const results = await blip2.captionAll(list, opts);
    const perImage = results.length / list.length;
    const grouped = list.map((_, i) => results.slice(i * perImage, (i + 1) * perImage).map((r) => ({ generated_text: r.text })));
    return Array.isArray(images) ? grouped : grouped[0]!;
  };
  return Object.assign(run, { blip2, dispose: () => blip2.dispose() }) as ImageToTextPipeline;
}
