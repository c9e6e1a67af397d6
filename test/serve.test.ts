/**
 * `blip2 serve` on the tiny fixtures: every route and its errors over real HTTP on loopback, its
 * answers equal to the CLI's for the same inputs, the official openai client against it, and the
 * queue's bound, batches, time limit and cancellation.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Blip2ForImageTextRetrieval } from "../src/api/retrieval.js";
import { Blip2 } from "../src/api/tasks.js";
import { Blip2Error } from "../src/errors.js";
import { openStore, type ImageStore } from "../src/search/store.js";
import { ChatStore } from "../src/serve/chats.js";
import { Scheduler } from "../src/serve/scheduler.js";
import { createServer, type ServeOptions } from "../src/serve/server.js";
import { cli, cliWithInput, fixture } from "./helpers.js";

const OPT = fixture("tiny-blip2-opt");
const ITM = fixture("tiny-blip2-itm");
const IMAGES = ["image0.png", "image1.png", "image2.png", "photo640x427.jpg"].map((f) => fixture(f));

const dataUrl = (file: string) => `data:image/${path.extname(file) === ".jpg" ? "jpeg" : "png"};base64,${fs.readFileSync(file).toString("base64")}`;

let work: string;
let db: string;
let blip2: Blip2;
let retrieval: Blip2ForImageTextRetrieval;
let store: ImageStore;
let base: string;
let close: () => Promise<void>;

/** A server on a free loopback port, and its address. */
async function start(options: Partial<ServeOptions> = {}): Promise<{ url: string; close: () => Promise<void> }> {
  const app = await createServer({ blip2, retrieval, store, modelName: "tiny-blip2-opt", retrievalName: "tiny-blip2-itm", webRoot: null, ...options });
  const url = await app.listen({ host: "127.0.0.1", port: 0 });
  return { url, close: () => app.close() };
}

async function post(url: string, body: unknown, headers: Record<string, string> = {}): Promise<{ status: number; json: any; headers: Headers }> {
  const r = await fetch(url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: typeof body === "string" ? body : JSON.stringify(body) });
  const text = await r.text();
  return { status: r.status, json: text ? JSON.parse(text) : null, headers: r.headers };
}

async function upload(url: string, fields: Record<string, string | Blob>): Promise<{ status: number; json: any }> {
  const form = new FormData();
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  const r = await fetch(url, { method: "POST", body: form });
  return { status: r.status, json: await r.json() };
}

/** The events of a server-sent event stream: [event, data] pairs. */
async function events(response: Response): Promise<[string, any][]> {
  const text = await response.text();
  return text
    .split("\n\n")
    .filter(Boolean)
    .map((block) => {
      const event = /^event: (.*)$/m.exec(block)?.[1] ?? "message";
      const data = /^data: (.*)$/m.exec(block)![1]!;
      return [event, data === "[DONE]" ? data : JSON.parse(data)];
    });
}

const cliJson = async (...argv: string[]) => {
  const r = await cli(...argv);
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0);
  return r.stdout.trim().split("\n").map((l) => JSON.parse(l));
};

beforeAll(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-serve-"));
  const photos = path.join(work, "photos");
  fs.mkdirSync(photos);
  for (const f of IMAGES) fs.copyFileSync(f, path.join(photos, path.basename(f)));
  db = path.join(work, "index.sqlite");
  expect((await cli("index", "-m", ITM, photos, "--db", db, "-q")).code).toBe(0);
  blip2 = await Blip2.load(OPT);
  retrieval = await Blip2ForImageTextRetrieval.fromPretrained(ITM);
  store = await openStore(db, null, false);
  ({ url: base, close } = await start());
});

afterAll(async () => {
  await close?.();
  await store?.close();
  await retrieval?.dispose();
  await blip2?.dispose();
  fs.rmSync(work, { recursive: true, force: true });
});

