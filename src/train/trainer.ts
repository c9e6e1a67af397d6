/**
 * The training loop: data in batches, the frozen image encoder's features (cached), one graph step
 * per micro-batch, gradient accumulation, clipping, the learning-rate schedule and AdamW on float32
 * master copies, progress, and atomic checkpoints that resume exactly (weights, optimizer moments,
 * step, random generator and data position), so that 4 steps, a stop and 4 more equal 8 straight.
 */
import path from "node:path";
import type * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import { Checkpoint } from "../io/checkpoint.js";
import { readTensorF32, type TensorInfo } from "../io/safetensors.js";
import type { ImageProcessorBackend } from "../image/imageProcessor.js";
import { Blip2Processor } from "../processor.js";
import type { WeightDType } from "../io/weightFormat.js";
import { resolveDTypes } from "../quantize/dtype.js";
import { withDTypes } from "../quantize/quantize.js";
import { blip2CacheDir } from "../quantize/weightCache.js";
import type { RuntimeOptions } from "../runtime/session.js";
import { openTrainingOutput, saveCheckpoint, type TensorValue, type TrainerState } from "./checkpoint.js";
import { Batches, loadExamples, type Example } from "./data.js";
import { stage1Extras, type Stage1Extras } from "./extras.js";
import { ImageFeatures } from "./features.js";
import { AdamW, clipByGlobalNorm, globalNorm, GradAccumulator, type AdamWState } from "./optimizer.js";
import { Rng, type RngState } from "./rng.js";
import { LAVIS_STAGE1, LAVIS_STAGE2, lrAt, type LrSchedule } from "./schedule.js";
import { stage1Trained } from "./stage1.js";
import { stage2Trained } from "./stage2.js";
import { Stage1Step, Stage2Step, type StepOutput } from "./steps.js";
import { MAX_TEXT_LENGTH, Stage1Text, Stage2Text } from "./text.js";

export interface TrainOptions {
  stage: 1 | 2;
  /** The checkpoint folder to start from (stage 1: Blip2ForImageTextRetrieval; stage 2: Blip2ForConditionalGeneration, see `compose`). */
  model: string;
  /** JSONL, a COCO captions JSON, or a folder of images with same-name .txt captions (see data.ts). */
  data: string;
  /** The output folder: a complete Hugging Face checkpoint plus the trainer's state. */
  out: string;
  /** Optimizer steps (default: as many as `epochs` give). */
  steps?: number;
  /** Passes over the data (default 1 when `steps` is not given). */
  epochs?: number;
  batchSize?: number;
  /** Micro-batches per optimizer step (default 1). */
  gradAccum?: number;
  lr?: number;
  minLr?: number;
  warmupLr?: number;
  warmupSteps?: number;
  weightDecay?: number;
  /** Clip the global gradient norm to this (default: no clipping; the norm is reported either way). */
  clipGradNorm?: number;
  /** Stage 2: the prompt before each caption (OPT) or the encoder's text (T5). */
  prompt?: string;
  maxTextLength?: number;
  seed?: number;
  /** Save every N optimizer steps (default: only at the end). */
  saveEvery?: number;
  /** Continue the run saved in this folder (default: `out` when it holds an earlier run of this training). */
  resume?: string;
  /** Data to report the mean loss on at each save and at the end. */
  eval?: string;
  /** Precision of the frozen parts (the Q-Former always trains in float32). */
  dtype?: WeightDType;
  /** LAVIS's random resized crop and flip; image features are then computed every step. */
  augment?: boolean;
  /** Dropout as the config says (default true); `blip2 grad` runs without. */
  dropout?: boolean;
  /** Resizing as transformers 5 ("torchvision", default) or 4 ("pil") does it. */
  imageBackend?: ImageProcessorBackend;
  /** The blip2 cache (image features, converted weights). */
  blip2Cache?: string;
  runtime?: RuntimeOptions;
  /** Called after every optimizer step. */
  onStep?: (info: StepInfo) => void;
  /** Told of one-time things (added stage-1 extras, resuming, caching off). */
  onNotice?: (message: string) => void;
  /** Stops after the current step, saving a checkpoint. */
  signal?: AbortSignal;
}

