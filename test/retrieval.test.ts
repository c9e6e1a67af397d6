/** Image-text retrieval: ITM and ITC against transformers through the API and `blip2 match`; the index. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import sharp from "sharp";
import { afterAll, describe, expect, it, vi } from "vitest";
import { Blip2ForImageTextRetrieval } from "../src/index.js";
import { RetrievalRuntime } from "../src/runtime/retrievalRuntime.js";
import { tensor } from "../src/runtime/session.js";
import { topK } from "../src/search/itcMatrix.js";
import { cli, copyFixture, expectClose, fixture, loadReference } from "./helpers.js";

const models: Blip2ForImageTextRetrieval[] = [];
afterAll(async () => Promise.all(models.map((m) => m.dispose())));
const flat = (rows: number[][] | number[][][]) => Float32Array.from(rows.flat(2) as number[]);

interface Case {
  dir: string[];
  images: string[];
  texts: string[];
  backend: "torchvision" | "pil";
  /** Reference tensor names. */
  itm: string;
  itc: string;
  itcPerText: string;
  textEmbeds: string;
  imageEmbeds: string;
  /** Which (image, text) pairs the reference ITM covers, in order. */
  pairs: [number, number][];
}

const tinyMeta = JSON.parse(fs.readFileSync(fixture("tiny-blip2-itm", "reference.json"), "utf8"));
const oldMeta = JSON.parse(fs.readFileSync(fixture("hf-4.45", "itm", "reference.json"), "utf8"));
const CASES: [string, Case][] = [
  ["tiny-blip2-itm (transformers 5.17)", {
    dir: ["tiny-blip2-itm"], images: [fixture("image0.png"), fixture("image1.png")], texts: tinyMeta.texts.slice(0, 2), backend: "torchvision",
    itm: "itm.logits_per_image", itc: "itc.logits_per_image", itcPerText: "itc.logits_per_text", textEmbeds: "itc.text_embeds", imageEmbeds: "itc.image_embeds", pairs: [[0, 0], [1, 1]],
  }],
  ["hf-4.45/itm (transformers 4.45)", {
    dir: ["hf-4.45", "itm"], images: [fixture("hf-4.45", "images", "img0.png"), fixture("hf-4.45", "images", "img1.png")], texts: oldMeta.texts, backend: "pil",
    itm: "itm_logits", itc: "itc_logits_per_image", itcPerText: "itc_logits_per_text", textEmbeds: "itc_text_embeds", imageEmbeds: "itc_image_embeds", pairs: oldMeta.itm_pairs,
  }],
];

describe.each(CASES)("%s", (_, c) => {
  const ref = loadReference(fixture(...c.dir, "reference.safetensors"));
  const pairLogits = (all: [number, number][][]) => Float32Array.from(c.pairs.flatMap(([i, t]) => all[i]![t]!));

  it("through the API: embeddings, ITC both ways, ITM logits and probabilities", async () => {
    const model = await Blip2ForImageTextRetrieval.fromPretrained(fixture(...c.dir), { imageBackend: c.backend });
    models.push(model);
    const images = await model.embedImages(c.images);
    const texts = await model.embedTexts(c.texts);
    expectClose("image_embeds", { shape: images.dims, data: images.data }, ref.get(c.imageEmbeds)!);
    expectClose("text_embeds", { shape: texts.dims, data: texts.data }, ref.get(c.textEmbeds)!);
    const itc = await model.similarity(c.images, c.texts);
    expectClose("logits_per_image", { shape: [2, 2], data: flat(itc) }, ref.get(c.itc)!);
    expectClose("logits_per_text", { shape: [2, 2], data: flat(itc[0]!.map((_, t) => itc.map((row) => row[t]!))) }, ref.get(c.itcPerText)!);
    const itm = await model.match(c.images, c.texts);
    const expected = ref.get(c.itm)!;
    expectClose("itm logits", { shape: expected.shape, data: pairLogits(itm.logits) }, expected);
    for (const [i, row] of itm.logits.entries()) for (const [t, [no, yes]] of row.entries()) expect(itm.probability[i]![t]).toBeCloseTo(Math.exp(yes) / (Math.exp(no) + Math.exp(yes)), 6);
  });

  it("through blip2 match --json --logits", async () => {
    const r = await cli("match", "-m", fixture(...c.dir), "--image-backend", c.backend, "--json", "--logits", ...c.images.flatMap((i) => ["--image", i]), ...c.texts.flatMap((t) => ["--text", t]));
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout);
    expectClose("itc", { shape: [2, 2], data: flat(out.itc) }, ref.get(c.itc)!);
    const expected = ref.get(c.itm)!;
    expectClose("itm_logits", { shape: expected.shape, data: pairLogits(out.itm_logits) }, expected);
    expect(out.itm[0][0]).toBeCloseTo(1 / (1 + Math.exp(out.itm_logits[0][0][0] - out.itm_logits[0][0][1])), 6);
  });
});

