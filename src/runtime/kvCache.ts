/**
 * The decoder's key/value cache as fixed-capacity buffers, one block per generation (the last
 * one's memory, see CacheMemory): each step feeds the whole buffers (ONNX Runtime reads them in
 * place) with a mask telling which slots hold keys, and gets back only the new positions' keys and
 * values, which are written into the next free slots. Nothing of the cache's size is allocated or
 * copied per step. The prompt's pass, while the cache is empty, is fed one masked slot instead. An
 * encoder-decoder's cross-attention keys/values, the same at every step, are kept here too:
 * computed beside the cache (SessionHost.runIntoCache), they are never sent between threads.
 */
import * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";

export interface CacheShape {
  layers: number;
  rows: number;
  heads: number;
  capacity: number;
  headDim: number;
}

/** Zero-filled memory for a cache's `floats` values (see CacheMemory). */
export type Allocate = (floats: number) => Float32Array;

export class KvCache {
  /** `past.{i}.key` / `past.{i}.value`: [rows, heads, capacity, headDim], zero-filled, views of `memory`. */
  readonly tensors: Record<string, ort.Tensor> = {};
  /** All of the keys and values, one block. */
  readonly memory: Float32Array;
  /** Filled slots. */
  length = 0;
  /** Per row and slot: 1 where the slot holds a key to attend to (0 for padding and empty slots). */
  private slotMask: Uint8Array;

  /**
   * Inputs fed unchanged with every step (T5's `cross.{i}.key` / `cross.{i}.value`), one row per
   * input, which the rows continuing it share: always fed whole.
   */
  cross: Record<string, ort.Tensor> = {};
  /** reorder's copy of the rows it overwrites but still reads, kept between steps. */
  private scratch = new Float32Array(0);

  constructor(
    readonly shape: CacheShape,
    allocate: Allocate = (floats) => new Float32Array(floats),
  ) {
    const { layers, rows, heads, capacity, headDim } = shape;
    // Never empty: ONNX Runtime's WebGPU provider crashed (SIGSEGV, on an H200) on T5's zero-length
    // past inputs. A single pass holds its own positions instead.
    if (!(capacity >= 1)) throw new Blip2Error(`internal: a key/value cache needs at least one slot, got ${capacity}`);
    const size = rows * heads * capacity * headDim;
    this.memory = allocate(2 * layers * size);
    let at = 0;
    for (let i = 0; i < layers; i++) {
      for (const kind of ["key", "value"]) {
        this.tensors[`past.${i}.${kind}`] = new ort.Tensor("float32", this.memory.subarray(at, at + size), [rows, heads, capacity, headDim]);
        at += size;
      }
    }
    this.slotMask = new Uint8Array(rows * capacity);
  }

  get capacity(): number {
    return this.shape.capacity;
  }

  /**
   * A step's inputs from the cache for rows `first`..`first + count` (the whole cache by default):
   * every slot's keys/values (views, not copies), all of the cross-attention inputs, and the
   * attention mask (every slot, then the new positions' own `newMask`). While the cache is empty (a
   * prompt's pass), one masked slot stands for it (see fedSlots).
   */
  inputs(newMask: number[][], first = 0): Record<string, ort.Tensor> {
    const count = newMask.length;
    if (first + count > this.shape.rows) throw new Blip2Error(`internal: rows ${first}..${first + count} of a cache of ${this.shape.rows}`);
    const whole = first === 0 && count === this.shape.rows;
    const rowsOf = (t: ort.Tensor) => (whole ? t : rowView(t, first, count));
    const out: Record<string, ort.Tensor> = { attention_mask: this.stepMask(newMask, first) };
    const { heads, capacity, headDim } = this.shape;
    const slots = this.fedSlots;
    const empty = slots < capacity ? new ort.Tensor("float32", new Float32Array(count * heads * slots * headDim), [count, heads, slots, headDim]) : null;
    for (const [name, t] of Object.entries(this.tensors)) out[name] = empty ?? rowsOf(t);
    if (!whole && Object.keys(this.cross).length) throw new Blip2Error("internal: a cache with cross-attention inputs runs all of its rows at once");
    Object.assign(out, this.cross);
    return out;
  }

  /**
   * Slots a step is given: all of them, or one (masked) while the cache is empty. A prompt's pass
   * then attends to its own positions only, not to every empty slot too (a long chat context in a
   * cache just larger would attend to twice its keys), which delays the first token.
   */
  get fedSlots(): number {
    return fedSlots(this.length, this.shape.capacity);
  }

