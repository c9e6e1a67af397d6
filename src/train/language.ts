/**
 * Pretraining the language model alone, as BLIP-2 takes a pretrained one: a small OPT
 * (OPTForCausalLM layout) trained with the causal LM loss on text of the synthetic world's train
 * split only. It never sees an image.
 *
 * The text mix, one sequence per scene (a fresh scene every time):
 * - a third are a plain caption and "\n": what stage 2's OPT is trained to write after the visual
 *   prompts (LAVIS: `prompt + caption + "\n"`, and generation stops at "\n");
 * - two thirds are a description of the scene (a caption), then one of its questions in BLIP-2's
 *   zero-shot VQA prompt and the answer: "description\nQuestion: q Answer: a\n".
 *
 * With `context`, the description mostly stands before BOS instead, as the end of the document
 * before this one (OPT is pretrained on documents packed with `</s>` between them): a quarter are
 * `description </s> caption\n` (another paraphrase), half `description </s> Question: q Answer:
 * a\n`, and an eighth each as above. The model learns to caption and to answer from what precedes
 * its BOS, where stage 2 puts the visual prompts: a Q-Former that learns to caption through it
 * gets its zero-shot answers from the same reading.
 *
 * A question's prompt is never a target, only its answer: most of a question's loss would be
 * guessing which question comes, which teaches nothing about the scene.
 *
 * Held-out evaluation (val split): the loss per token, and the answer accuracy with the
 * description given (teacher forcing: every token of the answer is the argmax after its prefix),
 * per question type.
 */
import fs from "node:fs";
import path from "node:path";
import * as ort from "onnxruntime-node";
import { parseBlip2Config, type OptConfig } from "../config.js";
import { Blip2Error } from "../errors.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { readSafetensorsHeader, readTensorF32, type TensorInfo } from "../io/safetensors.js";
import { Graph, type Value } from "../ir/graph.js";
import { Params } from "../models/layers.js";
import { optDecoder, optEmbedTokens } from "../models/opt.js";
import type { RuntimeOptions } from "../runtime/session.js";
import { Blip2Tokenizer } from "../tokenizer/tokenizer.js";
import { askScene, captionMatchesScene, captionScene, questionPrompt, QUESTION_TYPES, type QuestionType } from "../world/language.js";
import { generateScene, sceneSeed, type Split } from "../world/scene.js";
import { checkOutDir, encodeFloats, writeModelFolder } from "./checkpoint.js";
import { lmLoss, shiftedTargets } from "./losses.js";
import { checkCount, cpuDescription, GraphTraining, type PretrainStep, type TrainedTensor } from "./pretrain.js";
import { Rng } from "./rng.js";

export interface PretrainTextOptions {
  /** An OPTForCausalLM folder (e.g. from `writeFreshOpt`); all its tensors are trained. */
  model: string;
  /** The OPTForCausalLM folder to write (missing or empty); `blip2 compose --language-model` takes it. */
  out: string;
  /** Optimizer steps (default 400). */
  steps?: number;
  batchSize?: number;
  /** Every sequence is padded to this many tokens (default 48, longer than any of the mix). */
  length?: number;
  lr?: number;
  minLr?: number;
  warmupSteps?: number;
  weightDecay?: number;
  seed?: number;
  /** Held-out val scenes evaluated (default 128; five questions each). */
  evalScenes?: number;
  /** Index in the train split of the first scene (default 0). */
  firstScene?: number;
  /**
   * Put a description of the scene before BOS in three quarters of the sequences, followed by a
   * caption or a question and its answer (see the header); the val answers are then asked that way too.
   */
  context?: boolean;
  runtime?: RuntimeOptions;
  onStep?: (info: PretrainStep) => void;
}

export interface PretrainTextResult {
  out: string;
  steps: number;
  seconds: number;
  cpu: string;
  /** The last step's training loss per token. */
  loss: number;
  /** Val: mean loss per token over the description-question-answer sequences. */
  valLoss: number;
  /** Val: answers right (every token) with the description given, over all types and per type. */
  valAnswerAccuracy: number;
  valAnswerAccuracyByType: Record<QuestionType, number>;
  /** Val, with `context`: captions right (every object) written after a description placed before BOS; NaN without. */
  valCaptionAccuracy: number;
}

