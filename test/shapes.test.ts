/**
 * The built-in model's pipeline, shortened to minutes: every stage runs from a seed to the results,
 * each stage's loss falls, a second run resumes (nothing is redone), and the report is written.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { runShapesPipeline } from "../src/shapes/pipeline.js";
import { writeReport } from "../src/shapes/report.js";

const work = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-shapes-"));
afterAll(() => fs.rmSync(work, { recursive: true, force: true }));

const settings = { work, trainImages: 96, evalImages: 6, steps: { vision: 30, text: 40, stage1: 24, stage2: 24 }, batchSize: 8, curvePoints: 2, curveImages: 3, threads: 1 };

describe("the shapes pipeline, shortened", () => {
  it("runs every stage, each loss falls, and a second run only reads what the first wrote", async () => {
    const lines: string[] = [];
    const results = await runShapesPipeline({ ...settings, log: (l) => lines.push(l) });
    for (const stage of ["vision", "text", "stage1", "stage2", "stage2-without-stage1"]) {
      const loss = results.losses[stage]!;
      expect(loss.last, `${stage}'s loss falls`).toBeLessThan(loss.first);
    }
    for (const split of ["test", "compositional"] as const) {
      expect(results[split].caption.images).toBe(6);
      expect(results[split].vqa.questions).toBe(30);
      expect(results[split].caption.accuracy).toBe(results[split].caption.correct / 6);
    }
    expect(results.ablation.withStage1.map((p) => p.step)).toEqual([12, 24]);
    expect(results.ablation.withoutStage1.map((p) => p.step)).toEqual([12, 24]);
    expect(results.retrieval.candidates).toBe(6);
    // The unimodal models' held-out measures are recorded for the report (numbers, not placeholders).
    for (const v of [results.unimodal.vision.shape, results.unimodal.vision.size, results.unimodal.text.answers, results.unimodal.text.captions]) {
      expect(v).toBeGreaterThanOrEqual(0);
      expect(v).toBeLessThanOrEqual(1);
    }

    const again: string[] = [];
    await runShapesPipeline({ ...settings, log: (l) => again.push(l) });
    expect(again.every((l) => l.endsWith("done earlier"))).toBe(true);

    const docs = path.join(work, "docs");
    writeReport(results, docs, "test");
    expect(fs.readFileSync(path.join(docs, "shapes-results.md"), "utf8")).toMatch(/\| test \| 6 \|/);
    expect(fs.readFileSync(path.join(docs, "shapes-ablation.svg"), "utf8")).toMatch(/^<svg/);
  });
});
