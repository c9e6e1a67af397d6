/** `blip2 caption --json`, `ask` and `chat` against transformers' generate on the tiny checkpoints. */
import fs from "node:fs";
import { describe, expect, it } from "vitest";
import { cli, cliWithInput, fixture } from "./helpers.js";

const reference = (name: string) => JSON.parse(fs.readFileSync(fixture(name, "reference.json"), "utf8"));
const lines = (text: string) => text.trim().split("\n").map((l) => JSON.parse(l));

const FLAGS: [string, string, string[]][] = [
  ["greedy_ids", "greedy_text", ["--max-new-tokens", "10"]],
  ["greedy_min10_ids", "", ["--max-new-tokens", "10", "--min-new-tokens", "10"]],
  ["beam3_ids", "beam3_text", ["--max-new-tokens", "10", "--num-beams", "3", "--min-new-tokens", "3"]],
  ["repetition_penalty_1.5_ids", "", ["--max-new-tokens", "10", "--min-new-tokens", "10", "--repetition-penalty", "1.5"]],
];

describe.each(["tiny-blip2-opt", "tiny-blip2-t5"])("blip2 caption --json on %s", (name) => {
  const ref = reference(name);
  it.each(["0", "1", "2"])("case %s: every generation setting", async (c) => {
    const prompt = ref.prompts[Number(c)];
    for (const [idsKey, textKey, flags] of FLAGS) {
      const r = await cli("caption", "--model", fixture(name), "--json", ...(prompt ? ["--prompt", prompt] : []), ...flags, fixture("image0.png"));
      expect(r.code, r.stderr).toBe(0);
      const [out] = lines(r.stdout);
      expect(out.image).toBe(fixture("image0.png"));
      expect(out.ids, idsKey).toEqual(ref.cases[c][idsKey]);
      if (textKey) expect(out.text).toBe(ref.cases[c][textKey][0]);
    }
  });
});

describe("blip2 caption", () => {
  it("several images: one JSON line each, in order", async () => {
    const ref = reference("tiny-blip2-opt");
    const r = await cli("caption", "-m", fixture("tiny-blip2-opt"), "--json", "--batch-size", "2", "--max-new-tokens", "10", fixture("image0.png"), fixture("image2.png"), fixture("image0.png"));
    const out = lines(r.stdout);
    expect(out.map((o) => o.image)).toEqual([fixture("image0.png"), fixture("image2.png"), fixture("image0.png")]);
    expect(out[0].ids).toEqual(ref.cases["0"].greedy_ids);
    expect(out[2].ids).toEqual(ref.cases["0"].greedy_ids);
  });

  it("sampling with a seed is reproducible", async () => {
    const run = () => cli("caption", "-m", fixture("tiny-blip2-opt"), "--json", "--temperature", "1.5", "--seed", "11", "--max-new-tokens", "12", fixture("image1.png"));
    const [a, b] = await Promise.all([run(), run()]);
    expect(lines(a.stdout)[0].ids).toEqual(lines(b.stdout)[0].ids);
  });

  it("plain output is the caption alone", async () => {
    const ref = reference("tiny-blip2-opt");
    const r = await cli("caption", "-m", fixture("tiny-blip2-opt"), "--max-new-tokens", "10", "--prompt", ref.prompts[1], fixture("image0.png"));
    expect(r.stdout).toBe("ffffff\uFFFD\uFFFD\uFFFD\uFFFD\n");
  });
});

describe("blip2 ask", () => {
  it("answers with the VQA prompt", async () => {
    const ref = reference("tiny-blip2-opt");
    const r = await cli("ask", "-m", fixture("tiny-blip2-opt"), "--json", "--max-new-tokens", "10", fixture("image0.png"), "what color is the circle?");
    const [out] = lines(r.stdout);
    expect(out.ids).toEqual(ref.cases["2"].greedy_ids);
    expect(out.text).toBe(ref.cases["2"].greedy_text[0]);
    expect(out.answer).toBe("::::::::::");
  });
});

