/**
 * Generations as the server runs them: greedy OPT generations as rows of a running batch that
 * requests join and leave between steps (generation/rolling.ts), others (sampling, beams, T5) as a
 * batch of (image, prompt) rows decoded together with the same options. Each row's text is
 * streamed as it grows and cut at its stop strings. A row's result is what `Blip2.captionAll`
 * gives for it (same ids, same words), so the server answers as the CLI.
 */
import type * as ort from "onnxruntime-node";
import type { Blip2 } from "../api/tasks.js";
import type { GenerationOptions } from "../generation/options.js";
import type { RollingBatch, RollingResult } from "../generation/rolling.js";
import type { RawImage } from "../image/decode.js";
import { tensor } from "../runtime/session.js";
import { wholeBatches, type BatchRunner, type Batching, type RunningBatch } from "./scheduler.js";

export interface GenItem {
  image: RawImage;
  /** The text the generation continues ("" for a zero-shot caption). */
  prompt: string;
  options: GenerationOptions;
  /** Each new piece of the answer's text, as it is generated. */
  onText?: (delta: string) => void;
  /** The answer ends before the first of these it contains. */
  stop?: string[];
  /** Its prompt's ids and image's projected queries, started as it is queued (see `prepare`). */
  prepared?: Promise<Prepared>;
}

/** A request's prompt ids (alone, unpadded) and its image's projected queries [1, Q, D]. */
export interface Prepared {
  inputIds: number[];
  features: ort.Tensor;
}

export interface GenResult {
  /** The generated words, trimmed (the CLI's caption / answer). */
  text: string;
  /** The generated sequence as `generate` returns it (prompt ids first, for OPT). */
  ids: number[];
  finishReason: "stop" | "length";
  promptTokens: number;
  completionTokens: number;
  /** Rows decoded together, this one included (the most while it ran). */
  batchSize: number;
  runMs: number;
}

/** The batch key of greedy OPT generations: one running batch takes them all, each row with its own options. */
const ROLLING = "rolling";

/**
 * The key under which generations may share a batch, or null when one must run alone: sampling
 * (a seeded sample must not depend on its neighbours). Greedy OPT generations join one running
 * batch whatever their options (each row keeps its own); beam search and T5 batch with the same
 * options, and where the repetition rules look at the whole sequence, prompts of the same length
 * (the left padding would be part of what they see).
 */
export function batchKey(blip2: Blip2, options: GenerationOptions, promptTokens: number): string | null {
  const g = blip2.model.generationConfig(options);
  if (g.doSample || g.numReturnSequences !== 1) return null;
  if (blip2.model.config.text.modelType === "opt" && g.numBeams === 1) return ROLLING;
  const lengthMatters = g.repetitionPenalty !== 1 || g.noRepeatNgramSize > 0;
  return JSON.stringify({ ...g, seed: 0, promptTokens: lengthMatters ? promptTokens : undefined });
}

/**
 * Starts a request's work that need not wait for its turn: its prompt's ids, and its image through
 * the vision encoder (which runs in a worker of its own, beside the batch's decoding). Once only.
 */
export function prepare(blip2: Blip2, item: GenItem): Promise<Prepared> {
  if (!item.prepared) {
    item.prepared = (async () => {
      const inputIds = blip2.processor.tokenize([item.prompt]).inputIds[0]!;
      const { pixelValues } = await blip2.processor.imageProcessor.preprocess([item.image]);
      return { inputIds, features: await blip2.model.imageFeatures(pixelValues, 1) };
    })();
    // A request that leaves before its turn never reads it: its failure is not unhandled.
    item.prepared.catch(() => undefined);
  }
  return item.prepared;
}

/** How the server's scheduler runs generations on `blip2`: see batchKey. */
export function generationBatching(blip2: Blip2): Batching<GenItem, GenResult> {
  const whole = wholeBatches(generationRunner(blip2));
  return {
    arrive: (item) => void prepare(blip2, item),
    open: (key) => (key === ROLLING ? new RollingGenerations(blip2) : whole.open(key)),
  };
}

