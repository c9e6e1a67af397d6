/**
 * The public API end to end (processor from image files, model, decode) against transformers'
 * generate: every tiny 5.17 case, the batch and the legacy entries; the task helpers; chat.
 */
import fs from "node:fs";
import { afterAll, describe, expect, it, vi } from "vitest";
import { Blip2, Blip2ForConditionalGeneration, Blip2Processor, pipeline, type GenerationOptions } from "../src/index.js";
import { Blip2Runtime } from "../src/runtime/blip2Runtime.js";
import { fixture } from "./helpers.js";

const loaded: { dispose(): Promise<void> }[] = [];
afterAll(async () => Promise.all(loaded.map((m) => m.dispose())));
const keep = <T extends { dispose(): Promise<void> }>(m: T) => (loaded.push(m), m);
const reference = (name: string) => JSON.parse(fs.readFileSync(fixture(name, "reference.json"), "utf8"));

const SETTINGS: [string, string, GenerationOptions][] = [
  ["greedy_ids", "greedy_text", { maxNewTokens: 10 }],
  ["greedy_min10_ids", "", { maxNewTokens: 10, minNewTokens: 10 }],
  ["beam3_ids", "beam3_text", { maxNewTokens: 10, numBeams: 3, minNewTokens: 3 }],
  ["repetition_penalty_1.5_ids", "", { maxNewTokens: 10, minNewTokens: 10, repetitionPenalty: 1.5 }],
];

describe.each(["tiny-blip2-opt", "tiny-blip2-t5"])("%s through the API", (name) => {
  const ref = reference(name);
  const blip2 = Blip2.load(fixture(name)).then(keep);

  it.each(["0", "1", "2"])("case %s: ids and texts of every generation setting", async (c) => {
    const b = await blip2;
    for (const [idsKey, textKey, options] of SETTINGS) {
      const [r] = await b.captionAll([fixture("image0.png")], { ...options, prompt: ref.prompts[Number(c)] });
      expect(r!.ids, `${idsKey}`).toEqual(ref.cases[c][idsKey]);
      if (textKey) expect(r!.text, textKey).toBe(ref.cases[c][textKey][0]);
    }
  });

  it("batch: two images, two prompts, left padding after the image tokens", async () => {
    const b = await blip2;
    // Callable as in transformers: processor({ images, text }).
    const inputs = await b.processor({ images: [fixture("image0.png"), fixture("image1.png")], text: ref.batch.prompts, paddingSide: "left" });
    expect(inputs.inputIds).toEqual(ref.batch.input_ids);
    expect(inputs.attentionMask).toEqual(ref.batch.attention_mask);
    const ids = await b.model.generate({ ...inputs, maxNewTokens: 8, minNewTokens: 8 });
    expect(ids).toEqual(ref.batch.greedy_ids);
    expect(b.processor.batchDecode(ids, { skipSpecialTokens: true })).toHaveLength(2);
  });

  it("legacy prompt ids (a processor without num_query_tokens)", async () => {
    const b = await blip2;
    const legacy = new Blip2Processor(b.processor.imageProcessor, b.processor.tokenizer, null, null);
    const inputs = await legacy.process({ images: fixture("image0.png"), text: ref.prompts[2] });
    expect(inputs.inputIds).toEqual(ref.legacy.input_ids);
    expect(await b.model.generate({ ...inputs, maxNewTokens: 8 })).toEqual(ref.legacy.greedy_ids);
  });

  it("streaming yields the tokens generate returns", async () => {
    const b = await blip2;
    const inputs = await b.processor.process({ images: fixture("image0.png"), text: ref.prompts[1] });
    const streamed: number[] = [];
    for await (const step of b.model.stream({ ...inputs, maxNewTokens: 10 })) streamed.push(step[0]!);
    const [ids] = await b.model.generate({ ...inputs, maxNewTokens: 10 });
    expect(streamed).toEqual(ids!.slice(ids!.length - streamed.length));
    expect(streamed).toHaveLength(10);
  });
});