export interface StepInfo {
  step: number;
  totalSteps: number;
  epoch: number;
  losses: Record<string, number>;
  lr: number;
  gradNorm: number;
  samplesPerSecond: number;
  /** Seconds left at the current pace. */
  eta: number;
}

export interface TrainResult {
  out: string;
  steps: number;
  losses: Record<string, number>;
  evalLoss?: number;
  stopped: boolean;
}

/** What the trainer keeps in trainer_state.json besides the tensors. */
interface SavedState {
  step: number;
  totalSteps: number;
  rng: RngState;
  data: ReturnType<Batches["position"]>;
  optimizerSteps: Record<string, number>;
  decTokenId?: number;
}

export async function train(options: TrainOptions): Promise<TrainResult> {
  const trainer = await Trainer.create(options);
  try {
    return await trainer.run();
  } finally {
    await trainer.release();
  }
}

export class Trainer {
  private stepsDone = 0;
  private lastLosses: Record<string, number> = {};

  private constructor(
    private readonly options: TrainOptions,
    /** The checkpoint graphs are built from (the start, or the run being resumed) with the frozen parts' precision. */
    private readonly checkpoint: Checkpoint,
    /** Where frozen tensors are copied from at each save. */
    private readonly source: Checkpoint,
    private readonly params: Map<string, Float32Array>,
    private readonly optimizer: AdamW,
    private readonly batches: Batches,
    private readonly rng: Rng,
    private readonly schedule: LrSchedule,
    readonly totalSteps: number,
    private readonly identity: unknown,
    private readonly features: ImageFeatures,
    private readonly text: { stage1?: Stage1Text; stage2?: Stage2Text; size?: { length: number; targetLength: number } },
    private readonly extras: Stage1Extras | null,
    private readonly step1: Stage1Step | null,
    private readonly step2: Stage2Step | null,
  ) {}

