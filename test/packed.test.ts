/** ONNX Runtime's packed q8/q4 weights kept in the blip2 cache: saved once, mapped afterwards, never trusted blindly. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import onnxProto from "onnx-proto";
import * as ort from "onnxruntime-node";
import { afterAll, describe, expect, it, vi, type MockInstance } from "vitest";
import { Blip2, Blip2ForImageTextRetrieval, listWeightCaches } from "../src/index.js";
import { listPacked, PackedModel, packedRoot, pruneStalePacked } from "../src/runtime/packedModels.js";
import { probeDifference, sampleOutputs } from "../src/runtime/probe.js";
import { cli, fixture, vanishing } from "./helpers.js";

const cache = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-packed-"));
afterAll(() => fs.rmSync(cache, { recursive: true, force: true }));

const images = [fixture("image0.png"), fixture("image1.png")];
const texts = ["a photo of a cat", "a drawing of a dog"];

/** ITC similarities and ITM logits of the tiny ITM model in q8, as plain numbers. */
async function scores(options: { packedWeights?: boolean; blip2Cache?: string; packingProgress?: (p: { graph: string; done: boolean }) => void } = {}): Promise<number[]> {
  const model = await Blip2ForImageTextRetrieval.fromPretrained(fixture("tiny-blip2-itm"), { dtype: "q8", blip2Cache: cache, ...options });
  try {
    const itc = (await model.similarity(images, texts)).flat();
    const itm = (await model.match(images, texts)).logits.flat(2);
    return [...itc, ...itm];
  } finally {
    await model.dispose();
  }
}

/** The data-file offsets of a saved model's tensors, and the ranges of its packed blobs. */
function externalData(model: string): { offsets: number[]; packedBlobs: { offset: number; length: number }[] } {
  const proto = onnxProto.onnx.ModelProto.decode(fs.readFileSync(model));
  const entries = (proto.graph?.initializer ?? []).flatMap((i) => i.externalData ?? []);
  const packedBlobs = entries.flatMap((e) => {
    const m = e.key?.startsWith("prepacked_") ? /\|(\d+);(\d+);/.exec(e.value ?? "") : null;
    return m ? [{ offset: Number(m[1]), length: Number(m[2]) }] : [];
  });
  const offsets = entries.flatMap((e) => (e.key === "offset" ? [Number(e.value)] : []));
  return { offsets: [...offsets, ...packedBlobs.map((b) => b.offset)], packedBlobs };
}

/**
 * Each packed folder with its files' modification times, to tell a reopened copy from a rewritten
 * one (but the record's, which each opening sets).
 */
const snapshot = (root: string) =>
  Object.fromEntries(fs.readdirSync(root).map((d) => [d, fs.readdirSync(path.join(root, d)).sort().map((f) => (f === "entry.json" ? f : `${f}@${fs.statSync(path.join(root, d, f)).mtimeMs}`))]));

/**
 * Runs `body` on a new blip2 cache holding the shared cache's converted weights but no packed
 * copies, with console.warn captured; afterwards every spy is restored and the cache removed.
 */
async function withNewCache(prefix: string, body: (home: string, warn: MockInstance<typeof console.warn>) => Promise<void>): Promise<void> {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  fs.cpSync(path.join(cache, "weights"), path.join(home, "weights"), { recursive: true });
  try {
    await body(home, vi.spyOn(console, "warn").mockImplementation(() => {}));
  } finally {
    vi.restoreAllMocks();
    fs.rmSync(home, { recursive: true, force: true });
  }
}

