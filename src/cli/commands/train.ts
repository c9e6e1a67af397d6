/**
 * `blip2 train`: BLIP-2's stage 1 (ITC + ITM + ITG) or stage 2 (language modelling through a frozen
 * OPT or T5) on a data set, writing a Hugging Face checkpoint that resumes exactly.
 */
import { parseDTypeSpec } from "../../quantize/dtype.js";
import type { WeightDType } from "../../io/weightFormat.js";
import { train, type StepInfo } from "../../train/trainer.js";
import { imageBackendOption } from "../shared.js";
import { intOption, numberOption, requiredOption, stringOption, UsageError, type Command, type Io, type ParsedArgs } from "../command.js";

export const trainCommand: Command = {
  name: "train",
  summary: "train the Q-Former: stage 1 (ITC + ITM + ITG) or stage 2 (through a frozen OPT or T5)",
  usage: "blip2 train --stage 1|2 --model DIR --data FILE --out DIR [--steps N | --epochs N] [options]",
  help: [
    "--stage 1|2              1: representation learning; 2: generative learning (see blip2 compose)",
    "--model DIR              the checkpoint to start from",
    "--data FILE              JSONL {\"image\", \"text\"} lines, a COCO captions JSON, or a folder of",
    "                         images with same-name .txt captions",
    "--out DIR                the trained checkpoint (and the state to resume from); an earlier run",
    "                         of the same training there is continued",
    "--steps N | --epochs N   how long (default: one epoch)",
    "--batch-size N           pairs per micro-batch (default 8)",
    "--grad-accum N           micro-batches per optimizer step (default 1)",
    "--lr X, --min-lr X       peak and final learning rate (default 1e-4, 1e-5: LAVIS's)",
    "--warmup-steps N         linear warmup from --warmup-lr (default 1e-6) over N steps (stage 1 5000, stage 2 2000)",
    "--warmup-lr X",
    "--weight-decay X         AdamW's (default 0.05; not on biases, norms, vectors, temp)",
    "--clip-grad-norm X       clip the global gradient norm (default: off; the norm is reported)",
    "--prompt TEXT            stage 2: the text before each caption (OPT) or given to T5's encoder",
    "--max-text-length N      tokens per caption (default 32)",
    "--seed N                 shuffling, negatives, dropout (default 42)",
    "--save-every N           also save every N steps (default: at the end)",
    "--resume DIR             continue the run saved in DIR",
    "--eval FILE              report the mean loss on this data at the end",
    "--dtype D                precision of the frozen parts: fp32 (default), fp16, q8, q4",
    "--augment                random resized crops and flips (image features then are not cached)",
    "--no-dropout             train without dropout",
    "--image-backend B        torchvision (transformers 5 resizing, default) or pil (transformers 4)",
    "--threads N              threads per ONNX Runtime session (default: all cores)",
    "--json                   one JSON line per step on stdout instead of the progress line",
  ].join("\n"),
  options: {
    stage: { type: "string" },
    model: { type: "string", short: "m" },
    data: { type: "string" },
    out: { type: "string" },
    steps: { type: "string" },
    epochs: { type: "string" },
    "batch-size": { type: "string" },
    "grad-accum": { type: "string" },
    lr: { type: "string" },
    "min-lr": { type: "string" },
    "warmup-steps": { type: "string" },
    "warmup-lr": { type: "string" },
    "weight-decay": { type: "string" },
    "clip-grad-norm": { type: "string" },
    prompt: { type: "string" },
    "max-text-length": { type: "string" },
    seed: { type: "string" },
    "save-every": { type: "string" },
    resume: { type: "string" },
    eval: { type: "string" },
    dtype: { type: "string" },
    augment: { type: "boolean" },
    "no-dropout": { type: "boolean" },
    "image-backend": { type: "string" },
    threads: { type: "string" },
    json: { type: "boolean" },
  },
  async run(args, io) {
    if (args.positionals.length) throw new UsageError(`train: unexpected argument ${JSON.stringify(args.positionals[0])}`);
    const stage = stageOption(args, "train");
    const steps = intOption(args, "steps", 1);
    const epochs = intOption(args, "epochs", 1);
    if (steps !== undefined && epochs !== undefined) throw new UsageError("train: give --steps or --epochs, not both");
    const positive = (x: number) => x > 0;
    const json = args.values.json === true;
    const progress = progressLine(io, json);
    const controller = new AbortController();
    const stop = () => controller.abort();
    process.once("SIGINT", stop);
    try {
      const result = await train({
        stage,
        model: requiredOption(args, "train", "model"),
        data: requiredOption(args, "train", "data"),
        out: requiredOption(args, "train", "out"),
        steps,
        epochs,
        batchSize: intOption(args, "batch-size", 1),
        gradAccum: intOption(args, "grad-accum", 1),
        lr: numberOption(args, "lr", positive, "a number > 0"),
        minLr: numberOption(args, "min-lr", (x) => x >= 0, "a number >= 0"),
        warmupSteps: intOption(args, "warmup-steps", 0),
        warmupLr: numberOption(args, "warmup-lr", (x) => x >= 0, "a number >= 0"),
        weightDecay: numberOption(args, "weight-decay", (x) => x >= 0, "a number >= 0"),
        clipGradNorm: numberOption(args, "clip-grad-norm", positive, "a number > 0"),
        prompt: stringOption(args, "prompt"),
        maxTextLength: intOption(args, "max-text-length", 2),
        seed: intOption(args, "seed", 0),
        saveEvery: intOption(args, "save-every", 1),
        resume: stringOption(args, "resume"),
        eval: stringOption(args, "eval"),
        dtype: dtypeOption(args),
        augment: args.values.augment === true,
        dropout: args.values["no-dropout"] !== true,
        imageBackend: imageBackendOption(args),
        runtime: { threads: intOption(args, "threads", 1) },
        onStep: progress.step,
        onNotice: (m) => {
          progress.clear();
          io.stderr.write(`blip2: ${m}\n`);
        },
        signal: controller.signal,
      });
      progress.clear();
      const losses = Object.entries(result.losses).map(([k, v]) => `${k} ${v.toFixed(4)}`).join(", ");
      const evalPart = result.evalLoss !== undefined ? `; eval loss ${result.evalLoss.toFixed(4)}` : "";
      const summary = `${result.stopped ? "stopped" : "trained"} ${result.steps} steps (${losses}${evalPart}); checkpoint in ${result.out}`;
      if (json) io.stdout.write(`${JSON.stringify({ done: true, ...result })}\n`);
      else io.stdout.write(`${summary}\n`);
      return result.stopped ? 130 : 0;
    } finally {
      process.off("SIGINT", stop);
      progress.clear();
    }
  },
};

