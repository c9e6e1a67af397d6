/**
 * `blip2 serve`'s running batch: requests join it at its next step and leave when they end. The
 * scheduler with a scripted batch (joins, the bound, the head of the queue, work on arrival,
 * cancellation, failures); then the tiny fixtures: staggered requests get the CLI's answers, a
 * client that leaves frees its row, T5 still batches from the start.
 */
import fs from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { Blip2 } from "../src/api/tasks.js";
import { loadImage, type RawImage } from "../src/image/decode.js";
import { CacheHandle } from "../src/runtime/session.js";
import { generationBatching, generationRunner, prepare, type GenItem, type GenResult } from "../src/serve/generation.js";
import { Scheduler, type Batching, type RunningBatch } from "../src/serve/scheduler.js";
import { createServer } from "../src/serve/server.js";
import { fixture } from "./helpers.js";

/**
 * A batch whose rows are "name:steps": a row ends after that many steps and is answered
 * "name@n" (n: the batch's step). `steps` records the rows of every step.
 */
class ScriptedBatch implements RunningBatch<string, string> {
  readonly open = true;
  readonly steps: string[][] = [];
  private rows: { item: string; signal: AbortSignal; left: number; resolve: (r: string) => void; reject: (e: unknown) => void }[] = [];

  constructor(
    private readonly onStep: (n: number) => void = () => {},
    private readonly failAt = -1,
  ) {}

  get size(): number {
    return this.rows.filter((r) => !r.signal.aborted).length;
  }

  join(item: string, signal: AbortSignal): Promise<string> {
    return new Promise((resolve, reject) => this.rows.push({ item, signal, left: Number(item.split(":")[1]), resolve, reject }));
  }

  async step(): Promise<void> {
    await new Promise((r) => setImmediate(r));
    for (const r of this.rows.filter((r) => r.signal.aborted)) r.reject(r.signal.reason);
    this.rows = this.rows.filter((r) => !r.signal.aborted);
    this.steps.push(this.rows.map((r) => r.item.split(":")[0]!));
    if (this.steps.length === this.failAt) throw new Error("the model failed");
    for (const r of this.rows) if (--r.left === 0) r.resolve(`${r.item.split(":")[0]}@${this.steps.length}`);
    this.rows = this.rows.filter((r) => r.left > 0);
    this.onStep(this.steps.length);
  }

  async close(): Promise<void> {}
}

/** A scheduler over scripted batches; `batches` are the ones it opened. */
function scripted(maxBatch: number, onStep?: (n: number) => void, options: { failAt?: number; maxQueue?: number } = {}) {
  const batches: ScriptedBatch[] = [];
  const arrived: string[] = [];
  const sizes: number[] = [];
  const batching: Batching<string, string> = {
    arrive: (item) => void arrived.push(item),
    open: () => {
      const b = new ScriptedBatch(onStep, options.failAt);
      batches.push(b);
      return b;
    },
  };
  const scheduler = new Scheduler(batching, { maxQueue: options.maxQueue ?? 10, maxBatch }, { onBatch: (n) => sizes.push(n) });
  return { scheduler, batches, arrived, sizes };
}

const never = new AbortController().signal;


/** `batching` whose batches call `hook` after each of their steps (with the batch), to act at known steps whatever the speed. */
function afterEachStep(batching: Batching<GenItem, GenResult>, hook: (batch: RunningBatch<GenItem, GenResult>) => Promise<void>): Batching<GenItem, GenResult> {
  return {
    arrive: batching.arrive,
    open: (key) => {
      const inner = batching.open(key);
      return {
        get size() {
          return inner.size;
        },
        get open() {
          return inner.open;
        },
        join: (item, signal) => inner.join(item, signal),
        step: async () => {
          await inner.step();
          await hook(inner);
        },
        close: () => inner.close(),
      };
    },
  };
}

