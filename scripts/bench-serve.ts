/**
 * Benchmark of `blip2 serve` under load, on loopback only: autocannon sends caption requests from
 * N concurrent clients for D seconds, with batched decoding on (greedy requests join the running
 * batch at its next step and leave when they end, up to N rows: see serve/scheduler.ts) and off
 * (one request at a time). Reports p50/p99 latency, requests and tokens per second, the mean rows
 * decoding when a request joined, failed or lost requests, memory after warm-up and after a soak,
 * and the 429 path under an overfull queue. Prints a table and a JSON line, appended to
 * bench/results/<date>-<machine>.jsonl (or $BLIP2_BENCH_RESULTS/).
 *
 *   npm run bench:serve                                  # tiny model: 32 clients, 60 s
 *   npm run bench:serve -- --model opt-2.7b --dtype q8 --connections 4 --soak 300
 *
 * `--model opt-2.7b` is the synthetic full-size checkpoint (scripts/synthetic-checkpoint.ts); the
 * issue's bar there: with 4 clients, batched throughput at least twice the one-at-a-time one.
 */
import autocannon from "autocannon";
import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import { Blip2 } from "../src/api/tasks.js";
import type { DTypeSpec } from "../src/quantize/dtype.js";
import { createServer } from "../src/serve/server.js";
import { recordResult } from "./bench-results.js";
import { syntheticCheckpoint } from "./synthetic-checkpoint.js";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    dtype: { type: "string" },
    connections: { type: "string" },
    duration: { type: "string" },
    tokens: { type: "string" },
    soak: { type: "string" },
    warmup: { type: "string" },
  },
});
const variant = values.model ?? "tiny";
const fullSize = variant !== "tiny";
const dtype = (values.dtype ?? (fullSize ? "q8" : "fp32")) as DTypeSpec;
const connections = Number(values.connections ?? (fullSize ? 4 : 32));
const duration = Number(values.duration ?? 60);
const tokens = Number(values.tokens ?? 20);
const soak = Number(values.soak ?? 0);
const warmup = Number(values.warmup ?? 10);
const root = path.resolve(import.meta.dirname, "..");
const dir = fullSize ? syntheticCheckpoint(variant as "opt-2.7b") : path.join(root, "test/fixtures/tiny-blip2-opt");
const image = `data:image/png;base64,${fs.readFileSync(path.join(root, "test/fixtures/image0.png")).toString("base64")}`;
const body = JSON.stringify({ image, max_new_tokens: tokens, min_new_tokens: tokens });

const blip2 = await Blip2.load(dir, { dtype });
await blip2.model.prepare();

interface Run {
  maxBatch: number;
  /** Mean rows decoding when a request joined (itself included). */
  meanRows: number;
  requests: number;
  failed: number;
  p50Ms: number;
  p99Ms: number;
  requestsPerSecond: number;
  tokensPerSecond: number;
  answeredByServer: number;
}

/** The server's counter of a series in /metrics. */
async function counter(url: string, series: RegExp): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  return Number(series.exec(text)?.[1] ?? 0);
}

async function load(url: string, seconds: number): Promise<autocannon.Result> {
  return autocannon({ url: `${url}/v1/caption`, method: "POST", headers: { "content-type": "application/json" }, body, connections, duration: seconds, timeout: 600 });
}

async function run(maxBatch: number): Promise<Run> {
  const app = await createServer({ blip2, maxBatch, maxQueue: connections * 2, timeoutMs: 600_000, webRoot: null });
  const url = await app.listen({ host: "127.0.0.1", port: 0 });
  try {
    await load(url, Math.min(warmup, 5));
    const tokensBefore = await counter(url, /^blip2_generated_tokens_total (\d+)/m);
    const answeredBefore = await counter(url, /^blip2_requests_total\{route="\/v1\/caption",status="200"\} (\d+)/m);
    const rowsBefore = await counter(url, /^blip2_batch_size_sum (\d+)/m);
    const joinsBefore = await counter(url, /^blip2_batch_size_count (\d+)/m);
    const r = await load(url, duration);
    const joins = (await counter(url, /^blip2_batch_size_count (\d+)/m)) - joinsBefore;
    const meanRows = joins ? ((await counter(url, /^blip2_batch_size_sum (\d+)/m)) - rowsBefore) / joins : 0;
    const generated = (await counter(url, /^blip2_generated_tokens_total (\d+)/m)) - tokensBefore;
    const answered = (await counter(url, /^blip2_requests_total\{route="\/v1\/caption",status="200"\} (\d+)/m)) - answeredBefore;
    return {
      maxBatch,
      meanRows,
      requests: r.requests.total,
      failed: r.errors + r.timeouts + r.non2xx,
      p50Ms: r.latency.p50,
      p99Ms: r.latency.p99,
      requestsPerSecond: r.requests.total / duration,
      tokensPerSecond: generated / duration,
      answeredByServer: answered,
    };
  } finally {
    await app.close();
  }
}