const TOKENIZER_FILE = /^(special_tokens_map\.json|added_tokens\.json|merges\.txt|tokenizer[^/]*|vocab[^/]*|generation_config\.json)$/;

/**
 * A sequence of the mix: its text, the context before its BOS (not a target), and, for a question,
 * where the answer starts (in characters of `text`).
 */
export interface Sequence {
  text: string;
  context?: string;
  answerAt?: number;
  /** For a question, where its prompt starts (in characters of `text`): the prompt is not a target. */
  questionAt?: number;
  type?: QuestionType;
}

function describedQuestion(description: string, q: { question: string; answer: string; type: QuestionType }): Sequence {
  const prefix = `${description}\n${questionPrompt(q.question)}`;
  return { text: `${prefix} ${q.answer}\n`, answerAt: prefix.length, questionAt: description.length + 1, type: q.type };
}

/** A question about the scene that `context` describes, asked after BOS. */
function questionAfterContext(context: string, q: { question: string; answer: string; type: QuestionType }): Sequence {
  const prompt = questionPrompt(q.question);
  return { context, text: `${prompt} ${q.answer}\n`, answerAt: prompt.length, questionAt: 0, type: q.type };
}

/**
 * The training sequence of scene `index` of the train split (the mix of the header). With
 * `context`, three quarters put a description of the scene before BOS.
 */
export function textOfScene(split: Split, index: number, rng: Rng, context = false): Sequence {
  const scene = generateScene(sceneSeed(split, index));
  const captions = captionScene(scene, 4);
  const description = captions[rng.int(captions.length)]!;
  const questions = askScene(scene);
  const question = () => questions[rng.int(questions.length)]!;
  if (context) {
    const kind = rng.int(8);
    if (kind < 2) return { context: description, text: `${captions[rng.int(captions.length)]!}\n` };
    if (kind < 6) return questionAfterContext(description, question());
    if (kind === 6) return { text: `${description}\n` };
    return describedQuestion(description, question());
  }
  if (rng.int(3) === 0) return { text: `${description}\n` };
  return describedQuestion(description, question());
}

/** The decoder graph with the LM loss; outputs `loss` and `logits` [B, L, V]. */
function textPretrainGraph(ckpt: Checkpoint, cfg: OptConfig, batch: number, length: number): { g: Graph; loss: Value } {
  const g = new Graph("pretrain_text");
  g.trainable = () => true;
  const ids = g.input("input_ids", "int64", [batch, length]);
  const mask = g.input("attention_mask", "int64", [batch, length]);
  const targets = g.input("lm_targets", "int64", [batch, length - 1]);
  const weights = g.input("lm_weights", "float32", [batch, length - 1]);
  const decoder = new Params(g, ckpt, "model.decoder.");
  const heads = cfg.numAttentionHeads;
  // No cache: every position is new (as stage2.ts runs OPT in training).
  const noCache = Array.from({ length: cfg.numHiddenLayers }, () => {
    const empty = g.constant(new Float32Array(0), "float32", [batch, heads, 0, cfg.hiddenSize / heads]);
    return { key: empty, value: empty };
  });
  const every = g.ints(Array.from({ length }, (_, i) => i));
  const logits = optDecoder(decoder, new Params(g, ckpt), cfg, optEmbedTokens(decoder, cfg, ids), mask, noCache, every).logits;
  g.output(logits, "logits");
  return { g, loss: lmLoss(logits, targets, weights) };
}

/**
 * A sequence's token ids (context, then BOS and its text) and which are targets: those after the
 * context, but for a question's prompt. The model is taught to answer, not to guess which question
 * comes (most of a question's loss would be that guess, which says nothing about the scene).
 */
