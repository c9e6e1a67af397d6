/**
 * Benchmark: ITC search over N synthetic image embeddings (default 100,000 images x 32 queries x
 * 256 dims, the shapes of Salesforce/blip2-itm-vit-g) in the SQLite index. Prints a table and a
 * JSON line, and appends the line to bench/results/<date>-<machine>.jsonl. Usage: npm run bench:search -- [--images N] [--queries Q] [--dim E] [--runs R] [--dir D]
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { SqliteStore } from "../src/search/sqliteStore.js";
import { recordResult } from "./bench-results.js";

const { values } = parseArgs({ options: { images: { type: "string" }, queries: { type: "string" }, dim: { type: "string" }, runs: { type: "string" }, dir: { type: "string" } } });
const images = Number(values.images ?? 100_000);
const queries = Number(values.queries ?? 32);
const dim = Number(values.dim ?? 256);
const runs = Number(values.runs ?? 10);
const dir = values.dir ?? path.join(os.tmpdir(), "blip2-bench-search");
const db = path.join(dir, `index-${images}x${queries}x${dim}.sqlite`);

/** Deterministic pseudo-random unit vectors. */
function* embeddings(count: number): Generator<Float32Array> {
  let s = 12345;
  const rand = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
  for (let i = 0; i < count; i++) {
    const e = new Float32Array(queries * dim);
    for (let q = 0; q < queries; q++) {
      let norm = 0;
      for (let d = 0; d < dim; d++) norm += (e[q * dim + d] = rand()) ** 2;
      for (let d = 0; d < dim; d++) e[q * dim + d]! /= Math.sqrt(norm);
    }
    yield e;
  }
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const model = { id: "synthetic", fingerprint: `synthetic-${queries}x${dim}`, numQueries: queries, dim };

fs.mkdirSync(dir, { recursive: true });
let store = SqliteStore.open(db, model, true);
if (store.count() !== images) {
  const t0 = performance.now();
  let batch = [];
  let i = 0;
  for (const embedding of embeddings(images)) {
    batch.push({ path: `/synthetic/${i++}.jpg`, size: 1, mtimeMs: 0, sha256: String(i), embedding });
    if (batch.length === 1000) (store.upsert(batch), (batch = []));
  }
  store.upsert(batch);
  console.error(`generated ${images} embeddings in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}
const text = embeddings(1).next().value as Float32Array;
const query = text.subarray(0, dim);

let t = performance.now();
await store.search(query, 10);
const firstMs = performance.now() - t;
await store.close();

// A fresh process's first search: open the index and map the matrix (already written).
store = SqliteStore.open(db, model, false);
t = performance.now();
await store.search(query, 10);
const coldMs = performance.now() - t;
const warm: number[] = [];
for (let r = 0; r < runs; r++) {
  t = performance.now();
  await store.search(query, 10);
  warm.push(performance.now() - t);
}
await store.close();

const matrixBytes = images * queries * dim * 4;
console.log(`ITC search, ${images} images x ${queries} queries x ${dim} dims (${(matrixBytes / 1e9).toFixed(2)} GB matrix), ${os.cpus().length} cores`);
console.log(`  first search after indexing (writes the matrix): ${firstMs.toFixed(0)} ms`);
console.log(`  first search of a process (maps the matrix):     ${coldMs.toFixed(0)} ms`);
console.log(`  search, median of ${runs} (min ${Math.min(...warm).toFixed(0)}, max ${Math.max(...warm).toFixed(0)}): ${median(warm).toFixed(0)} ms`);
const line = { bench: "search", images, queries, dim, firstMs: Math.round(firstMs), coldMs: Math.round(coldMs), medianMs: Math.round(median(warm)), minMs: Math.round(Math.min(...warm)), maxMs: Math.round(Math.max(...warm)) };
console.log(JSON.stringify(line));
console.log(`appended to ${recordResult(line)}`);
