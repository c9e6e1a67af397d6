/**
 * The pipeline's results as the tables of docs/shapes-results.md and the ablation plot
 * docs/shapes-ablation.svg (zero-shot VQA and caption accuracy against stage-2 steps, with and
 * without stage 1), written by the pipeline's command so that the docs are its output.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { CurvePoint, ShapesResults } from "./pipeline.js";

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

export function resultsMarkdown(r: ShapesResults, command: string, date = new Date()): string {
  const cpu = os.cpus()[0]?.model ?? "unknown CPU";
  const types = Object.keys(r.test.vqa.byType) as (keyof typeof r.test.vqa.byType)[];
  const lines = [
    "# blip2-shapes: results",
    "",
    `Written by \`${command}\` on ${date.toISOString().slice(0, 10)}, ${os.cpus().length} × ${cpu}. Settings: ${r.settings.trainImages} training images at ${r.settings.imageSize} px, ${r.settings.queryTokens} queries;`,
    `steps: vision ${r.settings.steps.vision}, text ${r.settings.steps.text}, stage 1 ${r.settings.steps.stage1}, stage 2 ${r.settings.steps.stage2} (batch ${r.settings.batchSize}). See [shapes.md](shapes.md) for the method.`,
    "",
    "## The frozen unimodal models",
    "",
    "Each trained alone, then frozen (held-out val scenes). The language model is given a description of the scene as text",
    "before its BOS, where stage 2 puts the visual prompts: what it makes of a perfect description bounds what the Q-Former can get from it.",
    "",
    "| model | measure | value |",
    "|---|---|---|",
    `| image encoder | shape / colour / size of the objects, at their places | ${pct(r.unimodal.vision.shape)} / ${pct(r.unimodal.vision.colour)} / ${pct(r.unimodal.vision.size)} |`,
    `| language model | answers right, after a description | ${pct(r.unimodal.text.answers)} |`,
    `| language model | captions with every attribute right, after a description | ${pct(r.unimodal.text.captions)} |`,
    "",
    "## Captioning and zero-shot VQA",
    "",
    `| split | images | captions with every attribute right | VQA overall | ${types.join(" | ")} |`,
    `|---|---|---|---|${types.map(() => "---").join("|")}|`,
    ...(["test", "compositional"] as const).map((split) => {
      const s = r[split];
      return `| ${split} | ${s.caption.images} | ${pct(s.caption.accuracy)} | ${pct(s.vqa.accuracy)} | ${types.map((t) => pct(s.vqa.byType[t])).join(" | ")} |`;
    }),
    "",
    "## Retrieval (stage-1 model)",
    "",
    `Among ${r.retrieval.candidates} test images and their captions, image→text and text→image averaged:`,
    "",
    "| ranking | R@1 | R@5 |",
    "|---|---|---|",
    `| ITC | ${pct(r.retrieval.itc.r1)} | ${pct(r.retrieval.itc.r5)} |`,
    `| ITC + ITM re-ranking | ${pct(r.retrieval.itcItm.r1)} | ${pct(r.retrieval.itcItm.r5)} |`,
    "",
    "## The stage-1 ablation",
    "",
    "Stage 2 with the same budget, starting from the stage-1 Q-Former or from one that skipped stage 1",
    `(measured on ${r.settings.curveImages} test images at each point):`,
    "",
    "![ablation](shapes-ablation.svg)",
    "",
    "| stage-2 steps | captions, with stage 1 | captions, without | VQA, with stage 1 | VQA, without |",
    "|---|---|---|---|---|",
    ...r.ablation.withStage1.map((p, i) => {
      const q = r.ablation.withoutStage1[i];
      return `| ${p.step} | ${pct(p.caption)} | ${q ? pct(q.caption) : "–"} | ${pct(p.vqa)} | ${q ? pct(q.vqa) : "–"} |`;
    }),
    "",
    "## Losses and times",
    "",
    "| stage | first loss | last loss | seconds |",
    "|---|---|---|---|",
    ...Object.keys(r.seconds).map((k) => `| ${k} | ${r.losses[k] ? r.losses[k]!.first.toFixed(3) : "–"} | ${r.losses[k] ? r.losses[k]!.last.toFixed(3) : "–"} | ${r.seconds[k]!.toFixed(0)} |`),
    "",
    "## Sample captions (test split)",
    "",
    ...r.test.caption.samples.map((s) => `- ${s.correct ? "right" : "wrong"}: ${s.caption}`),
    "",
  ];
  return lines.join("\n");
}

/** A line chart of both runs' caption and VQA accuracy against stage-2 steps. */
export function ablationSvg(withStage1: CurvePoint[], withoutStage1: CurvePoint[]): string {
  const width = 640;
  const height = 360;
  const pad = { left: 56, right: 170, top: 24, bottom: 44 };
  const maxStep = Math.max(1, ...withStage1.map((p) => p.step), ...withoutStage1.map((p) => p.step));
  const x = (step: number) => pad.left + ((width - pad.left - pad.right) * step) / maxStep;
  const y = (v: number) => height - pad.bottom - (height - pad.top - pad.bottom) * v;
  const series = [
    { name: "captions, with stage 1", points: withStage1, key: "caption" as const, color: "#1f77b4", dash: "" },
    { name: "VQA, with stage 1", points: withStage1, key: "vqa" as const, color: "#d62728", dash: "" },
    { name: "captions, without stage 1", points: withoutStage1, key: "caption" as const, color: "#1f77b4", dash: "6 4" },
    { name: "VQA, without stage 1", points: withoutStage1, key: "vqa" as const, color: "#d62728", dash: "6 4" },
  ];
  const grid = [0, 0.25, 0.5, 0.75, 1].map((v) => `<line x1="${pad.left}" x2="${width - pad.right}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/><text x="${pad.left - 8}" y="${y(v) + 4}" text-anchor="end">${v * 100}%</text>`);
  const ticks = withStage1.map((p) => `<text x="${x(p.step)}" y="${height - pad.bottom + 18}" text-anchor="middle">${p.step}</text>`);
  const lines = series.map((s) => {
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p.step).toFixed(1)},${y(p[s.key]).toFixed(1)}`).join(" ");
    const dots = s.points.map((p) => `<circle cx="${x(p.step).toFixed(1)}" cy="${y(p[s.key]).toFixed(1)}" r="3" fill="${s.color}"/>`).join("");
    return `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2" stroke-dasharray="${s.dash}"/>${dots}`;
  });
  const legend = series.map((s, i) => `<line x1="${width - pad.right + 12}" x2="${width - pad.right + 36}" y1="${pad.top + 10 + i * 20}" y2="${pad.top + 10 + i * 20}" stroke="${s.color}" stroke-width="2" stroke-dasharray="${s.dash}"/><text x="${width - pad.right + 42}" y="${pad.top + 14 + i * 20}">${s.name}</text>`);
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    ...grid,
    ...ticks,
    `<text x="${(pad.left + width - pad.right) / 2}" y="${height - 8}" text-anchor="middle">stage-2 steps</text>`,
    ...lines,
    ...legend,
    "</svg>",
    "",
  ].join("\n");
}

export function writeReport(results: ShapesResults, docs: string, command: string): void {
  fs.mkdirSync(docs, { recursive: true });
  fs.writeFileSync(path.join(docs, "shapes-results.md"), resultsMarkdown(results, command));
  fs.writeFileSync(path.join(docs, "shapes-ablation.svg"), ablationSvg(results.ablation.withStage1, results.ablation.withoutStage1));
}