describe("packed weights", () => {
  const root = packedRoot(cache);
  let inMemory: number[] = [];

  it("are saved by the first load and opened by the next, with the very same results as packing in memory", async () => {
    inMemory = await scores({ packedWeights: false });
    expect(fs.existsSync(root)).toBe(false);
    // What a save killed midway leaves: removed by the next save.
    const killed = path.join(root, "0123abcd-1.tmp-99999999");
    fs.mkdirSync(killed, { recursive: true });
    fs.writeFileSync(path.join(killed, "model.data"), "partial");
    const told: string[] = [];
    const first = await scores({ packingProgress: (p) => void told.push(`${p.graph} ${p.done ? "saved" : "saving"}`) });
    expect(fs.existsSync(killed)).toBe(false);
    const saved = snapshot(root);
    // The sessions with integer kernels: the image path and the text/ITM path.
    expect(Object.keys(saved).length).toBeGreaterThanOrEqual(2);
    for (const files of Object.values(saved)) expect(files.map((f) => f.split("@")[0])).toEqual(["entry.json", "model.data", "model.onnx"]);
    // Every tensor and packed blob starts on a page (ONNX Runtime restores MatMulNBits' blobs wrongly otherwise).
    for (const dir of Object.keys(saved)) {
      const { offsets } = externalData(path.join(root, dir, "model.onnx"));
      expect(offsets.length).toBeGreaterThan(0);
      expect(offsets.filter((o) => o % 4096 !== 0)).toEqual([]);
    }
    // Each saved graph was announced, then reported done; the next load saves nothing.
    expect(told.length).toBe(2 * Object.keys(saved).length);
    for (const graph of new Set(told.map((t) => t.split(" ")[0]))) expect(told.filter((t) => t.startsWith(`${graph} `))).toEqual([`${graph} saving`, `${graph} saved`]);
    const second = await scores({ packingProgress: (p) => void told.push(p.graph) });
    expect(told.length).toBe(2 * Object.keys(saved).length);
    expect(snapshot(root)).toEqual(saved);
    expect(first).toEqual(inMemory);
    expect(second).toEqual(inMemory);
    expect(listPacked(cache).every((e) => !e.stale && e.graph)).toBe(true);
  });

  it("an external-data entry blip2 does not know stops the save, not the load", async () => {
    const [dir] = fs.readdirSync(root);
    const folder = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-packed-entry-"));
    try {
      for (const f of ["model.onnx", "model.data"]) fs.copyFileSync(path.join(root, dir!, f), path.join(folder, f));
      const model = path.join(folder, "model.onnx");
      const proto = onnxProto.onnx.ModelProto.decode(fs.readFileSync(model));
      const init = proto.graph!.initializer!.find((i) => i.externalData?.length)!;
      init.externalData!.push({ key: "prepacked_0", value: "something else" });
      fs.writeFileSync(model, onnxProto.onnx.ModelProto.encode(proto).finish());
      const { alignPacked } = await import("../src/runtime/alignPacked.js");
      expect(() => alignPacked(folder, "model.onnx", "model.data")).toThrow(`${init.name}: unknown external-data entry prepacked_0=something else`);
    } finally {
      fs.rmSync(folder, { recursive: true, force: true });
    }
  });

  it("a truncated data file is packed again, never mapped", async () => {
    const [dir] = fs.readdirSync(root);
    const data = path.join(root, dir!, "model.data");
    fs.truncateSync(data, Math.floor(fs.statSync(data).size / 2));
    expect(await scores()).toEqual(inMemory);
    expect(fs.statSync(data).size).toBe(JSON.parse(fs.readFileSync(path.join(root, dir!, "entry.json"), "utf8")).dataBytes);
  });

  it("a damaged model file is reported once, removed, and the session packs in memory", async () => {
    const dirs = fs.readdirSync(root);
    for (const d of dirs) fs.writeFileSync(path.join(root, d, "model.onnx"), "not a model");
    const warn = vi.spyOn(console, "warn").mockImplementation(() => {});
    try {
      expect(await scores()).toEqual(inMemory);
      expect(warn.mock.calls.flat().join("\n")).toMatch(/cannot use the packed weights kept there \(cannot create the .* session: .*\); removed, packing them again/);
    } finally {
      warn.mockRestore();
    }
    for (const d of dirs) expect(fs.existsSync(path.join(root, d))).toBe(false);
    // The next load saves them again.
    expect(await scores()).toEqual(inMemory);
    expect(fs.readdirSync(root).length).toBe(dirs.length);
  });

  it("whose packed blobs compute other numbers than the saving session did are reported, removed and packed again", async () => {
    const dirs = fs.readdirSync(root);
    // Every packed blob's bytes reversed: the file keeps its size, and the copy still opens.
    for (const d of dirs) {
      const data = path.join(root, d, "model.data");
      const bytes = fs.readFileSync(data);
      for (const { offset, length } of externalData(path.join(root, d, "model.onnx")).packedBlobs) bytes.subarray(offset, offset + length).reverse();
      fs.writeFileSync(data, bytes);
    }
    const warn = vi.spyOn(console, "warn").mockImplementation(() => {});
    try {
      expect(await scores()).toEqual(inMemory);
      const told = warn.mock.calls.flat().join("\n");
      for (const d of dirs) expect(told).toMatch(new RegExp(`${d}: cannot use the packed weights kept there \\(they compute other numbers than packing in memory did: .*: relative error [\\d.e+]+\\); removed, packing them again`));
    } finally {
      warn.mockRestore();
    }
    for (const d of dirs) expect(fs.existsSync(path.join(root, d))).toBe(false);
    expect(await scores()).toEqual(inMemory);
    expect(fs.readdirSync(root).sort()).toEqual(dirs.sort());
  });

  it("of every generation graph are checked by their probe, opened without a warning", async () => {
    const own = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-packed-gen-"));
    const warn = vi.spyOn(console, "warn").mockImplementation(() => {});
    try {
      for (const name of ["tiny-blip2-opt", "tiny-blip2-t5"]) {
        const ids: number[][] = [];
        for (const packedWeights of [false, true, true]) {
          const b = await Blip2.load(fixture(name), { dtype: "q8", blip2Cache: own, packedWeights });
          ids.push((await b.captionAll([fixture("image0.png")], { maxNewTokens: 5 }))[0]!.ids);
          await b.dispose();
        }
        expect(ids[1], name).toEqual(ids[0]);
        expect(ids[2], name).toEqual(ids[0]);
      }
      expect(warn).not.toHaveBeenCalled();
      const graphs = listPacked(own).map((e) => {
        const record = JSON.parse(fs.readFileSync(path.join(e.dir, "entry.json"), "utf8"));
        return `${e.graph}: ${Object.keys(record.probe).filter((o) => !/^new\.[1-9]|^cross\.[1-9]/.test(o)).join(" ")}`;
      });
      expect(graphs.sort()).toEqual([
        "image: vision_last_hidden_state vision_pooler_output qformer_last_hidden_state language_model_inputs",
        "image: vision_last_hidden_state vision_pooler_output qformer_last_hidden_state language_model_inputs",
        "opt_decoder: logits new.0.key new.0.value",
        "t5_cross_key_values: cross.0.key cross.0.value",
        "t5_decoder: logits new.0.key new.0.value",
        "t5_encoder: last_hidden_state",
      ]);
    } finally {
      warn.mockRestore();
      fs.rmSync(own, { recursive: true, force: true });
    }
  });

  it("where they cannot be saved, loading warns and packs in memory", () =>
    // The converted weights come from the shared cache; only the packed ones cannot be kept.
    withNewCache("blip2-packed-blocked-", async (blocked, warn) => {
      fs.writeFileSync(packedRoot(blocked), "a file where the folder would go");
      expect(await scores({ blip2Cache: blocked })).toEqual(inMemory);
      expect(warn.mock.calls.flat().join("\n")).toContain(`cannot keep packed weights in ${packedRoot(blocked)}`);
    }));

  it("are not saved onto a disk without room for them", () =>
    withNewCache("blip2-packed-small-", async (small, warn) => {
      vi.spyOn(fs, "statfsSync").mockReturnValue({ bavail: 1000, bsize: 4096 } as fs.StatsFs);
      expect(await scores({ blip2Cache: small })).toEqual(inMemory);
      expect(warn.mock.calls.flat().join("\n")).toMatch(/cannot keep packed weights in .* \(0\.0 GB free on its disk, 1\.\d GB wanted\)/);
      expect(fs.readdirSync(packedRoot(small))).toEqual([]);
    }));

  it("tell once, after a save, where blip2 cache --prune would free a gigabyte or more, and say so when a disk is short", () =>
    withNewCache("blip2-packed-prunable-", async (home, warn) => {
      // What earlier versions of blip2 leave (sparse files: their size, no disk): a packed copy in
      // another format, and a conversion in an older weight format.
      const older = path.join(packedRoot(home), "f".repeat(32));
      const oldFormat = path.join(listWeightCaches(home)[0]!.dir, "..", "blip2-weights-1");
      for (const [dir, file] of [[older, "model.data"], [oldFormat, "language-q8.safetensors"]] as const) {
        fs.mkdirSync(dir, { recursive: true });
        fs.writeFileSync(path.join(dir, file), "");
        fs.truncateSync(path.join(dir, file), 0.6e9);
      }
      fs.writeFileSync(path.join(older, "entry.json"), JSON.stringify({ format: "blip2-packed/2", graph: "image", weights: [] }));
      const told = (what: string) => warn.mock.calls.flat().map(String).filter((m) => m.includes(what));
      const statfs = vi.spyOn(fs, "statfsSync").mockReturnValue({ bavail: 1000, bsize: 4096 } as fs.StatsFs);
      expect(await scores({ blip2Cache: home })).toEqual(inMemory);
      statfs.mockRestore();
      expect(told("cannot keep")[0]).toMatch(/cannot keep packed weights in .* \(0\.0 GB free on its disk, 1\.\d GB wanted; `blip2 cache --prune` would free 1\.2 GB\)/);
      // Two graphs are saved; the first save tells, once.
      expect(await scores({ blip2Cache: home })).toEqual(inMemory);
      expect(told(" holds ")).toEqual([`blip2: warning: ${home} holds 1.2 GB of converted and packed weights that this version of blip2 will not open again on this machine; \`blip2 cache --prune\` removes them`]);
      // Opening the copies saves nothing, and tells nothing more.
      expect(await scores({ blip2Cache: home })).toEqual(inMemory);
      expect(told(" holds ").length).toBe(1);
      const pruned = await cli("cache", "--prune", "--cache-dir", home);
      expect(pruned.stdout).toContain("freed 1.2 GB");
    }));

  it("are kept when the cache cannot be listed for the notice (another process removing what was listed)", () =>
    withNewCache("blip2-packed-unlisted-", async (home, warn) => {
      const failing = vanishing("readdirSync", path.join(home, "weights"));
      expect(await scores({ blip2Cache: home })).toEqual(inMemory);
      failing.mockRestore();
      expect(warn.mock.calls).toEqual([]);
      expect(listPacked(home).filter((e) => !e.stale).length).toBeGreaterThanOrEqual(2);
    }));

  it("are listed while other processes change them: a folder gone meanwhile is left out, one without a whole record is incomplete", () => {
    const home = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-packed-listing-"));
    const [gone, partial, odd] = ["a", "b", "c"].map((c) => path.join(packedRoot(home), c.repeat(32)));
    for (const dir of [gone!, partial!, odd!]) fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(partial!, "model.data"), "x".repeat(10));
    fs.writeFileSync(path.join(odd!, "entry.json"), "{}");
    const racing = vanishing("statSync", gone!);
    try {
      const listed = listPacked(home);
      expect(listed.map((e) => [e.dir, e.bytes, e.stale])).toEqual([[partial, 10, "incomplete"], [odd, 2, "incomplete"]]);
    } finally {
      racing.mockRestore();
      fs.rmSync(home, { recursive: true, force: true });
    }
  });

  it("are marked when opened, and an older copy of the same graph's weights counts as superseded", async () => {
    // Later than any save before (a file's time may trail the clock by a few milliseconds).
    await new Promise((resolve) => setTimeout(resolve, 200));
    const start = Date.now() - 50;
    await scores();
    const usable = listPacked(cache).filter((e) => !e.stale);
    expect(usable.length).toBeGreaterThanOrEqual(2);
    for (const e of usable) expect(fs.statSync(path.join(e.dir, "entry.json")).mtimeMs).toBeGreaterThanOrEqual(start);
    // What a graph built by an earlier blip2 leaves: a copy of the same graph's weights under another key, opened before.
    const older = path.join(root, "0".repeat(32));
    fs.cpSync(usable[0]!.dir, older, { recursive: true });
    const hourAgo = new Date(Date.now() - 3600e3);
    fs.utimesSync(path.join(older, "entry.json"), hourAgo, hourAgo);
    const listed = listPacked(cache);
    expect(listed.find((e) => e.dir === older)!.stale).toBe(`superseded by ${path.basename(usable[0]!.dir)} (the same graph's weights, opened since: its graph changed with blip2)`);
    expect(listed.filter((e) => e.stale).map((e) => e.dir)).toEqual([older]);
    expect(pruneStalePacked(cache).paths).toEqual([older]);
    expect(listPacked(cache).filter((e) => !e.stale).map((e) => e.dir).sort()).toEqual(usable.map((e) => e.dir).sort());
  });

  it("hold each graph as optimized with blip2's optimizer settings, which are part of their key", () => {
    const copies = listPacked(cache);
    expect(copies.length).toBeGreaterThan(0);
    for (const e of copies) {
      const ops = (onnxProto.onnx.ModelProto.decode(fs.readFileSync(path.join(e.dir, "model.onnx"))).graph?.node ?? []).map((n) => n.opType);
      expect(ops).toContain("MatMulIntegerToFloat");
      expect(ops).not.toContain("BiasGelu");
    }
    const key = (disabled: string) => path.basename(PackedModel.for(root, "image", Uint8Array.of(1), [], 0, { graphOptimizationLevel: "all", extra: { optimization: { disable_specified_optimizers: disabled } } }).dir);
    expect(key("BiasGeluFusion")).not.toBe(key(""));
  });

  it("follow their weight files: a changed file gets new ones, and blip2 cache --prune removes the stale", async () => {
    const before = new Set(fs.readdirSync(root));
    const weights = listPacked(cache).flatMap((e) => JSON.parse(fs.readFileSync(path.join(e.dir, "entry.json"), "utf8")).weights.map((w: { file: string }) => w.file));
    const touched = weights.find((f: string) => f.includes(`${path.sep}weights${path.sep}`))!;
    const later = new Date(Date.now() + 5000);
    fs.utimesSync(touched, later, later);
    expect(await scores()).toEqual(inMemory);
    const stale = listPacked(cache).filter((e) => e.stale);
    expect(stale.length).toBeGreaterThan(0);
    for (const e of stale) {
      expect(before.has(path.basename(e.dir))).toBe(true);
      expect(e.stale).toBe(`${touched} has changed`);
    }
    const list = await cli("cache", "--cache-dir", cache);
    expect(list.stdout).toMatch(new RegExp(`${stale.length} \\(.*\\) not to be opened again here \\(--prune removes them\\)`));
    const pruned = await cli("cache", "--prune", "--cache-dir", cache);
    expect(pruned.code, pruned.stderr).toBe(0);
    for (const e of stale) expect(pruned.stdout).toContain(`removed ${e.dir}\n`);
    expect(listPacked(cache).filter((e) => e.stale)).toEqual([]);
    expect(pruneStalePacked(cache).paths).toEqual([]);
    // Removing a checkpoint's converted weights takes the packed copies made from them.
    const kept = listPacked(cache);
    expect(kept.length).toBeGreaterThan(0);
    const [entry] = listWeightCaches(cache);
    const removed = await cli("cache", "--remove", entry!.fingerprint.slice(0, 12), "--cache-dir", cache);
    expect(removed.code, removed.stderr).toBe(0);
    for (const e of kept) expect(removed.stdout).toContain(`removed ${e.dir}\n`);
    expect(listPacked(cache)).toEqual([]);
  });

  it("the CLI keeps them unless --no-packed-cache", async () => {
    const home = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-packed-cli-"));
    const saved = process.env.BLIP2_CACHE;
    process.env.BLIP2_CACHE = home;
    try {
      const caption = (...flags: string[]) => cli("caption", "-m", fixture("tiny-blip2-opt"), "--dtype", "q8", "--max-new-tokens", "3", "-q", ...flags, fixture("image0.png"));
      const inMemory = await caption("--no-packed-cache");
      expect(inMemory.code, inMemory.stderr).toBe(0);
      expect(fs.existsSync(packedRoot(home))).toBe(false);
      const kept = await caption();
      expect(kept.code, kept.stderr).toBe(0);
      expect(kept.stdout).toBe(inMemory.stdout);
      expect(listPacked(home).length).toBeGreaterThan(0);
    } finally {
      if (saved === undefined) delete process.env.BLIP2_CACHE;
      else process.env.BLIP2_CACHE = saved;
      fs.rmSync(home, { recursive: true, force: true });
    }
  });
});