  static async create(options: TrainOptions): Promise<Trainer> {
    const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as TrainOptions;
    const o = { batchSize: 8, gradAccum: 1, seed: 42, maxTextLength: MAX_TEXT_LENGTH, dropout: true, ...given };
    checkPositive("--batch-size", o.batchSize);
    checkPositive("--grad-accum", o.gradAccum);
    if (o.steps !== undefined) checkPositive("--steps", o.steps);
    if (o.epochs !== undefined) checkPositive("--epochs", o.epochs);
    if (o.saveEvery !== undefined) checkPositive("--save-every", o.saveEvery);
    if (o.stage === 1 && o.batchSize < 2) throw new Blip2Error("stage 1 needs a batch size of at least 2 (ITC contrasts the pairs of a batch and ITM draws its negatives from it)");

    const input = Checkpoint.open(o.model);
    checkStage(input, o.stage);
    const examples = loadExamples(o.data);
    const identity = { stage: o.stage, model: input.fingerprint(), data: path.resolve(o.data), examples: examples.length, batchSize: o.batchSize, gradAccum: o.gradAccum, seed: o.seed };
    const resumeDir = o.resume ?? null;
    const saved = resumeDir ? openTrainingOutput(resumeDir, identity) : openTrainingOutput(o.out, identity);
    if (resumeDir && !saved) throw new Blip2Error(`${resumeDir}: no earlier run to resume there (no ${"trainer_state.json"})`);
    if (resumeDir && path.resolve(resumeDir) !== path.resolve(o.out)) openTrainingOutput(o.out, identity);
    const start = saved ? Checkpoint.open(resumeDir ?? o.out) : input;

    const rng = new Rng(o.seed);
    let extras: Stage1Extras | null = null;
    let graphCheckpoint = start;
    if (o.stage === 1) {
      extras = await stage1Extras(start, rng);
      if (extras.notice) o.onNotice?.(extras.notice);
      graphCheckpoint = withExtras(start, extras);
    }
    const dtypes = { ...resolveDTypes(o.dtype), qformer: "fp32" as const };
    graphCheckpoint = await withDTypes(graphCheckpoint, dtypes, { cacheDir: o.blip2Cache });

    const trainedNames = graphCheckpoint.names().filter((n) => (o.stage === 1 ? stage1Trained(n) : stage2Trained(n)) && !n.includes(".q8.") && !n.includes(".q4.") && !n.endsWith(".fp16"));
    const params = new Map<string, Float32Array>();
    for (const name of trainedNames) params.set(name, extras?.tensors.get(name)?.data.slice() ?? readTensorF32(graphCheckpoint.tensor(name)));
    const optimizer = new AdamW(
      trainedNames.map((name) => ({ name, shape: [...graphCheckpoint.tensor(name).shape], value: params.get(name)! })),
      { weightDecay: o.weightDecay ?? 0.05 },
    );

    const processor = await Blip2Processor.fromDirectory(start.dir, start.config, { imageBackend: o.imageBackend });
    const text: { stage1?: Stage1Text; stage2?: Stage2Text; size?: { length: number; targetLength: number } } = {};
    if (o.stage === 1) {
      text.stage1 = new Stage1Text(processor.tokenizer, extras!.decTokenId, o.maxTextLength);
    } else {
      text.stage2 = new Stage2Text(processor, start.config.text.modelType === "opt" ? "opt" : "t5", o.prompt ?? "", o.maxTextLength);
      text.size = text.stage2.lengths(examples);
    }

    const microPerEpoch = Math.floor(examples.length / o.batchSize);
    if (microPerEpoch === 0) throw new Blip2Error(`${o.data}: ${examples.length} example${examples.length === 1 ? "" : "s"}, fewer than the batch size ${o.batchSize}`);
    const epochs = o.steps !== undefined ? Math.ceil((o.steps * o.gradAccum) / microPerEpoch) : (o.epochs ?? 1);
    const batches = new Batches(examples, { batchSize: o.batchSize, epochs, seed: o.seed });
    const totalSteps = o.steps ?? Math.floor(batches.totalBatches / o.gradAccum);
    if (totalSteps === 0) throw new Blip2Error(`${o.data}: ${batches.totalBatches} batches make no optimizer step of ${o.gradAccum} micro-batches`);
    const defaults = o.stage === 1 ? LAVIS_STAGE1 : LAVIS_STAGE2;
    const schedule: LrSchedule = {
      lr: o.lr ?? defaults.lr,
      minLr: o.minLr ?? defaults.minLr,
      warmupLr: o.warmupLr ?? defaults.warmupLr,
      warmupSteps: Math.min(o.warmupSteps ?? defaults.warmupSteps, totalSteps),
      totalSteps,
    };

    const runtime = o.runtime ?? {};
    const cacheDir = o.augment ? null : blip2CacheDir(o.blip2Cache);
    if (o.augment) o.onNotice?.("augmentation is on: image features are computed at every step (nothing can be cached)");
    const features = new ImageFeatures(graphCheckpoint, processor.imageProcessor, runtime, cacheDir);
    const trainer = new Trainer(o, graphCheckpoint, start, params, optimizer, batches, rng, schedule, totalSteps, identity, features, text, saved ? null : extras, o.stage === 1 ? new Stage1Step(graphCheckpoint, runtime) : null, o.stage === 2 ? new Stage2Step(graphCheckpoint, runtime) : null);
    if (saved) trainer.restore(saved);
    return trainer;
  }

  /** Continues from a saved state: step, optimizer moments, generator and data position. */
  private restore(saved: TrainerState): void {
    const s = saved.json as SavedState;
    this.stepsDone = s.step;
    const tensors: AdamWState["tensors"] = {};
    for (const [name, steps] of Object.entries(s.optimizerSteps)) {
      const m = saved.tensors.get(`exp_avg.${name}`);
      const v = saved.tensors.get(`exp_avg_sq.${name}`);
      if (!m || !v) throw new Blip2Error(`${this.options.resume ?? this.options.out}: the optimizer state has no moments for ${name}`);
      tensors[name] = { step: steps, expAvg: m.data, expAvgSq: v.data };
    }
    this.optimizer.load({ tensors });
    for (const [name, value] of this.params) {
      const master = saved.tensors.get(`param.${name}`);
      if (master) value.set(master.data);
    }
    this.rng.restore(s.rng);
    this.batches.seek(s.data);
    this.options.onNotice?.(`continuing the run saved at step ${s.step} of ${s.totalSteps}`);
  }