describe("the scheduler's running batch", () => {
  it("a job that arrives while a batch runs joins it at its next step, and is answered when its row ends", async () => {
    const submit = (item: string) => s.scheduler.submit({ key: "k", signal: never, item });
    const later: Promise<string>[] = [];
    const s = scripted(4, (n) => {
      if (n === 2) later.push(submit("b:2"));
      if (n === 4) later.push(submit("c:1"));
    });
    const a = submit("a:6");
    await a;
    const [b, c] = await Promise.all(later);
    expect([await a, b, c]).toEqual(["a@6", "b@4", "c@5"]);
    expect(s.batches).toHaveLength(1);
    expect(s.batches[0]!.steps).toEqual([["a"], ["a"], ["a", "b"], ["a", "b"], ["a", "c"], ["a"]]);
    expect(s.sizes).toEqual([1, 2, 2]);
  });

  it("takes rows up to maxBatch; the others wait and join as rows leave", async () => {
    const s = scripted(2);
    const jobs = ["a:3", "b:1", "c:2", "d:1"].map((item) => s.scheduler.submit({ key: "k", signal: never, item }));
    // The first job starts as it comes, alone; the others join at the next step, two rows at most.
    expect(await Promise.all(jobs)).toEqual(["a@3", "b@2", "c@4", "d@4"]);
    expect(s.batches[0]!.steps).toEqual([["a"], ["a", "b"], ["a", "c"], ["c", "d"]]);
  });

  it("a job of another kind at the head of the queue closes the batch: it runs once the batch's rows have ended", async () => {
    const order: string[] = [];
    const s = scripted(4);
    const a1 = s.scheduler.submit({ key: "k", signal: never, item: "a1:3" }).then((r) => (order.push(r), r));
    const solo = s.scheduler.submit({ key: null, signal: never, run: async () => (order.push("solo"), "solo") });
    const a2 = s.scheduler.submit({ key: "k", signal: never, item: "a2:1" }).then((r) => (order.push(r), r));
    await Promise.all([a1, solo, a2]);
    expect(order).toEqual(["a1@3", "solo", "a2@1"]);
    expect(s.batches.map((b) => b.steps)).toEqual([[["a1"], ["a1"], ["a1"]], [["a2"]]]);
  });

  it("starts a queued job's work as it arrives (not a refused one's), before its turn", async () => {
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const s = scripted(1, undefined, { maxQueue: 1 });
    const solo = s.scheduler.submit({ key: null, signal: never, run: async () => (started(), await gate, "solo") });
    await running;
    const queued = s.scheduler.submit({ key: "k", signal: never, item: "a:1" });
    expect(s.arrived).toEqual(["a:1"]);
    await expect(s.scheduler.submit({ key: "k", signal: never, item: "b:1" })).rejects.toMatchObject({ status: 429 });
    expect(s.arrived).toEqual(["a:1"]);
    release();
    expect([await solo, await queued]).toEqual(["solo", "a@1"]);
  });

  it("a job that leaves is answered at once and its row is not stepped again; a failed step fails its rows, and the queue goes on", async () => {
    const leaving = new AbortController();
    const s = scripted(4, (n) => n === 2 && leaving.abort("client left"));
    const left = s.scheduler.submit({ key: "k", signal: leaving.signal, item: "x:5" }).catch((e) => e);
    const stays = s.scheduler.submit({ key: "k", signal: never, item: "y:3" });
    expect(await left).toBe("client left");
    expect(await stays).toBe("y@4");
    expect(s.batches[0]!.steps).toEqual([["x"], ["x", "y"], ["y"], ["y"]]);

    const failing = scripted(4, undefined, { failAt: 2 });
    const jobs = ["p:5", "q:5"].map((item) => failing.scheduler.submit({ key: "k", signal: never, item }).catch((e: Error) => e.message));
    expect(await Promise.all(jobs)).toEqual(["the model failed", "the model failed"]);
    expect(await failing.scheduler.submit({ key: "k", signal: never, item: "r:1" })).toBe("r@1");
    expect(failing.scheduler.queued).toBe(0);
  });
});

const OPT = fixture("tiny-blip2-opt");
const T5 = fixture("tiny-blip2-t5");
const IMAGES = ["image0.png", "image1.png", "image2.png", "photo640x427.jpg"].map((f) => fixture(f));

let blip2: Blip2;
let images: RawImage[];

beforeAll(async () => {
  blip2 = await Blip2.load(OPT);
  images = await Promise.all(IMAGES.map(async (f) => ({ ...(await loadImage(f, f, { exifOrientation: true })), channels: 3 as const })));
});

afterAll(async () => {
  await blip2?.dispose();
});

