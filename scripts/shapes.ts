/**
 * `npm run shapes`: BLIP-2 trained by blip2 on its synthetic world, from seed to results
 * (docs/shapes-results.md, docs/shapes-ablation.svg) and, with --ship, the built-in models.
 *
 *   npm run shapes -- [--work DIR] [--quick] [--ship] [--threads N]
 *
 * Resumable: run it again with the same --work and it continues at the stage it stopped in.
 */
import path from "node:path";
import { parseArgs } from "node:util";
import { runShapesPipeline } from "../src/shapes/pipeline.js";
import { writeReport } from "../src/shapes/report.js";
import { shipExamples, shipModel } from "../src/shapes/ship.js";

const { values } = parseArgs({ options: { work: { type: "string" }, quick: { type: "boolean" }, ship: { type: "boolean" }, threads: { type: "string" }, docs: { type: "string" } } });
const root = path.join(import.meta.dirname, "..");
const work = values.work ?? path.join(root, "shapes-work");
const quick = values.quick ? { trainImages: 512, evalImages: 40, steps: { vision: 150, text: 300, stage1: 150, stage2: 200 }, curvePoints: 2, curveImages: 20 } : {};
const started = Date.now();
const results = await runShapesPipeline({ work, threads: values.threads ? Number(values.threads) : undefined, ...quick, log: (line) => console.log(`[${((Date.now() - started) / 1000).toFixed(0)} s] ${line}`) });
const command = `npm run shapes${values.quick ? " -- --quick" : ""}`;
writeReport(results, values.docs ?? path.join(root, "docs"), command);
if (values.ship) {
  const mb = (b: number) => `${(b / 1e6).toFixed(1)} MB`;
  const captioner = shipModel(path.join(work, "stage2"), path.join(root, "models/blip2-shapes"));
  const matcher = shipModel(path.join(work, "stage1"), path.join(root, "models/blip2-shapes-itm"));
  shipExamples(path.join(work, "data/test"), path.join(root, "models/blip2-shapes"), 4);
  console.log(`shipped blip2-shapes (${mb(captioner)}) and blip2-shapes-itm (${mb(matcher)})`);
}
