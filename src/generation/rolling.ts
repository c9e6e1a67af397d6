/**
 * Continuous batching of OPT's greedy decoding: one key/value cache whose rows come and go.
 *
 * A request joins with its prompt's ids and its image's projected queries (or their promise: the
 * vision encoder runs as the request arrives, beside the batch's decoding). At the first step after
 * they are there, its prompt runs alone into a cache of its own, which gives its first token; that
 * cache then becomes a row of the batch's, its slots right-aligned with the others' and masked
 * slots before them (left padding). OPT counts positions from the attention mask (see models/opt.ts),
 * so padding moves none of a row's positions. Each step then runs the language model once over
 * every row's last token. A row ends at an end token, at its `maxNewTokens`, when its caller's
 * `done` says so (a stop string) or when its signal aborts: its promise settles at once, and the
 * next step's cache is made without it (and without the padding no row needs any more).
 *
 * Each row keeps its own options and token history, so its tokens are those `generate` gives for
 * its prompt alone (the logits processors see its own prompt, unpadded). Greedy only: a sampled row
 * would draw from logits that differ from its lone run's in the last bits with its neighbours. OPT
 * only: T5's decoder takes the self-attention positions of the batch's slots (one set of relative
 * buckets for all rows), so its rows cannot start at different steps.
 */
import type * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import type { Blip2Runtime } from "../runtime/blip2Runtime.js";
import { CacheHandle } from "../runtime/session.js";
import { checkPromptLength } from "./limits.js";
import { argmax, logitsProcessors, type Processor } from "./logits.js";
import type { ResolvedGeneration } from "./options.js";

/** What a row's prompt pass needs. */
export interface RowInputs {
  /** The prompt's ids, unpadded (Blip2Processor's for this prompt alone). */
  inputIds: number[];
  /** The image's projected queries, [1, Q, D]. */
  image: ort.Tensor;
}

export interface RollingRequest {
  /** Its inputs, or their promise: the row joins at the first step after they are there. */
  inputs: RowInputs | Promise<RowInputs>;
  /** Greedy search: no sampling, one beam, one sequence. */
  generation: ResolvedGeneration;
  /** Each new token as it is chosen; `end` when it is an end token. */
  onToken?: (token: number, end: boolean) => void;
  /** Asked after each token: true ends the row there (its text reached a stop string). */
  done?: () => boolean;
  /** Once aborted, the row leaves at the next step and its promise rejects with the reason. */
  signal?: AbortSignal;
}

export interface RollingResult {
  /** The prompt's ids followed by the new tokens, as `generate` gives them for this prompt alone. */
  sequence: number[];
  /** eos: an end token; length: `maxNewTokens` tokens; done: its `done` said so. */
  reason: "eos" | "length" | "done";
  /** The most rows that decoded together while it ran, itself included. */
  peakRows: number;
}

interface Row {
  request: RollingRequest;
  g: ResolvedGeneration;
  inputs: RowInputs | null;
  /** Set when its inputs failed to come: it leaves with this error at the next step. */
  failure: { error: unknown } | null;
  /** Settles when its inputs are there (or failed). */
  ready: Promise<void>;
  processors: Processor[];
  /** Its prompt's ids, then each new token. */
  sequence: number[];
  generated: number;
  /** Slots its keys fill: its prompt's positions and the tokens fed since. */
  filled: number;
  /** A cache of its own, from its prompt's pass, until it becomes a row of the batch's. */
  cache: CacheHandle | null;
  /** Its row in the batch's cache. */
  index: number;
  peakRows: number;
  left: boolean;
  resolve(result: RollingResult): void;
  reject(err: unknown): void;
}

export class RollingBatch {
  /** Rows in the batch's cache (those that left are dropped when it is next made), then rows whose prompt ran but that are not in it yet. */
  private rows: Row[] = [];
  /** Rows that joined and wait for the next step, in order. */
  private joining: Row[] = [];
  private cache: CacheHandle | null = null;
  /** Whether rows left or came since the cache was made: it is made again before the next run. */
  private changed = false;
  private prepared: Promise<void> | null = null;

  constructor(private readonly rt: Blip2Runtime) {
    if (rt.config.text.modelType !== "opt") throw new Blip2Error("continuous batching decodes OPT checkpoints only: T5's decoder positions are its cache's slots, shared by every row");
  }

  /** Rows decoding or waiting to join, without those that left (or whose signal aborted: they leave at the next step). */
  get size(): number {
    return [...this.rows, ...this.joining].filter((r) => !r.left && !r.request.signal?.aborted).length;
  }

  /** Adds a row, which joins at the next step once its inputs are there; settles when it ends. */
  join(request: RollingRequest): Promise<RollingResult> {
    return new Promise((resolve, reject) => {
      const g = request.generation;
      if (g.doSample || g.numBeams !== 1 || g.numReturnSequences !== 1) throw new Blip2Error("continuous batching runs greedy search only (no sampling, one beam, one sequence)");
      const row: Row = {
        request,
        g,
        inputs: null,
        failure: null,
        ready: Promise.resolve(),
        processors: [],
        sequence: [],
        generated: 0,
        filled: 0,
        cache: null,
        index: -1,
        peakRows: 1,
        left: false,
        resolve,
        reject,
      };
      row.ready = Promise.resolve(request.inputs).then(
        (inputs) => void (row.inputs = inputs),
        (error) => void (row.failure = { error }),
      );
      this.joining.push(row);
    });
  }