export function stageOption(args: ParsedArgs, command: string): 1 | 2 {
  const v = requiredOption(args, command, "stage");
  if (v !== "1" && v !== "2") throw new UsageError(`invalid value for --stage: expected 1 or 2, got ${JSON.stringify(v)}`);
  return Number(v) as 1 | 2;
}

/** --dtype for the frozen parts: one precision. */
export function dtypeOption(args: ParsedArgs): WeightDType | undefined {
  const v = stringOption(args, "dtype");
  if (v === undefined) return undefined;
  let spec;
  try {
    spec = parseDTypeSpec(v);
  } catch (err) {
    throw new UsageError(`invalid value for --dtype: ${(err as Error).message}`);
  }
  if (typeof spec !== "string") throw new UsageError(`invalid value for --dtype: training takes one precision for the frozen parts (fp32, fp16, q8, q4), got ${JSON.stringify(v)}`);
  return spec;
}

function progressLine(io: Io, json: boolean) {
  const tty = io.stderr.isTTY === true && !json;
  let drawn = false;
  return {
    step(s: StepInfo) {
      if (json) {
        io.stdout.write(`${JSON.stringify({ step: s.step, total: s.totalSteps, epoch: s.epoch, ...s.losses, lr: s.lr, grad_norm: s.gradNorm, samples_per_s: s.samplesPerSecond, eta_s: s.eta })}\n`);
        return;
      }
      const terms = Object.entries(s.losses).map(([k, v]) => `${k.replace("loss_", "")} ${v.toFixed(4)}`).join("  ");
      const line = `step ${s.step}/${s.totalSteps}  ${terms}  lr ${s.lr.toExponential(2)}  ${s.samplesPerSecond.toFixed(2)} samples/s  ETA ${duration(s.eta)}`;
      if (tty) {
        io.stderr.write(`\r${line.padEnd(110)}`);
        drawn = true;
      } else if (s.step === s.totalSteps || s.step % 10 === 0) {
        io.stderr.write(`${line}\n`);
      }
    },
    clear() {
      if (drawn) io.stderr.write(`\r${" ".repeat(110)}\r`);
      drawn = false;
    },
  };
}

function duration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "?";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