describe("answers equal the CLI's", () => {
  it("caption: a data URL and an upload give the CLI's words and ids", async () => {
    const [expected] = await cliJson("caption", "-m", OPT, "--json", "-q", IMAGES[1]!);
    const json = await post(`${base}/v1/caption`, { image: dataUrl(IMAGES[1]!) });
    expect(json.status).toBe(200);
    expect(json.json.text).toBe(expected.caption);
    expect(json.json.ids).toEqual(expected.ids);
    expect(json.json.timings.new_tokens).toBe(20);
    expect(json.json.finish_reason).toBe("length");
    const form = await upload(`${base}/v1/caption`, { image: new Blob([fs.readFileSync(IMAGES[1]!)]), max_new_tokens: "20" });
    expect(form.status).toBe(200);
    expect(form.json.ids).toEqual(expected.ids);
  });

  it("a prompted caption and a question give the CLI's", async () => {
    const [captioned] = await cliJson("caption", "-m", OPT, "--json", "-q", "--prompt", "a photo of", "--max-new-tokens", "8", IMAGES[0]!);
    const c = await post(`${base}/v1/caption`, { image: dataUrl(IMAGES[0]!), prompt: "a photo of", max_new_tokens: 8 });
    expect([c.json.text, c.json.ids]).toEqual([captioned.caption, captioned.ids]);
    const [asked] = await cliJson("ask", "-m", OPT, "--json", "-q", IMAGES[2]!, "what is it?");
    const a = await post(`${base}/v1/ask`, { image: dataUrl(IMAGES[2]!), question: "what is it?" });
    expect([a.json.text, a.json.ids]).toEqual([asked.answer, asked.ids]);
  });

  it("concurrent requests decode together in batches and each still gets the CLI's answer", async () => {
    const questions = ["what is it?", "what colour is the large shape in the middle?", "why?", "is there a dog?"];
    const expected = await Promise.all(questions.map(async (q, i) => (await cliJson("ask", "-m", OPT, "--json", "-q", IMAGES[i]!, q))[0]));
    const answers = await Promise.all(questions.map((q, i) => post(`${base}/v1/ask`, { image: dataUrl(IMAGES[i]!), question: q })));
    answers.forEach((a, i) => expect([a.json.text, a.json.ids], questions[i]).toEqual([expected[i].answer, expected[i].ids]));
    // The first runs alone as it arrives; the others, queued meanwhile, share the next batch.
    expect(Math.max(...answers.map((a) => a.json.timings.batch_size))).toBeGreaterThan(1);
  });

  it("a sampled generation runs alone and repeats with its seed", async () => {
    const body = { image: dataUrl(IMAGES[0]!), do_sample: true, seed: 7, max_new_tokens: 10 };
    const [a, b] = await Promise.all([post(`${base}/v1/caption`, body), post(`${base}/v1/caption`, body)]);
    expect(a.json.ids).toEqual(b.json.ids);
    expect([a.json.timings.batch_size, b.json.timings.batch_size]).toEqual([1, 1]);
    const [expected] = await cliJson("caption", "-m", OPT, "--json", "-q", "--do-sample", "--seed", "7", "--max-new-tokens", "10", IMAGES[0]!);
    expect(a.json.ids).toEqual(expected.ids);
  });

  it("a chat answers as 'blip2 chat', streams its tokens, and is gone once deleted", async () => {
    const questions = ["what is it?", "and the colour?"];
    const expected = (await cliWithInput(questions.join("\n") + "\n", "chat", "-m", OPT, "-q", IMAGES[1]!)).stdout.split("\n").slice(0, 2);
    const created = await post(`${base}/v1/chats`, { image: dataUrl(IMAGES[1]!) });
    expect(created.status).toBe(201);
    const id = created.json.id as string;
    const first = await post(`${base}/v1/chats/${id}/messages`, { content: questions[0] });
    expect(first.json).toMatchObject({ answer: expected[0], dropped_turns: 0, turns: 1 });
    const streamed = await fetch(`${base}/v1/chats/${id}/messages`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ content: questions[1], stream: true }) });
    expect(streamed.headers.get("content-type")).toMatch(/^text\/event-stream/);
    const evs = await events(streamed);
    const done = evs.at(-1)!;
    expect(done[0]).toBe("done");
    expect(done[1].answer).toBe(expected[1]);
    const tokens = evs.filter(([e]) => e === "token");
    expect(tokens.length).toBeGreaterThan(1);
    expect(tokens.map(([, d]) => d.text).join("")).toBe(expected[1]);
    const gone = await fetch(`${base}/v1/chats/${id}`, { method: "DELETE" });
    expect(gone.status).toBe(204);
    const after = await post(`${base}/v1/chats/${id}/messages`, { content: "still there?" });
    expect([after.status, after.json.error.code]).toEqual([404, "chat_not_found"]);
  });

  it("match gives the CLI's ITM and ITC", async () => {
    const [expected] = await cliJson("match", "-m", ITM, "--json", "-q", "--image", IMAGES[0]!, "--image", IMAGES[1]!, "--text", "a dog", "--text", "two shapes");
    const r = await post(`${base}/v1/match`, { images: [dataUrl(IMAGES[0]!), dataUrl(IMAGES[1]!)], texts: ["a dog", "two shapes"] });
    expect(r.status).toBe(200);
    expect(r.json).toEqual({ itm: expected.itm, itc: expected.itc });
  });

  it("search gives the CLI's ranking, with thumbnails of indexed files only", async () => {
    const expected = await cliJson("search", "--db", db, "--json", "-q", "--k", "3", "--rerank", "4", "a red circle");
    const r = await post(`${base}/v1/search`, { text: "a red circle", k: 3, rerank: 4 });
    expect(r.json.results.map((h: any) => [h.path, h.score, h.itc, h.itm])).toEqual(expected.map((h: any) => [h.path, h.score, h.itc, h.itm]));
    const thumb = await fetch(`${base}${r.json.results[0].thumbnail}`);
    expect(thumb.status).toBe(200);
    expect(thumb.headers.get("content-type")).toBe("image/jpeg");
    expect([...new Uint8Array(await thumb.arrayBuffer()).subarray(0, 2)]).toEqual([0xff, 0xd8]);
    const indexed = r.json.results[0].path as string;
    for (const p of ["/etc/passwd", IMAGES[0]!, path.join(path.dirname(indexed), "..", "index.sqlite"), `${path.dirname(indexed)}/../photos/${path.basename(indexed)}`]) {
      const denied = await fetch(`${base}/v1/thumbnails?path=${encodeURIComponent(p)}`);
      expect([denied.status, ((await denied.json()) as any).error.code], p).toEqual([404, "not_indexed"]);
    }
  });
});

