/**
 * Where ONNX Runtime sessions and the key/value caches they use live: in this thread, or in a
 * worker thread (runtime/sessionWorker.ts) so that long runs do not block the event loop. The
 * caches stay beside the sessions, so a decoding step sends only the new tokens' inputs and gets
 * back only its outputs.
 */
import * as ort from "onnxruntime-node";
import { Blip2Error, describeError } from "../errors.js";
import { CacheMemory, KvCache, rowView, type CacheShape, type RowPlacement } from "./kvCache.js";

/** A decoding step: the cache to attend to and extend, and the new positions' attention mask. */
export interface CacheStep {
  cache: number;
  mask: number[][];
  /**
   * Run `rows` rows at a time, the feeds named split by row (the others shared); the outputs are
   * joined again. For long prompts: ONNX Runtime's arena keeps a run's largest outputs, the new
   * keys/values.
   */
  chunks?: { rows: number; feeds: string[] };
}

/** The operations a host offers; ids are chosen by the caller. */
export class SessionHost {
  private readonly sessions = new Map<number, { name: string; session: ort.InferenceSession }>();
  private readonly caches = new Map<number, KvCache>();
  private readonly cacheMemory = new CacheMemory();

  async create(id: number, name: string, model: Uint8Array | string, options: ort.InferenceSession.SessionOptions): Promise<void> {
    try {
      const session = typeof model === "string" ? await ort.InferenceSession.create(model, options) : await ort.InferenceSession.create(model, options);
      this.sessions.set(id, { name, session });
    } catch (err) {
      throw new Blip2Error(`cannot create the ${name} session: ${describeError(err)}`);
    }
  }

  async run(id: number, feeds: Record<string, ort.Tensor>, step?: CacheStep): Promise<Record<string, ort.Tensor>> {
    if (!step) return this.runSession(id, feeds);
    const cache = this.cache(step.cache);
    const { mask, chunks } = step;
    const runRows = async (first: number, count: number) => {
      const rowMask = mask.slice(first, first + count);
      const outputs = await this.runSession(id, { ...feeds, ...rowFeeds(feeds, chunks?.feeds, first, count), ...cache.inputs(rowMask, first) });
      cache.write(outputs, rowMask, first);
      for (const key of Object.keys(outputs)) if (key.startsWith("new.")) delete outputs[key];
      return outputs;
    };
    const outputs = chunks && chunks.rows < mask.length ? await joinRows(mask.length, chunks.rows, runRows) : await runRows(0, mask.length);
    cache.advance(mask[0]!.length);
    return outputs;
  }

  /** Runs a session whose outputs stay here as the cache's per-step inputs (T5's cross-attention keys/values). */
  async runIntoCache(id: number, feeds: Record<string, ort.Tensor>, cacheId: number): Promise<void> {
    this.cache(cacheId).cross = await this.runSession(id, feeds);
  }

  async release(id: number): Promise<void> {
    const s = this.sessions.get(id);
    this.sessions.delete(id);
    await s?.session.release();
  }

  newCache(id: number, shape: CacheShape): void {
    this.caches.set(id, new KvCache(shape, this.cacheMemory.allocate));
  }

  resizeCache(id: number, capacity: number, keep: number): void {
    const old = this.cache(id);
    const resized = old.resized(capacity, keep, this.cacheMemory.allocate);
    this.caches.set(id, resized);
    if (resized.memory.buffer !== old.memory.buffer) this.cacheMemory.release(old.memory);
  }

  /** A new cache `id` made of rows of others (see KvCache.composed); they stay as they are. */
  composeCache(id: number, rows: RowPlacement<number>[], capacity: number, length: number): void {
    const placed = rows.map((r) => ({ cache: this.cache(r.cache), row: r.row, shift: r.shift }));
    this.caches.set(id, KvCache.composed(placed, capacity, length, this.cacheMemory.allocate));
  }

  reorderCache(id: number, index: number[], shared: number): void {
    this.cache(id).reorder(index, shared);
  }

  dropCache(id: number): void {
    const cache = this.caches.get(id);
    this.caches.delete(id);
    if (cache) this.cacheMemory.release(cache.memory);
  }

  private async runSession(id: number, feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>> {
    const { name, session } = this.session(id);
    try {
      return (await session.run(feeds)) as Record<string, ort.Tensor>;
    } catch (err) {
      throw new Blip2Error(`${name}: ${describeError(err)}`);
    }
  }

  private session(id: number) {
    const s = this.sessions.get(id);
    if (!s) throw new Blip2Error(`internal: no session ${id}`);
    return s;
  }

  private cache(id: number): KvCache {
    const c = this.caches.get(id);
    if (!c) throw new Blip2Error(`internal: no key/value cache ${id}`);
    return c;
  }
}

/** Rows `first`..`first + count` of the feeds named (views). */
function rowFeeds(feeds: Record<string, ort.Tensor>, names: string[] | undefined, first: number, count: number): Record<string, ort.Tensor> {
  return Object.fromEntries((names ?? []).map((name) => [name, rowView(feeds[name]!, first, count)]));
}

/**
 * Runs `run` over `rows` rows, `per` at a time, and joins its float outputs ([count, ...] each) by
 * name into [rows, ...]; a run's outputs are let go as soon as they are copied.
 */
export async function joinRows(rows: number, per: number, run: (first: number, count: number) => Promise<Record<string, ort.Tensor>>): Promise<Record<string, ort.Tensor>> {
  const out: Record<string, ort.Tensor> = {};
  for (let first = 0; first < rows; first += per) {
    for (const [name, t] of Object.entries(await run(first, Math.min(per, rows - first)))) {
      const rowSize = t.size / t.dims[0]!;
      out[name] ??= new ort.Tensor("float32", new Float32Array(rowSize * rows), [rows, ...t.dims.slice(1)]);
      (out[name].data as Float32Array).set(t.data as Float32Array, first * rowSize);
    }
  }
  return out;
}

/** Tensors as plain objects, for messages between threads. */
export interface WireTensor {
  type: ort.Tensor.Type;
  dims: readonly number[];
  data: ort.Tensor["data"];
}

export function toWire(tensors: Record<string, ort.Tensor>): Record<string, WireTensor> {
  const out: Record<string, WireTensor> = {};
  for (const [name, t] of Object.entries(tensors)) out[name] = { type: t.type, dims: t.dims, data: t.data };
  return out;
}

export function fromWire(tensors: Record<string, WireTensor>): Record<string, ort.Tensor> {
  const out: Record<string, ort.Tensor> = {};
  for (const [name, t] of Object.entries(tensors)) out[name] = new ort.Tensor(t.type, t.data as Float32Array, t.dims);
  return out;
}

/** The buffers of tensors, to transfer rather than copy. */
export function buffersOf(tensors: Record<string, WireTensor>): ArrayBuffer[] {
  return [...new Set(Object.values(tensors).map((t) => (t.data as ArrayBufferView).buffer as ArrayBuffer))];
}
