/**
 * What the unimodal pretrainings (vision.ts, language.ts) share: a training graph whose trained
 * tensors are graph inputs, run forward and backward in one ONNX Runtime session, updated by AdamW
 * on float32 master copies under BLIP-2's warmup-then-cosine schedule.
 */
import os from "node:os";
import * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import type { Graph, Value } from "../ir/graph.js";
import { gradients } from "../autodiff/backward.js";
import { CompiledGraph, type RuntimeOptions } from "../runtime/session.js";
import { AdamW, globalNorm } from "./optimizer.js";
import { lrAt, type CosineSchedule } from "./schedule.js";

/** A tensor trained by a pretraining: its graph input, shape and float32 master copy. */
export interface TrainedTensor {
  input: Value;
  shape: number[];
  value: Float32Array;
}

export interface OptimizerSettings {
  lr: number;
  minLr: number;
  warmupSteps: number;
  weightDecay: number;
}

/** What a pretraining reports after each step. */
export interface PretrainStep {
  step: number;
  totalSteps: number;
  loss: number;
  lr: number;
  gradNorm: number;
  /** Seconds since training started. */
  elapsed: number;
}

/**
 * Appends `grad.<name>` outputs for every trained tensor to `g` (whose loss is `loss`), compiles it
 * and runs steps: feeds plus the current values in, AdamW on the gradients out.
 */
export class GraphTraining {
  private readonly optimizer: AdamW;
  private stepsDone = 0;

  private constructor(
    private readonly session: CompiledGraph,
    readonly tensors: Map<string, TrainedTensor>,
    private readonly schedule: CosineSchedule,
    weightDecay: number,
  ) {
    // AdamW's default rule: matrices decay, biases, LayerNorm gains and embeddings' vectors do not.
    this.optimizer = new AdamW([...tensors].map(([name, t]) => ({ name, shape: t.shape, value: t.value })), { weightDecay });
  }

  static async create(g: Graph, loss: Value, tensors: Map<string, TrainedTensor>, settings: OptimizerSettings & { totalSteps: number }, runtime: RuntimeOptions = {}): Promise<GraphTraining> {
    g.output(loss, "loss");
    const names = [...tensors.keys()];
    gradients(loss, names.map((n) => tensors.get(n)!.input)).forEach((grad, i) => g.output(grad, `grad.${names[i]}`));
    // Training sessions keep the backward's temporaries apart (see SessionOptions.foldConstants).
    const session = await CompiledGraph.create(g, { worker: false, ...runtime, foldConstants: false });
    const schedule: CosineSchedule = { lr: settings.lr, minLr: settings.minLr, warmupLr: settings.lr / 100, warmupSteps: Math.min(settings.warmupSteps, settings.totalSteps), totalSteps: settings.totalSteps };
    return new GraphTraining(session, tensors, schedule, settings.weightDecay);
  }

  /** The graph's outputs for `feeds` at the current values (no update). */
  async run(feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>> {
    for (const [name, t] of this.tensors) feeds[name] = new ort.Tensor("float32", t.value, t.shape);
    return this.session.run(feeds);
  }

  /** One optimizer step on `feeds`; returns the loss, the rate and the gradient norm, and the graph's other outputs. */
  async step(feeds: Record<string, ort.Tensor>): Promise<{ loss: number; lr: number; gradNorm: number; outputs: Record<string, ort.Tensor> }> {
    const outputs = await this.run(feeds);
    const loss = Number(outputs.loss!.data[0]);
    if (!Number.isFinite(loss)) throw new Blip2Error(`step ${this.stepsDone + 1}: the loss is not finite (${loss}); try a lower learning rate`);
    const grads = new Map<string, Float32Array>();
    for (const name of this.tensors.keys()) grads.set(name, outputs[`grad.${name}`]!.data as Float32Array);
    const lr = lrAt(this.stepsDone, this.schedule);
    this.optimizer.step(grads, lr);
    this.stepsDone += 1;
    return { loss, lr, gradNorm: globalNorm(grads), outputs };
  }

  release(): Promise<void> {
    return this.session.release();
  }
}

/** The CPU this runs on, for reports ("AMD EPYC 7B13, 2 cores"). */
export function cpuDescription(): string {
  const cpus = os.cpus();
  return `${cpus[0]?.model.trim() ?? "unknown CPU"}, ${cpus.length} core${cpus.length === 1 ? "" : "s"}`;
}

export function checkCount(what: string, v: number, min = 1): void {
  if (!Number.isSafeInteger(v) || v < min) throw new Blip2Error(`${what} must be a whole number >= ${min}, got ${v}`);
}