describe("the probe of a packed copy", () => {
  const outputs = (values: number[]) => ({ y: new ort.Tensor("float32", Float32Array.from(values), [values.length]) });
  /** A record as a copy keeps it: through JSON. */
  const kept = (values: number[]) => JSON.parse(JSON.stringify(sampleOutputs(outputs(values))));

  it("keeps 64 evenly spaced values of each float output, and those that are not finite by name", () => {
    const record = kept(Array.from({ length: 1000 }, (_, i) => (i === 15 ? NaN : i === 30 ? -Infinity : i)));
    expect(record.y.size).toBe(1000);
    expect(record.y.sample).toHaveLength(64);
    expect(record.y.sample.slice(0, 4)).toEqual([0, "NaN", "-Infinity", 45]);
  });

  it("accepts the saving session's values up to 2% of their norm, and tells where others depart", () => {
    const values = [3, -4, 0, 12];
    expect(probeDifference(kept(values), sampleOutputs(outputs(values)))).toBeNull();
    expect(probeDifference(kept(values), sampleOutputs(outputs([3.1, -4, 0, 12.1])))).toBeNull();
    expect(probeDifference(kept(values), sampleOutputs(outputs([3, -4, 0.5, 12])))).toBe("y: relative error 0.0385");
    expect(probeDifference(kept(values), sampleOutputs(outputs([3, -4, 0])))).toBe("y: 3 values, expected 4");
    expect(probeDifference(kept(values), {})).toBe("y: missing, expected 4");
    // Not finite: the same where the saving session overflowed, a difference anywhere else.
    expect(probeDifference(kept([NaN, Infinity, 1]), sampleOutputs(outputs([NaN, Infinity, 1])))).toBeNull();
    expect(probeDifference(kept(values), sampleOutputs(outputs([3, NaN, 0, 12])))).toBe("y: NaN where the saving session gave -4");
    expect(probeDifference(kept([NaN, 1]), sampleOutputs(outputs([0, 1])))).toBe("y: 0 where the saving session gave NaN");
  });
});
