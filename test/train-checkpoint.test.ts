/**
 * Training checkpoints on disk: the atomic writer (frozen tensors copied byte for byte, trained ones
 * in the source dtype, sharding, the trainer state), what it refuses, a full disk, a killed save;
 * stage 1's extras; `blip2 compose` of a stage-2 starting checkpoint.
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { Checkpoint } from "../src/io/checkpoint.js";
import { readSafetensorsHeader, readTensorBytes, readTensorF32 } from "../src/io/safetensors.js";
import { Blip2Tokenizer } from "../src/tokenizer/tokenizer.js";
import { Blip2 } from "../src/index.js";
import { checkOutDir, encodeFloats, loadTrainerState, openTrainingOutput, saveCheckpoint, writeModelFolder, type TensorValue, type TrainerState } from "../src/train/checkpoint.js";
import { composeStage2 } from "../src/train/compose.js";
import { stage1Extras } from "../src/train/extras.js";
import { Rng } from "../src/train/rng.js";
import { cli, fixture } from "./helpers.js";

const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-ckpt-"));
afterAll(() => fs.rmSync(scratch, { recursive: true, force: true }));
afterEach(() => vi.restoreAllMocks());
let counter = 0;
const fresh = (name = "out") => path.join(scratch, `${name}-${++counter}`);

const ITM = fixture("hf-4.45", "itm");
const headerOf = (file: string) => readSafetensorsHeader(file);
const tensorsOf = (dir: string) => {
  const ckpt = Checkpoint.open(dir);
  return new Map(ckpt.names().map((n) => [n, ckpt.tensor(n)] as const));
};
/** Tensor names in the order their bytes sit in the file(s). */
const fileOrder = (dir: string) =>
  [...tensorsOf(dir).values()].sort((a, b) => path.basename(a.file).localeCompare(path.basename(b.file)) || a.offset - b.offset).map((t) => t.name);
const siblings = (out: string) => fs.readdirSync(path.dirname(out)).filter((f) => f.startsWith(`${path.basename(out)}.`));

function state(step: number, identity: unknown = { stage: 1, source: "abc", data: "train.jsonl" }): TrainerState {
  return {
    identity,
    json: { step, rng: { s: [1, 2, 3, 4], spare: null }, data: { epoch: 0, position: step * 4 } },
    tensors: new Map([
      ["exp_avg.qformer.layernorm.weight", { shape: [32], data: Float32Array.from({ length: 32 }, (_, i) => step + i / 64) }],
      ["exp_avg_sq.qformer.layernorm.weight", { shape: [32], data: Float32Array.from({ length: 32 }, (_, i) => step * i) }],
    ]),
  };
}

const layernorm = (v: number): Map<string, TensorValue> => new Map([["qformer.layernorm.weight", { shape: [32], data: new Float32Array(32).fill(v) }]]);

