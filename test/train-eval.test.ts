/**
 * `blip2 eval`: a stage-2 model's loss equals PyTorch's on the reference batch, its perplexity is
 * exp(loss); a stage-1 model's recall is what ranking its ITC and ITM scores by hand gives.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { evaluateLanguageModel, evaluateRetrieval } from "../src/api/evaluate.js";
import { Blip2ForImageTextRetrieval } from "../src/api/retrieval.js";
import { cli, fixture } from "./helpers.js";
import { fixture as trainFixture } from "./trainFixtures.js";

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-eval-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function data(name: string, rows: { image: string; text: string }[]): string {
  const file = path.join(tmp, name);
  fs.writeFileSync(file, rows.map((r) => JSON.stringify(r)).join("\n"));
  return file;
}

describe("evaluation", () => {
  it("stage 2: the mean loss per token is PyTorch's for the reference batch", async () => {
    const f = trainFixture("stage2-opt-prompted");
    const rows = (f.json.images as string[]).map((image, i) => ({ image: fixture(image), text: (f.json.texts as string[])[i]! }));
    const score = await evaluateLanguageModel(fixture("hf-4.45/opt"), data("opt.jsonl", rows), { prompt: "a photo of", imageBackend: "pil", batchSize: 4 });
    expect(score.examples).toBe(4);
    expect(Math.abs(score.loss - f.get("loss").data[0]!) / f.get("loss").data[0]!).toBeLessThan(1e-5);
    expect(score.perplexity).toBeCloseTo(Math.exp(score.loss), 10);
    // In two batches, the per-token mean is the same.
    const split = await evaluateLanguageModel(fixture("hf-4.45/opt"), data("opt2.jsonl", rows), { prompt: "a photo of", imageBackend: "pil", batchSize: 3 });
    expect(Math.abs(split.loss - score.loss)).toBeLessThan(1e-5);
  });

  it("stage 2 from the CLI, with captions and their exact-match rate", async () => {
    const rows = [0, 1].map((i) => ({ image: fixture(`image${i}.png`), text: "a caption" }));
    const r = await cli("eval", "--model", fixture("tiny-blip2-opt"), "--data", data("gen.jsonl", rows), "--generate", "--json");
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.captions).toHaveLength(2);
    expect(out.exactMatch).toBe(out.captions.filter((c: { exact: boolean }) => c.exact).length / 2);
  });

  it("stage 1: recall@k from ITC, and from ITC + ITM re-ranking, as ranking the scores by hand gives", async () => {
    const images = ["image0.png", "image1.png", "image2.png", "hf-4.45/images/img0.png", "hf-4.45/images/img1.png"].map((p) => fixture(p));
    const texts = ["a red circle", "a blue square", "a green triangle", "two cats", "a dog in the snow"];
    const rows = images.map((image, i) => ({ image, text: texts[i]! }));
    const r = await evaluateRetrieval(fixture("hf-4.45/itm"), data("itm.jsonl", rows), { rerank: 3 });
    const model = await Blip2ForImageTextRetrieval.fromPretrained(fixture("hf-4.45/itm"));
    const itc = await model.similarity(images, texts);
    const itm = (await model.match(images, texts)).logits;
    await model.dispose();
    const rankOf = (scores: number[], truth: number) => scores.map((s, j) => [s, j] as const).sort((a, b) => b[0] - a[0]).findIndex(([, j]) => j === truth);
    const recall = (ranks: number[], k: number) => ranks.filter((x) => x < k).length / ranks.length;
    const itcI2t = images.map((_, i) => rankOf(itc[i]!, i));
    const itcT2i = texts.map((_, t) => rankOf(images.map((_, i) => itc[i]![t]!), t));
    expect(r.itcImageToText).toEqual({ r1: recall(itcI2t, 1), r5: recall(itcI2t, 5), r10: recall(itcI2t, 10) });
    expect(r.itcTextToImage).toEqual({ r1: recall(itcT2i, 1), r5: recall(itcT2i, 5), r10: recall(itcT2i, 10) });
    // Re-ranked: the top 3 by ITC ordered by ITM + ITC; the rest stay out.
    const rerank = (cands: number[], score: (c: number) => number) => [...cands].sort((a, b) => score(b) - score(a));
    const topItc = (scores: number[]) => scores.map((s, j) => [s, j] as const).sort((a, b) => b[0] - a[0]).slice(0, 3).map(([, j]) => j);
    const i2t = images.map((_, i) => rerank(topItc(itc[i]!), (t) => itm[i]![t]![1] + itc[i]![t]!).indexOf(i));
    const t2i = texts.map((_, t) => rerank(topItc(images.map((_, i) => itc[i]![t]!)), (i) => itm[i]![t]![1] + itc[i]![t]!).indexOf(t));
    const hit = (ranks: number[], k: number) => ranks.filter((x) => x >= 0 && x < k).length / ranks.length;
    expect(r.imageToText.r1).toBeCloseTo(hit(i2t, 1), 10);
    expect(r.textToImage.r1).toBeCloseTo(hit(t2i, 1), 10);
    expect(r.imageToText.r5).toBeCloseTo(hit(i2t, 5), 10);
  });
});
