/**
 * Blip2ForConditionalGeneration: the public model class, as transformers / transformers.js users
 * know it: `fromPretrained(src)`, `generate({...inputs, ...options})`, plus a token stream.
 */
import type * as ort from "onnxruntime-node";
import { ArchitectureError, Blip2Error } from "../errors.js";
import { generateIds, type GenerateInputs } from "../generation/generate.js";
import { generationDefaults, resolveGeneration, type GenerationOptions } from "../generation/options.js";
import { checkPromptLength } from "../generation/limits.js";
import type { ResolvedGeneration } from "../generation/options.js";
import { RollingBatch } from "../generation/rolling.js";
import type { SearchResult } from "../generation/search.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { Blip2Runtime } from "../runtime/blip2Runtime.js";
import { loadCheckpoint, runtimeOptions, type ModelLoadOptions } from "./load.js";

export type { ModelLoadOptions };

export interface GenerateArgs extends GenerateInputs, GenerationOptions {
  /** Called after each step with the new token of every row (greedy and sampling). */
  onToken?: (tokens: number[], finished: boolean[]) => void | Promise<void>;
  /** Stops the generation at its next step (its cache is freed); the call then rejects with the signal's reason. */
  signal?: AbortSignal;
}

export class Blip2ForConditionalGeneration {
  private readonly defaults: ReturnType<typeof generationDefaults>;

  private constructor(
    readonly checkpoint: Checkpoint,
    private readonly runtime: Blip2Runtime,
  ) {
    this.defaults = generationDefaults(checkpoint.json("generation_config.json"), checkpoint.file("generation_config.json"));
  }

  /** Load from a local folder or a Hub model id ("Salesforce/blip2-opt-2.7b"). */
  static async fromPretrained(src: string, options: ModelLoadOptions = {}): Promise<Blip2ForConditionalGeneration> {
    const checkpoint = await loadCheckpoint(src, options);
    if (checkpoint.config.architectures.includes("Blip2ForImageTextRetrieval")) {
      throw new ArchitectureError(`${src}: is an image-text retrieval checkpoint (Blip2ForImageTextRetrieval); load it with Blip2ForImageTextRetrieval`, "Blip2ForImageTextRetrieval");
    }
    return new Blip2ForConditionalGeneration(checkpoint, new Blip2Runtime(checkpoint, runtimeOptions(options)));
  }

  get config() {
    return this.checkpoint.config;
  }

  /**
   * Generated ids per prompt (per returned sequence): for OPT the prompt ids followed by the new
   * tokens, for T5 the decoder start token followed by the new tokens (transformers 5 convention).
   */
  async generate(args: GenerateArgs): Promise<number[][]> {
    return (await this.generateWithScores(args)).sequences;
  }

  /** Like `generate`, also returning beam scores (beam search). */
  async generateWithScores(args: GenerateArgs): Promise<SearchResult> {
    const g = this.generationConfig(args);
    this.checkInputs(args, g.maxNewTokens);
    return generateIds(this.runtime, args, g, { onToken: args.onToken, signal: args.signal });
  }

  /** The options a generation with `options` runs with: these over the checkpoint's generation_config.json. */
  generationConfig(options: GenerationOptions): ResolvedGeneration {
    return resolveGeneration(options, this.defaults, this.config);
  }

  /**
   * The new tokens as they are generated: one array per step with a token per prompt. Leaving the
   * loop early (`break`, `return`, an exception) or aborting `args.signal` stops the generation
   * and frees its cache before the loop is left; an error of the generation is thrown to the loop.
   */
  async *stream(args: GenerateArgs): AsyncGenerator<number[]> {
    const g = this.generationConfig(args);
    if (g.numBeams > 1) throw new Blip2Error("streaming works with greedy search and sampling, not beam search (numBeams > 1)");
    this.checkInputs(args, g.maxNewTokens);
    const stop = new AbortController();
    const signal = args.signal ? AbortSignal.any([args.signal, stop.signal]) : stop.signal;
    const queue: number[][] = [];
    let wake: (() => void) | null = null;
    let done = false;
    const push = (tokens: number[]) => {
      queue.push(tokens);
      wake?.();
    };
    const generation = generateIds(this.runtime, args, g, { onToken: (t) => push(t), signal }).finally(() => {
      done = true;
      wake?.();
    });
    // Observed here so that a failure while the consumer is away is not reported as unhandled; it
    // is thrown below (or from the finally block when the consumer left early).
    generation.catch(() => undefined);
    try {
      while (true) {
        if (queue.length) {
          yield queue.shift()!;
          continue;
        }
        if (done) break;
        await new Promise<void>((resolve) => (wake = resolve));
        wake = null;
      }
    } finally {
      // A consumer that left early stops the generation at its next step. Either way the cache is
      // freed before the loop is left, and a failure of the generation is thrown (the stop is none).
      if (!done) stop.abort();
      await generation.catch((err) => {
        if (!(stop.signal.aborted && err === stop.signal.reason)) throw err;
      });
    }
  }

  /**
   * A decoding batch that requests join and leave between its steps (greedy search, OPT): see
   * generation/rolling.ts. The server decodes concurrent requests with it.
   */
  rollingBatch(): RollingBatch {
    return new RollingBatch(this.runtime);
  }

  /** The image's projected queries [B, Q, D], to reuse across several prompts about the same image. */
  async imageFeatures(pixelValues: Float32Array, batch: number): Promise<ort.Tensor> {
    return (await this.runtime.image(pixelValues, batch)).language_model_inputs!;
  }

  private checkInputs(args: GenerateInputs, maxNewTokens: number): void {
    const width = args.inputIds[0]?.length;
    if (!args.inputIds.length || width === undefined) throw new Blip2Error("generate needs inputIds (use Blip2Processor to prepare them)");
    if (args.inputIds.some((r) => r.length !== width) || args.attentionMask.length !== args.inputIds.length || args.attentionMask.some((r) => r.length !== width)) {
      throw new Blip2Error("generate: inputIds and attentionMask must be rectangular and of the same shape (pad the batch)");
    }
    checkPromptLength(this.config, width, maxNewTokens);
  }

  /** Creates every ONNX Runtime session now instead of on first use (e.g. before serving requests). */
  prepare(): Promise<void> {
    return this.runtime.prepare();
  }

  /** Frees the ONNX Runtime sessions. */
  dispose(): Promise<void> {
    return this.runtime.release();
  }
}