  async run(): Promise<TrainResult> {
    const o = this.options;
    const started = Date.now();
    const startStep = this.stepsDone;
    let stopped = false;
    while (this.stepsDone < this.totalSteps) {
      if (o.signal?.aborted) {
        stopped = true;
        break;
      }
      const accumulator = new GradAccumulator();
      const sums: Record<string, number> = {};
      let epoch = 0;
      for (let micro = 0; micro < (o.gradAccum ?? 1); micro++) {
        const batch = this.batches.next();
        if (!batch) throw new Blip2Error("internal: the data ran out before the last step");
        epoch = batch.epoch;
        const out = await this.forwardBackward(batch.examples, o.dropout ?? true);
        for (const [k, v] of Object.entries(out.losses)) sums[k] = (sums[k] ?? 0) + v / (o.gradAccum ?? 1);
        if (!Number.isFinite(out.losses.loss!)) throw this.diverged(out.losses);
        accumulator.add(out.grads);
      }
      const grads = accumulator.mean();
      const gradNorm = o.clipGradNorm ? clipByGlobalNorm(grads, o.clipGradNorm) : globalNorm(grads);
      const lr = lrAt(this.stepsDone, this.schedule);
      this.optimizer.step(grads, lr);
      this.stepsDone += 1;
      this.lastLosses = sums;
      const elapsed = (Date.now() - started) / 1000;
      const done = this.stepsDone - startStep;
      const samplesPerSecond = (done * (o.batchSize ?? 8) * (o.gradAccum ?? 1)) / Math.max(elapsed, 1e-9);
      o.onStep?.({ step: this.stepsDone, totalSteps: this.totalSteps, epoch, losses: sums, lr, gradNorm, samplesPerSecond, eta: (elapsed / done) * (this.totalSteps - this.stepsDone) });
      if (o.saveEvery && this.stepsDone % o.saveEvery === 0 && this.stepsDone < this.totalSteps) this.save();
    }
    this.save();
    const evalLoss = o.eval ? await this.evaluate(o.eval) : undefined;
    return { out: path.resolve(o.out), steps: this.stepsDone, losses: this.lastLosses, evalLoss, stopped };
  }

  /** Loss terms and gradients of one micro-batch. */
  private async forwardBackward(examples: Example[], dropout: boolean): Promise<StepOutput> {
    const features = await this.featuresOf(examples);
    // Masks are a function of a seed drawn here, so a resumed run draws the same ones.
    const options = dropout ? { dropoutSeed: this.rng.int(0x7fffffff) } : {};
    if (this.step1) return this.step1.run(this.text.stage1!.batch(examples), features, this.params, this.rng, options);
    return this.step2!.run(this.text.stage2!.batch(examples, this.text.size!), features, this.params, options);
  }

  private featuresOf(examples: Example[]): Promise<ort.Tensor> {
    return this.features.of(examples.map((e) => e.image), examples.map((e) => e.where), this.options.augment ? this.rng : null);
  }

  private diverged(losses: Record<string, number>): Blip2Error {
    const terms = Object.entries(losses).map(([k, v]) => `${k} ${v}`).join(", ");
    const kept = this.stepsDone > 0 && this.options.saveEvery ? ` ${this.options.out} keeps the last checkpoint saved before it` : ` nothing was saved`;
    return new Blip2Error(`step ${this.stepsDone + 1}: the loss is not finite (${terms}); training stopped;${kept} (try a lower --lr or --clip-grad-norm)`);
  }

