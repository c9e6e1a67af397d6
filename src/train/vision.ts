/**
 * Pretraining the image encoder alone, as BLIP-2 takes a pretrained one: a small ViT in the
 * Blip2VisionModel layout, trained on rendered scenes of the synthetic world with labels of its own.
 *
 * Objective: for each of the five places (top, left, centre, right, bottom), classify the object
 * there: its shape (six, or none), colour (eight, or none) and size (two, or none). The world is
 * fully labelled, and these are exactly the facts the captions and questions are made of, so the
 * features must carry colour, shape, size and place, which later stages read through the Q-Former
 * and which no generic objective (such as predicting masked pixels) would single out. The head is
 * deliberately weak so that the encoder does the work: each place pools the final tokens with
 * weights of its own (a learned softmax over the tokens, starting as a Gaussian around the place's
 * centre on the patch grid), and one linear classifier, shared by the five places, reads each
 * pooled vector. The attributes of an object must therefore be readable linearly from the tokens
 * at its place, as the Q-Former's cross-attention will read them, and encoded the same way
 * wherever the object is. (Pooling by learned queries over the tokens' content, tried first, sat
 * for hundreds of steps at the class priors: nothing told the queries where to look.)
 *
 * Images are drawn fresh from the world's train split at every step (a scene is never seen twice),
 * at the checkpoint's image size (the renderer draws that size, so there is no resize), normalised
 * as BlipImageProcessor does (rescale 1/255, CLIP mean and std). Accuracy is reported on the
 * training batches and on held-out scenes of the val split.
 */