describe("blip2 chat", () => {
  it("answers each piped line, /reset and /exit", async () => {
    const r = await cliWithInput("what color is the circle?\nand now?\n/reset\nwhat color is the circle?\n/exit\nnever asked\n", "chat", "-m", fixture("tiny-blip2-opt"), "--max-new-tokens", "10", fixture("image0.png"));
    expect(r.code, r.stderr).toBe(0);
    const out = r.stdout.trim().split("\n");
    expect(out).toHaveLength(4);
    expect(out[0]).toBe("::::::::::");
    expect(out[2]).toBe("(conversation reset)");
    expect(out[3]).toBe(out[0]);
  });

  it("says when old turns are dropped, and keeps going past a question that cannot fit", async () => {
    const questions = Array.from({ length: 6 }, (_, i) => `what is in picture ${i}?`).join("\n");
    const r = await cliWithInput(`${questions}\n${"why ".repeat(80)}\nlast?\n`, "chat", "-m", fixture("tiny-blip2-opt"), "--context-window", "48", "--max-new-tokens", "4", fixture("image0.png"));
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/left out the \d+ oldest turns? to stay within the context window/);
    expect(r.stderr).toMatch(/does not fit the 48-token window/);
    expect(r.stdout.trim().split("\n")).toHaveLength(7);
    // --drop-to 0.5 frees half of the window at each drop: fewer drops for the same questions.
    const drops = async (...dropTo: string[]) => {
      const run = await cliWithInput(`${questions}\n`, "chat", "-m", fixture("tiny-blip2-opt"), "--context-window", "64", ...dropTo, "--max-new-tokens", "4", fixture("image0.png"));
      expect(run.code).toBe(0);
      return run.stderr.match(/left out the \d+ oldest turns?/g)?.length ?? 0;
    };
    const [fit, half] = [await drops(), await drops("--drop-to", "0.5")];
    expect(half).toBeGreaterThan(0);
    expect(half).toBeLessThan(fit);
    const bad = await cliWithInput("hi\n", "chat", "-m", fixture("tiny-blip2-opt"), "--drop-to", "1.5", fixture("image0.png"));
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/invalid value for --drop-to: expected a share of the window in \(0, 1\], got "1.5"/);
  });
});

describe("bad input", () => {
  const one = (r: { stderr: string }) => expect(r.stderr.trim().split("\n")).toHaveLength(1);

  it("missing image", async () => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-opt"), "/nowhere/cat.png");
    expect(r.code).toBe(1);
    one(r);
    expect(r.stderr).toMatch(/\/nowhere\/cat.png/);
  });

  it("unreadable model", async () => {
    const r = await cli("caption", "-m", "./not/a/model", fixture("image0.png"));
    expect(r.code).toBe(1);
    one(r);
    expect(r.stderr).toMatch(/not\/a\/model.*neither a folder nor a Hub model id/);
  });

  it("prompt too long for the language model", async () => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-opt"), "--prompt", "word ".repeat(200), fixture("image0.png"));
    expect(r.code).toBe(1);
    one(r);
    expect(r.stderr).toMatch(/prompt too long: \d+ prompt tokens .* exceed the language model's 128 positions/);
  });

  it.each([
    [["--num-beams", "0"], /--num-beams: expected an integer >= 1, got "0"/],
    [["--top-p", "1.5"], /--top-p: expected a number in \(0, 1\], got "1.5"/],
    [["--temperature", "hot"], /--temperature: expected a number >= 0, got "hot"/],
    [["--device", "tpu"], /--device: expected cpu, webgpu or cuda/],
    [["--num-return-sequences", "3"], /numReturnSequences \(3\) exceeds numBeams \(1\)/],
  ])("invalid option %j", async (flags, message) => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-opt"), ...(flags as string[]), fixture("image0.png"));
    expect(r.code).not.toBe(0);
    one(r);
    expect(r.stderr).toMatch(message as RegExp);
  });

  it("no image, and ask without a question", async () => {
    expect((await cli("caption", "-m", fixture("tiny-blip2-opt"))).stderr).toMatch(/give at least one IMAGE/);
    expect((await cli("ask", "-m", fixture("tiny-blip2-opt"), fixture("image0.png"))).stderr).toMatch(/give an IMAGE and a QUESTION/);
  });

  it("every command has --help", async () => {
    for (const c of ["caption", "ask", "chat", "dump"]) {
      const r = await cli(c, "--help");
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(new RegExp(`^Usage: blip2 ${c}`));
    }
  });
});

describe("blip2 caption --json on the hf-4.45 set (--image-backend pil)", () => {
  it.each(["opt", "t5"])("%s: greedy, caption and beam sequences", async (variant) => {
    const ref = JSON.parse(fs.readFileSync(fixture("hf-4.45", variant, "reference.json"), "utf8"));
    const images = [fixture("hf-4.45", "images", "img0.png"), fixture("hf-4.45", "images", "img1.png")];
    const runs: [string, string[], number][] = [
      ["greedy", ["--prompt", ref.prompt], ref.input_ids[0].length],
      ["caption_greedy", [], ref.caption_input_ids[0].length],
      ["beam", ["--prompt", ref.prompt, "--num-beams", "3"], ref.input_ids[0].length],
    ];
    for (const [key, flags, promptLength] of runs) {
      const r = await cli("caption", "-m", fixture("hf-4.45", variant), "--image-backend", "pil", "--json", "--max-new-tokens", "8", ...flags, ...images);
      expect(r.code, r.stderr).toBe(0);
      const ids = lines(r.stdout).map((o) => (variant === "opt" ? [2, ...o.ids.slice(promptLength)] : o.ids));
      expect(ids, key).toEqual(ref.generation[key].sequences);
    }
  });
});
