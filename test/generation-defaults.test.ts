/**
 * Where generation settings come from: the options given, else the checkpoint's
 * generation_config.json, else transformers' defaults, the same for the library, chat and the CLI;
 * and what turns sampling on (as in transformers, `doSample`; a seed alone does not).
 */
import fs from "node:fs";
import path from "node:path";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { Blip2, Blip2ForConditionalGeneration } from "../src/index.js";
import { resolveGeneration } from "../src/generation/options.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { cli, copyFixture, fixture } from "./helpers.js";

const config = Checkpoint.open(fixture("tiny-blip2-opt")).config;
const lines = (text: string) => text.trim().split("\n").map((l) => JSON.parse(l));

describe("what turns sampling on", () => {
  const sampling = (user: object, file: object = {}) => resolveGeneration(user, file, config).doSample;

  it("a seed alone does not (transformers: it only seeds sampling)", () => {
    expect(sampling({ seed: 5 })).toBe(false);
    expect(sampling({ seed: 5, numBeams: 3 })).toBe(false);
  });

  it("doSample does, given or from generation_config.json", () => {
    expect(sampling({ doSample: true })).toBe(true);
    expect(sampling({ seed: 5 }, { doSample: true })).toBe(true);
    expect(sampling({ doSample: false }, { doSample: true })).toBe(false);
  });

  it("a temperature, topK or topP given without doSample: false does (the documented convenience)", () => {
    for (const o of [{ temperature: 0.7 }, { topK: 5 }, { topP: 0.9 }]) {
      expect(sampling(o)).toBe(true);
      expect(sampling({ ...o, doSample: false })).toBe(false);
    }
    // From the file they are settings of sampling, not a request for it (as in transformers).
    expect(sampling({}, { temperature: 0.7, topK: 5 })).toBe(false);
  });
});

/** The tiny OPT checkpoint with max_new_tokens 3 (and min_new_tokens 3, so no early end) in its generation_config.json. */
function withGenerationConfig(): string {
  const dir = copyFixture("tiny-blip2-opt");
  const file = path.join(dir, "generation_config.json");
  fs.writeFileSync(file, JSON.stringify({ ...JSON.parse(fs.readFileSync(file, "utf8")), max_new_tokens: 3, min_new_tokens: 3 }));
  return dir;
}

describe("the checkpoint's max_new_tokens", () => {
  const dir = withGenerationConfig();
  const blip2 = Blip2.load(dir);
  afterAll(async () => {
    await (await blip2).dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  afterEach(() => vi.restoreAllMocks());

  it("the library honours it", async () => {
    const b = await blip2;
    const inputs = await b.processor.process({ images: fixture("image0.png"), text: "" });
    const [ids] = await b.model.generate(inputs);
    expect(ids!.length - inputs.inputIds[0]!.length).toBe(3);
  });

  it("the CLI honours it when --max-new-tokens is not given, and the flag still overrides it", async () => {
    const prompt = (await (await blip2).processor.process({ images: fixture("image0.png"), text: "" })).inputIds[0]!.length;
    const plain = await cli("caption", "-m", dir, "--json", fixture("image0.png"));
    expect(plain.code, plain.stderr).toBe(0);
    expect(lines(plain.stdout)[0].ids.length - prompt).toBe(3);
    const flag = await cli("caption", "-m", dir, "--json", "--max-new-tokens", "5", fixture("image0.png"));
    expect(lines(flag.stdout)[0].ids.length - prompt).toBe(5);
  });

  it("a chat honours it (its prompt leaves room for that many tokens)", async () => {
    const b = await blip2;
    const generate = vi.spyOn(Blip2ForConditionalGeneration.prototype, "generate");
    const chat = await b.chat(fixture("image0.png"));
    await chat.ask("what is it?");
    await chat.dispose();
    expect(generate.mock.calls[0]![0].maxNewTokens).toBe(3);
  });

  it("the CLI's --do-sample samples, and --seed alone does not", async () => {
    const run = (...flags: string[]) => cli("caption", "-m", dir, "--json", "--max-new-tokens", "12", ...flags, fixture("image1.png")).then((r) => lines(r.stdout)[0].ids);
    const greedy = await run();
    expect(await run("--seed", "3")).toEqual(greedy);
    const samples = await Promise.all([1, 2, 3, 4].map((s) => run("--do-sample", "--seed", String(s))));
    expect(samples.some((s) => JSON.stringify(s) !== JSON.stringify(greedy))).toBe(true);
  });
});