import fs from "node:fs";
import path from "node:path";
import * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import { defaultImageProcessorConfig, preprocessRgb } from "../image/imageProcessor.js";
import { Checkpoint } from "../io/checkpoint.js";
import { readTensorF32 } from "../io/safetensors.js";
import { Graph, type Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { Params } from "../models/layers.js";
import { visionEncoder } from "../models/vision.js";
import type { RuntimeOptions } from "../runtime/session.js";
import { renderScene } from "../world/render.js";
import { generateScene, sceneSeed, type Scene, type Split } from "../world/scene.js";
import { COLOURS, POSITION_CENTRE, POSITIONS, SHAPES, SIZES } from "../world/vocabulary.js";
import { checkOutDir, encodeFloats, saveCheckpoint, writeModelFolder, type TensorValue } from "./checkpoint.js";
import { meanCrossEntropy } from "./losses.js";
import { checkCount, cpuDescription, GraphTraining, type PretrainStep, type TrainedTensor } from "./pretrain.js";
import { Rng } from "./rng.js";

/** The labelled attributes, each with "none" as its last class (no object at the place). */
export const ATTRIBUTES = [
  { name: "shape", classes: [...SHAPES, "none"] },
  { name: "colour", classes: [...COLOURS, "none"] },
  { name: "size", classes: [...SIZES, "none"] },
] as const;
type AttributeName = (typeof ATTRIBUTES)[number]["name"];
const CLASSES = ATTRIBUTES.reduce((n, a) => n + a.classes.length, 0);

export interface PretrainVisionOptions {
  /** A Blip2ForImageTextRetrieval checkpoint (e.g. from `writeFreshRetrieval`); its `vision_model.*` is trained. */
  model: string;
  /** The Blip2VisionModel folder to write (missing or empty). */
  out: string;
  /** The copy of `model` with the trained vision encoder (missing or empty), what stage 1 starts from. */
  retrievalOut: string;
  /** Optimizer steps (default 300). */
  steps?: number;
  batchSize?: number;
  lr?: number;
  minLr?: number;
  warmupSteps?: number;
  weightDecay?: number;
  seed?: number;
  /** Held-out val scenes the accuracy is measured on (default 256). */
  evalScenes?: number;
  /** Index in the train split of the first scene (default 0). */
  firstScene?: number;
  runtime?: RuntimeOptions;
  onStep?: (info: PretrainStep & { accuracy: Accuracy }) => void;
}

/** Accuracy per attribute over the places that hold an object, and over all five places (none included). */
export interface Accuracy {
  shape: number;
  colour: number;
  size: number;
  /** Places, empty or not, where all three attributes are right. */
  places: number;
}

export interface PretrainVisionResult {
  out: string;
  retrievalOut: string;
  steps: number;
  seconds: number;
  cpu: string;
  loss: number;
  /** Over the last tenth of the training batches (at least one). */
  trainAccuracy: Accuracy;
  /** On held-out val scenes, after training. */
  valAccuracy: Accuracy;
}

/** The class of each attribute at each place: [places, 3] (shape, colour, size). */
export function placeLabels(scene: Scene): number[][] {
  return POSITIONS.map((position) => {
    const o = scene.objects.find((x) => x.position === position);
    return ATTRIBUTES.map((a) => {
      const value = o ? (a.name === "shape" ? o.shape : a.name === "colour" ? o.colour : o.size) : "none";
      return (a.classes as readonly string[]).indexOf(value);
    });
  });
}

/** A batch of scenes as pixel values [B, 3, S, S] and labels [B, places, 3]. */
export function sceneBatch(split: Split, indices: number[], size: number): { pixels: ort.Tensor; labels: ort.Tensor; scenes: Scene[] } {
  const config = { ...defaultImageProcessorConfig(), doResize: false, size: { height: size, width: size } };
  const per = 3 * size * size;
  const pixels = new Float32Array(indices.length * per);
  const labels: number[] = [];
  const scenes = indices.map((i) => generateScene(sceneSeed(split, i)));
  scenes.forEach((scene, b) => {
    const image = renderScene(scene, size);
    pixels.set(preprocessRgb({ data: Uint8Array.from(image.data), width: image.width, height: image.height }, config), b * per);
    labels.push(...placeLabels(scene).flat());
  });
  return {
    pixels: new ort.Tensor("float32", pixels, [indices.length, 3, size, size]),
    labels: new ort.Tensor("int64", BigInt64Array.from(labels.map(BigInt)), [indices.length, POSITIONS.length, ATTRIBUTES.length]),
    scenes,
  };
}

/** The graph: the encoder's tokens, the head's logits [B, places, classes] and the summed cross-entropies. */
function visionPretrainGraph(ckpt: Checkpoint, batch: number): { g: Graph; loss: Value; head: Map<string, Value> } {
  const v = ckpt.config.vision;
  const d = v.hiddenSize;
  const places = POSITIONS.length;
  const g = new Graph("pretrain_vision");
  g.trainable = (name) => name.startsWith("vision_model.");
  const pixels = g.input("pixel_values", "float32", [batch, 3, v.imageSize, v.imageSize]);
  const labels = g.input("labels", "int64", [batch, places, ATTRIBUTES.length]);
  const tokens = visionEncoder(new Params(g, ckpt).at("vision_model"), v, pixels).lastHiddenState;
  const head = new Map([
    ["head.places", g.input("head.places", "float32", [places, tokens.dim(1) as number])],
    ["head.classifier.weight", g.input("head.classifier.weight", "float32", [CLASSES, d])],
    ["head.classifier.bias", g.input("head.classifier.bias", "float32", [CLASSES])],
  ]);
  // Each place's weights over the tokens [places, T] pool them: [B, places, D].
  const pooled = op.matmul(op.softmax(head.get("head.places")!, -1), tokens);
  const logits = op.linear(pooled, head.get("head.classifier.weight")!, head.get("head.classifier.bias")!);
  g.output(logits, "logits");
  let loss: Value | null = null;
  let at = 0;
  ATTRIBUTES.forEach((a, i) => {
    const n = a.classes.length;
    const rows = op.reshape(op.slice(logits, [at], [at + n], [2]), [batch * places, n]);
    const targets = op.reshape(op.slice(labels, [i], [i + 1], [2]), [batch * places]);
    const term = meanCrossEntropy(rows, targets);
    loss = loss ? op.add(loss, term) : term;
    at += n;
  });
  return { g, loss: loss!, head };
}

/** Counts of right answers in a batch's logits [B, places, classes] against its labels. */
class AccuracyCounter {
  private right = { shape: 0, colour: 0, size: 0, places: 0 };
  private objects = 0;
  private places = 0;

  add(logits: ort.Tensor, labels: ort.Tensor): void {
    const data = logits.data as Float32Array;
    const truth = labels.data as BigInt64Array;
    const rows = truth.length / ATTRIBUTES.length;
    for (let r = 0; r < rows; r++) {
      const occupied = Number(truth[r * ATTRIBUTES.length]) !== SHAPES.length;
      let allRight = true;
      let at = 0;
      ATTRIBUTES.forEach((a, i) => {
        const n = a.classes.length;
        let best = 0;
        for (let c = 1; c < n; c++) if (data[r * CLASSES + at + c]! > data[r * CLASSES + at + best]!) best = c;
        const ok = best === Number(truth[r * ATTRIBUTES.length + i]);
        if (occupied && ok) this.right[a.name as AttributeName] += 1;
        allRight &&= ok;
        at += n;
      });
      if (occupied) this.objects += 1;
      if (allRight) this.right.places += 1;
      this.places += 1;
    }
  }

  accuracy(): Accuracy {
    const o = Math.max(this.objects, 1);
    return { shape: this.right.shape / o, colour: this.right.colour / o, size: this.right.size / o, places: this.right.places / Math.max(this.places, 1) };
  }
}

const VISION_PREFIX = "vision_model.";

/**
 * The pooling weights' starting logits [places, 1 + grid²]: -(distance to the place's centre)² / 2,
 * in patches, over the patch tokens; the class token starts far below (it has no place).
 */
function placePriors(grid: number): Float32Array {
  const tokens = 1 + grid * grid;
  const out = new Float32Array(POSITIONS.length * tokens);
  POSITIONS.forEach((position, p) => {
    const [cx, cy] = POSITION_CENTRE[position];
    out[p * tokens] = -grid * grid;
    for (let r = 0; r < grid; r++) {
      for (let c = 0; c < grid; c++) {
        const dx = c + 0.5 - cx * grid;
        const dy = r + 0.5 - cy * grid;
        out[p * tokens + 1 + r * grid + c] = -(dx * dx + dy * dy) / 2;
      }
    }
  });
  return out;
}

/**
 * Trains the vision encoder of `model` with the place-attribute objective; writes the Blip2VisionModel
 * folder `out` and the retrieval checkpoint `retrievalOut` (its other tensors copied byte for byte).
 */
export async function pretrainVision(options: PretrainVisionOptions): Promise<PretrainVisionResult> {
  const o = { steps: 300, batchSize: 32, lr: 1e-3, minLr: 1e-5, warmupSteps: 30, weightDecay: 0.05, seed: 0, evalScenes: 256, firstScene: 0, ...definedOnly(options) };
  checkCount("steps", o.steps);
  checkCount("batch size", o.batchSize);
  checkCount("eval scenes", o.evalScenes, 0);
  const ckpt = Checkpoint.open(o.model);
  if (!ckpt.has(`${VISION_PREFIX}embeddings.patch_embedding.weight`)) throw new Blip2Error(`${o.model}: no vision_model.* tensors: pretrainVision trains the vision encoder of a BLIP-2 checkpoint`);
  for (const out of [o.out, o.retrievalOut]) checkOutDir(out, null);
  if (path.resolve(o.out) === path.resolve(o.retrievalOut)) throw new Blip2Error(`${o.out}: the vision model and the retrieval checkpoint need two folders`);
  const size = ckpt.config.vision.imageSize;
  const d = ckpt.config.vision.hiddenSize;

  const { g, loss, head } = visionPretrainGraph(ckpt, o.batchSize);
  const tensors = new Map<string, TrainedTensor>();
  for (const [name, input] of g.trained) tensors.set(name, { input, shape: input.shape as number[], value: readTensorF32(ckpt.tensor(name)) });
  const rng = new Rng(o.seed);
  const normal = (n: number, std: number) => Float32Array.from({ length: n }, () => std * rng.normal());
  tensors.set("head.places", { input: head.get("head.places")!, shape: [POSITIONS.length, 1 + (size / ckpt.config.vision.patchSize) ** 2], value: placePriors(size / ckpt.config.vision.patchSize) });
  tensors.set("head.classifier.weight", { input: head.get("head.classifier.weight")!, shape: [CLASSES, d], value: normal(CLASSES * d, 0.02) });
  tensors.set("head.classifier.bias", { input: head.get("head.classifier.bias")!, shape: [CLASSES], value: new Float32Array(CLASSES) });

  const training = await GraphTraining.create(g, loss, tensors, { ...o, totalSteps: o.steps }, o.runtime);
  const started = Date.now();
  let lastLoss = NaN;
  const recent = new AccuracyCounter();
  const recentFrom = o.steps - Math.max(1, Math.floor(o.steps / 10));
  try {
    for (let step = 0; step < o.steps; step++) {
      const first = o.firstScene + step * o.batchSize;
      const batch = sceneBatch("train", range(first, o.batchSize), size);
      const r = await training.step({ pixel_values: batch.pixels, labels: batch.labels });
      lastLoss = r.loss;
      const counter = new AccuracyCounter();
      counter.add(r.outputs.logits!, batch.labels);
      if (step >= recentFrom) recent.add(r.outputs.logits!, batch.labels);
      o.onStep?.({ step: step + 1, totalSteps: o.steps, loss: r.loss, lr: r.lr, gradNorm: r.gradNorm, elapsed: (Date.now() - started) / 1000, accuracy: counter.accuracy() });
    }
    const seconds = (Date.now() - started) / 1000;
    const valAccuracy = await evaluate(training, size, o.batchSize, o.evalScenes);
    writeOutputs(ckpt, o.out, o.retrievalOut, tensors);
    return { out: path.resolve(o.out), retrievalOut: path.resolve(o.retrievalOut), steps: o.steps, seconds, cpu: cpuDescription(), loss: lastLoss, trainAccuracy: recent.accuracy(), valAccuracy };
  } finally {
    await training.release();
  }
}

/** Accuracy on the first `count` val scenes, rounded up to whole batches (the graph has one batch size). */
async function evaluate(training: GraphTraining, size: number, batchSize: number, count: number): Promise<Accuracy> {
  const counter = new AccuracyCounter();
  for (let first = 0; first < count; first += batchSize) {
    const batch = sceneBatch("val", range(first, batchSize), size);
    const out = await training.run({ pixel_values: batch.pixels, labels: batch.labels });
    counter.add(out.logits!, batch.labels);
  }
  return counter.accuracy();
}

function writeOutputs(ckpt: Checkpoint, out: string, retrievalOut: string, tensors: Map<string, TrainedTensor>): void {
  const trained = new Map<string, TensorValue>();
  for (const [name, t] of tensors) if (name.startsWith(VISION_PREFIX)) trained.set(name, { shape: t.shape, data: t.value });
  saveCheckpoint({ source: ckpt, out: retrievalOut, trained });
  // Blip2VisionModel's own names are the BLIP-2 ones without `vision_model.`.
  const entries = [...trained].map(([name, t]) => ({ name: name.slice(VISION_PREFIX.length), dtype: "F32" as const, shape: t.shape, bytes: encodeFloats(t.data, "F32", name) }));
  entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const blip2 = ckpt.json("config.json") as { vision_config?: Record<string, unknown>; torch_dtype?: unknown };
  const config = { architectures: ["Blip2VisionModel"], ...blip2.vision_config, model_type: "blip_2_vision_model", torch_dtype: "float32" };
  const files: Record<string, string | { copy: string }> = { "config.json": `${JSON.stringify(config, null, 2)}\n` };
  if (fs.existsSync(ckpt.file("preprocessor_config.json"))) files["preprocessor_config.json"] = { copy: ckpt.file("preprocessor_config.json") };
  writeModelFolder({ out, tensors: entries, files });
}

const range = (first: number, n: number) => Array.from({ length: n }, (_, i) => first + i);

/** `o` without its undefined fields, so that defaults spread before it stay. */
function definedOnly<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}