describe("tiny-blip2-itm: ITC over 2 images x 3 texts", () => {
  it("matches itc3.logits_per_image", async () => {
    const model = await Blip2ForImageTextRetrieval.fromPretrained(fixture("tiny-blip2-itm"));
    models.push(model);
    const ref = loadReference(fixture("tiny-blip2-itm", "reference.safetensors"));
    expect(model.tokenize(tinyMeta.texts)[0]).toEqual(tinyMeta.itc3_input_ids);
    const itc = await model.similarity([fixture("image0.png"), fixture("image1.png")], tinyMeta.texts);
    expectClose("itc3.logits_per_image", { shape: [2, 3], data: flat(itc) }, ref.get("itc3.logits_per_image")!);
  });
});

describe("tiny-blip2-itm: ITM over 2 images x 3 texts", () => {
  it("sends each image once, not once per text, with the logits of a run over copied pairs", async () => {
    const model = await Blip2ForImageTextRetrieval.fromPretrained(fixture("tiny-blip2-itm"));
    models.push(model);
    const images = [fixture("image0.png"), fixture("image1.png")];
    const [features] = await model.imageFeatures(images);
    const [b, n, d] = features!.dims as [number, number, number];
    const itm = vi.spyOn(RetrievalRuntime.prototype, "itm");
    const { logits } = await model.match(images, tinyMeta.texts);
    // One run per image, each with that image alone: the image data sent does not grow with the texts.
    expect(itm.mock.calls.map(([embeds, ids]) => [...embeds.dims, ids.length])).toEqual([[1, n, d, 3], [1, n, d, 3]]);
    itm.mockRestore();
    // Every (image, text) pair copied out, as transformers runs them.
    const [ids, mask] = model.tokenize(tinyMeta.texts);
    const src = features!.data as Float32Array;
    const pairs = new Float32Array(b * 3 * n * d);
    for (let i = 0; i < b; i++) for (let t = 0; t < 3; t++) pairs.set(src.subarray(i * n * d, (i + 1) * n * d), (i * 3 + t) * n * d);
    const runtime = (model as unknown as { runtime: RetrievalRuntime }).runtime;
    const copied = await runtime.itm(tensor.f32(pairs, [b * 3, n, d]), [...ids, ...ids], [...mask, ...mask]);
    expectClose("itm logits", { shape: [b * 3, 2], data: flat(logits) }, { shape: copied.itm_logits!.dims as number[], data: copied.itm_logits!.data as Float32Array }, 1e-5);
  });
});

describe("match: bad input", () => {
  it("needs images and texts, and a retrieval checkpoint", async () => {
    expect((await cli("match", "-m", fixture("tiny-blip2-itm"), "--image", fixture("image0.png"))).stderr).toMatch(/give at least one --image and one --text/);
    const r = await cli("match", "-m", fixture("tiny-blip2-opt"), "--image", fixture("image0.png"), "--text", "x");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/not an image-text retrieval model/);
  });
});

describe("topK", () => {
  it("returns the k best indices, best first, ties by index", () => {
    const scores = Float32Array.from([0.1, 0.9, 0.5, 0.9, -1, 0.7]);
    expect(topK(scores, 3)).toEqual([1, 3, 5]);
    expect(topK(scores, 10)).toEqual([1, 3, 5, 2, 0, 4]);
    expect(topK(scores, 0)).toEqual([]);
  });
});