describe("task helpers", () => {
  const ref = reference("tiny-blip2-opt");
  const blip2 = Blip2.load(fixture("tiny-blip2-opt")).then(keep);

  it("caption and ask return the generated words only", async () => {
    const b = await blip2;
    expect(await b.caption(fixture("image0.png"), { maxNewTokens: 10 })).toBe(ref.cases["0"].greedy_text[0].trim());
    const answer = await b.ask(fixture("image0.png"), "what color is the circle?", { maxNewTokens: 10 });
    expect(answer).toBe(b.processor.decode(ref.cases["2"].greedy_ids.slice(15), { skipSpecialTokens: true }).trim());
  });

  it("pipeline('image-to-text') returns [{ generated_text }]", async () => {
    const pipe = keep(await pipeline("image-to-text", fixture("tiny-blip2-opt")));
    expect(await pipe(fixture("image0.png"), { maxNewTokens: 10, prompt: ref.prompts[1] })).toEqual([{ generated_text: ref.cases["1"].greedy_text[0] }]);
    const two = await pipe([fixture("image0.png"), fixture("image0.png")], { maxNewTokens: 10 });
    expect(two).toEqual([[{ generated_text: ref.cases["0"].greedy_text[0] }], [{ generated_text: ref.cases["0"].greedy_text[0] }]]);
  });

  it("a retrieval checkpoint is refused with a clear message", async () => {
    await expect(Blip2ForConditionalGeneration.fromPretrained(fixture("tiny-blip2-itm"))).rejects.toThrow(/image-text retrieval checkpoint/);
  });
});