  /**
   * One step: rows whose signal aborted leave; rows whose inputs are there join (their prompt runs
   * alone and gives their first token); then one run of the language model gives every row of the
   * batch its next token. With no row decoding, it waits for the first joining row's inputs.
   */
  async step(): Promise<void> {
    try {
      this.prepared ??= this.rt.prepare();
      await this.prepared;
      this.leaveAborted();
      const waiting = this.joining.filter((r) => !r.left);
      if (!this.rows.some((r) => !r.left) && waiting.length && !waiting.some(isReady)) await Promise.race(waiting.map((r) => r.ready));
      this.leaveAborted();
      await this.admit();
      if (this.changed) await this.recompose();
      if (!this.rows.length) return;
      const tokens = this.rows.map((r) => r.sequence[r.sequence.length - 1]!);
      const logits = (await this.rt.optDecode(this.rt.optStep(tokens), this.cache!, true)).logits!.data as Float32Array;
      const vocab = this.rt.config.text.vocabSize;
      this.rows.forEach((row, i) => {
        row.filled++;
        row.peakRows = Math.max(row.peakRows, this.rows.length);
        this.choose(row, logits.slice(i * vocab, (i + 1) * vocab));
      });
    } catch (err) {
      await this.fail(err);
      throw err;
    }
  }

  /** Frees the batch's cache; rows still in it reject (the batch is closed with them). */
  async close(): Promise<void> {
    await this.fail(new Blip2Error("the decoding batch was closed"));
  }

  /** The rows whose inputs are there run their prompts, each alone into a cache of its own. */
  private async admit(): Promise<void> {
    const ready = this.joining.filter(isReady);
    this.joining = this.joining.filter((r) => !isReady(r));
    for (const row of ready) {
      if (row.left) continue;
      if (row.failure) {
        this.end(row, null, row.failure.error);
        continue;
      }
      const { inputIds, image } = row.inputs!;
      try {
        checkPromptLength(this.rt.config, inputIds.length, row.g.maxNewTokens);
      } catch (err) {
        this.end(row, null, err);
        continue;
      }
      row.sequence = [...inputIds];
      row.processors = logitsProcessors(row.g, inputIds.length);
      const prompt = this.rt.optPrompt([inputIds], [inputIds.map(() => 1)], image);
      row.filled = prompt.ids[0]!.length;
      // Rows only join a batch once their cache is in: until then the batch's failure frees it.
      this.rows.push(row);
      row.cache = await this.rt.newCache(1, row.filled);
      const logits = (await this.rt.optDecode(prompt, row.cache, true)).logits!.data as Float32Array;
      this.changed = true;
      this.choose(row, logits.slice());
    }
  }

  /** The row's next token (greedy, after its logits processors); ends the row when it should. */
  private choose(row: Row, scores: Float32Array): void {
    for (const p of row.processors) p(scores, row.sequence);
    const token = argmax(scores);
    row.sequence.push(token);
    row.generated++;
    const eos = row.g.eosTokenIds.includes(token);
    row.request.onToken?.(token, eos);
    if (eos) this.end(row, "eos");
    else if (row.generated >= row.g.maxNewTokens) this.end(row, "length");
    else if (row.request.done?.()) this.end(row, "done");
  }

  /** The row leaves the batch: its promise settles now, its slots go when the cache is next made. */
  private end(row: Row, reason: RollingResult["reason"] | null, error?: unknown): void {
    if (row.left) return;
    row.left = true;
    this.changed = true;
    if (reason) row.resolve({ sequence: row.sequence, reason, peakRows: row.peakRows });
    else row.reject(error);
  }

  private leaveAborted(): void {
    for (const row of [...this.rows, ...this.joining]) {
      const signal = row.request.signal;
      if (signal?.aborted) this.end(row, null, signal.reason);
    }
  }

  /**
   * Makes the batch's cache of the rows that stay: right-aligned at the longest row's filled
   * slots, with room for the most steps any row may still take. The caches it is made of go.
   */
  private async recompose(): Promise<void> {
    const old = this.cache;
    const staying = this.rows.filter((r) => !r.left);
    const gone = [old, ...this.rows.filter((r) => r.cache).map((r) => r.cache)];
    this.cache = null;
    if (staying.length) {
      const length = Math.max(...staying.map((r) => r.filled));
      const capacity = length + Math.max(...staying.map((r) => r.g.maxNewTokens - r.generated));
      const parts = staying.map((r) => (r.cache ? { cache: r.cache, row: 0, shift: length - r.filled } : { cache: old!, row: r.index, shift: length - old!.length }));
      this.cache = await CacheHandle.compose(parts, capacity, length);
    }
    this.rows = staying;
    staying.forEach((r, i) => {
      r.index = i;
      r.cache = null;
    });
    this.changed = false;
    await Promise.all(gone.map((c) => c?.drop()));
  }

  /** Every row rejects with `err` (those not ended yet) and every cache is freed. */
  private async fail(err: unknown): Promise<void> {
    const caches = [this.cache, ...this.rows.map((r) => r.cache)];
    for (const row of [...this.rows, ...this.joining]) this.end(row, null, err);
    this.rows = [];
    this.joining = [];
    this.cache = null;
    this.changed = false;
    await Promise.all(caches.map((c) => c?.drop().catch(() => undefined)));
  }
}

const isReady = (row: Row) => row.inputs !== null || row.failure !== null;