describe("blip2 index / search", () => {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-index-"));
  const photos = path.join(work, "photos");
  const db = path.join(work, "index.sqlite");
  const model = fixture("tiny-blip2-itm");
  const index = (...extra: string[]) => cli("index", "-m", model, photos, "--db", db, "--json", ...extra);
  const search = async (text: string, ...extra: string[]) => {
    const r = await cli("search", "--db", db, text, "--json", ...extra);
    expect(r.code, r.stderr).toBe(0);
    return r.stdout.trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));
  };

  it("indexes a folder: nested images, skipping a non-image and reporting a corrupt file", async () => {
    fs.mkdirSync(path.join(photos, "nested", "deeper"), { recursive: true });
    fs.copyFileSync(fixture("image0.png"), path.join(photos, "circle.png"));
    fs.copyFileSync(fixture("image1.png"), path.join(photos, "nested", "monsters.png"));
    fs.copyFileSync(fixture("photo640x427.jpg"), path.join(photos, "nested", "deeper", "photo.jpg"));
    for (const [name, color] of [["red.png", "#d00"], ["blue.png", "#00c"]] as const) {
      await sharp({ create: { width: 40, height: 30, channels: 3, background: color } }).png().toFile(path.join(photos, "nested", name));
    }
    fs.writeFileSync(path.join(photos, "notes.txt"), "not an image");
    fs.writeFileSync(path.join(photos, "broken.jpg"), fs.readFileSync(fixture("photo640x427.jpg")).subarray(0, 500));
    const r = await index();
    expect(r.code, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report.added).toHaveLength(5);
    expect(report.total).toBe(5);
    expect(report.skipped).toEqual([path.join(photos, "notes.txt")]);
    expect(report.unreadable.map((u: { path: string }) => u.path)).toEqual([path.join(photos, "broken.jpg")]);
    expect(r.stderr).toMatch(/unreadable: .*broken\.jpg/);
  });

  it("search ranks by ITC, deterministically, with the scores of the model", async () => {
    const hits = await search("a red circle on a table", "--k", "3");
    expect(hits).toHaveLength(3);
    expect(await search("a red circle on a table", "--k", "3")).toEqual(hits);
    const m = await Blip2ForImageTextRetrieval.fromPretrained(model);
    models.push(m);
    const all = await m.similarity(hits.map((h) => h.path), ["a red circle on a table"]);
    hits.forEach((h, i) => expect(h.itc).toBeCloseTo(all[i]![0]!, 5));
    for (let i = 1; i < hits.length; i++) expect(hits[i - 1].score).toBeGreaterThanOrEqual(hits[i].score);
  });

  it("--rerank scores the top candidates with ITM + ITC", async () => {
    const hits = await search("two cartoon monsters", "--k", "5", "--rerank", "5");
    expect(hits).toHaveLength(5);
    const m = models.at(-1)!;
    const itm = await m.match(hits.map((h) => h.path), ["two cartoon monsters"]);
    hits.forEach((h, i) => {
      expect(h.itm).toBeCloseTo(itm.logits[i]![0]![1], 5);
      expect(h.score).toBeCloseTo(h.itm + h.itc, 5);
    });
    for (let i = 1; i < hits.length; i++) expect(hits[i - 1].score).toBeGreaterThanOrEqual(hits[i].score);
  });

  it("re-indexing touches only what changed: a rename reuses its embedding, a deletion is removed", async () => {
    const again = JSON.parse((await index()).stdout);
    expect(again).toMatchObject({ added: [], updated: [], reused: [], removed: [], unchanged: 5, total: 5 });
    fs.renameSync(path.join(photos, "circle.png"), path.join(photos, "nested", "deeper", "circle-renamed.png"));
    fs.rmSync(path.join(photos, "nested", "blue.png"));
    await sharp({ create: { width: 40, height: 30, channels: 3, background: "#0a0" } }).png().toFile(path.join(photos, "nested", "red.png"));
    const report = JSON.parse((await index()).stdout);
    expect(report.reused).toEqual([path.join(photos, "nested", "deeper", "circle-renamed.png")]);
    expect(report.updated).toEqual([path.join(photos, "nested", "red.png")]);
    expect(report.added).toEqual([]);
    expect(report.removed.sort()).toEqual([path.join(photos, "circle.png"), path.join(photos, "nested", "blue.png")].sort());
    expect(report.unchanged).toBe(2);
    expect(report.total).toBe(4);
    const hits = await search("anything", "--k", "10");
    expect(hits.map((h) => path.basename(h.path)).sort()).toEqual(["circle-renamed.png", "monsters.png", "photo.jpg", "red.png"]);
  });

  it("refuses an index built with another model", async () => {
    const other = copyFixture("hf-4.45/itm");
    const r = await cli("index", "-m", other, photos, "--db", db);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/this index was built with model .*tiny-blip2-itm; refusing to use it with .* \(a different model\)/);
    const s = await cli("search", "-m", other, "--db", db, "x");
    expect(s.code).toBe(1);
    expect(s.stderr).toMatch(/refusing/);
  });

  it("refuses a model with the same shapes but other weights (as the -coco variants are)", async () => {
    const other = copyFixture("tiny-blip2-itm");
    const file = path.join(other, "model.safetensors");
    const bytes = fs.readFileSync(file);
    for (let i = bytes.length - 4096; i < bytes.length; i++) bytes[i] ^= 0x01;
    fs.writeFileSync(file, bytes);
    const r = await cli("index", "-m", other, photos, "--db", db);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/refusing to use it with .* \(a different model\)/);
  });

  it("a missing index is a clear error", async () => {
    const r = await cli("search", "--db", path.join(work, "none.sqlite"), "x");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/none.sqlite: no such index/);
  });
});