describe("OpenAI compatibility", () => {
  it("the official openai client gets a completion and a stream equal to 'blip2 ask'", async () => {
    const [expected] = await cliJson("ask", "-m", OPT, "--json", "-q", "--max-new-tokens", "12", IMAGES[1]!, "what is it?");
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", maxRetries: 0 });
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(["tiny-blip2-opt", "tiny-blip2-itm"]);
    const messages = [{ role: "user" as const, content: [{ type: "text" as const, text: "what is it?" }, { type: "image_url" as const, image_url: { url: dataUrl(IMAGES[1]!) } }] }];
    const completion = await client.chat.completions.create({ model: "tiny-blip2-opt", messages, max_tokens: 12, temperature: 0 });
    expect(completion.choices[0]!.message.content).toBe(expected.answer);
    expect(completion.choices[0]!.finish_reason).toBe("length");
    expect(completion.usage).toEqual({ prompt_tokens: expected.ids.length - 12, completion_tokens: 12, total_tokens: expected.ids.length });
    const stream = await client.chat.completions.create({ model: "tiny-blip2-opt", messages, max_tokens: 12, temperature: 0, stream: true });
    let text = "";
    let finish: string | null = null;
    let chunks = 0;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
      chunks++;
    }
    expect(text).toBe(expected.answer);
    expect(finish).toBe("length");
    expect(chunks).toBeGreaterThan(3);
  });

  it("earlier turns make the demo's chat prompt, a stop string cuts the answer", async () => {
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", maxRetries: 0 });
    const image = { type: "image_url" as const, image_url: { url: dataUrl(IMAGES[0]!) } };
    const full = await client.chat.completions.create({ model: "m", max_tokens: 6, messages: [{ role: "user", content: [image, { type: "text", text: "what?" }] }, { role: "assistant", content: "a cat" }, { role: "user", content: "why?" }] });
    const [expected] = await cliJson("caption", "-m", OPT, "--json", "-q", "--max-new-tokens", "6", "--prompt", "Question: what? Answer: a cat. Question: why? Answer:", IMAGES[0]!);
    expect(full.choices[0]!.message.content).toBe(expected.caption);
    const text = full.choices[0]!.message.content!;
    const stop = text.slice(2, 3);
    const cut = await client.chat.completions.create({ model: "m", max_tokens: 6, stop: [stop], messages: [{ role: "user", content: [image, { type: "text", text: "what?" }] }, { role: "assistant", content: "a cat" }, { role: "user", content: "why?" }] });
    expect(cut.choices[0]!.message.content).toBe(text.slice(0, text.indexOf(stop)).trimEnd());
    expect(cut.choices[0]!.finish_reason).toBe("stop");
    await expect(client.chat.completions.create({ model: "m", messages: [{ role: "user", content: "no image" }] })).rejects.toMatchObject({ status: 400, code: "invalid_request" });
  });
});