/** Greedy OPT generations as rows of one RollingBatch. */
class RollingGenerations implements RunningBatch<GenItem, GenResult> {
  readonly open = true;
  private readonly rows: RollingBatch;

  constructor(private readonly blip2: Blip2) {
    this.rows = blip2.model.rollingBatch();
  }

  get size(): number {
    return this.rows.size;
  }

  async join(item: GenItem, signal: AbortSignal): Promise<GenResult> {
    const started = performance.now();
    const stream = new TextStream(this.blip2, item);
    const prepared = prepare(this.blip2, item);
    const result = await this.rows.join({
      inputs: prepared.then((p) => ({ inputIds: p.inputIds, image: p.features })),
      generation: this.blip2.model.generationConfig(item.options),
      signal,
      onToken: (token, end) => stream.push(token, end),
      done: () => stream.done !== null,
    });
    return rowResult(this.blip2, item, stream, result, (await prepared).inputIds.length, performance.now() - started);
  }

  step(): Promise<void> {
    return this.rows.step();
  }

  close(): Promise<void> {
    return this.rows.close();
  }
}

/** A row's answer from its sequence: its words (cut at a stop string), why it ended, its counts. */
function rowResult(blip2: Blip2, item: GenItem, stream: TextStream, r: RollingResult, promptTokens: number, runMs: number): GenResult {
  const fresh = r.sequence.slice(promptTokens);
  let text: string;
  let stopped = r.reason !== "length";
  if (r.reason === "done") {
    text = stream.text.trimEnd();
  } else {
    const caption = blip2.result(r.sequence, r.sequence.slice(0, promptTokens)).caption;
    const cut = firstStop(caption, item.stop);
    text = cut >= 0 ? caption.slice(0, cut).trimEnd() : caption;
    stopped ||= cut >= 0;
  }
  stream.emit(text);
  return { text, ids: r.sequence, finishReason: stopped ? "stop" : "length", promptTokens, completionTokens: fresh.length, batchSize: r.peakRows, runMs };
}

/** One row's new tokens and text, as they come, streamed to `item.onText` without the bits that may still change. */
export class TextStream {
  readonly fresh: number[] = [];
  /** Text already sent through onText. */
  private sent = "";
  done: "stop" | "length" | null = null;
  text = "";

  constructor(
    private readonly blip2: Blip2,
    private readonly item: Pick<GenItem, "onText" | "stop">,
  ) {}

  push(token: number, finished: boolean): void {
    if (this.done) return;
    this.fresh.push(token);
    if (finished) this.done = "stop";
    const decoded = this.blip2.processor.decode(this.fresh, { skipSpecialTokens: true }).trimStart();
    const cut = firstStop(decoded, this.item.stop);
    if (cut >= 0) this.done = "stop";
    this.text = cut >= 0 ? decoded.slice(0, cut) : decoded;
    this.emit(this.done ? this.text.trimEnd() : this.settled(this.text));
  }

  /**
   * The part of `text` that cannot change with the next token: without trailing whitespace (the
   * final text is trimmed), an incomplete UTF-8 character, or the start of a stop string.
   */
  private settled(text: string): string {
    let end = text.replace(/[\s\uFFFD]+$/u, "").length;
    for (const s of this.item.stop ?? []) {
      for (let n = Math.min(s.length - 1, end); n > 0; n--) {
        if (text.slice(end - n, end) === s.slice(0, n)) {
          end -= n;
          break;
        }
      }
    }
    return text.slice(0, end);
  }

  emit(upTo: string): void {
    if (!this.item.onText || upTo.length <= this.sent.length || !upTo.startsWith(this.sent)) return;
    this.item.onText(upTo.slice(this.sent.length));
    this.sent = upTo;
  }
}