describe("saveCheckpoint", () => {
  it("writes a Hugging Face folder: frozen tensors byte-identical in the source's order, trained ones replaced, the checkpoint's files and no others", () => {
    const source = Checkpoint.open(ITM);
    const out = fresh();
    saveCheckpoint({ source, out, trained: layernorm(1.5), state: state(7) });

    expect(fs.readdirSync(out).sort()).toEqual(
      ["added_tokens.json", "config.json", "model.safetensors", "optimizer.safetensors", "preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "tokenizer_config.json", "trainer_state.json", "vocab.txt"].sort(),
    );
    for (const f of ["config.json", "vocab.txt", "tokenizer_config.json", "preprocessor_config.json"]) expect(fs.readFileSync(path.join(out, f))).toEqual(fs.readFileSync(path.join(ITM, f)));
    const { metadata } = headerOf(path.join(out, "model.safetensors"));
    expect(metadata).toEqual({ format: "pt" });
    expect(fileOrder(out)).toEqual(fileOrder(ITM));
    const saved = tensorsOf(out);
    for (const name of source.names()) {
      if (name === "qformer.layernorm.weight") continue;
      expect(readTensorBytes(saved.get(name)!).equals(readTensorBytes(source.tensor(name))), name).toBe(true);
    }
    expect([...readTensorF32(saved.get("qformer.layernorm.weight")!)]).toEqual(new Array(32).fill(1.5));
    expect(Checkpoint.open(out).config.architectures).toEqual(["Blip2ForImageTextRetrieval"]);

    const back = loadTrainerState(out);
    expect(back.json).toEqual(state(7).json);
    expect(back.identity).toEqual(state(7).identity);
    expect([...back.tensors.keys()].sort()).toEqual([...state(7).tensors.keys()].sort());
    for (const [name, t] of state(7).tensors) expect(back.tensors.get(name)).toEqual(t);
  });

  it("shards above the size limit with transformers' names and index", () => {
    const source = Checkpoint.open(ITM);
    const out = fresh();
    saveCheckpoint({ source, out, trained: layernorm(2), config: { ...(source.json("config.json") as object), note: "replaced" }, maxShardBytes: 60_000 });
    const shards = fs.readdirSync(out).filter((f) => f.endsWith(".safetensors")).sort();
    expect(shards.length).toBeGreaterThan(3);
    shards.forEach((f, i) => expect(f).toBe(`model-${String(i + 1).padStart(5, "0")}-of-${String(shards.length).padStart(5, "0")}.safetensors`));
    expect(fs.existsSync(path.join(out, "model.safetensors"))).toBe(false);
    const index = JSON.parse(fs.readFileSync(path.join(out, "model.safetensors.index.json"), "utf8"));
    expect(Object.keys(index)).toEqual(["metadata", "weight_map"]);
    const sizes = shards.map((f) => [...headerOf(path.join(out, f)).tensors.values()].reduce((n, t) => n + t.byteLength, 0));
    expect(index.metadata.total_size).toBe(sizes.reduce((a, b) => a + b));
    expect(index.metadata.total_size).toBe(source.names().reduce((n, name) => n + source.tensor(name).byteLength, 0));
    // Each shard stays under the limit unless it holds a single larger tensor.
    shards.forEach((f, i) => expect(sizes[i]! <= 60_000 || headerOf(path.join(out, f)).tensors.size === 1).toBe(true));
    expect(Object.keys(index.weight_map)).toEqual([...source.names()].sort());
    for (const f of shards) for (const name of headerOf(path.join(out, f)).tensors.keys()) expect(index.weight_map[name]).toBe(f);
    expect(fileOrder(out)).toEqual(fileOrder(ITM));
    const saved = tensorsOf(out);
    for (const name of source.names()) if (name !== "qformer.layernorm.weight") expect(readTensorBytes(saved.get(name)!).equals(readTensorBytes(source.tensor(name))), name).toBe(true);
    expect(JSON.parse(fs.readFileSync(path.join(out, "config.json"), "utf8")).note).toBe("replaced");
  });

  it("saves again over the checkpoint it resumed from, though each save moves the tensors in its files", () => {
    const out = fresh();
    saveCheckpoint({ source: Checkpoint.open(ITM), out, trained: layernorm(1) });
    const resumed = Checkpoint.open(out);
    // A new tensor sorting first moves every other tensor's offset in the files resumed points to.
    saveCheckpoint({ source: resumed, out, trained: layernorm(2), added: new Map([["a.extra", { shape: [1000], data: new Float32Array(1000).fill(3) }]]) });
    saveCheckpoint({ source: resumed, out, trained: layernorm(4) });
    const saved = tensorsOf(out);
    const itm = Checkpoint.open(ITM);
    for (const name of itm.names()) if (name !== "qformer.layernorm.weight") expect(readTensorBytes(saved.get(name)!).equals(readTensorBytes(itm.tensor(name))), name).toBe(true);
    expect(readTensorF32(saved.get("a.extra")!).every((x) => x === 3)).toBe(true);
    expect(readTensorF32(saved.get("qformer.layernorm.weight")!)[0]).toBe(4);
  });

  it("writes a trained tensor back in its source dtype (float16, bfloat16 rounded to nearest even)", () => {
    const values = Float32Array.from([1, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, 65504, 1e-8]);
    expect([...new Uint16Array(encodeFloats(values, "BF16", "x").slice().buffer)]).toEqual([0x3f80, 0x3f80, 0x3f82, 0xc020, 0x4780, 0x322c]);
    expect([...new Uint16Array(encodeFloats(values, "F16", "x").slice().buffer)]).toEqual([0x3c00, 0x3c04, 0x3c0c, 0xc100, 0x7bff, 0x0000]);

    // A source whose tensors are float16: a trained one stays float16, a new one is float32.
    const half = fresh("half");
    const source = Checkpoint.open(ITM);
    const f16 = new Map([...source.names()].map((n) => [n, { shape: source.tensor(n).shape, data: readTensorF32(source.tensor(n)) }] as const));
    saveHalf(source, half, f16);
    const halfCkpt = Checkpoint.open(half);
    expect(halfCkpt.tensor("query_tokens").dtype).toBe("F16");
    const out = fresh();
    const queries = Float32Array.from({ length: 128 }, (_, i) => i / 7);
    saveCheckpoint({ source: halfCkpt, out, trained: new Map([["query_tokens", { shape: [1, 4, 32], data: queries }], ["temp", { shape: [], data: Float32Array.of(0.07) }]]) });
    const saved = tensorsOf(out);
    expect(saved.get("query_tokens")!.dtype).toBe("F16");
    expect(readTensorBytes(saved.get("query_tokens")!).equals(Buffer.from(encodeFloats(queries, "F16", "q")))).toBe(true);
    expect(saved.get("temp")!.dtype).toBe("F32");
    expect(readTensorF32(saved.get("temp")!)[0]).toBeCloseTo(0.07, 7);
    // The new tensor sits where its name sorts among the source's (alphabetical) tensors.
    expect(fileOrder(out)).toEqual([...fileOrder(half), "temp"].sort());
  });
});

/** A copy of `source` with every tensor stored as float16, written by the module under test. */
function saveHalf(source: Checkpoint, out: string, values: Map<string, TensorValue>): void {
  fs.mkdirSync(out);
  fs.copyFileSync(source.file("config.json"), path.join(out, "config.json"));
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  const chunks: Buffer[] = [];
  let offset = 0;
  for (const name of [...values.keys()].sort()) {
    const bytes = Buffer.from(encodeFloats(values.get(name)!.data, "F16", name));
    header[name] = { dtype: "F16", shape: values.get(name)!.shape, data_offsets: [offset, offset + bytes.length] };
    chunks.push(bytes);
    offset += bytes.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  fs.writeFileSync(path.join(out, "model.safetensors"), Buffer.concat([len, json, ...chunks]));
}

describe("checkOutDir: where a run may write", () => {
  const identity = { stage: 1, source: "abc", data: "train.jsonl" };

  it("accepts a missing or empty folder, and an earlier run of the same training (keys in any order)", () => {
    expect(checkOutDir(fresh(), identity)).toBe("new");
    const empty = fresh();
    fs.mkdirSync(empty);
    expect(checkOutDir(empty, identity)).toBe("new");
    const earlier = fresh();
    saveCheckpoint({ source: Checkpoint.open(ITM), out: earlier, trained: layernorm(1), state: state(3, identity) });
    expect(checkOutDir(earlier, { data: "train.jsonl", source: "abc", stage: 1 })).toBe("resume");
    expect(openTrainingOutput(earlier, identity)!.json).toEqual(state(3).json);
    expect(openTrainingOutput(empty, identity)).toBeNull();
  });

  it("refuses anything else, saying what is there, and writes nothing", () => {
    const earlier = fresh();
    saveCheckpoint({ source: Checkpoint.open(ITM), out: earlier, trained: layernorm(1), state: state(3, identity) });
    const before = fs.readdirSync(earlier).map((f) => fs.readFileSync(path.join(earlier, f)));
    expect(() => checkOutDir(earlier, { ...identity, stage: 2, data: "other.jsonl" })).toThrow(
      `${earlier}: holds an earlier run of another training (data: "train.jsonl" there, "other.jsonl" here; stage: 1 there, 2 here); nothing was written`,
    );
    expect(fs.readdirSync(earlier).map((f) => fs.readFileSync(path.join(earlier, f)))).toEqual(before);

    expect(() => checkOutDir(ITM, identity)).toThrow(/hf-4.45\/itm: holds added_tokens.json, config.json, model.safetensors, preprocessor_config.json, … \(10 entries\) and no trainer_state.json, so it is not an earlier run of this training; nothing was written/);
    const file = path.join(scratch, "a-file");
    fs.writeFileSync(file, "x");
    expect(() => checkOutDir(file, identity)).toThrow(`${file}: is a file, not a folder; nothing was written`);
    const bad = fresh();
    fs.mkdirSync(bad);
    fs.writeFileSync(path.join(bad, "trainer_state.json"), "{ not json");
    expect(() => checkOutDir(bad, identity)).toThrow(`${path.join(bad, "trainer_state.json")}: not valid JSON; it is not a trainer state written by blip2`);
    // Without an identity (blip2 compose) only a missing or empty folder will do.
    expect(() => checkOutDir(earlier, null)).toThrow(/is not empty \(holds .*\); nothing was written \(choose another --out or an empty folder\)/);
  });
});

describe("a save that fails or is killed leaves the previous checkpoint", () => {
  it("a full disk: one clear error naming the folder, the previous checkpoint intact, nothing partial left", () => {
    const source = Checkpoint.open(ITM);
    const out = fresh();
    saveCheckpoint({ source, out, trained: layernorm(1), state: state(1) });
    const before = new Map(fs.readdirSync(out).map((f) => [f, fs.readFileSync(path.join(out, f))]));
    let writes = 0;
    const original = fs.writeSync;
    vi.spyOn(fs, "writeSync").mockImplementation(((...args: Parameters<typeof fs.writeSync>) => {
      if (++writes > 20) throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
      return (original as (...a: unknown[]) => number)(...args);
    }) as typeof fs.writeSync);
    expect(() => saveCheckpoint({ source, out, trained: layernorm(2), state: state(2) })).toThrow(
      new RegExp(`^${out.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: the disk is full \\(ENOSPC\\) while saving the checkpoint \\(.*\\); nothing was saved and the checkpoint already there is intact$`),
    );
    expect(writes).toBeGreaterThan(20);
    vi.restoreAllMocks();
    expect(new Map(fs.readdirSync(out).map((f) => [f, fs.readFileSync(path.join(out, f))]))).toEqual(before);
    expect(siblings(out)).toEqual([]);
    expect(loadTrainerState(out).json).toEqual(state(1).json);
  });

  it("a full disk on a first save leaves no folder at all", () => {
    const out = fresh();
    vi.spyOn(fs, "writeSync").mockImplementation(() => {
      throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
    });
    expect(() => saveCheckpoint({ source: Checkpoint.open(ITM), out, trained: layernorm(2) })).toThrow(/the disk is full \(ENOSPC\).*no folder was left$/);
    expect(fs.existsSync(out)).toBe(false);
    expect(siblings(out)).toEqual([]);
  });

  it("a rename of the swap that fails puts the previous checkpoint back and leaves nothing partial", () => {
    const source = Checkpoint.open(ITM);
    const out = fresh();
    saveCheckpoint({ source, out, trained: layernorm(1), state: state(1) });
    const original = fs.renameSync;
    let renames = 0;
    vi.spyOn(fs, "renameSync").mockImplementation((from, to) => {
      // 1: tmp → new, 2: out → old, 3: new → out
      if (++renames === 3) throw Object.assign(new Error(`EACCES: permission denied, rename '${from}' -> '${to}'`), { code: "EACCES" });
      original(from, to);
    });
    expect(() => saveCheckpoint({ source, out, trained: layernorm(2), state: state(2) })).toThrow(/: cannot save the checkpoint \(EACCES: permission denied, rename .*\); nothing was saved and the checkpoint already there is intact$/);
    vi.restoreAllMocks();
    expect(siblings(out)).toEqual([]);
    expect(loadTrainerState(out).json).toEqual(state(1).json);
  });

  it("refuses up front when the disk has less free space than the checkpoint needs", () => {
    const out = fresh();
    vi.spyOn(fs, "statfsSync").mockReturnValue({ bavail: 10, bsize: 4096 } as fs.StatsFs);
    expect(() => saveCheckpoint({ source: Checkpoint.open(ITM), out, trained: layernorm(2) })).toThrow(`${out}: not enough disk space to save the checkpoint: 231733 bytes needed (the previous checkpoint is replaced only once the new one is complete), 40960 bytes free; nothing was saved`);
    expect(fs.existsSync(out)).toBe(false);
    expect(siblings(out)).toEqual([]);
  });

  // A child process saves over a first checkpoint and is killed (SIGKILL) at a chosen point:
  // during the writes, or at one of the renames of the swap (1: tmp → new, 2: out → old, 3: new → out).
  const killedSave = async (out: string, killAt: { write?: number; rename?: number }) => {
    const script = path.join(scratch, `child-${++counter}.ts`);
    const src = path.resolve(fixture(), "..", "..", "src");
    fs.writeFileSync(
      script,
      `import fs from "node:fs";
import { Checkpoint } from ${JSON.stringify(path.join(src, "io", "checkpoint.ts"))};
import { saveCheckpoint } from ${JSON.stringify(path.join(src, "train", "checkpoint.ts"))};
const killAt = ${JSON.stringify(killAt)};
let writes = 0, renames = 0;
const write = fs.writeSync, rename = fs.renameSync;
fs.writeSync = (...a) => { if (++writes === killAt.write) process.kill(process.pid, "SIGKILL"); return write(...a); };
fs.renameSync = (...a) => { if (++renames === killAt.rename) process.kill(process.pid, "SIGKILL"); return rename(...a); };
const trained = new Map([["qformer.layernorm.weight", { shape: [32], data: new Float32Array(32).fill(2) }]]);
saveCheckpoint({ source: Checkpoint.open(${JSON.stringify(ITM)}), out: ${JSON.stringify(out)}, trained, state: { identity: "id", json: { step: 2 }, tensors: new Map() } });
`,
    );
    const err = await promisify(execFile)(process.execPath, ["--import", "tsx", script]).catch((e) => e);
    expect(err.signal).toBe("SIGKILL");
  };
  const stepOf = (out: string) => (loadTrainerState(out).json as { step: number }).step;
  const layernormOf = (out: string) => readTensorF32(Checkpoint.open(out).tensor("qformer.layernorm.weight"))[0];
  const first = (out: string) => saveCheckpoint({ source: Checkpoint.open(ITM), out, trained: layernorm(1), state: { identity: "id", json: { step: 1 }, tensors: new Map() } });

  it("killed while writing: the previous checkpoint stays, the partial folder is removed at the next open", async () => {
    const out = fresh();
    first(out);
    await killedSave(out, { write: 40 });
    expect(siblings(out)).toEqual([expect.stringMatching(/\.tmp-\d+$/)]);
    expect(stepOf(out)).toBe(1);
    expect(layernormOf(out)).toBe(1);
    expect(siblings(out)).toEqual([]);
  });

  it("killed between the renames of the swap: the next open completes the save (the new checkpoint is complete)", async () => {
    for (const rename of [2, 3]) {
      const out = fresh();
      first(out);
      await killedSave(out, { rename });
      expect(fs.existsSync(out)).toBe(rename === 2); // at 3, out was already moved aside
      expect(stepOf(out)).toBe(2);
      expect(layernormOf(out)).toBe(2);
      expect(siblings(out)).toEqual([]);
    }
  });

  it("killed before its complete folder was renamed: the previous checkpoint stays", async () => {
    const out = fresh();
    first(out);
    await killedSave(out, { rename: 1 });
    expect(checkOutDir(out, "id")).toBe("resume");
    expect(stepOf(out)).toBe(1);
    expect(siblings(out)).toEqual([]);
  });
});

describe("stage1Extras", () => {
  it("on Hugging Face's retrieval checkpoint: [DEC], the ITG head and temp, as the stage-1 fixture has them", async () => {
    const source = Checkpoint.open(ITM);
    const extras = await stage1Extras(source, new Rng(0));
    expect(extras.decTokenId).toBe(101);
    expect(extras.notice).toMatch(/^added \[DEC\] \(token 101, a new row of embeddings.word_embeddings.weight: 102 rows\), the ITG head and temp \(0.07\): /);
    const out = fresh();
    saveCheckpoint({ source, out, trained: extras.tensors, config: extras.config, files: extras.files });

    const reference = fixture("train", "stage1-itm");
    const shapes = (dir: string) => new Map([...tensorsOf(dir)].map(([n, t]) => [n, t.shape]));
    expect(shapes(out)).toEqual(shapes(reference));
    expect(fileOrder(out)).toEqual(fileOrder(reference));
    const { _name_or_path: _, ...expectedConfig } = JSON.parse(fs.readFileSync(path.join(reference, "config.json"), "utf8"));
    expect(JSON.parse(fs.readFileSync(path.join(out, "config.json"), "utf8"))).toEqual(expectedConfig);
    for (const f of ["added_tokens.json", "tokenizer_config.json"]) expect(JSON.parse(fs.readFileSync(path.join(out, f), "utf8")), f).toEqual(JSON.parse(fs.readFileSync(path.join(reference, f), "utf8")));

    const [mine, theirs] = await Promise.all([Blip2Tokenizer.fromDirectory(out), Blip2Tokenizer.fromDirectory(reference)]);
    expect(mine.bosTokenId).toBe(101);
    expect(mine.tokenToId("[DEC]")).toBe(101);
    expect(mine.vocabSize).toBe(theirs.vocabSize);
    for (const text of ["[DEC] a photo of a cat", "<image> two dogs", "hello world"]) expect(mine.encode(text)).toEqual(theirs.encode(text));

    // Fresh values: BERT init (normal(0, 0.02) weights, zero biases, LayerNorm 1/0), temp 0.07.
    const saved = tensorsOf(out);
    const values = (n: string) => readTensorF32(saved.get(n)!);
    const dense = values("cls.predictions.transform.dense.weight");
    const std = Math.sqrt(dense.reduce((s, x) => s + x * x, 0) / dense.length);
    expect(std).toBeGreaterThan(0.018);
    expect(std).toBeLessThan(0.022);
    expect(Math.abs(dense.reduce((s, x) => s + x, 0) / dense.length)).toBeLessThan(0.002);
    for (const n of ["cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.bias", "cls.predictions.bias"]) expect(values(n).every((x) => x === 0), n).toBe(true);
    expect(values("cls.predictions.transform.LayerNorm.weight").every((x) => x === 1)).toBe(true);
    expect(values("temp")).toEqual(Float32Array.of(0.07));
    const words = readTensorBytes(saved.get("embeddings.word_embeddings.weight")!);
    expect(words.subarray(0, 101 * 32 * 4).equals(readTensorBytes(source.tensor("embeddings.word_embeddings.weight")))).toBe(true);
    const row = new Float32Array(words.buffer.slice(words.byteOffset + 101 * 128, words.byteOffset + 102 * 128));
    expect(row.some((x) => x !== 0) && row.every((x) => Math.abs(x) < 0.1)).toBe(true);

    // Seeded: the same seed draws the same values.
    const again = await stage1Extras(source, new Rng(0));
    expect(again.tensors.get("cls.predictions.transform.dense.weight")!.data).toEqual(extras.tensors.get("cls.predictions.transform.dense.weight")!.data);
  });

  it("on the stage-1 fixture itself: nothing is missing, no notice", async () => {
    const extras = await stage1Extras(Checkpoint.open(fixture("train", "stage1-itm")), new Rng(0));
    expect(extras).toEqual({ decTokenId: 101, tensors: new Map(), config: undefined, files: {}, notice: null });
  });

  it("refuses a checkpoint that is not a retrieval one", async () => {
    await expect(stage1Extras(Checkpoint.open(fixture("hf-4.45", "opt")), new Rng(0))).rejects.toThrow(/hf-4.45\/opt: stage 1 trains a Blip2ForImageTextRetrieval checkpoint .*config.json says Blip2ForConditionalGeneration/);
  });
});

describe("blip2 compose", () => {
  const OPT = fixture("hf-4.45", "opt");
  const T5 = fixture("hf-4.45", "t5");
  const readJson = (...p: string[]) => JSON.parse(fs.readFileSync(path.join(...p), "utf8"));
  const without = (obj: Record<string, unknown>, ...keys: string[]) => Object.fromEntries(Object.entries(obj).filter(([k]) => !keys.includes(k)));

  /**
   * The language model inside a BLIP-2 fixture as Hugging Face publishes one: its `language_model.*`
   * tensors without the prefix (sharded when asked), its text_config as config.json, its tokenizer
   * without `<image>`, no generation_config.json. `edit` may change the tensors and the config.
   */
  function languageModelFolder(blip2: string, options: { maxShardBytes?: number; edit?: (tensors: Map<string, TensorValue>, config: Record<string, unknown>) => void } = {}): string {
    const dir = fresh("lm");
    const ckpt = Checkpoint.open(blip2);
    const tensors = new Map<string, TensorValue>();
    for (const name of ckpt.names().filter((n) => n.startsWith("language_model."))) tensors.set(name.slice("language_model.".length), { shape: ckpt.tensor(name).shape, data: readTensorF32(ckpt.tensor(name)) });
    const t5 = ckpt.config.text.modelType === "t5";
    // Hub T5 files may also hold the encoder's and decoder's copies of the tied embeddings.
    if (t5) for (const copy of ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]) tensors.set(copy, tensors.get("shared.weight")!);
    const config = { architectures: [t5 ? "T5ForConditionalGeneration" : "OPTForCausalLM"], ...readJson(blip2, "config.json").text_config };
    options.edit?.(tensors, config);
    const entries = [...tensors].sort(([a], [b]) => (a < b ? -1 : 1)).map(([name, v]) => ({ name, dtype: "F32" as const, shape: v.shape, bytes: encodeFloats(v.data, "F32", name) }));
    const files: Record<string, string | { copy: string }> = { "config.json": JSON.stringify(config) };
    for (const f of ["vocab.json", "merges.txt", "spiece.model"]) if (fs.existsSync(path.join(blip2, f))) files[f] = { copy: path.join(blip2, f) };
    const imageId = String(ckpt.config.imageTokenIndex);
    const tokenizerConfig = readJson(blip2, "tokenizer_config.json");
    delete tokenizerConfig.added_tokens_decoder[imageId];
    files["tokenizer_config.json"] = JSON.stringify(without(tokenizerConfig, "additional_special_tokens", "processor_class"));
    files["special_tokens_map.json"] = JSON.stringify(without(readJson(blip2, "special_tokens_map.json"), "additional_special_tokens"));
    writeModelFolder({ out: dir, tensors: entries, files, maxShardBytes: options.maxShardBytes });
    return dir;
  }

  const bytesOf = (dir: string) => new Map([...tensorsOf(dir)].map(([n, t]) => [n, readTensorBytes(t)] as const));
  const lmBytes = (dir: string) => {
    const map = new Map<string, Buffer>();
    const index = path.join(dir, "model.safetensors.index.json");
    const files = fs.existsSync(index) ? [...new Set(Object.values(readJson(index).weight_map as Record<string, string>))] : ["model.safetensors"];
    for (const f of files) for (const [n, t] of headerOf(path.join(dir, f)).tensors) map.set(n, readTensorBytes(t));
    return map;
  };

  it.each([
    ["OPT", OPT, {}],
    ["T5 (sharded language model folder)", T5, { maxShardBytes: 40_000 }],
  ] as const)("%s: transformers' conditional-generation layout, frozen tensors byte-identical, the tokenizer with <image>, and it captions", async (_, reference, lmOptions) => {
    const lm = languageModelFolder(reference, lmOptions);
    expect(fs.existsSync(path.join(lm, "model.safetensors.index.json"))).toBe("maxShardBytes" in lmOptions);
    const out = fresh();
    const r = await cli("compose", "--stage1", ITM, "--language-model", lm, "--out", out, "--seed", "3");
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const ref = Checkpoint.open(reference);
    expect(r.stdout).toContain(`<image> is token ${ref.config.imageTokenIndex}\n`);
    expect(r.stdout).toMatch(/left out from stage 1: embeddings, itm_head, text_projection, the Q-Former's text feed-forward, vision_projection\n$/);

    // Every key and shape of transformers' own Blip2ForConditionalGeneration checkpoint, and no other.
    const composed = Checkpoint.open(out);
    const shapes = (c: Checkpoint) => new Map(c.names().map((n) => [n, c.tensor(n).shape]));
    expect(shapes(composed)).toEqual(shapes(ref));
    expect(composed.names()).toEqual([...composed.names()].sort());
    const saved = bytesOf(out);
    const stage1 = bytesOf(ITM);
    const language = lmBytes(lm);
    for (const [name, bytes] of saved) {
      if (name.startsWith("language_projection.")) continue;
      const source = name.startsWith("language_model.") ? language.get(name.slice("language_model.".length)) : stage1.get(name);
      expect(source && bytes.equals(source), name).toBe(true);
    }
    const projection = readTensorF32(composed.tensor("language_projection.weight"));
    const std = Math.sqrt(projection.reduce((s, x) => s + x * x, 0) / projection.length);
    expect(std).toBeGreaterThan(0.018);
    expect(std).toBeLessThan(0.022);
    expect(readTensorF32(composed.tensor("language_projection.bias")).every((x) => x === 0)).toBe(true);

    // config.json parses as the same architecture, with the stage-1 Q-Former's and vision encoder's settings.
    const config = readJson(out, "config.json");
    const expected = readJson(reference, "config.json");
    const itmConfig = readJson(ITM, "config.json");
    expect(without(config, "image_text_hidden_size", "qformer_config", "text_config")).toEqual(without(expected, "image_text_hidden_size", "qformer_config", "text_config", "transformers_version"));
    expect(config.qformer_config).toEqual(without(itmConfig.qformer_config, "use_qformer_text_input"));
    expect(without(config.text_config, "architectures")).toEqual(expected.text_config);
    expect(config.vision_config).toEqual(itmConfig.vision_config);
    expect(composed.config.text).toEqual(ref.config.text);

    // The tokenizer and processor files as transformers saved them for the reference.
    for (const f of ["added_tokens.json", "special_tokens_map.json", "processor_config.json"]) expect(readJson(out, f), f).toEqual(readJson(reference, f));
    expect(readJson(out, "tokenizer_config.json")).toEqual(without(readJson(reference, "tokenizer_config.json"), "processor_class"));
    expect(readJson(out, "generation_config.json")).toEqual(without(readJson(reference, "generation_config.json"), "transformers_version"));
    expect(fs.readFileSync(path.join(out, "preprocessor_config.json"))).toEqual(fs.readFileSync(path.join(ITM, "preprocessor_config.json")));

    const blip2 = await Blip2.load(out, { worker: false, threads: 1 });
    try {
      const inputs = await blip2.processor.process({ images: fixture("image0.png"), text: "a photo of" });
      expect(inputs.inputIds[0]!.slice(0, 4)).toEqual(new Array(4).fill(ref.config.imageTokenIndex));
      const [caption] = await blip2.captionAll([fixture("image0.png")], { maxNewTokens: 5, minNewTokens: 5 });
      expect(caption!.ids.length).toBeGreaterThanOrEqual(5);
      expect(caption!.ids.every((id) => id >= 0 && id < ref.config.text.vocabSize)).toBe(true);
      expect(typeof caption!.text).toBe("string");
    } finally {
      await blip2.dispose();
    }
  });

  it("the same seed composes the same checkpoint; the stage-1 fixture's extras are left out too", async () => {
    const lm = languageModelFolder(OPT);
    const [a, b] = [fresh(), fresh()];
    for (const out of [a, b]) expect((await cli("compose", "--stage1", fixture("train", "stage1-itm"), "--language-model", lm, "--out", out)).code).toBe(0);
    expect(bytesOf(a)).toEqual(bytesOf(b));
    expect([...tensorsOf(a).keys()].sort()).toEqual([...tensorsOf(OPT).keys()].sort());
  });

  it("grows the language model's embeddings when <image> has no row yet (the new row is the others' mean)", async () => {
    const lm = languageModelFolder(OPT, {
      edit: (tensors, config) => {
        const embed = tensors.get("model.decoder.embed_tokens.weight")!;
        tensors.set("model.decoder.embed_tokens.weight", { shape: [354, 32], data: embed.data.slice(0, 354 * 32) });
        config.vocab_size = 354;
      },
    });
    const out = fresh();
    const lines = await composeStage2({ stage1: ITM, languageModel: lm, out, rng: new Rng(1) });
    expect(lines[1]).toMatch(/<image> is token 354, a new row of the language model's embeddings \(355 rows\)$/);
    const composed = Checkpoint.open(out);
    expect(composed.config.text.vocabSize).toBe(355);
    expect(composed.config.imageTokenIndex).toBe(354);
    const embed = readTensorF32(composed.tensor("language_model.model.decoder.embed_tokens.weight"));
    const original = readTensorF32(Checkpoint.open(OPT).tensor("language_model.model.decoder.embed_tokens.weight"));
    expect(embed.subarray(0, 354 * 32)).toEqual(original.subarray(0, 354 * 32));
    for (let c = 0; c < 32; c++) {
      let mean = 0;
      for (let r = 0; r < 354; r++) mean += original[r * 32 + c]! / 354;
      expect(embed[354 * 32 + c]).toBeCloseTo(mean, 6);
    }
  });

  describe("bad input: one clear error, exit 1, nothing written", () => {
    const refused = async (stage1: string, lm: string, message: string | RegExp, out = fresh()) => {
      const before = fs.existsSync(out) ? fs.readdirSync(out) : null;
      const r = await cli("compose", "--stage1", stage1, "--language-model", lm, "--out", out);
      expect(r.code).toBe(1);
      expect(r.stderr.split("\n")).toHaveLength(2); // one line
      expect(r.stderr).toMatch(typeof message === "string" ? `blip2: error: ${message}\n` : message);
      expect(fs.existsSync(out) ? fs.readdirSync(out) : null).toEqual(before);
      expect(siblings(out)).toEqual([]);
    };

    it("a stage-1 folder that is not a retrieval checkpoint", async () => {
      await refused(OPT, languageModelFolder(OPT), `${OPT}: config.json says Blip2ForConditionalGeneration; --stage1 must be a stage-1 checkpoint (Blip2ForImageTextRetrieval)`);
    });

    it("a language model of another architecture", async () => {
      await refused(ITM, ITM, `${path.join(ITM, "config.json")}: model_type is "blip-2" (Blip2ForImageTextRetrieval); --language-model must be an OPTForCausalLM or T5ForConditionalGeneration folder`);
      const bert = languageModelFolder(OPT, { edit: (_, config) => Object.assign(config, { model_type: "bert", architectures: ["BertForMaskedLM"] }) });
      await refused(ITM, bert, /model_type is "bert" \(BertForMaskedLM\); --language-model must be/);
      const encoder = languageModelFolder(T5, { edit: (tensors) => [...tensors.keys()].filter((n) => n.startsWith("decoder.")).forEach((n) => tensors.delete(n)) });
      await refused(ITM, encoder, `${encoder}: no decoder.* tensors: a T5 encoder alone cannot generate (expected a T5ForConditionalGeneration folder)`);
    });

    it("a hidden-size mismatch between the language model's config and its weights", async () => {
      const lm = languageModelFolder(OPT, { edit: (_, config) => Object.assign(config, { hidden_size: 64, word_embed_proj_dim: 64 }) });
      await refused(ITM, lm, "model.safetensors: tensor model.decoder.embed_tokens.weight has shape [355, 32] but config.json's vocab_size and word_embed_proj_dim implies [355, 64]");
      const t5 = languageModelFolder(T5, { edit: (_, config) => Object.assign(config, { num_heads: 8 }) });
      await refused(ITM, t5, "model.safetensors: tensor encoder.block.0.layer.0.SelfAttention.q.weight has shape [32, 32] but config.json's num_heads × d_kv and d_model implies [64, 32]");
    });

    it("--out that is not empty, and a missing option", async () => {
      const out = fresh();
      fs.mkdirSync(out);
      fs.writeFileSync(path.join(out, "notes.txt"), "mine");
      await refused(ITM, languageModelFolder(OPT), `${out}: is not empty (holds notes.txt); nothing was written (choose another --out or an empty folder)`, out);
      expect(fs.readFileSync(path.join(out, "notes.txt"), "utf8")).toBe("mine");
      const usage = await cli("compose", "--stage1", ITM, "--out", fresh());
      expect(usage.code).toBe(2);
      expect(usage.stderr).toBe("blip2: error: compose: missing --language-model (see 'blip2 compose --help')\n");
    });
  });
});