/** A PNG whose header claims `width` x `height` pixels, with almost no data behind it. */
function bombPng(width: number, height: number): Buffer {
  const chunk = (type: string, data: Buffer) => {
    const body = Buffer.concat([Buffer.from(type), data]);
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    body.copy(out, 4);
    out.writeUInt32BE(zlib.crc32(body), 8 + data.length);
    return out;
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 2, 0, 0, 0], 8);
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk("IHDR", ihdr), chunk("IDAT", zlib.deflateSync(Buffer.alloc(1024))), chunk("IEND", Buffer.alloc(0))]);
}

describe("errors are JSON with a stable code", () => {
  const expectError = (r: { status: number; json: any }, status: number, code: string) => {
    expect([r.status, r.json.error.code], JSON.stringify(r.json)).toEqual([status, code]);
    expect(JSON.stringify(r.json)).not.toMatch(/\n\s+at |\.ts:\d+/);
  };

  it("bad JSON, unknown fields, bad values, unknown routes", async () => {
    expectError(await post(`${base}/v1/caption`, "{bad json"), 400, "invalid_json");
    expectError(await post(`${base}/v1/caption`, { image: dataUrl(IMAGES[0]!), max_new_token: 3 }), 400, "invalid_request");
    expectError(await post(`${base}/v1/caption`, { image: dataUrl(IMAGES[0]!), top_p: 2 }), 400, "invalid_request");
    expectError(await post(`${base}/v1/ask`, { image: dataUrl(IMAGES[0]!) }), 400, "invalid_request");
    expectError(await post(`${base}/v1/nothing`, {}), 404, "not_found");
    // A prompt too long for the language model's positions: the library's message, as a 400.
    const long = await post(`${base}/v1/caption`, { image: dataUrl(IMAGES[0]!), prompt: "word ".repeat(200) });
    expectError(long, 400, "invalid_input");
    expect(long.json.error.message).toMatch(/prompt too long/);
  });

  it("a non-image upload, a remote URL, an oversized image and a decompression bomb", async () => {
    expectError(await upload(`${base}/v1/caption`, { image: new Blob([Buffer.from("hello, not an image")]) }), 400, "invalid_image");
    expectError(await post(`${base}/v1/caption`, { image: "data:image/png;base64,AAAA" }), 400, "invalid_image");
    expectError(await post(`${base}/v1/caption`, { image: "https://example.com/cat.jpg" }), 400, "remote_image_refused");
    const small = await start({ maxImagePixels: 10_000, maxBodyBytes: 200_000 });
    try {
      // photo640x427: 273,280 pixels; the bomb: 2 GB of pixels in a few hundred bytes.
      expectError(await post(`${small.url}/v1/caption`, { image: dataUrl(IMAGES[3]!) }), 413, "image_too_large");
      const bomb = bombPng(50_000, 40_000);
      expect(bomb.length).toBeLessThan(200);
      const started = performance.now();
      expectError(await upload(`${small.url}/v1/caption`, { image: new Blob([new Uint8Array(bomb)]) }), 413, "image_too_large");
      expect(performance.now() - started).toBeLessThan(2000);
      expectError(await upload(`${small.url}/v1/caption`, { image: new Blob([fs.readFileSync(fixture("photo640x427.png"))]) }), 413, "body_too_large");
    } finally {
      await small.close();
    }
  });

  it("an unknown chat, and search or match on a server without them", async () => {
    expectError(await post(`${base}/v1/chats/chat_nope/messages`, { content: "hi" }), 404, "chat_not_found");
    const r = await fetch(`${base}/v1/chats/chat_nope`, { method: "DELETE" });
    expect(r.status).toBe(404);
    const bare = await start({ retrieval: undefined, store: undefined });
    try {
      expectError(await post(`${bare.url}/v1/search`, { text: "x" }), 404, "no_index");
      expectError(await post(`${bare.url}/v1/match`, { images: [dataUrl(IMAGES[0]!)], texts: ["x"] }), 404, "no_retrieval_model");
    } finally {
      await bare.close();
    }
  });

  it("off loopback, no server without an API key; with one, every /v1 route needs it", async () => {
    await expect(createServer({ blip2, host: "0.0.0.0" })).rejects.toThrow(Blip2Error);
    await expect(createServer({ blip2, host: "192.168.1.10" })).rejects.toThrow(/refusing to listen on 192\.168\.1\.10 without --api-key/);
    // Checked on the request, so the test need not listen anywhere but loopback.
    const app = await createServer({ blip2, host: "0.0.0.0", apiKey: "s3cret", modelName: "m", webRoot: null });
    try {
      const none = await app.inject({ method: "GET", url: "/v1/models" });
      expect([none.statusCode, none.json().error.code, none.headers["www-authenticate"]]).toEqual([401, "invalid_api_key", "Bearer"]);
      const wrong = await app.inject({ method: "POST", url: "/v1/caption", headers: { authorization: "Bearer nope" }, payload: { image: dataUrl(IMAGES[0]!) } });
      expect(wrong.statusCode).toBe(401);
      expect((await app.inject({ method: "GET", url: "/metrics" })).statusCode).toBe(401);
      const right = await app.inject({ method: "GET", url: "/v1/models", headers: { authorization: "Bearer s3cret" } });
      expect([right.statusCode, right.json().data[0].id]).toEqual([200, "m"]);
      expect((await app.inject({ method: "GET", url: "/health" })).statusCode).toBe(200);
    } finally {
      await app.close();
    }
  });

  it("CORS is off unless origins are named", async () => {
    const preflight = { method: "OPTIONS", headers: { origin: "https://elsewhere.example", "access-control-request-method": "POST" } };
    const off = await fetch(`${base}/v1/caption`, preflight);
    expect(off.headers.get("access-control-allow-origin")).toBeNull();
    const open = await start({ corsOrigins: ["https://elsewhere.example"] });
    try {
      const on = await fetch(`${open.url}/v1/caption`, preflight);
      expect(on.headers.get("access-control-allow-origin")).toBe("https://elsewhere.example");
    } finally {
      await open.close();
    }
  });
});