  private stepMask(newMask: number[][], first: number): ort.Tensor {
    const { capacity } = this.shape;
    const slots = this.fedSlots;
    const width = newMask[0]!.length;
    const out = new BigInt64Array(newMask.length * (slots + width));
    newMask.forEach((row, i) => {
      const at = i * (slots + width);
      for (let s = 0; s < slots; s++) out[at + s] = BigInt(this.slotMask[(first + i) * capacity + s]!);
      row.forEach((m, j) => (out[at + slots + j] = BigInt(m)));
    });
    return new ort.Tensor("int64", out, [newMask.length, slots + width]);
  }

  /**
   * Writes a step's new keys/values for rows `first`.. (`new.{i}.key`, [rows, heads, S, headDim],
   * heads split as the cache holds them) into the next free slots: one copy per row and head, since
   * both lay a head's positions out one after another. (Projections as computed, [rows, S, heads *
   * headDim], would take a copy per position too.) `advance` then
   * counts the slots as filled, once every row is written.
   */
  write(outputs: Record<string, ort.Tensor>, newMask: number[][], first = 0): void {
    const steps = newMask[0]!.length;
    const { heads, capacity, headDim } = this.shape;
    if (this.length + steps > capacity) throw new Blip2Error(`internal: key/value cache of ${capacity} positions is full`);
    const span = steps * headDim;
    for (const [name, t] of Object.entries(this.tensors)) {
      const src = outputs[`new.${name.slice(5)}`]?.data as Float32Array | undefined;
      if (!src) throw new Blip2Error(`internal: the decoder did not return new.${name.slice(5)}`);
      const dst = t.data as Float32Array;
      for (let rh = 0; rh < newMask.length * heads; rh++) {
        dst.set(src.subarray(rh * span, (rh + 1) * span), ((first * heads + rh) * capacity + this.length) * headDim);
      }
    }
    newMask.forEach((row, i) => row.forEach((m, j) => (this.slotMask[(first + i) * capacity + this.length + j] = m)));
  }

  advance(steps: number): void {
    this.length += steps;
  }

  /**
   * A cache of `capacity` slots holding this one's first `keep` (a conversation's next prompt starts
   * with them; see generation/generate.ts KeptCache). In this cache's own block when it fits (a
   * block has room to grow, see CacheMemory): the kept slots move within it, and this cache is
   * then done. Otherwise a copy in memory from `allocate`: a second cache for a moment, up to 0.33
   * GB for OPT-2.7B at a full 512-token window.
   */
  resized(capacity: number, keep: number, allocate?: Allocate): KvCache {
    const { layers, rows, heads, headDim } = this.shape;
    if (keep > Math.min(this.length, capacity)) throw new Blip2Error(`internal: cannot keep ${keep} slots of ${this.length} in ${capacity}`);
    const block = new Float32Array(this.memory.buffer);
    const inPlace = block.length >= 2 * layers * rows * heads * capacity * headDim;
    const out = new KvCache({ ...this.shape, capacity }, inPlace ? (floats) => block.subarray(0, floats) : allocate);
    this.copySlots(out.memory, capacity, keep);
    const from = this.shape.capacity;
    for (let r = 0; r < rows; r++) out.slotMask.set(this.slotMask.subarray(r * from, r * from + keep), r * capacity);
    out.length = keep;
    out.cross = this.cross;
    return out;
  }