  /** Saves the model and the trainer's state into `out`, atomically. */
  private save(): void {
    const trained = new Map<string, TensorValue>();
    for (const [name, data] of this.params) trained.set(name, { shape: [...this.checkpoint.tensor(name).shape], data });
    const opt = this.optimizer.state();
    const tensors = new Map<string, TensorValue>();
    const optimizerSteps: Record<string, number> = {};
    for (const [name, s] of Object.entries(opt.tensors)) {
      const shape = trained.get(name)!.shape;
      tensors.set(`exp_avg.${name}`, { shape, data: s.expAvg });
      tensors.set(`exp_avg_sq.${name}`, { shape, data: s.expAvgSq });
      optimizerSteps[name] = s.step;
    }
    // Weights saved in another dtype than float32 lose bits: keep the master copy for an exact resume.
    for (const [name, v] of trained) {
      if (this.source.has(name) && this.source.tensor(name).dtype !== "F32") tensors.set(`param.${name}`, v);
    }
    const json: SavedState = { step: this.stepsDone, totalSteps: this.totalSteps, rng: this.rng.state(), data: this.batches.position(), optimizerSteps };
    const fresh = this.extras;
    saveCheckpoint({
      source: this.source,
      out: this.options.out,
      trained,
      config: fresh?.config,
      files: fresh?.files,
      state: { identity: this.identity, json, tensors },
    });
  }

  /** The mean loss over a data set (no update): batches in order, the last one kept. */
  private async evaluate(file: string): Promise<number> {
    const examples = loadExamples(file);
    const size = this.options.batchSize ?? 8;
    let total = 0;
    let count = 0;
    const evalRng = new Rng(0);
    for (let i = 0; i < examples.length; i += size) {
      const chunk = examples.slice(i, i + size);
      if (this.step1 && chunk.length < 2) break;
      const features = await this.features.of(chunk.map((e) => e.image), chunk.map((e) => e.where));
      const out = this.step1
        ? await this.step1.run(this.text.stage1!.batch(chunk), features, this.params, evalRng)
        : await this.step2!.run(this.text.stage2!.batch(chunk, this.text.size!), features, this.params);
      total += out.losses.loss! * chunk.length;
      count += chunk.length;
    }
    return count ? total / count : NaN;
  }

  async release(): Promise<void> {
    await Promise.all([this.step1?.release(), this.step2?.release(), this.features.release()]);
  }
}

function checkPositive(what: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 1) throw new Blip2Error(`${what} must be a whole number >= 1, got ${v}`);
}

/** Refuses a checkpoint that does not have what the stage trains. */
export function checkStage(ckpt: Checkpoint, stage: 1 | 2): void {
  const retrieval = ckpt.config.architectures.includes("Blip2ForImageTextRetrieval");
  const hasLanguageModel = ckpt.names().some((n) => n.startsWith("language_model."));
  if (stage === 1 && (!retrieval || !ckpt.has("embeddings.word_embeddings.weight"))) {
    throw new Blip2Error(`${ckpt.dir}: stage 1 trains the Q-Former's text side too, which this checkpoint lacks (it is ${ckpt.config.architectures.join(", ")}; stage 1 needs a Blip2ForImageTextRetrieval checkpoint such as Salesforce/blip2-itm-vit-g)`);
  }
  if (stage === 2 && !hasLanguageModel) {
    throw new Blip2Error(`${ckpt.dir}: stage 2 trains through a language model, which this ${ckpt.config.architectures.join(", ")} checkpoint has none of; make a stage-2 checkpoint with blip2 compose --stage1 ${ckpt.dir} --language-model <OPT or T5 folder> --out <folder>`);
  }
}

/**
 * The checkpoint with stage 1's extras as tensors of the right shape (the graphs feed trained
 * tensors from the trainer, so only their names and shapes are needed) and the grown vocabulary.
 */
export function withExtras(ckpt: Checkpoint, extras: Stage1Extras): Checkpoint {
  if (extras.tensors.size === 0) return ckpt;
  const infos = new Map<string, TensorInfo>();
  for (const [name, v] of extras.tensors) {
    infos.set(name, { name, dtype: "F32", shape: v.shape, file: ckpt.file("model.safetensors"), offset: 0, byteLength: v.data.byteLength });
  }
  const vocab = extras.tensors.get("embeddings.word_embeddings.weight")?.shape[0] ?? ckpt.config.qformer.vocabSize;
  return ckpt.withWeights(infos, ckpt.dtypes).withConfig({ qformer: { ...ckpt.config.qformer, vocabSize: vocab } });
}