export function encodeSequence(tokenizer: Blip2Tokenizer, seq: Sequence): { ids: number[]; targets: boolean[] } {
  const before = seq.context === undefined ? [] : tokenizer.encode(seq.context, { addSpecialTokens: false });
  const ids = [...before, ...tokenizer.encode(seq.text)];
  // Token boundaries of the question's prompt: the BPE of a prefix of the text is a prefix of the text's.
  const [from, to] = seq.questionAt === undefined ? [0, 0] : [seq.questionAt, seq.answerAt!].map((c) => before.length + tokenizer.encode(seq.text.slice(0, c)).length);
  return { ids, targets: ids.map((_, j) => j >= before.length && !(j >= from! && j < to!)) };
}

/** Token ids of a batch of sequences, right-padded to `length`, with their shifted targets. */
function textBatch(tokenizer: Blip2Tokenizer, sequences: Sequence[], length: number): Record<string, ort.Tensor> {
  const rows = sequences.map((seq) => encodeSequence(tokenizer, seq));
  const long = rows.find((r) => r.ids.length > length);
  if (long) throw new Blip2Error(`text pretraining: a sequence has ${long.ids.length} tokens, more than the length ${length}; give a larger length`);
  return idsFeeds(tokenizer, rows.map((r) => r.ids), length, rows.map((r) => r.targets));
}

/** The graph's feeds for rows of ids, right-padded to `length`, with which ids are targets (default: none). */
function idsFeeds(tokenizer: Blip2Tokenizer, rows: number[][], length: number, targets?: boolean[][]): Record<string, ort.Tensor> {
  const pad = tokenizer.padTokenId ?? 1;
  const ids = rows.map((r) => [...r, ...new Array<number>(length - r.length).fill(pad)]);
  const mask = rows.map((r) => Array.from({ length }, (_, j) => (j < r.length ? 1 : 0)));
  const labels = ids.map((row, i) => row.map((id, j) => (targets?.[i]?.[j] ? id : -100)));
  const shifted = shiftedTargets(labels);
  const int64 = (m: number[][]) => new ort.Tensor("int64", BigInt64Array.from(m.flat().map(BigInt)), [m.length, length]);
  return {
    input_ids: int64(ids),
    attention_mask: int64(mask),
    lm_targets: new ort.Tensor("int64", shifted.targets, shifted.shape),
    lm_weights: new ort.Tensor("float32", shifted.weights, shifted.shape),
  };
}

/** Trains the OPT of `model` on the world's text; writes the OPTForCausalLM folder `out`. */
export async function pretrainText(options: PretrainTextOptions): Promise<PretrainTextResult> {
  const given = Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as PretrainTextOptions;
  const o = { steps: 400, batchSize: 32, length: 48, lr: 1e-3, minLr: 1e-5, warmupSteps: 30, weightDecay: 0.05, seed: 0, evalScenes: 128, firstScene: 0, context: false, ...given };
  checkCount("steps", o.steps);
  checkCount("batch size", o.batchSize);
  checkCount("length", o.length, 2);
  checkCount("eval scenes", o.evalScenes, 0);
  checkOutDir(o.out, null);
  const { ckpt, cfg } = openOpt(o.model);
  if (o.length > cfg.maxPositionEmbeddings) throw new Blip2Error(`text pretraining: length ${o.length} exceeds the model's ${cfg.maxPositionEmbeddings} positions`);
  const tokenizer = await Blip2Tokenizer.fromDirectory(o.model);

  const { g, loss } = textPretrainGraph(ckpt, cfg, o.batchSize, o.length);
  const tensors = new Map<string, TrainedTensor>();
  for (const [name, input] of g.trained) tensors.set(name, { input, shape: input.shape as number[], value: readTensorF32(ckpt.tensor(name)) });
  const training = await GraphTraining.create(g, loss, tensors, { ...o, totalSteps: o.steps }, o.runtime);
  const rng = new Rng(o.seed);
  const started = Date.now();
  let lastLoss = NaN;
  try {
    for (let step = 0; step < o.steps; step++) {
      const first = o.firstScene + step * o.batchSize;
      const sequences = Array.from({ length: o.batchSize }, (_, i) => textOfScene("train", first + i, rng, o.context));
      const r = await training.step(textBatch(tokenizer, sequences, o.length));
      lastLoss = r.loss;
      o.onStep?.({ step: step + 1, totalSteps: o.steps, loss: r.loss, lr: r.lr, gradNorm: r.gradNorm, elapsed: (Date.now() - started) / 1000 });
    }
    const seconds = (Date.now() - started) / 1000;
    const evaluation = await evaluate(training, tokenizer, o.batchSize, o.length, o.evalScenes, o.context);
    writeOpt(o.model, o.out, tensors);
    return { out: path.resolve(o.out), steps: o.steps, seconds, cpu: cpuDescription(), loss: lastLoss, ...evaluation };
  } finally {
    await training.release();
  }
}