  /**
   * A cache of `capacity` slots, `length` of them filled, whose rows are rows of other caches
   * (continuous batching: a request's row joins a running batch, or the batch drops the rows that
   * ended). Each row's filled slots move by its `shift`: its keys stay in order, and slots it masks
   * may be left out at either end (the left padding a shorter row no longer needs). OPT counts
   * positions from the mask, so masked slots placed before a row change none of its positions.
   */
  static composed(rows: RowPlacement[], capacity: number, length: number, allocate?: Allocate): KvCache {
    const first = rows[0]?.cache.shape;
    if (!first) throw new Blip2Error("internal: a key/value cache needs at least one row");
    if (length > capacity) throw new Blip2Error(`internal: ${length} filled slots in a cache of ${capacity}`);
    const { layers, heads, headDim } = first;
    const out = new KvCache({ layers, rows: rows.length, heads, capacity, headDim }, allocate);
    rows.forEach(({ cache, row, shift }, i) => {
      const s = cache.shape;
      if (s.layers !== layers || s.heads !== heads || s.headDim !== headDim || row >= s.rows) throw new Blip2Error(`internal: row ${row} of a cache shaped ${JSON.stringify(s)} in one shaped ${JSON.stringify(first)}`);
      if (Object.keys(cache.cross).length) throw new Blip2Error("internal: rows of a cache with cross-attention inputs cannot move to another");
      // Slots [from, to) of the source row land at [from + shift, to + shift), within [0, length).
      const from = Math.max(0, -shift);
      const to = Math.max(from, Math.min(cache.length, length - shift));
      const mask = cache.slotMask.subarray(row * s.capacity, row * s.capacity + cache.length);
      if (mask.subarray(0, from).some(Boolean) || mask.subarray(to).some(Boolean)) {
        throw new Blip2Error(`internal: moving row ${row} by ${shift} slots into ${length} would drop keys it attends to`);
      }
      if (to === from) return;
      for (const [name, t] of Object.entries(out.tensors)) {
        const src = cache.tensors[name]!.data as Float32Array;
        const dst = t.data as Float32Array;
        for (let h = 0; h < heads; h++) {
          const at = (row * heads + h) * s.capacity;
          dst.set(src.subarray((at + from) * headDim, (at + to) * headDim), ((i * heads + h) * capacity + from + shift) * headDim);
        }
      }
      out.slotMask.set(mask.subarray(from, to), i * capacity + from + shift);
    });
    out.length = length;
    return out;
  }

  /**
   * Copies the first `keep` slots of every head of every tensor (span k of the block: the tensors
   * lie one after another) to where `to`, the memory of a cache of `capacity` slots, has them. In
   * this cache's own block they move in the order that reads each span before anything is written
   * over it (from the front when the stride shrinks, from the back when it grows), and the slots
   * after them are zeroed; memory of its own is zero already.
   */
  private copySlots(to: Float32Array, capacity: number, keep: number): void {
    const { layers, rows, heads, headDim } = this.shape;
    const spans = 2 * layers * rows * heads;
    const [oldStride, newStride, span] = [this.shape.capacity * headDim, capacity * headDim, keep * headDim];
    if (to.buffer !== this.memory.buffer) {
      for (let k = 0; k < spans; k++) to.set(this.memory.subarray(k * oldStride, k * oldStride + span), k * newStride);
      return;
    }
    const block = new Float32Array(this.memory.buffer);
    const move = (k: number) => block.copyWithin(k * newStride, k * oldStride, k * oldStride + span);
    if (newStride <= oldStride) for (let k = 0; k < spans; k++) move(k);
    else for (let k = spans - 1; k >= 0; k--) move(k);
    for (let k = 0; k < spans; k++) block.fill(0, k * newStride + span, (k + 1) * newStride);
  }

  /**
   * Keeps rows `index` in that order (beam search, every step). Only rows that change are written,
   * only their filled slots past the first `shared` are copied (the caller knows that each row and
   * the row it takes hold the same ones there: the beams of one prompt share its slots), in an
   * order that writes a row once nothing still needs to read it (a cycle of rows goes through one
   * copy, in a buffer kept between steps), rather than copying every tensor whole at each step.
   */
  reorder(index: number[], shared = 0): void {
    const copies = rowCopies(index);
    if (!copies.length) return;
    const { heads, capacity, headDim } = this.shape;
    const first = Math.min(shared, this.length) * headDim;
    const span = this.length * headDim - first;
    const saves = copies.filter((c) => c.to === SCRATCH).length;
    if (this.scratch.length < saves * heads * span) this.scratch = new Float32Array(saves * heads * span);
    // Head h of row r (its filled slots), in a tensor or in the scratch buffer.
    const at = (r: number, h: number) => (r * heads + h) * capacity * headDim + first;
    const saved = (k: number, h: number) => (k * heads + h) * span;
    for (const t of Object.values(this.tensors)) {
      const data = t.data as Float32Array;
      let k = 0;
      for (const c of copies) {
        for (let h = 0; h < heads; h++) {
          if (c.to === SCRATCH) this.scratch.set(data.subarray(at(c.from, h), at(c.from, h) + span), saved(k, h));
          else if (c.scratch !== undefined) data.set(this.scratch.subarray(saved(c.scratch, h), saved(c.scratch, h) + span), at(c.to, h));
          else data.copyWithin(at(c.to, h), at(c.from, h), at(c.from, h) + span);
        }
        if (c.to === SCRATCH) k++;
      }
    }
    const masks = this.slotMask.slice();
    index.forEach((from, to) => this.slotMask.set(masks.subarray(from * capacity, (from + 1) * capacity), to * capacity));
  }
}