describe("chat", () => {
  const blip2 = Blip2.load(fixture("tiny-blip2-opt")).then(keep);

  it("30 turns: the prompt never exceeds the window and the newest turn is always kept", async () => {
    const b = await blip2;
    const window = 64;
    const maxNewTokens = 6;
    const dropped: number[] = [];
    const chat = await b.chat(fixture("image0.png"), { contextWindow: window, onDrop: (n) => dropped.push(n) });
    for (let turn = 0; turn < 30; turn++) {
      const question = `what is in picture ${turn}?`;
      const prompt = chat.prompt(question, maxNewTokens);
      expect(prompt.inputIds.length + maxNewTokens).toBeLessThanOrEqual(window);
      expect(prompt.text.endsWith(`Question: ${question} Answer:`)).toBe(true);
      expect(prompt.inputIds.slice(0, 4)).toEqual([400, 400, 400, 400]);
      const reply = await chat.ask(question, { maxNewTokens });
      expect(reply.droppedTurns).toBe(prompt.droppedTurns);
      expect(chat.history.at(-1)).toEqual({ question, answer: reply.answer });
    }
    expect(dropped.length).toBeGreaterThan(0);
    expect(chat.history).toHaveLength(30);
  });

  it("dropTo: a drop leaves that share of the window, dropped turns stay out, and the next turns add to a kept cache", async () => {
    const b = await blip2;
    const decode = vi.spyOn(Blip2Runtime.prototype, "optDecode");
    const window = 64;
    const talk = async (dropTo?: number) => {
      decode.mockClear();
      const chat = await b.chat(fixture("image0.png"), { contextWindow: window, dropTo });
      const dropped: number[] = [];
      for (let turn = 0; turn < 20; turn++) {
        const question = `what is in picture ${turn}?`;
        const prompt = chat.prompt(question, 4);
        expect(prompt.inputIds.length + 4).toBeLessThanOrEqual(window);
        if (prompt.droppedTurns > (dropped.at(-1) ?? 0)) expect(prompt.inputIds.length + 4).toBeLessThanOrEqual((dropTo ?? 1) * window);
        expect((await chat.ask(question, { maxNewTokens: 4, minNewTokens: 4 })).droppedTurns).toBe(prompt.droppedTurns);
        dropped.push(prompt.droppedTurns);
      }
      await chat.dispose();
      return { dropped, drops: new Set(dropped).size - 1, positions: decode.mock.calls.reduce((n, [inputs]) => n + inputs.ids[0]!.length, 0) };
    };
    const fit = await talk();
    const half = await talk(0.5);
    decode.mockRestore();
    for (const { dropped } of [fit, half]) expect(dropped).toEqual([...dropped].sort((x, y) => x - y));
    expect(fit.drops).toBeGreaterThan(2);
    expect(half.drops).toBeLessThan(fit.drops);
    expect(half.positions).toBeLessThan(fit.positions);
    await expect(b.chat(fixture("image0.png"), { dropTo: 0 })).rejects.toThrow(/dropTo must be a share of the window in \(0, 1\], got 0/);
  });

  it("keeps the cache between turns: the answers of whole passes, each turn running only what is new", async () => {
    const b = await blip2;
    const decode = vi.spyOn(Blip2Runtime.prototype, "optDecode");
    const talk = async (keepCache: boolean) => {
      decode.mockClear();
      const chat = await b.chat(fixture("image0.png"), { contextWindow: 48, keepCache });
      const answers: string[] = [];
      for (let turn = 0; turn < 8; turn++) answers.push((await chat.ask(`what is in picture ${turn}?`, { maxNewTokens: 4, minNewTokens: 4 })).answer);
      await chat.dispose();
      await expect(chat.ask("and now?")).rejects.toThrow(/this chat was disposed/);
      // Prefills and steps: the positions the language model ran.
      return { answers, positions: decode.mock.calls.reduce((n, [inputs]) => n + inputs.ids[0]!.length, 0) };
    };
    const kept = await talk(true);
    const whole = await talk(false);
    decode.mockRestore();
    expect(kept.answers).toEqual(whole.answers);
    expect(kept.positions).toBeLessThan(whole.positions * 0.75);
  });

  it("a turn that fails drops the kept cache; the next turn runs whole and answers as a fresh chat would", async () => {
    const b = await blip2;
    const decode = vi.spyOn(Blip2Runtime.prototype, "optDecode");
    const chat = await b.chat(fixture("image0.png"));
    await chat.ask("what is it?", { maxNewTokens: 4 });
    const fail = () => {
      throw new Error("listener failed");
    };
    await expect(chat.ask("what color?", { maxNewTokens: 4, onToken: fail })).rejects.toThrow(/listener failed/);
    const whole = chat.prompt("where?", 4).inputIds.length;
    decode.mockClear();
    const after = await chat.ask("where?", { maxNewTokens: 4 });
    // Its prefill ran the whole prompt: the failed turn's cache was not kept.
    expect(decode.mock.calls[0]![0].ids[0]!.length).toBe(whole);
    decode.mockRestore();
    const fresh = await b.chat(fixture("image0.png"), { keepCache: false });
    fresh.history.push(...chat.history.slice(0, 1));
    expect((await fresh.ask("where?", { maxNewTokens: 4 })).answer).toBe(after.answer);
    await Promise.all([chat.dispose(), fresh.dispose()]);
  });

  it("answers questions asked at once one after the other, in order", async () => {
    const b = await blip2;
    const questions = ["what is it?", "what color?", "where?"];
    const prompts = vi.spyOn(b.model, "generate");
    const one = await b.chat(fixture("image0.png"));
    const expected: string[] = [];
    for (const q of questions) expected.push((await one.ask(q, { maxNewTokens: 3 })).answer);
    const all = await b.chat(fixture("image0.png"));
    const replies = await Promise.all(questions.map((q) => all.ask(q, { maxNewTokens: 3 })));
    const [sequential, atOnce] = [0, 3].map((at) => prompts.mock.calls.slice(at, at + 3).map(([args]) => args.inputIds));
    prompts.mockRestore();
    // Each turn's prompt holds the turns before it.
    expect(atOnce).toEqual(sequential);
    expect(replies.map((r) => r.answer)).toEqual(expected);
    expect(all.history.map((t) => t.question)).toEqual(questions);
  });

  it("history is formatted as the BLIP-2 demo does", async () => {
    const b = await blip2;
    const chat = await b.chat(fixture("image0.png"));
    chat.history.push({ question: "what is it?", answer: "a circle" });
    expect(chat.prompt("what color?", 10).text).toBe("Question: what is it? Answer: a circle. Question: what color? Answer:");
    chat.reset();
    expect(chat.prompt("what color?", 10).text).toBe("Question: what color? Answer:");
  });

  it("a question that cannot fit is an error, never cut", async () => {
    const b = await blip2;
    const chat = await b.chat(fixture("image0.png"), { contextWindow: 20 });
    await expect(chat.ask("why ".repeat(40), { maxNewTokens: 5 })).rejects.toThrow(/does not fit the 20-token window/);
  });
});