/** Loss and teacher-forced answer accuracy on every question of the first val scenes. */
async function evaluate(training: GraphTraining, tokenizer: Blip2Tokenizer, batchSize: number, length: number, scenes: number, context: boolean) {
  const sequences: Sequence[] = [];
  for (let i = 0; i < scenes; i++) {
    const scene = generateScene(sceneSeed("val", i));
    const description = captionScene(scene, 1)[0]!;
    for (const q of askScene(scene)) sequences.push(context ? questionAfterContext(description, q) : describedQuestion(description, q));
  }
  const right = Object.fromEntries(QUESTION_TYPES.map((t) => [t, 0])) as Record<QuestionType, number>;
  const asked = { ...right };
  let lossSum = 0;
  let batches = 0;
  for (let at = 0; at < sequences.length; at += batchSize) {
    // The graph has one batch size: the last batch is filled up with its first sequence, not counted.
    const chunk = sequences.slice(at, at + batchSize);
    const out = await training.run(textBatch(tokenizer, Array.from({ length: batchSize }, (_, i) => chunk[i] ?? chunk[0]!), length));
    if (chunk.length === batchSize) {
      lossSum += Number(out.loss!.data[0]);
      batches += 1;
    }
    const logits = out.logits!.data as Float32Array;
    const vocab = out.logits!.dims[2]!;
    chunk.forEach((s, b) => {
      const { ids, targets } = encodeSequence(tokenizer, s);
      const answerAt = targets.indexOf(true, targets.lastIndexOf(false));
      let ok = true;
      // The answer's tokens, up to the closing "\n": each the argmax at the position before it.
      for (let j = answerAt; j < ids.length - 1; j++) {
        const row = logits.subarray(((b * length) + j - 1) * vocab, ((b * length) + j) * vocab);
        let best = 0;
        for (let v = 1; v < vocab; v++) if (row[v]! > row[best]!) best = v;
        ok &&= best === ids[j];
      }
      asked[s.type!] += 1;
      if (ok) right[s.type!] += 1;
    });
  }
  const total = QUESTION_TYPES.reduce((n, t) => n + asked[t], 0);
  const valAnswerAccuracyByType = Object.fromEntries(QUESTION_TYPES.map((t) => [t, asked[t] ? right[t] / asked[t] : NaN])) as Record<QuestionType, number>;
  const valAnswerAccuracy = QUESTION_TYPES.reduce((n, t) => n + right[t], 0) / Math.max(total, 1);
  const valCaptionAccuracy = context ? await captionsFromContext(training, tokenizer, batchSize, length, scenes) : NaN;
  return { valLoss: batches ? lossSum / batches : NaN, valAnswerAccuracy, valAnswerAccuracyByType, valCaptionAccuracy };
}

/**
 * The share of val scenes whose caption, decoded greedily after a description of the scene placed
 * before BOS, names every object right: how well the model reads what precedes its BOS, where
 * stage 2 will put the visual prompts.
 */
