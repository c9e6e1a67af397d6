/** `blip2 grad` and `blip2 train` from the command line: reference numbers, and every bad input refused cleanly. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { readSafetensorsHeader, readTensorF32 } from "../src/io/safetensors.js";
import { cli, fixture } from "./helpers.js";
import { expectClose, fixture as trainFixture } from "./trainFixtures.js";

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-cli-train-"));
// Image features are cached under the blip2 cache: a temporary one, not the user's.
const savedCache = process.env.BLIP2_CACHE;
process.env.BLIP2_CACHE = path.join(tmp, "cache");
afterAll(() => {
  if (savedCache === undefined) delete process.env.BLIP2_CACHE;
  else process.env.BLIP2_CACHE = savedCache;
  fs.rmSync(tmp, { recursive: true, force: true });
});

function write(name: string, contents: string): string {
  const file = path.join(tmp, name);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, contents);
  return file;
}

const jsonl = (rows: object[]) => rows.map((r) => JSON.stringify(r)).join("\n");
const pairs = [0, 1, 2].map((i) => ({ image: fixture(`image${i}.png`), text: ["a red circle", "a blue square", "a green shape"][i] }));

describe("blip2 grad", () => {
  it("gives stage 1's loss terms and gradients as PyTorch for the reference batch", async () => {
    const f = trainFixture("stage1");
    const batch = {
      images: (f.json.images as string[]).map((i) => fixture(i)),
      texts: f.json.texts,
      input_ids: f.json.input_ids,
      attention_mask: f.json.attention_mask,
      negatives: { image_for_text: (f.json.negatives as { image_for_text: number[] }).image_for_text, text_for_image: (f.json.negatives as { text_for_image: number[] }).text_for_image },
    };
    const out = path.join(tmp, "grad1.safetensors");
    const r = await cli("grad", "--model", fixture("train/stage1-itm"), "--stage", "1", "--batch", write("batch1.json", JSON.stringify(batch)), "--out", out, "--image-backend", "pil");
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const got = readSafetensorsHeader(out).tensors;
    for (const term of ["loss", "loss_itc", "loss_itm", "loss_itg"]) {
      const v = readTensorF32(got.get(term)!)[0]!;
      expect(Math.abs(v - f.get(term).data[0]!) / f.get(term).data[0]!, term).toBeLessThan(1e-5);
    }
    for (const name of f.json.trainable as string[]) {
      const info = got.get(`grad.${name}`)!;
      expect(info.shape, name).toEqual(f.get(`grad.${name}`).shape);
      expectClose(`grad.${name}`, readTensorF32(info), f.get(`grad.${name}`).data, 1e-4);
    }
  });

  it("tokenizes texts itself for stage 2 and refuses a bad batch file", async () => {
    const out = path.join(tmp, "grad2.safetensors");
    const ok = await cli("grad", "--model", fixture("hf-4.45/opt"), "--stage", "2", "--batch", write("b2/batch.json", JSON.stringify({ images: ["../../image0.png".replace("../../", path.relative(path.join(tmp, "b2"), fixture("")) + "/")], texts: ["a red circle"], prompt: "a photo of" })), "--out", out);
    expect(ok.stderr).toBe("");
    expect(ok.code).toBe(0);
    expect(readTensorF32(readSafetensorsHeader(out).tensors.get("loss")!)[0]).toBeGreaterThan(0);
    const again = await cli("grad", "--model", fixture("hf-4.45/opt"), "--stage", "2", "--batch", path.join(tmp, "b2/batch.json"), "--out", out);
    expect([again.code, again.stderr]).toEqual([1, expect.stringMatching(/already exists/)]);
    const bad = await cli("grad", "--model", fixture("hf-4.45/opt"), "--stage", "2", "--batch", write("bad.json", JSON.stringify({ images: ["x.png"], texts: [] })), "--out", path.join(tmp, "x.safetensors"));
    expect([bad.code, bad.stderr]).toEqual([1, expect.stringMatching(/texts must be a list of 1 strings/)]);
  });
});

describe("blip2 train", () => {
  it("trains stage 2 and prints a summary; --json gives one line per step", async () => {
    const data = write("pairs.jsonl", jsonl(pairs));
    const out = path.join(tmp, "run-opt");
    const r = await cli("train", "--stage", "2", "--model", fixture("hf-4.45/opt"), "--data", data, "--out", out, "--steps", "3", "--batch-size", "2", "--json", "--threads", "1");
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const lines = r.stdout.trim().split("\n").map((l) => JSON.parse(l));
    expect(lines.map((l) => l.step)).toEqual([1, 2, 3, undefined]);
    expect(lines[0]).toEqual(expect.objectContaining({ total: 3, loss: expect.any(Number), lr: expect.any(Number), grad_norm: expect.any(Number), eta_s: expect.any(Number) }));
    expect(lines[3]).toEqual(expect.objectContaining({ done: true, steps: 3 }));
    expect(fs.existsSync(path.join(out, "model.safetensors"))).toBe(true);
    expect(fs.existsSync(path.join(out, "trainer_state.json"))).toBe(true);
  });

  it.each([
    ["stage 1 on a checkpoint without the Q-Former's text side", ["--stage", "1", "--model", fixture("hf-4.45/opt")], /stage 1 trains the Q-Former's text side/],
    ["stage 2 on a retrieval checkpoint", ["--stage", "2", "--model", fixture("hf-4.45/itm")], /blip2 compose --stage1/],
    ["a data line whose image is missing", ["--stage", "2", "--model", fixture("hf-4.45/opt"), "--data", "MISSING"], /missing\.jsonl:2: .*nope\.png/],
    ["an empty text", ["--stage", "2", "--model", fixture("hf-4.45/opt"), "--data", "EMPTYTEXT"], /empty-text\.jsonl:1: .*(empty|text)/],
    ["an empty data set", ["--stage", "2", "--model", fixture("hf-4.45/opt"), "--data", "EMPTY"], /empty\.jsonl.*(no examples|empty)/],
    ["an unknown stage", ["--stage", "3", "--model", fixture("hf-4.45/opt")], /--stage: expected 1 or 2/],
  ])("refuses %s", async (_what, argv, message) => {
    const files: Record<string, string> = {
      MISSING: write("missing.jsonl", jsonl([pairs[0]!, { image: "nope.png", text: "x" }])),
      EMPTYTEXT: write("empty-text.jsonl", jsonl([{ image: pairs[0]!.image, text: "  " }])),
      EMPTY: write("empty.jsonl", ""),
    };
    const data = write("ok.jsonl", jsonl(pairs));
    const args = argv.map((a) => files[a] ?? a);
    if (!args.includes("--data")) args.push("--data", data);
    const out = path.join(tmp, `refused-${Math.random().toString(36).slice(2)}`);
    const r = await cli("train", ...args, "--out", out, "--steps", "1", "--batch-size", "2");
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(message);
    expect(r.stderr.split("\n").filter(Boolean)).toHaveLength(1);
    expect(fs.existsSync(out)).toBe(false);
  });

  it("refuses an --out that holds something else, and leaves it as it was", async () => {
    const out = path.join(tmp, "not-a-run");
    write("not-a-run/notes.txt", "mine");
    const r = await cli("train", "--stage", "2", "--model", fixture("hf-4.45/opt"), "--data", write("ok2.jsonl", jsonl(pairs)), "--out", out, "--steps", "1", "--batch-size", "2");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not-a-run: holds notes\.txt .*nothing was written/);
    expect(fs.readdirSync(out)).toEqual(["notes.txt"]);
  });

  it("stops on a loss that is not finite, naming the step", async () => {
    const out = path.join(tmp, "diverged");
    const r = await cli("train", "--stage", "2", "--model", fixture("hf-4.45/opt"), "--data", write("ok3.jsonl", jsonl(pairs)), "--out", out, "--steps", "6", "--batch-size", "2", "--lr", "1e30", "--warmup-steps", "0", "--min-lr", "1e30");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/step \d: the loss is not finite/);
  });
});
