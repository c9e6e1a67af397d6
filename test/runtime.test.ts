/** The runtime around ONNX Runtime: the worker thread, devices and their fallback. */
import fs from "node:fs";
import * as ort from "onnxruntime-node";
import { afterAll, describe, expect, it, vi } from "vitest";
import { Blip2, Blip2ForConditionalGeneration } from "../src/index.js";
import { Graph } from "../src/ir/graph.js";
import { serializeGraph } from "../src/ir/onnx.js";
import * as op from "../src/ir/ops.js";
import { CompiledGraph } from "../src/runtime/session.js";
import { fixture } from "./helpers.js";

const loaded: { dispose(): Promise<void> }[] = [];
afterAll(async () => Promise.all(loaded.map((m) => m.dispose())));

/** A graph that keeps ONNX Runtime busy for a while: a chain of 1024 x 1024 matrix products. */
function busyGraph(): Graph {
  const g = new Graph("busy");
  let x = g.input("x", "float32", [1024, 1024]);
  const w = g.constant(Float32Array.from({ length: 1024 * 1024 }, (_, i) => Math.sin(i) / 32), "float32", [1024, 1024]);
  for (let i = 0; i < 24; i++) x = op.matmul(x, w);
  g.output(x, "y");
  return g;
}

async function ticksDuring(run: () => Promise<unknown>): Promise<number> {
  let ticks = 0;
  const timer = setInterval(() => ticks++, 2);
  await run();
  clearInterval(timer);
  return ticks;
}

describe("inference off the main thread", () => {
  it("the event loop keeps running during a long run in the worker, not in this thread", async () => {
    const feeds = { x: new ort.Tensor("float32", new Float32Array(1024 * 1024).fill(0.01), [1024, 1024]) };
    const inWorker = await CompiledGraph.create(busyGraph(), { worker: true });
    const here = await CompiledGraph.create(busyGraph(), { worker: false });
    const a = await inWorker.run(feeds);
    const b = await here.run(feeds);
    expect(Array.from((a.y!.data as Float32Array).slice(0, 8))).toEqual(Array.from((b.y!.data as Float32Array).slice(0, 8)));
    const start = performance.now();
    const workerTicks = await ticksDuring(() => inWorker.run(feeds));
    const elapsed = performance.now() - start;
    const hereTicks = await ticksDuring(() => here.run(feeds));
    // Timers fire throughout the worker's run; in this thread they wait for the run to end.
    expect(workerTicks).toBeGreaterThanOrEqual(Math.min(5, Math.floor(elapsed / 10)));
    expect(hereTicks).toBeLessThanOrEqual(2);
    await inWorker.release();
    await here.release();
  });

  it.each(["tiny-blip2-opt", "tiny-blip2-t5"])("%s: gives the same generations in this thread as in the worker", async (name) => {
    const ref = JSON.parse(fs.readFileSync(fixture(name, "reference.json"), "utf8"));
    const b = await Blip2.load(fixture(name), { worker: false });
    loaded.push(b);
    const [r] = await b.captionAll([fixture("image0.png")], { maxNewTokens: 10, numBeams: 3, minNewTokens: 3, prompt: ref.prompts[1] });
    expect(r!.ids).toEqual(ref.cases["1"].beam3_ids);
  });
});

/** Whether this machine can run ONNX Runtime's WebGPU provider at all. */
async function webgpuWorks(): Promise<boolean> {
  const g = new Graph("probe");
  const x = g.input("x", "float32", [1]);
  g.output(op.relu(x), "y");
  try {
    await ort.InferenceSession.create(serializeGraph(g, { externalLocation: () => "" }), { executionProviders: ["webgpu"], logSeverityLevel: 4 });
    return true;
  } catch {
    return false;
  }
}
const gpu = await webgpuWorks();