/** What `captionAll` gives for one request alone: its ids and words. */
async function alone(model: Blip2, image: number, prompt: string, options: GenItem["options"]): Promise<[number[], string]> {
  const [r] = await model.captionAll([images[image]!], { prompt, ...options });
  return [r!.ids, r!.caption];
}

describe("requests joining the running batch on the tiny OPT", () => {
  it("staggered requests get their lone answers: one joins after the first's third step, one after it left", async () => {
    const batching = generationBatching(blip2);
    const sizes: number[] = [];
    const later: Promise<GenResult>[] = [];
    const order: string[] = [];
    let steps = 0;
    const submit = (name: string, item: GenItem) => scheduler.submit({ key: "rolling", signal: never, item }).then((r) => (order.push(name), r));
    const items: GenItem[] = [
      { image: images[0]!, prompt: "", options: { maxNewTokens: 40 } },
      { image: images[1]!, prompt: "a photo of", options: { maxNewTokens: 5, repetitionPenalty: 1.3 } },
      { image: images[2]!, prompt: "Question: what is it? Answer:", options: { maxNewTokens: 6 } },
    ];
    let cSubmitted = false;
    // Steps are counted through the batch, so that joins come at known steps whatever the speed.
    const counted = afterEachStep(batching, async () => {
      // Each joins once its image is encoded (queued, it is encoded as it comes): waited for
      // here so that it joins at the next step.
      if (++steps === 3) {
        later.push(submit("b", items[1]!));
        await items[1]!.prepared;
      }
      if (order.includes("b") && !cSubmitted) {
        cSubmitted = true;
        later.push(submit("c", items[2]!));
        await items[2]!.prepared;
      }
    });
    const scheduler = new Scheduler(counted, { maxQueue: 10, maxBatch: 4 }, { onBatch: (n) => sizes.push(n) });
    const a = await submit("a", items[0]!);
    const [b, c] = await Promise.all(later);
    const expected = await Promise.all(items.map((item, i) => alone(blip2, i, item.prompt, item.options)));
    [a, b!, c!].forEach((r, i) => expect([r.ids, r.text], "abc"[i]).toEqual(expected[i]));
    expect(order).toEqual(["b", "c", "a"]);
    expect([a.batchSize, b!.batchSize, c!.batchSize]).toEqual([2, 2, 2]);
    expect([a.finishReason, a.completionTokens, b!.completionTokens, c!.completionTokens]).toEqual(["length", 40, 5, 6]);
    expect(sizes).toEqual([1, 2, 2]);
  });

  it("a request cancelled mid-way is answered at once and its row leaves the cache at the next step", async () => {
    const batching = generationBatching(blip2);
    const leaving = new AbortController();
    let steps = 0;
    let sizeAfterAbort = -1;
    const counted = afterEachStep(batching, async (inner) => {
      if (++steps === 3) {
        leaving.abort("client left");
        sizeAfterAbort = inner.size;
      }
    });
    const compose = vi.spyOn(CacheHandle, "compose");
    try {
      const scheduler = new Scheduler(counted, { maxQueue: 10, maxBatch: 4 });
      const items: GenItem[] = [0, 1].map((i) => ({ image: images[i]!, prompt: "", options: { maxNewTokens: 30 } }));
      await Promise.all(items.map((item) => prepare(blip2, item)));
      const left = scheduler.submit({ key: "rolling", signal: leaving.signal, item: items[0]! }).catch((e) => [e, steps]);
      const kept = scheduler.submit({ key: "rolling", signal: never, item: items[1]! });
      expect(await left).toEqual(["client left", 3]);
      expect(sizeAfterAbort).toBe(1);
      const r = await kept;
      expect([r.ids, r.text]).toEqual(await alone(blip2, 1, "", { maxNewTokens: 30 }));
      // Made for the first row alone, both, then the second alone from the step after the abort.
      expect(compose.mock.calls.map(([rows]) => rows.length)).toEqual([1, 2, 1]);
    } finally {
      compose.mockRestore();
    }
  });

  it("a stop string ends a row there, as in a batch decoded from start to end", async () => {
    const item = (): GenItem => ({ image: images[3]!, prompt: "a", options: { maxNewTokens: 12 } });
    const [, caption] = await alone(blip2, 3, "a", { maxNewTokens: 12 });
    const stop = [caption.slice(3, 5)];
    const whole = (await generationRunner(blip2)([{ ...item(), stop }], never))[0] as GenResult;
    const streamed: string[] = [];
    const rolling = await new Scheduler(generationBatching(blip2), { maxQueue: 4, maxBatch: 4 }).submit({ key: "rolling", signal: never, item: { ...item(), stop, onText: (t) => streamed.push(t) } });
    expect(rolling.text).toBe(caption.slice(0, caption.indexOf(stop[0]!)).trimEnd());
    expect([rolling.text, rolling.ids, rolling.finishReason, rolling.completionTokens]).toEqual([whole.text, whole.ids, "stop", whole.completionTokens]);
    expect(streamed.join("")).toBe(rolling.text);
  });

  it("the image of a queued request goes through the vision encoder while the batch before it decodes", async () => {
    const encoded: number[] = [];
    const original = blip2.model.imageFeatures.bind(blip2.model);
    const spy = vi.spyOn(blip2.model, "imageFeatures");
    spy.mockImplementation((...args) => (encoded.push(performance.now()), original(...args)));
    try {
      // One row at a time: the second waits for the first to end, its image encoded meanwhile.
      const scheduler = new Scheduler(generationBatching(blip2), { maxQueue: 4, maxBatch: 1 });
      const ended: number[] = [];
      const jobs = [0, 1].map((i) => scheduler.submit({ key: "rolling", signal: never, item: { image: images[i]!, prompt: "", options: { maxNewTokens: 60 } } }).then((r) => (ended.push(performance.now()), r)));
      await Promise.all(jobs);
      expect(encoded).toHaveLength(2);
      // Sent to the vision encoder before the first request's row ended, not when its turn came.
      expect(encoded[1]).toBeLessThan(ended[0]!);
    } finally {
      spy.mockRestore();
    }
  });
});

