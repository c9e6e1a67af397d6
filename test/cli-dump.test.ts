/** `blip2 dump` against the reference activations, and every kind of bad input it must reject cleanly. */
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import sharp from "sharp";
import { describe, expect, it } from "vitest";
import { readSafetensorsHeader, readTensorF32, readTensorInts } from "../src/io/safetensors.js";
import { cli, copyFixture, editSafetensorsHeader, expectClose, fixture, loadReference } from "./helpers.js";

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-dump-"));
const outFile = (name: string) => path.join(tmp, `${name}.safetensors`);

function readDump(file: string) {
  const { tensors } = readSafetensorsHeader(file);
  return (name: string) => {
    const info = tensors.get(name);
    expect(info, `${name} in dump`).toBeDefined();
    return { shape: info!.shape, data: info!.dtype === "F32" ? readTensorF32(info!) : Float32Array.from(readTensorInts(info!)) };
  };
}

describe("blip2 dump", () => {
  it.each([
    ["tiny-blip2-opt", "0", []],
    ["tiny-blip2-opt", "1", ["--prompt", "this is a cartoon of"]],
    ["tiny-blip2-t5", "2", ["--prompt", "Question: what color is the circle? Answer:", "--decoder-input-ids", "0,3,2,3,2,3,2"]],
  ])("%s case %s matches transformers", async (name, c, extra) => {
    const out = outFile(`${name}-${c}`);
    const r = await cli("dump", "--model", fixture(name), "--image", fixture("image0.png"), ...extra, "--out", out);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const ref = loadReference(fixture(name, "reference.safetensors"));
    const cases = JSON.parse(fs.readFileSync(fixture(name, "reference.json"), "utf8")).cases;
    const get = readDump(out);
    expect(Array.from(get("input_ids").data)).toEqual(cases[c].input_ids);
    expectClose("pixel_values", get("pixel_values"), ref.get(`case${c}.pixel_values`)!, 1e-5);
    for (const k of ["vision_last_hidden_state", "vision_pooler_output", "qformer_last_hidden_state", "logits"]) expectClose(k, get(k), ref.get(`case${c}.${k}`)!);
  });

  it.each([
    ["opt", ["--prompt", "a photo of a"]],
    ["t5", ["--prompt", "Question: what is in the picture? Answer:", "--decoder-input-ids", "0,4,26"]],
  ])("hf-4.45/%s (Pillow resizing, as transformers 4) matches transformers 4.45", async (variant, extra) => {
    const out = outFile(`hf445-${variant}`);
    const r = await cli("dump", "--model", fixture("hf-4.45", variant), "--image", fixture("hf-4.45", "images", "img0.png"), "--image-backend", "pil", ...extra, "--out", out);
    expect(r.stderr).toBe("");
    const ref = loadReference(fixture("hf-4.45", variant, "reference.safetensors"));
    const first = (name: string) => {
      const t = ref.get(name)!;
      const size = t.data.length / t.shape[0]!;
      return { shape: [1, ...t.shape.slice(1)], data: t.data.subarray(0, size) };
    };
    const get = readDump(out);
    expect(Array.from(get("input_ids").data)).toEqual(Array.from(first("input_ids").data));
    for (const k of ["pixel_values", "vision_last_hidden_state", "vision_pooler_output", "qformer_last_hidden_state", "language_model_inputs", "logits"]) expectClose(k, get(k), first(k));
  });

  it("refuses to overwrite an existing file without --force", async () => {
    const out = outFile("exists");
    fs.writeFileSync(out, "user data");
    const r = await cli("dump", "--model", fixture("tiny-blip2-opt"), "--image", fixture("image0.png"), "--out", out);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/already exists/);
    expect(fs.readFileSync(out, "utf8")).toBe("user data");
  });

  it("an --out in a missing folder is named as such, not by the temporary file written through", async () => {
    const out = path.join(tmp, "no-such-folder", "x.safetensors");
    const r = await cli("dump", "--model", fixture("tiny-blip2-opt"), "--image", fixture("image0.png"), "--out", out);
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(`blip2: error: ${out}: no such folder ${path.dirname(out)}`);
  });

  it("a T5 prompt beyond the encoder's 2048 positions is refused before it runs", async () => {
    const r = await cli("dump", "--model", fixture("tiny-blip2-t5"), "--image", fixture("image0.png"), "--prompt", "word ".repeat(1100), "--out", outFile("long-t5"));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/prompt too long: 22\d\d prompt tokens \(image tokens included\) exceed the 2048 positions blip2 gives T5's encoder/);
    expect(fs.existsSync(outFile("long-t5"))).toBe(false);
  });
});