describe("devices", () => {
  it("on a GPU every session shares one worker thread; on the CPU the vision encoder's has its own", async () => {
    const { sessionThread, VISION_SESSION: vision } = await import("../src/runtime/session.js");
    expect([sessionThread(vision, "cpu"), sessionThread({}, "cpu")]).toEqual(["image", "main"]);
    expect([sessionThread(vision, "webgpu"), sessionThread(vision, "cuda"), sessionThread({}, "webgpu")]).toEqual(["main", "main", "main"]);
  });

  it.skipIf(gpu)("an unavailable device falls back to the CPU with one warning", async () => {
    const warn = vi.spyOn(console, "warn").mockImplementation(() => {});
    const ref = JSON.parse(fs.readFileSync(fixture("tiny-blip2-opt", "reference.json"), "utf8"));
    const b = await Blip2.load(fixture("tiny-blip2-opt"), { device: "webgpu" });
    loaded.push(b);
    const [r] = await b.captionAll([fixture("image0.png")], { maxNewTokens: 10 });
    expect(r!.ids).toEqual(ref.cases["0"].greedy_ids);
    expect(warn.mock.calls.map((c) => String(c[0])).filter((m) => /device webgpu is not available here .*running on the CPU/.test(m))).toHaveLength(1);
    warn.mockRestore();
  });

  // After the fallback test above: the device probe (and its one warning) is process-wide.
  it("graphs are built for the device the sessions run on: the GPU where it works, else the CPU", async () => {
    const { SessionCache } = await import("../src/runtime/session.js");
    const targets: string[] = [];
    const sessions = new SessionCache({ device: "webgpu" });
    await sessions.get("probe", (target) => {
      targets.push(target);
      const g = new Graph("probe", target);
      g.output(op.relu(g.input("x", "float32", [1])), "y");
      return g;
    });
    expect(targets).toEqual([gpu ? "gpu" : "cpu"]);
    await sessions.release();
  });

  // Where a GPU is present (not in CI), the tiny fixtures must match transformers within 1e-3 on WebGPU.
  it.skipIf(!gpu)("webgpu: the tiny OPT and T5 models within 1e-3 of transformers", async () => {
    const { loadReference, expectClose } = await import("./helpers.js");
    for (const name of ["tiny-blip2-opt", "tiny-blip2-t5"]) {
      const model = await Blip2ForConditionalGeneration.fromPretrained(fixture(name), { device: "webgpu" });
      loaded.push(model);
      const ref = loadReference(fixture(name, "reference.safetensors"));
      const cases = JSON.parse(fs.readFileSync(fixture(name, "reference.json"), "utf8")).cases;
      const rt = (model as unknown as { runtime: import("../src/runtime/blip2Runtime.js").Blip2Runtime }).runtime;
      for (const c of ["0", "1", "2"]) {
        const image = await rt.image(ref.get(`case${c}.pixel_values`)!.data, 1);
        for (const k of ["vision_last_hidden_state", "qformer_last_hidden_state"]) expectClose(k, { shape: image[k]!.dims, data: image[k]!.data as Float32Array }, ref.get(`case${c}.${k}`)!, 1e-3);
        const [ids] = await model.generate({ pixelValues: ref.get(`case${c}.pixel_values`)!.data, inputIds: [cases[c].input_ids], attentionMask: [cases[c].attention_mask], maxNewTokens: 10 });
        expect(ids).toEqual(cases[c].greedy_ids);
      }
    }
  });

  it.skipIf(!gpu)("webgpu: the tiny ITM model's ITC and ITM scores within 1e-3 of transformers", async () => {
    const { loadReference, expectClose } = await import("./helpers.js");
    const { Checkpoint } = await import("../src/io/checkpoint.js");
    const { itcSimilarity, RetrievalRuntime } = await import("../src/runtime/retrievalRuntime.js");
    const ref = loadReference(fixture("tiny-blip2-itm", "reference.safetensors"));
    const meta = JSON.parse(fs.readFileSync(fixture("tiny-blip2-itm", "reference.json"), "utf8"));
    const rt = new RetrievalRuntime(Checkpoint.open(fixture("tiny-blip2-itm")), { device: "webgpu" });
    loaded.push({ dispose: () => rt.release() });
    const close = (name: string, t: ort.Tensor) => expectClose(name, { shape: t.dims, data: t.data as Float32Array }, ref.get(name)!, 1e-3);
    const images = await rt.images(ref.get("pixel_values")!.data, 2);
    const texts = await rt.texts(meta.input_ids, meta.attention_mask);
    close("itc.image_embeds", images.image_embeds!);
    close("itc.text_embeds", texts.text_embeds!);
    expectClose("itc.logits_per_image", { shape: [2, 2], data: itcSimilarity(images.image_embeds!, texts.text_embeds!) }, ref.get("itc.logits_per_image")!, 1e-3);
    const itm = await rt.itm(images.vision_last_hidden_state!, meta.input_ids, meta.attention_mask);
    expectClose("itm.logits_per_image", { shape: itm.itm_logits!.dims, data: itm.itm_logits!.data as Float32Array }, ref.get("itm.logits_per_image")!, 1e-3);
  });
});

