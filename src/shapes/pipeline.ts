/**
 * BLIP-2's method in miniature, end to end, on the synthetic world (docs/shapes.md):
 *
 *   data      the world's train / val / test / compositional splits, rendered
 *   fresh     a small ViT + Q-Former (retrieval layout) and a small OPT, randomly initialised
 *   vision    the ViT trained alone (attributes at each place), then frozen
 *   text      the OPT trained alone on text (captions, then questions and answers), then frozen
 *   stage1    the Q-Former between the frozen ViT and text: ITC + ITM + ITG
 *   compose   stage 2's starting checkpoints: the stage-1 Q-Former, and (the ablation) a Q-Former
 *             that skipped stage 1, each with the frozen OPT and a fresh projection
 *   stage2    both trained on captions only, the same budget, evaluated along the way
 *   evaluate  captions, zero-shot VQA, retrieval, on the test and compositional splits
 *
 * Each stage leaves its folder under `work` with a `.done` marker, so a stopped run resumes at the
 * stage it was in (and the trainer resumes within a stage).
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2 } from "../api/tasks.js";
import { Blip2Tokenizer } from "../tokenizer/tokenizer.js";
import { composeStage2 } from "../train/compose.js";
import { SMALL_QFORMER, writeFreshModels } from "../train/fresh.js";
import { Rng } from "../train/rng.js";
import { train } from "../train/trainer.js";
import { pretrainVision, type Accuracy } from "../train/vision.js";
import { pretrainText } from "../train/language.js";
import { writeDataset } from "../world/dataset.js";
import type { Split } from "../world/scene.js";
import { captionAccuracy, retrievalScore, vqaAccuracy, type CaptionScore, type RetrievalScore, type VqaScore } from "./evaluate.js";

export interface ShapesPipelineOptions {
  /** Where the data, checkpoints and results go (resumable). */
  work: string;
  imageSize?: number;
  /** The Q-Former's learned queries: the visual prompts the language model reads. */
  queryTokens?: number;
  trainImages?: number;
  /** Images of each evaluation split (test, compositional). */
  evalImages?: number;
  steps?: { vision: number; text: number; stage1: number; stage2: number };
  batchSize?: number;
  /** Evaluations along stage 2 for the ablation curve (and how many test images each uses). */
  curvePoints?: number;
  curveImages?: number;
  threads?: number;
  log?: (line: string) => void;
}

export interface CurvePoint {
  step: number;
  caption: number;
  vqa: number;
}

export interface ShapesResults {
  settings: Required<Omit<ShapesPipelineOptions, "log" | "work" | "threads">>;
  seconds: Record<string, number>;
  losses: Record<string, { first: number; last: number }>;
  /** The frozen models alone, on held-out val scenes. */
  unimodal: {
    /** The image encoder's attributes at each place (its own objective). */
    vision: Accuracy;
    /** The language model given a description of the scene before BOS: its answers and its captions. */
    text: { answers: number; captions: number };
  };
  test: { caption: CaptionScore; vqa: VqaScore };
  compositional: { caption: CaptionScore; vqa: VqaScore };
  retrieval: RetrievalScore;
  ablation: { withStage1: CurvePoint[]; withoutStage1: CurvePoint[] };
}

/** The defaults: about an hour on two cores. */
export const FULL_SETTINGS = {
  imageSize: 64,
  queryTokens: 32,
  trainImages: 10000,
  evalImages: 150,
  steps: { vision: 1500, text: 8000, stage1: 1500, stage2: 2000 },
  batchSize: 16,
  curvePoints: 3,
  curveImages: 50,
};

const SPLIT_OFFSET: Record<Split, number> = { train: 0, val: 0, test: 0, compositional: 0 };