/** Runs dump on a broken input; expects one line naming `file` and matching `problem`. */
async function expectCleanError(args: { model?: string; image?: string }, file: string, problem: RegExp) {
  const r = await cli("dump", "--model", args.model ?? fixture("tiny-blip2-opt"), "--image", args.image ?? fixture("image0.png"), "--out", outFile(`err-${Math.random()}`));
  expect(r.code).not.toBe(0);
  expect(r.stderr.trim().split("\n"), r.stderr).toHaveLength(1);
  expect(r.stderr).toMatch(/^blip2: error: /);
  expect(r.stderr).toContain(file);
  expect(r.stderr).toMatch(problem);
  expect(r.stderr).not.toMatch(/\n\s+at /);
}

describe("bad input: one clear line naming the file, exit code != 0", () => {
  it("missing model folder", () => expectCleanError({ model: path.join(tmp, "no-such-model") }, "no-such-model", /model folder not found/));

  it("missing model_type", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    const cfg = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8"));
    delete cfg.model_type;
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify(cfg));
    await expectCleanError({ model: dir }, "config.json", /missing model_type/);
  });

  it("unknown model_type and unknown text model", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    const cfg = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8"));
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...cfg, model_type: "llava" }));
    await expectCleanError({ model: dir }, "config.json", /model_type is "llava", expected "blip-2"/);
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...cfg, text_config: { ...cfg.text_config, model_type: "llama" } }));
    await expectCleanError({ model: dir }, "config.json", /text_config.model_type is "llama"/);
  });

  it("a config field of the wrong type", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    const cfg = JSON.parse(fs.readFileSync(path.join(dir, "config.json"), "utf8"));
    fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ ...cfg, vision_config: { ...cfg.vision_config, hidden_size: "32" } }));
    await expectCleanError({ model: dir }, "config.json", /vision_config.hidden_size: expected an integer >= 1, got "32"/);
  });

  it("missing shard of a sharded checkpoint", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    const { tensors } = readSafetensorsHeader(path.join(dir, "model.safetensors"));
    const weightMap = Object.fromEntries([...tensors.keys()].map((k, i) => [k, i % 2 ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors"]));
    fs.renameSync(path.join(dir, "model.safetensors"), path.join(dir, "model-00001-of-00002.safetensors"));
    fs.writeFileSync(path.join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    await expectCleanError({ model: dir }, "model.safetensors.index.json", /lists shard model-00002-of-00002.safetensors, which is missing/);
  });

  it("no weights at all", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    fs.rmSync(path.join(dir, "model.safetensors"));
    await expectCleanError({ model: dir }, dir, /no model.safetensors or model.safetensors.index.json/);
  });

  it("truncated safetensors", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    const file = path.join(dir, "model.safetensors");
    fs.truncateSync(file, fs.statSync(file).size - 1000);
    await expectCleanError({ model: dir }, "model.safetensors", /truncated: tensor .* ends at byte \d+ but the file has \d+ bytes/);
    fs.truncateSync(file, 4);
    await expectCleanError({ model: dir }, "model.safetensors", /truncated safetensors file \(4 bytes, no header\)/);
  });

  it("a header that lies about sizes", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    editSafetensorsHeader(path.join(dir, "model.safetensors"), (h) => {
      h["query_tokens"].data_offsets[1] -= 4;
    });
    await expectCleanError({ model: dir }, "model.safetensors", /tensor query_tokens of shape \[1, 4, 32\] F32 needs 512 bytes but its header gives 508/);
    const file = path.join(dir, "model.safetensors");
    const bytes = fs.readFileSync(file);
    bytes.writeBigUInt64LE(10n ** 12n, 0);
    fs.writeFileSync(file, bytes);
    await expectCleanError({ model: dir }, "model.safetensors", /header says 1000000000000 bytes but the file has/);
  });

  it("a tensor of the wrong shape for the config", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    editSafetensorsHeader(path.join(dir, "model.safetensors"), (h) => {
      h["vision_model.encoder.layers.1.mlp.fc1.weight"].shape = [32, 64];
    });
    await expectCleanError({ model: dir }, "model.safetensors", /tensor vision_model.encoder.layers.1.mlp.fc1.weight has shape \[32, 64\] but config.json implies \[64, 32\]/);
  });

  it("an unsupported dtype", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    editSafetensorsHeader(path.join(dir, "model.safetensors"), (h) => {
      const t = h["qformer.layernorm.bias"];
      t.dtype = "F8_E4M3";
      t.shape = [t.shape[0] * 4];
    });
    await expectCleanError({ model: dir }, "model.safetensors", /tensor qformer.layernorm.bias has unsupported dtype "F8_E4M3"/);
  });

  it("a missing tensor", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    editSafetensorsHeader(path.join(dir, "model.safetensors"), (h) => {
      h["vision_model.post_layernorm.weightX"] = h["vision_model.post_layernorm.weight"];
      delete h["vision_model.post_layernorm.weight"];
    });
    await expectCleanError({ model: dir }, dir, /no tensor vision_model.post_layernorm.weight/);
  });

  it("a corrupt image and a file that is not an image", async () => {
    const png = fs.readFileSync(fixture("image1.png"));
    const corrupt = path.join(tmp, "corrupt.png");
    fs.writeFileSync(corrupt, png.subarray(0, png.length / 2));
    await expectCleanError({ image: corrupt }, "corrupt.png", /./);
    await expectCleanError({ image: fixture("tiny-blip2-opt", "config.json") }, "config.json", /./);
    await expectCleanError({ image: path.join(tmp, "missing.png") }, "missing.png", /./);
  });

  it("images of 0 px and of 100,000 px width", async () => {
    const wide = path.join(tmp, "wide.png");
    // A real PNG header claiming 100000 x 1 pixels.
    await sharp({ create: { width: 8, height: 1, channels: 3, background: "#fff" } }).png().toFile(wide);
    const bytes = fs.readFileSync(wide);
    bytes.writeUInt32BE(100000, 16);
    fs.writeFileSync(wide, bytes);
    await expectCleanError({ image: wide }, "wide.png", /100000/);
    const zero = Buffer.from(bytes);
    zero.writeUInt32BE(0, 16);
    const zeroFile = path.join(tmp, "zero.png");
    fs.writeFileSync(zeroFile, zero);
    await expectCleanError({ image: zeroFile }, "zero.png", /./);
  });

  it("bad option values", async () => {
    const r = await cli("dump", "--model", fixture("tiny-blip2-t5"), "--image", fixture("image0.png"), "--decoder-input-ids", "0,x", "--out", outFile("bad"));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/invalid value for --decoder-input-ids/);
    const u = await cli("dump", "--modle", "x");
    expect(u.code).toBe(2);
    expect(u.stderr).toMatch(/Unknown option '--modle'/);
  });
});

describe("the installed command", () => {
  it("exits non-zero with one line and no stack trace", async () => {
    const run = promisify(execFile);
    const main = path.join(path.dirname(fixture()), "..", "src", "cli", "main.ts");
    const err = await run(process.execPath, ["--import", "tsx", main, "dump", "--model", "/nonexistent", "--image", "x", "--out", outFile("x")]).catch((e) => e);
    expect(err.code).toBe(1);
    expect(err.stderr.trim()).toBe("blip2: error: /nonexistent: model folder not found");
  });
});