describe("garbage collection in the inference worker", () => {
  it("collectGarbage frees dropped buffers at once", async () => {
    const { collectGarbage } = await import("../src/runtime/gc.js");
    const MB = 2 ** 20;
    let big: Float32Array | null = new Float32Array(64 * MB);
    big.fill(1);
    const held = process.memoryUsage().arrayBuffers;
    big = null;
    collectGarbage();
    // The collection finds the buffer dead at once; V8 may free its memory on a background sweeper
    // a moment later (once in about seven runs the count had not moved yet), so wait up to 2 s.
    const freed = () => held - process.memoryUsage().arrayBuffers;
    for (let waited = 0; freed() < 200 * MB && waited < 2000; waited += 10) await new Promise((r) => setTimeout(r, 10));
    expect(freed()).toBeGreaterThanOrEqual(200 * MB);
  });
});

describe("key/value cache", () => {
  it("has at least one slot: zero-length past inputs crashed ONNX Runtime's WebGPU provider", async () => {
    const { KvCache } = await import("../src/runtime/kvCache.js");
    expect(() => new KvCache({ layers: 1, rows: 1, heads: 1, capacity: 0, headDim: 4 })).toThrow(/at least one slot, got 0/);
    expect(new KvCache({ layers: 1, rows: 2, heads: 1, capacity: 1, headDim: 4 }).tensors["past.0.key"]!.dims).toEqual([2, 1, 1, 4]);
  });

  it("gives a prompt's pass one masked slot while empty, then every slot", async () => {
    const { KvCache } = await import("../src/runtime/kvCache.js");
    const cache = new KvCache({ layers: 1, rows: 2, heads: 2, capacity: 5, headDim: 3 });
    const prompt = cache.inputs([[0, 1, 1], [1, 1, 1]]);
    expect(prompt["past.0.key"]!.dims).toEqual([2, 2, 1, 3]);
    expect(Array.from(prompt.attention_mask!.data as BigInt64Array, Number)).toEqual([0, 0, 1, 1, 0, 1, 1, 1]);
    const fresh = new ort.Tensor("float32", new Float32Array(2 * 2 * 3 * 3).fill(1), [2, 2, 3, 3]);
    cache.write({ "new.0.key": fresh, "new.0.value": fresh }, [[0, 1, 1], [1, 1, 1]]);
    cache.advance(3);
    const step = cache.inputs([[1], [1]]);
    expect(step["past.0.key"]!.dims).toEqual([2, 2, 5, 3]);
    expect(Array.from(step.attention_mask!.data as BigInt64Array, Number)).toEqual([0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 1]);
  });

  it("resizes to another capacity, keeping the first slots of every row and head", async () => {
    const { KvCache } = await import("../src/runtime/kvCache.js");
    const cache = new KvCache({ layers: 1, rows: 2, heads: 2, capacity: 4, headDim: 1 });
    // Row r, head h, position s holds 100r + 10s + h.
    const fresh = new ort.Tensor("float32", Float32Array.from([0, 10, 20, 1, 11, 21, 100, 110, 120, 101, 111, 121]), [2, 2, 3, 1]);
    cache.write({ "new.0.key": fresh, "new.0.value": fresh }, [[1, 1, 1], [0, 1, 1]]);
    cache.advance(3);
    const kept = cache.resized(6, 2);
    expect(kept.length).toBe(2);
    expect(Array.from(kept.tensors["past.0.key"]!.data as Float32Array)).toEqual([0, 10, 0, 0, 0, 0, 1, 11, 0, 0, 0, 0, 100, 110, 0, 0, 0, 0, 101, 111, 0, 0, 0, 0]);
    expect(Array.from(kept.inputs([[1], [1]]).attention_mask!.data as BigInt64Array, Number)).toEqual([1, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1]);
    expect(() => cache.resized(6, 4)).toThrow(/cannot keep 4 slots of 3/);
    expect(kept.memory.buffer).not.toBe(cache.memory.buffer);
  });

  it("resizes within its own block when it fits, growing or shrinking, and the host keeps that block", async () => {
    const { KvCache } = await import("../src/runtime/kvCache.js");
    const { SessionHost } = await import("../src/runtime/sessionHost.js");
    const shape = { layers: 2, rows: 2, heads: 3, capacity: 4, headDim: 2 };
    const block = new Float32Array(2 * 2 * 2 * 3 * 7 * 2).fill(-1);
    const cache = new KvCache(shape, (floats) => block.subarray(0, floats).fill(0));
    // Slot s of head h of row r of tensor n holds 1000n + 100r + 10h + s (both values of the slot).
    const value = (n: number, r: number, h: number, s: number) => 1000 * n + 100 * r + 10 * h + s;
    Object.values(cache.tensors).forEach((t, n) => (t.data as Float32Array).forEach((_, i, a) => (a[i] = Math.floor(i / 2) % 4 < 3 ? value(n, Math.floor(i / 24), Math.floor(i / 8) % 3, Math.floor(i / 2) % 4) : 0)));
    cache.length = 3;
    const expected = (capacity: number, keep: number) =>
      [0, 1, 2, 3].map((n) => Array.from({ length: 2 * 3 * capacity * 2 }, (_, i) => {
        const s = Math.floor(i / 2) % capacity;
        return s < keep ? value(n, Math.floor(i / (6 * capacity)), Math.floor(i / (2 * capacity)) % 3, s) : 0;
      }));
    const grown = cache.resized(7, 3, () => { throw new Error("allocated"); });
    expect(grown.memory.buffer).toBe(block.buffer);
    expect(Object.values(grown.tensors).map((t) => Array.from(t.data as Float32Array))).toEqual(expected(7, 3));
    const shrunk = grown.resized(3, 2, () => { throw new Error("allocated"); });
    expect(Object.values(shrunk.tensors).map((t) => Array.from(t.data as Float32Array))).toEqual(expected(3, 2));
    expect(Array.from(shrunk.inputs([[1], [1]]).attention_mask!.data as BigInt64Array, Number)).toEqual([0, 0, 0, 1, 0, 0, 0, 1]);
    expect(() => shrunk.resized(8, 2, (floats) => new Float32Array(floats))).not.toThrow();

    // The host hands a block to another cache only when the resized one left it.
    const host = new SessionHost();
    host.newCache(1, shape);
    host.resizeCache(1, 5, 0);
    host.newCache(2, shape);
    const memoryOf = (id: number) => (host as unknown as { caches: Map<number, InstanceType<typeof KvCache>> }).caches.get(id)!.memory.buffer;
    expect(memoryOf(2)).not.toBe(memoryOf(1));
  });

  it("reorders rows as beam search asks: any index, cycles included, filled slots past the shared ones only", async () => {
    const { KvCache, rowCopies } = await import("../src/runtime/kvCache.js");
    const shape = { layers: 2, rows: 6, heads: 3, capacity: 5, headDim: 2 };
    let seed = 7;
    const random = (n: number) => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
    const indexes = [[1, 0, 3, 2, 5, 4], [1, 2, 0, 4, 5, 3], [0, 0, 1, 2, 3, 4], [5, 5, 5, 0, 0, 0], [0, 1, 2, 3, 4, 5]];
    for (let i = 0; i < 200; i++) indexes.push(Array.from({ length: 6 }, () => random(6)));
    for (const [index, shared] of indexes.flatMap((index) => [[index, 0], [index, 2]] as const)) {
      const cache = new KvCache(shape);
      // Slot s of head h of row r holds 1000r + 100h + 10s + d in the first 3 (filled) slots.
      for (const t of Object.values(cache.tensors)) (t.data as Float32Array).forEach((_, i, a) => (a[i] = Math.floor(i / 30) * 1000 + (Math.floor(i / 10) % 3) * 100 + (i % 10)));
      cache.length = 3;
      const before = Object.values(cache.tensors).map((t) => (t.data as Float32Array).slice());
      cache.reorder(index, shared);
      Object.values(cache.tensors).forEach((t, n) => {
        const data = t.data as Float32Array;
        for (let r = 0; r < 6; r++) {
          for (let h = 0; h < 3; h++) {
            // Slots [from, to) of head h of a row (2 values per slot).
            const slots = (row: number, a: Float32Array, from: number, to: number) => Array.from(a.subarray((row * 3 + h) * 10 + 2 * from, (row * 3 + h) * 10 + 2 * to));
            expect(slots(r, data, shared, 3), `index ${index} row ${r}`).toEqual(slots(index[r]!, before[n]!, shared, 3));
            // The shared slots the caller vouches for are left alone.
            expect(slots(r, data, 0, shared)).toEqual(slots(r, before[n]!, 0, shared));
          }
        }
      });
      // One copy per changed row, plus one per cycle.
      expect(rowCopies(index).filter((c) => c.to >= 0)).toHaveLength(index.filter((from, to) => from !== to).length);
    }
    expect(rowCopies([1, 0, 3, 2, 5, 4]).filter((c) => c.to < 0)).toHaveLength(3);
    expect(rowCopies([0, 0, 1, 2, 3, 4]).filter((c) => c.to < 0)).toHaveLength(0);
  });

  it("takes a dropped cache's memory for the next one, zeroed, with room to grow (fresh memory faults on first write)", async () => {
    const { CacheMemory, KvCache } = await import("../src/runtime/kvCache.js");
    const memory = new CacheMemory();
    const shape = { layers: 2, rows: 2, heads: 2, capacity: 4, headDim: 3 };
    const first = new KvCache(shape, memory.allocate);
    first.memory.fill(7);
    memory.release(first.memory);
    const second = new KvCache({ ...shape, capacity: 3 }, memory.allocate);
    expect(second.memory.buffer).toBe(first.memory.buffer);
    expect(second.memory.every((v) => v === 0)).toBe(true);
    expect(second.tensors["past.1.value"]!.dims).toEqual([2, 2, 3, 3]);
    // Taken: the next cache gets its own.
    expect(new KvCache(shape, memory.allocate).memory.buffer).not.toBe(first.memory.buffer);
    memory.release(second.memory);
    // A block is made with room for a slightly larger cache (192 floats in 256), not for more.
    const grown = new KvCache({ ...shape, capacity: 5 }, memory.allocate);
    expect(grown.memory.buffer).toBe(first.memory.buffer);
    expect(grown.memory.every((v) => v === 0)).toBe(true);
    memory.release(grown.memory);
    expect(new KvCache({ ...shape, capacity: 6 }, memory.allocate).memory.buffer).not.toBe(first.memory.buffer);
  });

  it("gathers rows in the order asked (beams of one input), copying only when it must", async () => {
    const { gatherRows } = await import("../src/runtime/kvCache.js");
    const t = new ort.Tensor("float32", Float32Array.from({ length: 12 }, (_, i) => i), [3, 2, 2]);
    const g = gatherRows(t, [2, 0, 0, 1]);
    expect(g.dims).toEqual([4, 2, 2]);
    expect(Array.from(g.data as Float32Array)).toEqual([8, 9, 10, 11, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]);
    expect(gatherRows(t, [0, 1, 2])).toBe(t);
  });
});

describe("OPT prompt passes", () => {
  it("take a batch of captions or questions in one pass, a long chat context alone", async () => {
    const { promptRowsPerRun } = await import("../src/runtime/blip2Runtime.js");
    const opt27 = { numHiddenLayers: 32, hiddenSize: 2560 };
    const opt67 = { numHiddenLayers: 32, hiddenSize: 4096 };
    expect(promptRowsPerRun(opt27, 38)).toBeGreaterThanOrEqual(5); // a batch of 4 captions, with a row to spare
    expect(promptRowsPerRun(opt27, 64)).toBe(4);
    expect(promptRowsPerRun(opt67, 42)).toBe(4);
    expect(promptRowsPerRun(opt27, 512)).toBe(1);
    expect(promptRowsPerRun(opt67, 2048)).toBe(1);
  });
});