const SCRATCH = -1;

/** Row `row` of `cache` (the cache, or its id where caches are named by id), as a row of a composed cache: its slots `shift` later (see KvCache.composed). */
export interface RowPlacement<C = KvCache> {
  cache: C;
  row: number;
  shift: number;
}

/** One row copy of a reorder: into row `to`, or into the scratch buffer (SCRATCH); from row `from`, or from the scratch's row `scratch`. */
interface RowCopy {
  from: number;
  to: number;
  scratch?: number;
}

/**
 * The copies that put row `index[to]` into row `to` for every changed row, one at a time: a row is
 * written only once no pending copy reads it; rows left in cycles are freed by saving one row of
 * each to the scratch buffer first (what compilers do to sequentialize a parallel copy).
 */
export function rowCopies(index: number[]): RowCopy[] {
  const source = new Map<number, number>();
  index.forEach((from, to) => from !== to && source.set(to, from));
  const readers = new Map<number, number>();
  for (const from of source.values()) readers.set(from, (readers.get(from) ?? 0) + 1);
  const fromScratch = new Map<number, number>();
  const out: RowCopy[] = [];
  const ready = [...source.keys()].filter((to) => !readers.get(to));
  let saves = 0;
  while (source.size) {
    const to = ready.pop();
    if (to === undefined) {
      // Only cycles are left: save one row and let its reader take the copy.
      const row = source.keys().next().value!;
      const reader = [...source].find(([, from]) => from === row)![0];
      out.push({ from: row, to: SCRATCH });
      fromScratch.set(reader, saves++);
      readers.set(row, 0);
      ready.push(row);
      continue;
    }
    const from = source.get(to)!;
    source.delete(to);
    const k = fromScratch.get(to);
    out.push(k === undefined ? { from, to } : { from, to, scratch: k });
    if (k !== undefined) continue;
    readers.set(from, readers.get(from)! - 1);
    if (!readers.get(from) && source.has(from)) ready.push(from);
  }
  return out;
}

/**
 * Keeps the memory of the last dropped cache for the next one. Memory the process has not touched
 * yet costs a page fault per 4 KB page on first write, which virtual machines serve slowly, and a
 * cache is written a slot at a time across all of its pages, so fresh memory makes every step
 * slower (docs/performance.md). The block kept is the largest recently dropped; it is zeroed when
 * reused.
 */
export class CacheMemory {
  private spare: Float32Array | null = null;

  readonly allocate: Allocate = (floats) => {
    const spare = this.spare;
    this.spare = null;
    // A new block is made up to twice as large, so that a slightly larger cache (a chat's next
    // turn) still fits it once it comes back; the pages past what is used are never touched.
    if (!spare || spare.length < floats) return new Float32Array(2 ** Math.ceil(Math.log2(floats))).subarray(0, floats);
    return spare.subarray(0, floats).fill(0);
  };

  /** Takes back a dropped cache's memory (the whole block it was cut from). */
  release(memory: Float32Array): void {
    const block = new Float32Array(memory.buffer);
    if (!this.spare || this.spare.length < block.length) this.spare = block;
  }
}

/** Slots a step over a cache of `length` filled slots is given (see KvCache.fedSlots). */
export function fedSlots(length: number, capacity: number): number {
  return length === 0 ? 1 : capacity;
}

/** Rows of a [N, ...] float32 tensor in the given order (the tensor itself when that is all of them in order). */
export function gatherRows(t: ort.Tensor, rows: number[]): ort.Tensor {
  const [n, ...rest] = t.dims as number[];
  if (rows.length === n && rows.every((r, i) => r === i)) return t;
  const size = t.size / n!;
  const src = t.data as Float32Array;
  const out = new Float32Array(rows.length * size);
  rows.forEach((r, i) => out.set(src.subarray(r * size, (r + 1) * size), i * size));
  return new ort.Tensor("float32", out, [rows.length, ...rest]);
}

/** Rows `first`..`first + count` of a [rows, ...] tensor, sharing its memory. */
export function rowView(t: ort.Tensor, first: number, count: number): ort.Tensor {
  const [rows, ...rest] = t.dims as number[];
  const size = t.size / rows!;
  return new ort.Tensor(t.type, (t.data as Float32Array).subarray(first * size, (first + count) * size), [count, ...rest]);
}
