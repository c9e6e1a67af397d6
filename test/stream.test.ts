/**
 * Stopping a generation: leaving a stream's loop early or aborting a signal stops the decoding at
 * its next step and frees its key/value cache before the loop is left; errors of the generation
 * still reach the caller.
 */
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { Blip2 } from "../src/index.js";
import { Blip2Runtime } from "../src/runtime/blip2Runtime.js";
import { CacheHandle } from "../src/runtime/session.js";
import { fixture } from "./helpers.js";

const blip2 = Blip2.load(fixture("tiny-blip2-opt"));
afterAll(async () => (await blip2).dispose());
afterEach(() => vi.restoreAllMocks());

async function prepared() {
  const b = await blip2;
  return { b, inputs: await b.processor.process({ images: fixture("image0.png"), text: "a photo of" }) };
}

/** Counts the language model's runs and the caches dropped. */
function watch() {
  return { decode: vi.spyOn(Blip2Runtime.prototype, "optDecode"), drop: vi.spyOn(CacheHandle.prototype, "drop") };
}

describe("stopping a stream", () => {
  it("break: no step after the one in flight, and the cache is freed before the loop is left", async () => {
    const { b, inputs } = await prepared();
    const { decode, drop } = watch();
    const seen: number[] = [];
    for await (const step of b.model.stream({ ...inputs, maxNewTokens: 30, minNewTokens: 30 })) {
      seen.push(step[0]!);
      if (seen.length === 2) break;
    }
    expect(drop).toHaveBeenCalledTimes(1);
    // The prompt, the step that gave the second token and at most the one in flight: not 30.
    const runs = decode.mock.calls.length;
    expect(runs).toBeGreaterThanOrEqual(2);
    expect(runs).toBeLessThanOrEqual(3);
    await new Promise((r) => setTimeout(r, 50));
    expect(decode.mock.calls.length).toBe(runs);
    // The model still works, and gives the same tokens.
    const [ids] = await b.model.generate({ ...inputs, maxNewTokens: 2, minNewTokens: 2 });
    expect(ids!.slice(-2)).toEqual(seen);
  });

  it("an aborted signal stops the stream with its reason and frees the cache", async () => {
    const { b, inputs } = await prepared();
    const { decode, drop } = watch();
    const controller = new AbortController();
    const seen: number[] = [];
    const consume = async () => {
      for await (const step of b.model.stream({ ...inputs, maxNewTokens: 30, minNewTokens: 30, signal: controller.signal })) {
        seen.push(step[0]!);
        if (seen.length === 3) controller.abort(new Error("enough"));
      }
    };
    await expect(consume()).rejects.toThrow("enough");
    expect(seen.length).toBeLessThanOrEqual(5);
    expect(decode.mock.calls.length).toBeLessThanOrEqual(5);
    expect(drop).toHaveBeenCalledTimes(1);
  });

  it("generate takes a signal too", async () => {
    const { b, inputs } = await prepared();
    const { drop } = watch();
    const controller = new AbortController();
    const steps: number[] = [];
    const run = b.model.generate({ ...inputs, maxNewTokens: 30, minNewTokens: 30, signal: controller.signal, onToken: (t) => void (steps.push(t[0]!), steps.length === 4 && controller.abort()) });
    await expect(run).rejects.toThrow(/abort/i);
    expect(steps).toHaveLength(4);
    expect(drop).toHaveBeenCalledTimes(1);
  });

  it("a failure of the generation is thrown to the loop, also when the loop leaves meanwhile", async () => {
    const { b, inputs } = await prepared();
    const real = Blip2Runtime.prototype.optDecode;
    let calls = 0;
    vi.spyOn(Blip2Runtime.prototype, "optDecode").mockImplementation(function (this: Blip2Runtime, ...args) {
      // The second step fails (the first run is the prompt).
      if (++calls === 3) return Promise.reject(new Error("worker lost"));
      return real.apply(this, args);
    });
    const consume = async (leaveAfter: number, pause = 0) => {
      let n = 0;
      for await (const _ of b.model.stream({ ...inputs, maxNewTokens: 30, minNewTokens: 30 })) {
        if (pause) await new Promise((r) => setTimeout(r, pause));
        if (++n === leaveAfter) break;
      }
    };
    await expect(consume(100)).rejects.toThrow("worker lost");
    calls = 0;
    // Leaving at the second token, while the failing step is in flight: the failure is not lost.
    await expect(consume(2)).rejects.toThrow("worker lost");
    calls = 0;
    // A slow consumer: the generation has failed before the loop leaves at a queued token.
    await expect(consume(2, 300)).rejects.toThrow("worker lost");
  });
});