describe("hf-4.45 generation through the API (Pillow resizing, as transformers 4 did)", () => {
  const images = [fixture("hf-4.45", "images", "img0.png"), fixture("hf-4.45", "images", "img1.png")];
  it.each(["opt", "t5"])("%s: greedy, caption and beam sequences", async (variant) => {
    const ref = JSON.parse(fs.readFileSync(fixture("hf-4.45", variant, "reference.json"), "utf8"));
    const b = keep(await Blip2.load(fixture("hf-4.45", variant), { imageBackend: "pil" }));
    // transformers 4.45 returned [bos] + new tokens for OPT; we return prompt + new tokens.
    const as445 = (r: { ids: number[] }, prompt: number) => (variant === "opt" ? [2, ...r.ids.slice(prompt)] : r.ids);
    const runs: [string, string | undefined, GenerationOptions][] = [["greedy", ref.prompt, {}], ["caption_greedy", undefined, {}], ["beam", ref.prompt, { numBeams: 3 }]];
    for (const [key, prompt, options] of runs) {
      const results = await b.captionAll(images, { ...options, prompt, maxNewTokens: 8 });
      const promptLength = (prompt === undefined ? ref.caption_input_ids : ref.input_ids)[0].length;
      expect(results.map((r) => as445(r, promptLength)), key).toEqual(ref.generation[key].sequences);
      expect(results.map((r) => r.caption), key).toEqual(ref.generation[key].decoded.map((t: string) => t.trim()));
    }
  });
});

describe("loading from the Hub (a local fake Hub on 127.0.0.1)", () => {
  it("downloads into the cache with progress, then loads offline", async () => {
    const { startFakeHub, readFolder } = await import("./hubServer.js");
    const os = await import("node:os");
    const path = await import("node:path");
    const hub = await startFakeHub([{ id: "tiny/blip2-opt", revisions: { main: readFolder(fixture("tiny-blip2-opt")) } }]);
    const cacheDir = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-cache-"));
    try {
      const seen = new Set<string>();
      const b = keep(await Blip2.load("tiny/blip2-opt", { endpoint: hub.url, cacheDir, progress: (p) => void (p.done && seen.add(p.file)) }));
      expect(seen.has("model.safetensors")).toBe(true);
      expect(b.model.checkpoint.dir).toContain(path.join(cacheDir, "models--tiny--blip2-opt", "snapshots"));
      const ref = reference("tiny-blip2-opt");
      expect((await b.captionAll([fixture("image0.png")], { maxNewTokens: 10 }))[0]!.ids).toEqual(ref.cases["0"].greedy_ids);
      const requests = hub.log.length;
      keep(await Blip2.load("tiny/blip2-opt", { cacheDir, offline: true }));
      expect(hub.log.length).toBe(requests);
    } finally {
      await hub.close();
    }
  });
});
