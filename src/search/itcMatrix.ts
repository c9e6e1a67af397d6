/**
 * All image embeddings of an index as one contiguous float32 matrix in a file, scored against a text
 * embedding by ONNX Runtime: the matrix is the graph's external initializer, so it is memory-mapped
 * rather than read into JavaScript, and the scoring (a matrix-vector product and a max over each
 * image's queries) runs vectorised and multi-threaded.
 *
 * File layout: a 64-byte header (magic, generation, rows, queries, dim), then [rows, queries, dim].
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { partialFile } from "../io/partialFile.js";
import { Graph } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { CompiledGraph, tensor } from "../runtime/session.js";

const MAGIC = "BLIP2ITC";
export const HEADER_BYTES = 64;

export interface MatrixHeader {
  generation: number;
  rows: number;
  queries: number;
  dim: number;
}

export function readMatrixHeader(file: string): MatrixHeader | null {
  let fd: number;
  try {
    fd = fs.openSync(file, "r");
  } catch {
    return null;
  }
  try {
    const b = Buffer.alloc(HEADER_BYTES);
    if (fs.readSync(fd, b, 0, HEADER_BYTES, 0) !== HEADER_BYTES || b.toString("latin1", 0, 8) !== MAGIC) return null;
    const h = { generation: Number(b.readBigUInt64LE(8)), rows: Number(b.readBigUInt64LE(16)), queries: b.readUInt32LE(24), dim: b.readUInt32LE(28) };
    return fs.fstatSync(fd).size === HEADER_BYTES + h.rows * h.queries * h.dim * 4 ? h : null;
  } finally {
    fs.closeSync(fd);
  }
}

/** Whether `file` is missing or one of these matrices (maybe stale, maybe cut short): one that may be written over. */
export function isMatrixOrMissing(file: string): boolean {
  let fd: number;
  try {
    fd = fs.openSync(file, "r");
  } catch {
    return !fs.existsSync(file);
  }
  try {
    const b = Buffer.alloc(MAGIC.length);
    const n = fs.readSync(fd, b, 0, MAGIC.length, 0);
    return n === 0 || b.toString("latin1", 0, n) === MAGIC.slice(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

/** Writes the matrix from rows given in order (streamed: never all in memory), atomically. */
export function writeMatrix(file: string, header: MatrixHeader, rows: Iterable<Float32Array>): void {
  const tmp = partialFile(file);
  const fd = fs.openSync(tmp, "w");
  try {
    const b = Buffer.alloc(HEADER_BYTES);
    b.write(MAGIC, 0, "latin1");
    b.writeBigUInt64LE(BigInt(header.generation), 8);
    b.writeBigUInt64LE(BigInt(header.rows), 16);
    b.writeUInt32LE(header.queries, 24);
    b.writeUInt32LE(header.dim, 28);
    fs.writeSync(fd, b);
    let count = 0;
    for (const row of rows) {
      if (row.length !== header.queries * header.dim) throw new Blip2Error(`${file}: embedding of ${row.length} values, expected ${header.queries * header.dim}`);
      fs.writeSync(fd, new Uint8Array(row.buffer, row.byteOffset, row.byteLength));
      count++;
    }
    if (count !== header.rows) throw new Blip2Error(`internal: wrote ${count} rows, expected ${header.rows}`);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

/** A scoring session over a matrix file: text embeddings [T, dim] -> ITC scores [rows, T]. */
export class ItcScorer {
  private constructor(
    private readonly session: CompiledGraph,
    readonly header: MatrixHeader,
  ) {}

  static async open(file: string, header: MatrixHeader): Promise<ItcScorer> {
    const { rows, queries, dim } = header;
    const g = new Graph("itc_scores");
    const text = g.input("text_embeds", "float32", ["texts", dim]);
    const matrix = g.weight({ name: "image_embeds", dtype: "F32", shape: [rows * queries, dim], file: path.resolve(file), offset: HEADER_BYTES, byteLength: rows * queries * dim * 4 });
    const perQuery = op.matmul(matrix, op.transpose(text, [1, 0]));
    g.output(op.reduceMax(op.reshape(perQuery, [rows, queries, -1]), [1], false), "scores");
    return new ItcScorer(await CompiledGraph.create(g), header);
  }

  async scores(text: Float32Array, texts = 1): Promise<Float32Array> {
    const out = await this.session.run({ text_embeds: tensor.f32(text, [texts, this.header.dim]) });
    return out.scores!.data as Float32Array;
  }

  release(): Promise<void> {
    return this.session.release();
  }
}

/** Indices of the k largest scores, best first. */
export function topK(scores: Float32Array, k: number): number[] {
  const n = Math.min(k, scores.length);
  if (n <= 0) return [];
  // A bounded min-heap keeps this O(N log k) over 100k+ scores.
  const heap: number[] = [];
  const less = (a: number, b: number) => scores[a]! < scores[b]! || (scores[a] === scores[b] && a > b);
  const down = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < heap.length && less(heap[l]!, heap[m]!)) m = l;
      if (r < heap.length && less(heap[r]!, heap[m]!)) m = r;
      if (m === i) return;
      [heap[i], heap[m]] = [heap[m]!, heap[i]!];
      i = m;
    }
  };
  for (let i = 0; i < scores.length; i++) {
    if (heap.length < n) {
      heap.push(i);
      for (let j = heap.length - 1; j > 0; ) {
        const p = (j - 1) >> 1;
        if (!less(heap[j]!, heap[p]!)) break;
        [heap[j], heap[p]] = [heap[p]!, heap[j]!];
        j = p;
      }
    } else if (less(heap[0]!, i)) {
      heap[0] = i;
      down(0);
    }
  }
  return heap.sort((a, b) => (less(a, b) ? 1 : -1));
}