/** Resident memory after warm-up and after `seconds` of load, batched. */
async function soakMemory(seconds: number): Promise<{ warmMb: number; afterMb: number; growth: number }> {
  const app = await createServer({ blip2, maxBatch: connections, maxQueue: connections * 2, timeoutMs: 600_000, webRoot: null });
  const url = await app.listen({ host: "127.0.0.1", port: 0 });
  try {
    await load(url, warmup);
    global.gc?.();
    const warm = process.memoryUsage().rss;
    await load(url, seconds);
    global.gc?.();
    const after = process.memoryUsage().rss;
    return { warmMb: warm / 2 ** 20, afterMb: after / 2 ** 20, growth: after / warm - 1 };
  } finally {
    await app.close();
  }
}

/** 20 requests at once against a queue of 2: the rest must get 429 with a Retry-After, none lost. */
async function overfull(): Promise<{ sent: number; ok: number; refused: number; withRetryAfter: number }> {
  const app = await createServer({ blip2, maxBatch: 1, maxQueue: 2, webRoot: null });
  const url = await app.listen({ host: "127.0.0.1", port: 0 });
  try {
    const sent = 20;
    const all = await Promise.all(Array.from({ length: sent }, () => fetch(`${url}/v1/caption`, { method: "POST", headers: { "content-type": "application/json" }, body }).then(async (r) => (await r.arrayBuffer(), r))));
    const refused = all.filter((r) => r.status === 429);
    return { sent, ok: all.filter((r) => r.status === 200).length, refused: refused.length, withRetryAfter: refused.filter((r) => Number(r.headers.get("retry-after")) >= 1).length };
  } finally {
    await app.close();
  }
}

const batched = await run(connections);
const sequential = await run(1);
const memory = soak > 0 ? await soakMemory(soak) : null;
const queue = await overfull();
await blip2.dispose();

const speedup = batched.tokensPerSecond / sequential.tokensPerSecond;
console.log(`blip2 serve, ${variant} (${JSON.stringify(dtype)}), ${connections} clients for ${duration} s, ${tokens} tokens per caption, loopback`);
console.log("| decoding | mean rows | requests | failed | p50 ms | p99 ms | requests/s | tokens/s |");
console.log("|---|---|---|---|---|---|---|---|");
for (const r of [batched, sequential]) {
  console.log(`| ${r.maxBatch > 1 ? `batched (up to ${r.maxBatch} rows)` : "one at a time"} | ${r.meanRows.toFixed(2)} | ${r.requests} | ${r.failed} | ${r.p50Ms} | ${r.p99Ms} | ${r.requestsPerSecond.toFixed(2)} | ${r.tokensPerSecond.toFixed(1)} |`);
}
console.log(`batched / one at a time, tokens/s: ${speedup.toFixed(2)}x${fullSize ? ` (bar: >= 2x: ${speedup >= 2 ? "met" : "NOT met"})` : ""}`);
if (memory) console.log(`memory: ${memory.warmMb.toFixed(0)} MB after warm-up, ${memory.afterMb.toFixed(0)} MB after ${soak} s (${(memory.growth * 100).toFixed(1)}%; bar: within 10%: ${Math.abs(memory.growth) <= 0.1 ? "met" : "NOT met"})`);
console.log(`overfull queue: ${queue.sent} sent, ${queue.ok} answered, ${queue.refused} refused with 429 (${queue.withRetryAfter} with Retry-After), ${queue.sent - queue.ok - queue.refused} lost`);
const failed = batched.failed + sequential.failed + (queue.sent - queue.ok - queue.refused);
const result = { bench: "serve", model: variant, dtype, connections, duration, tokens, batched, sequential, speedup, memory, queue, failed };
console.log(JSON.stringify(result));
recordResult(result);
process.exitCode = failed > 0 ? 1 : 0;