describe("the queue", () => {
  it("past its bound, requests get 429 with Retry-After; the others are answered", async () => {
    const busy = await start({ maxQueue: 1, maxBatch: 1 });
    try {
      const all = await Promise.all(Array.from({ length: 6 }, () => post(`${busy.url}/v1/caption`, { image: dataUrl(IMAGES[1]!) })));
      const refused = all.filter((r) => r.status === 429);
      expect(refused.length).toBeGreaterThan(0);
      for (const r of refused) {
        expect(r.json.error.code).toBe("queue_full");
        expect(Number(r.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
      }
      expect(all.filter((r) => r.status === 200).length).toBe(6 - refused.length);
    } finally {
      await busy.close();
    }
  });

  it("a request past its time limit gets 504", async () => {
    const hurried = await start({ timeoutMs: 1 });
    try {
      const r = await post(`${hurried.url}/v1/caption`, { image: dataUrl(IMAGES[1]!) });
      expect([r.status, r.json.error.code]).toEqual([504, "timeout"]);
    } finally {
      await hurried.close();
    }
  });

  it("a client that leaves frees its place in the queue", async () => {
    const one = await start({ maxBatch: 1 });
    try {
      const ahead = Array.from({ length: 3 }, () => post(`${one.url}/v1/caption`, { image: dataUrl(IMAGES[1]!), do_sample: true, max_new_tokens: 60 }));
      const queued = async (n: number) => {
        while (((await (await fetch(`${one.url}/health`)).json()) as any).queue !== n) await new Promise((r) => setTimeout(r, 5));
      };
      await queued(2); // one runs, two wait
      const leaving = new AbortController();
      const left = fetch(`${one.url}/v1/caption`, { method: "POST", signal: leaving.signal, headers: { "content-type": "application/json" }, body: JSON.stringify({ image: dataUrl(IMAGES[0]!) }) });
      await queued(3);
      leaving.abort();
      await expect(left).rejects.toThrow();
      await Promise.all(ahead);
      const health = await (await fetch(`${one.url}/health`)).json();
      expect(health.queue).toBe(0);
      const metrics = await (await fetch(`${one.url}/metrics`)).text();
      // Three answered; the one that left never reached the model (it would be a fourth batch of 1).
      expect(metrics).toMatch(/blip2_batch_size_count 3\b/);
    } finally {
      await one.close();
    }
  });

  it("takes the queued jobs of the head's key into one batch, in order, up to its size", async () => {
    const batches: string[][] = [];
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const scheduler = new Scheduler<string, string>(async (items) => (batches.push(items), await gate, items.map((i) => i.toUpperCase())), { maxQueue: 10, maxBatch: 3 });
    const signal = new AbortController().signal;
    const jobs = ["a1", "a2", "b1", "a3", "a4", "a5"].map((item) => scheduler.submit({ key: item[0]!, signal, item }));
    release();
    expect(await Promise.all(jobs)).toEqual(["A1", "A2", "B1", "A3", "A4", "A5"]);
    // a1 ran as it came; then a2, a3, a4 (b1 waits its turn behind the batch of its head); then b1; then a5.
    expect(batches).toEqual([["a1"], ["a2", "a3", "a4"], ["b1"], ["a5"]]);
  });

  it("a job that leaves a running batch is answered at once; the batch stops when all have left", async () => {
    let seen: AbortSignal | null = null;
    const scheduler = new Scheduler<string, string>((_items, signal) => {
      seen = signal;
      return new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason)));
    }, { maxQueue: 10, maxBatch: 4 });
    const [x, y] = [new AbortController(), new AbortController()];
    const blocker = new AbortController();
    const first = scheduler.submit({ key: "k", signal: blocker.signal, item: "first" }).catch((e) => e);
    const jx = scheduler.submit({ key: "k", signal: x.signal, item: "x" }).catch((e) => e);
    const jy = scheduler.submit({ key: "k", signal: y.signal, item: "y" }).catch((e) => e);
    blocker.abort("first left");
    expect(await first).toBe("first left");
    await new Promise((r) => setTimeout(r, 0));
    const batchSignal = seen as AbortSignal | null;
    x.abort("x left");
    expect(await jx).toBe("x left");
    expect(batchSignal?.aborted).toBe(false);
    y.abort("y left");
    expect(await jy).toBe("y left");
    expect(batchSignal?.aborted).toBe(true);
    expect(scheduler.queued).toBe(0);
  });

  it("idle chats expire and free their cache", async () => {
    const disposed: string[] = [];
    const chats = new ChatStore(1000, 2);
    const fake = (name: string) => ({ dispose: async () => void disposed.push(name) }) as never;
    const a = chats.add(fake("a"));
    chats.add(fake("b"));
    expect(() => chats.add(fake("c"))).toThrow(/2 chats are open/);
    chats.get(a); // used now: not idle
    expect(await chats.expire(Date.now() + 500)).toEqual([]);
    expect((await chats.expire(Date.now() + 1500)).length).toBe(2);
    expect(disposed.sort()).toEqual(["a", "b"]);
    expect(() => chats.get(a)).toThrow(/no chat/);
    await chats.close();
  });
});