async function captionsFromContext(training: GraphTraining, tokenizer: Blip2Tokenizer, batchSize: number, length: number, scenes: number): Promise<number> {
  const newline = tokenizer.encode("\n", { addSpecialTokens: false })[0];
  // After a context the model may start a caption or a question: the caption is asked for.
  const question = tokenizer.encode("Question:", { addSpecialTokens: false })[0]!;
  let right = 0;
  for (let first = 0; first < scenes; first += batchSize) {
    const chunk = Array.from({ length: Math.min(batchSize, scenes - first) }, (_, i) => generateScene(sceneSeed("val", first + i)));
    const rows = chunk.map((scene) => encodeSequence(tokenizer, { context: captionScene(scene, 1)[0]!, text: "" }).ids);
    const written = chunk.map(() => [] as number[]);
    const open = new Set(chunk.map((_, i) => i));
    while (open.size) {
      // The graph has one batch size and length: rows past the chunk repeat its first, and every
      // row is right-padded, its next token read at its last position.
      const feeds = idsFeeds(tokenizer, Array.from({ length: batchSize }, (_, i) => rows[i] ?? rows[0]!), length);
      const out = await training.run(feeds);
      const logits = out.logits!.data as Float32Array;
      const vocab = out.logits!.dims[2]!;
      for (const i of [...open]) {
        const at = rows[i]!.length - 1;
        const row = logits.slice((i * length + at) * vocab, (i * length + at + 1) * vocab);
        if (!written[i]!.length) row[question] = -Infinity;
        const next = argmaxOf(row);
        rows[i]!.push(next);
        written[i]!.push(next);
        if (next === newline || rows[i]!.length >= length) open.delete(i);
      }
    }
    chunk.forEach((scene, i) => {
      if (captionMatchesScene(tokenizer.decode(written[i]!, { skipSpecialTokens: true }).trim(), scene)) right++;
    });
  }
  return scenes ? right / scenes : NaN;
}

function argmaxOf(row: Float32Array): number {
  let best = 0;
  for (let v = 1; v < row.length; v++) if (row[v]! > row[best]!) best = v;
  return best;
}

/**
 * The OPTForCausalLM folder's tensors and config, as the decoder graph reads them. The graph
 * builders take a Checkpoint (a BLIP-2 folder) and ask it only for tensors by name and for their
 * precision; this view answers those for a language-model folder alone.
 */
function openOpt(dir: string): { ckpt: Checkpoint; cfg: OptConfig } {
  const configFile = path.join(dir, "config.json");
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(fs.readFileSync(configFile, "utf8")) as Record<string, unknown>;
  } catch {
    throw new Blip2Error(`${configFile}: missing or not JSON (text pretraining takes an OPTForCausalLM folder)`);
  }
  if (json["model_type"] !== "opt") throw new Blip2Error(`${configFile}: model_type is ${JSON.stringify(json["model_type"])}, expected "opt" (an OPTForCausalLM folder)`);
  const cfg = parseBlip2Config({ model_type: "blip-2", text_config: json }, configFile).text as OptConfig;
  const file = path.join(dir, "model.safetensors");
  if (!fs.existsSync(file)) throw new Blip2Error(`${dir}: no model.safetensors (text pretraining reads a single safetensors file)`);
  const tensors = readSafetensorsHeader(file).tensors;
  const view = {
    dir: path.resolve(dir),
    config: { text: cfg },
    has: (name: string) => tensors.has(name),
    names: () => [...tensors.keys()],
    dtypeOf: () => "fp32" as const,
    tensor: (name: string, shape?: readonly number[]): TensorInfo => {
      const info = tensors.get(name);
      if (!info) throw new Blip2Error(`${file}: no tensor ${name}, which config.json needs`);
      if (shape && (shape.length !== info.shape.length || shape.some((d, i) => d !== info.shape[i]))) {
        throw new Blip2Error(`${file}: tensor ${name} has shape [${info.shape.join(", ")}] but config.json implies [${shape.join(", ")}]`);
      }
      if (info.dtype !== "F32") throw new Blip2Error(`${file}: tensor ${name} is ${info.dtype}; text pretraining trains float32 weights`);
      return info;
    },
  };
  return { ckpt: view as unknown as Checkpoint, cfg };
}

/** `out`: the model folder's files with every tensor replaced by its trained value. */
function writeOpt(model: string, out: string, tensors: Map<string, TrainedTensor>): void {
  const entries = [...tensors]
    .map(([name, t]) => ({ name, dtype: "F32" as const, shape: t.shape, bytes: encodeFloats(t.value, "F32", name) }))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const files: Record<string, { copy: string }> = { "config.json": { copy: path.join(model, "config.json") } };
  for (const f of fs.readdirSync(model).filter((f) => TOKENIZER_FILE.test(f))) files[f] = { copy: path.join(model, f) };
  writeModelFolder({ out, tensors: entries, files });
}