function firstStop(text: string, stop: string[] | undefined): number {
  let at = -1;
  for (const s of stop ?? []) {
    const i = s ? text.indexOf(s) : -1;
    if (i >= 0 && (at < 0 || i < at)) at = i;
  }
  return at;
}

/** Runs batches of generations on `blip2` that decode together from start to end (see GenItem). */
export function generationRunner(blip2: Blip2): BatchRunner<GenItem, GenResult> {
  return async (items, signal) => {
    const started = performance.now();
    const prepared = await Promise.all(items.map((item) => prepare(blip2, item)));
    const inputs = blip2.processor.tokenize(items.map((i) => i.prompt), "left");
    const rows = items.map((item) => new TextStream(blip2, item));
    // Rows cut by a stop string need no more tokens: when all are, the generation stops.
    const cut = new AbortController();
    const options = { ...items[0]!.options, numReturnSequences: 1 };
    const g = blip2.model.generationConfig(options);
    let sequences: number[][] | null = null;
    try {
      sequences = await blip2.model.generate({
        ...options,
        imageFeatures: joinFeatures(prepared.map((p) => p.features)),
        inputIds: inputs.inputIds,
        attentionMask: inputs.attentionMask,
        signal: AbortSignal.any([signal, cut.signal]),
        onToken: g.numBeams > 1 ? undefined : (tokens, finished) => {
          tokens.forEach((t, i) => rows[i]!.push(t, finished[i]!));
          if (rows.every((r) => r.done)) cut.abort();
        },
      });
    } catch (err) {
      if (!cut.signal.aborted || signal.aborted) throw err;
    }
    const runMs = performance.now() - started;
    return rows.map((row, i) => {
      const promptIds = inputs.inputIds[i]!;
      const promptTokens = inputs.attentionMask[i]!.reduce((a, b) => a + b, 0);
      const common = { promptTokens, batchSize: items.length, runMs };
      const full = sequences?.[i];
      if (!full) {
        // Every row was cut by a stop string before the generation ended: the tokens up to the cut.
        const ids = blip2.model.config.text.modelType === "opt" ? [...promptIds, ...row.fresh] : [g.decoderStartTokenId, ...row.fresh];
        const text = row.text.trimEnd();
        row.emit(text);
        return { ...common, text, ids, finishReason: "stop", completionTokens: row.fresh.length };
      }
      const { caption } = blip2.result(full, promptIds);
      // The ids as this prompt alone gives them: without the padding that the batch put in it.
      const ids = [...promptIds.filter((_, j) => inputs.attentionMask[i]![j]), ...full.slice(promptIds.length)];
      const stopped = firstStop(caption, items[i]!.stop);
      const text = stopped >= 0 ? caption.slice(0, stopped).trimEnd() : caption;
      const [completionTokens, ended] = countNew(full, promptIds.length, g.eosTokenIds, blip2.model.config.text.modelType === "opt");
      row.emit(text);
      return { ...common, text, ids: blip2.model.config.text.modelType === "opt" ? ids : full, finishReason: stopped >= 0 || ended ? "stop" : "length", completionTokens };
    });
  };
}

/** New tokens of a generated sequence up to and including its end token (the pads after it are not), and whether it has one. */
function countNew(ids: number[], promptLength: number, eos: number[], opt: boolean): [number, boolean] {
  const fresh = opt ? ids.slice(promptLength) : ids.slice(1);
  const end = fresh.findIndex((t) => eos.includes(t));
  return end >= 0 ? [end + 1, true] : [fresh.length, false];
}

/** Images' projected queries [1, Q, D] each, as one [B, Q, D] tensor. */
function joinFeatures(features: ort.Tensor[]): ort.Tensor {
  if (features.length === 1) return features[0]!;
  const [, q, d] = features[0]!.dims as [number, number, number];
  const out = new Float32Array(features.length * q * d);
  features.forEach((f, i) => out.set(f.data as Float32Array, i * q * d));
  return tensor.f32(out, [features.length, q, d]);
}
