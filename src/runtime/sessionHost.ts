/**
 * Where ONNX Runtime sessions and the key/value caches they use live: in this thread, or in a
 * worker thread (runtime/sessionWorker.ts) so that long runs do not block the event loop. The
 * caches stay beside the sessions, so a decoding step sends only the new tokens' inputs and gets
 * back only its outputs.
 */
import * as ort from "onnxruntime-node";
import { Blip2Error, describeError } from "../errors.js";
import { KvCache, type CacheShape } from "./kvCache.js";

/** A decoding step: the cache to attend to and extend, and the new positions' attention mask. */
export interface CacheStep {
  cache: number;
  mask: number[][];
}

/** The operations a host offers; ids are chosen by the caller. */
export class SessionHost {
  private readonly sessions = new Map<number, { name: string; session: ort.InferenceSession }>();
  private readonly caches = new Map<number, KvCache>();

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
    const outputs = await this.runSession(id, { ...feeds, ...cache.inputs(step.mask) });
    cache.write(outputs, step.mask);
    for (const key of Object.keys(outputs)) if (key.startsWith("new.")) delete outputs[key];
    return outputs;
  }

  /** Runs a session whose outputs stay here as the cache's per-step inputs (T5's cross-attention keys/values). */
  async runIntoCache(id: number, feeds: Record<string, ort.Tensor>, cacheId: number): Promise<void> {
    const cache = this.cache(cacheId);
    cache.cross = await this.runSession(id, feeds);
  }

  async release(id: number): Promise<void> {
    const s = this.sessions.get(id);
    this.sessions.delete(id);
    await s?.session.release();
  }

  newCache(id: number, shape: CacheShape): void {
    this.caches.set(id, new KvCache(shape));
  }

  reorderCache(id: number, index: number[]): void {
    this.cache(id).reorder(index);
  }

  dropCache(id: number): void {
    this.caches.delete(id);
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

/**
 * Runs `runRow` for each of `rows` rows and joins its float outputs ([1, ...] each) by name into
 * [rows, ...]; a row's outputs are let go as soon as they are copied.
 */
export async function joinRows(rows: number, runRow: (row: number) => Promise<Record<string, ort.Tensor>>): Promise<Record<string, ort.Tensor>> {
  const out: Record<string, ort.Tensor> = {};
  for (let r = 0; r < rows; r++) {
    for (const [name, t] of Object.entries(await runRow(r))) {
      out[name] ??= new ort.Tensor("float32", new Float32Array(t.size * rows), [rows, ...t.dims.slice(1)]);
      (out[name].data as Float32Array).set(t.data as Float32Array, r * t.size);
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