describe("over HTTP", () => {
  const dataUrl = (file: string) => `data:image/${path.extname(file) === ".jpg" ? "jpeg" : "png"};base64,${fs.readFileSync(file).toString("base64")}`;
  const post = async (url: string, body: unknown) => (await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) })).json() as Promise<any>;

  it("a client that leaves mid-stream frees its row: the next request decodes without it and gets the CLI's answer", async () => {
    const app = await createServer({ blip2, webRoot: null });
    const url = await app.listen({ host: "127.0.0.1", port: 0 });
    try {
      const leaving = new AbortController();
      const long = await fetch(`${url}/v1/caption`, { method: "POST", signal: leaving.signal, headers: { "content-type": "application/json" }, body: JSON.stringify({ image: dataUrl(IMAGES[0]!), max_new_tokens: 120, stream: true }) });
      const reader = long.body!.getReader();
      let text = "";
      while (!text.includes("event: token")) text += new TextDecoder().decode((await reader.read()).value);
      expect(text).not.toContain("event: done");
      leaving.abort();
      const short = await post(`${url}/v1/caption`, { image: dataUrl(IMAGES[1]!), max_new_tokens: 4 });
      expect([short.ids, short.text]).toEqual(await alone(blip2, 1, "", { maxNewTokens: 4 }));
      expect(short.timings.batch_size).toBe(1);
      const health = await (await fetch(`${url}/health`)).json();
      expect(health.queue).toBe(0);
    } finally {
      await app.close();
    }
  });

  it("T5's greedy requests still decode together from the start, with the CLI's answers", async () => {
    const t5 = await Blip2.load(T5);
    const app = await createServer({ blip2: t5, webRoot: null });
    const url = await app.listen({ host: "127.0.0.1", port: 0 });
    try {
      // One question, so that no prompt is padded: T5's relative positions count the padding
      // (as in transformers), so a padded prompt's answer may differ from its lone one.
      const answers = await Promise.all([0, 1, 2].map((i) => post(`${url}/v1/ask`, { image: dataUrl(IMAGES[i]!), question: "what is it?", max_new_tokens: 6 })));
      for (const i of [0, 1, 2]) expect([answers[i].ids, answers[i].text], `image ${i}`).toEqual(await alone(t5, i, "Question: what is it? Answer:", { maxNewTokens: 6 }));
      expect(Math.max(...answers.map((a) => a.timings.batch_size))).toBeGreaterThan(1);
    } finally {
      await app.close();
      await t5.dispose();
    }
  });
});