export async function runShapesPipeline(options: ShapesPipelineOptions): Promise<ShapesResults> {
  const s = { ...FULL_SETTINGS, ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) } as typeof FULL_SETTINGS & ShapesPipelineOptions;
  const work = path.resolve(options.work);
  const log = options.log ?? (() => {});
  const at = (name: string) => path.join(work, name);
  const runtime = { threads: options.threads };
  fs.mkdirSync(work, { recursive: true });
  const resultsFile = at("results.json");
  const partial: Partial<ShapesResults> & { seconds: Record<string, number>; losses: ShapesResults["losses"] } = fs.existsSync(resultsFile)
    ? JSON.parse(fs.readFileSync(resultsFile, "utf8"))
    : { seconds: {}, losses: {} };
  const save = () => fs.writeFileSync(resultsFile, `${JSON.stringify(partial, null, 2)}\n`);

  /** Runs `fn` once: a stage whose marker exists is skipped. */
  const stage = async (name: string, fn: () => Promise<void>) => {
    const marker = at(`${name}.done`);
    if (fs.existsSync(marker)) {
      log(`${name}: done earlier`);
      return;
    }
    log(`${name}: …`);
    const t0 = Date.now();
    await fn();
    partial.seconds[name] = (Date.now() - t0) / 1000;
    save();
    fs.writeFileSync(marker, "");
    log(`${name}: ${partial.seconds[name]!.toFixed(0)} s`);
  };
  const unimodal = () => (partial.unimodal ??= { vision: { shape: NaN, colour: NaN, size: NaN, places: NaN }, text: { answers: NaN, captions: NaN } });
  const lossTrack = (name: string) => {
    let first = NaN;
    return (loss: number) => {
      if (Number.isNaN(first)) first = loss;
      partial.losses[name] = { first, last: loss };
    };
  };

  await stage("data", async () => {
    const splits: [Split, number][] = [["train", s.trainImages], ["test", s.evalImages], ["compositional", s.evalImages]];
    for (const [split, count] of splits) {
      fs.rmSync(at(`data/${split}`), { recursive: true, force: true });
      await writeDataset({ split, count, out: at(`data/${split}`), imageSize: s.imageSize, first: SPLIT_OFFSET[split] });
    }
  });

  await stage("fresh", async () => {
    for (const d of ["fresh-retrieval", "fresh-opt"]) fs.rmSync(at(d), { recursive: true, force: true });
    writeFreshModels({ retrieval: at("fresh-retrieval"), languageModel: at("fresh-opt"), seed: 0, qformer: { ...SMALL_QFORMER, numQueryTokens: s.queryTokens } });
  });

  await stage("vision", async () => {
    for (const d of ["vision", "stage1-start"]) fs.rmSync(at(d), { recursive: true, force: true });
    const track = lossTrack("vision");
    const r = await pretrainVision({ model: at("fresh-retrieval"), out: at("vision"), retrievalOut: at("stage1-start"), steps: s.steps.vision, runtime, onStep: (i) => track(i.loss) });
    log(`vision: val accuracy shape ${pct(r.valAccuracy.shape)}, colour ${pct(r.valAccuracy.colour)}, size ${pct(r.valAccuracy.size)}`);
    unimodal().vision = r.valAccuracy;
  });

  await stage("text", async () => {
    fs.rmSync(at("opt"), { recursive: true, force: true });
    const track = lossTrack("text");
    // A description before BOS, then a caption or a question about it: the LM learns to read
    // what precedes its BOS, where stage 2 puts the visual prompts (see language.ts).
    const r = await pretrainText({ model: at("fresh-opt"), out: at("opt"), steps: s.steps.text, context: true, length: 80, runtime, onStep: (i) => track(i.loss) });
    unimodal().text = { answers: r.valAnswerAccuracy, captions: r.valCaptionAccuracy };
    log(`text: val answers ${pct(r.valAnswerAccuracy)}, captions ${pct(r.valCaptionAccuracy)} (from a description)`);
  });

  const trainData = at("data/train/captions.jsonl");
  // The small models train fast at a higher rate than BLIP-2's 1e-4, with a short warmup.
  const stageOptions = { data: trainData, batchSize: s.batchSize, lr: 1e-3, minLr: 1e-4, warmupLr: 1e-5, seed: 0, runtime, blip2Cache: at("cache") };
  const warmup = (steps: number) => Math.min(100, Math.ceil(steps / 10));
  await stage("stage1", async () => {
    const track = lossTrack("stage1");
    await train({ ...stageOptions, stage: 1, model: at("stage1-start"), out: at("stage1"), steps: s.steps.stage1, warmupSteps: warmup(s.steps.stage1), onStep: (i) => track(i.losses.loss!) });
  });

  await stage("compose", async () => {
    for (const [from, out] of [["stage1", "stage2-start"], ["stage1-start", "stage2-start-without-stage1"]] as const) {
      fs.rmSync(at(out), { recursive: true, force: true });
      await composeStage2({ stage1: at(from), languageModel: at("opt"), out: at(out), rng: new Rng(1) });
      await endCaptionsAtNewline(at(out));
    }
  });

  // Stage 2 with and without stage 1, the same budget, evaluated along the way (the paper's Figure 5).
  partial.ablation ??= { withStage1: [], withoutStage1: [] };
  for (const [key, start, out] of [["withStage1", "stage2-start", "stage2"], ["withoutStage1", "stage2-start-without-stage1", "stage2-without-stage1"]] as const) {
    await stage(out, async () => {
      const curve: CurvePoint[] = [];
      const track = lossTrack(out);
      for (let point = 1; point <= s.curvePoints; point++) {
        const steps = Math.round((s.steps.stage2 * point) / s.curvePoints);
        // A constant rate after warmup: each segment continues the run exactly where it stopped.
        await train({ ...stageOptions, stage: 2, model: at(start), out: at(out), steps, warmupSteps: warmup(s.steps.stage2), minLr: stageOptions.lr, onStep: (i) => track(i.losses.loss!) });
        const blip2 = await Blip2.load(at(out), runtime);
        const caption = await captionAccuracy(blip2, at("data/test"), s.curveImages);
        const vqa = await vqaAccuracy(blip2, at("data/test"), s.curveImages);
        await blip2.dispose();
        curve.push({ step: steps, caption: caption.accuracy, vqa: vqa.accuracy });
        log(`${out}: step ${steps}: captions ${pct(caption.accuracy)}, VQA ${pct(vqa.accuracy)}`);
      }
      partial.ablation![key] = curve;
    });
  }

  await stage("evaluate", async () => {
    const blip2 = await Blip2.load(at("stage2"), runtime);
    for (const split of ["test", "compositional"] as const) {
      partial[split] = { caption: await captionAccuracy(blip2, at(`data/${split}`), s.evalImages), vqa: await vqaAccuracy(blip2, at(`data/${split}`), s.evalImages) };
      log(`${split}: captions ${pct(partial[split]!.caption.accuracy)}, VQA ${pct(partial[split]!.vqa.accuracy)}`);
    }
    await blip2.dispose();
    partial.retrieval = await retrievalScore(at("stage1"), at("data/test"), 100, work);
    log(`retrieval among ${partial.retrieval.candidates}: R@1 ITC ${pct(partial.retrieval.itc.r1)}, ITC + ITM ${pct(partial.retrieval.itcItm.r1)}`);
  });

  partial.settings = { imageSize: s.imageSize, queryTokens: s.queryTokens, trainImages: s.trainImages, evalImages: s.evalImages, steps: s.steps, batchSize: s.batchSize, curvePoints: s.curvePoints, curveImages: s.curveImages };
  save();
  return partial as ShapesResults;
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

/**
 * LAVIS trains OPT to end a caption with "\n" and generates until "\n": the composed checkpoint's
 * generation config says so, so a caption ends where training taught it to.
 */
async function endCaptionsAtNewline(dir: string): Promise<void> {
  const tokenizer = await Blip2Tokenizer.fromDirectory(dir);
  const [newline] = tokenizer.encode("\n", { addSpecialTokens: false });
  if (newline === undefined) return;
  const file = path.join(dir, "generation_config.json");
  const config = fs.existsSync(file) ? (JSON.parse(fs.readFileSync(file, "utf8")) as Record<string, unknown>) : {};
  fs.writeFileSync(file, `${JSON.stringify({ ...config, eos_token_id: newline, max_new_tokens: 40 }, null, 2)}\n`);
}