describe("health, metrics and the command", () => {
  it("/health names the models; /metrics is Prometheus text with the server's series", async () => {
    const health = await (await fetch(`${base}/health`)).json();
    expect(health).toMatchObject({ status: "ok", model: "tiny-blip2-opt", dtype: "fp32", retrieval_model: "tiny-blip2-itm", indexed_images: 4, queue: 0 });
    expect(health.tokens_per_second).toBeGreaterThan(0);
    const r = await fetch(`${base}/metrics`);
    expect(r.headers.get("content-type")).toMatch(/^text\/plain/);
    const text = await r.text();
    for (const series of ["blip2_requests_total{route=\"/v1/caption\",status=\"200\"}", "blip2_queue_length 0", "blip2_batch_size_bucket", "blip2_generated_tokens_total", "blip2_tokens_per_second", "blip2_request_duration_seconds_bucket"]) {
      expect(text).toContain(series);
    }
    expect(Number(/blip2_generated_tokens_total (\d+)/.exec(text)![1])).toBeGreaterThan(20);
  });

  it("'blip2 serve' refuses another address without a key before loading anything", async () => {
    const r = await cli("serve", "--host", "0.0.0.0", "-m", "does/not-exist");
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/refusing to listen on 0\.0\.0\.0 without --api-key/);
  });

  it("'blip2 serve' listens on loopback, answers, and stops on SIGTERM", async () => {
    const child = spawn(process.execPath, ["--import", "tsx", "src/cli/main.ts", "serve", "-m", OPT, "--port", "0", "-q"], { cwd: path.resolve(import.meta.dirname, ".."), stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    const url = await new Promise<string>((resolve, reject) => {
      child.stderr.on("data", (d: Buffer) => {
        stderr += d;
        const m = /on (http:\/\/127\.0\.0\.1:\d+)\//.exec(stderr);
        if (m) resolve(m[1]!);
      });
      child.on("exit", () => reject(new Error(stderr)));
    });
    const r = await post(`${url}/v1/caption`, { image: dataUrl(IMAGES[1]!) });
    const [expected] = await cliJson("caption", "-m", OPT, "--json", "-q", IMAGES[1]!);
    expect(r.json.ids).toEqual(expected.ids);
    const code = new Promise((resolve) => child.on("exit", resolve));
    child.kill("SIGTERM");
    expect(await code).toBe(0);
    expect(stderr).toContain("stopping");
  });
});
