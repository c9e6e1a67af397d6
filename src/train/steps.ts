/**
 * One training step's forward and backward for each stage: the graph for the batch's shape
 * (compiled once per shape), the trained tensors fed from the trainer's float32 master copies, the
 * loss terms and gradients read back.
 */
import * as ort from "onnxruntime-node";
import type { Checkpoint } from "../io/checkpoint.js";
import { Blip2Error } from "../errors.js";
import type { Graph } from "../ir/graph.js";
import { DROPOUT_SEED } from "../models/dropout.js";
import { CompiledGraph, type RuntimeOptions } from "../runtime/session.js";
import { shiftedTargets } from "./losses.js";
import type { Rng } from "./rng.js";
import { multimodalCausalBias, stage1Graph, type Stage1Shape } from "./stage1.js";
import { stage2Feeds, stage2Graph, type Stage2Batch, type Stage2Shape } from "./stage2.js";

export interface StepOutput {
  /** `loss` and, in stage 1, `loss_itc`, `loss_itm`, `loss_itg`. */
  losses: Record<string, number>;
  /** d loss / d tensor for every trained tensor, by checkpoint name. */
  grads: Map<string, Float32Array>;
  /** Each gradient's shape (its tensor's). */
  shapes: Map<string, number[]>;
  /** The graph's other outputs (similarities, logits). */
  outputs: Record<string, ort.Tensor>;
}

/** Stage 1's hard negatives: for each text an image, for each image a text (batch indices). */
export interface Negatives {
  imageForText: number[];
  textForImage: number[];
}

/** One stage-1 batch as Q-Former token ids ([CLS] first, padded to one length). */
export interface Stage1Batch {
  inputIds: number[][];
  attentionMask: number[][];
  /** Replaces [CLS] for ITG (the tokenizer's bos_token). */
  decTokenId: number;
  padTokenId: number;
}

/** Compiled graphs by shape, built on first use. */
class GraphsByShape {
  private readonly compiled = new Map<string, Promise<{ graph: Graph; session: CompiledGraph }>>();

  constructor(private readonly runtime: RuntimeOptions) {}

  get(key: string, build: () => Graph): Promise<{ graph: Graph; session: CompiledGraph }> {
    let hit = this.compiled.get(key);
    if (!hit) {
      hit = (async () => {
        const graph = build();
        // Unfolded: the backward's dequantized weights stay per-product temporaries (see SessionOptions).
        return { graph, session: await CompiledGraph.create(graph, { worker: false, ...this.runtime, foldConstants: false }) };
      })();
      this.compiled.set(key, hit);
    }
    return hit;
  }

  async release(): Promise<void> {
    const all = [...this.compiled.values()];
    this.compiled.clear();
    await Promise.all(all.map(async (c) => (await c).session.release()));
  }
}

async function runTraining(graph: Graph, session: CompiledGraph, feeds: Record<string, ort.Tensor>, params: ReadonlyMap<string, Float32Array>): Promise<StepOutput> {
  for (const [name, v] of graph.trained) {
    const value = params.get(name);
    if (!value) throw new Error(`internal: no value for trained tensor ${name}`);
    feeds[name] = new ort.Tensor("float32", value, v.shape as number[]);
  }
  const out = await session.run(feeds);
  const losses: Record<string, number> = {};
  const grads = new Map<string, Float32Array>();
  const shapes = new Map<string, number[]>();
  const outputs: Record<string, ort.Tensor> = {};
  for (const [key, t] of Object.entries(out)) {
    if (key.startsWith("grad.")) {
      grads.set(key.slice(5), t.data as Float32Array);
      shapes.set(key.slice(5), [...t.dims]);
    }
    else if (key === "loss" || key.startsWith("loss_")) losses[key] = Number(t.data[0]);
    else outputs[key] = t;
  }
  return { losses, grads, shapes, outputs };
}

/**
 * Options of a step. `dropoutSeed`: run with dropout in the Q-Former (and, in stage 2, in the frozen
 * language model, as LAVIS leaves it in train mode), its masks a function of this seed alone (an
 * integer in [0, 2^32), e.g. `rng.nextUint32()` from the trainer's generator), so a resumed run
 * repeats them; without it, no dropout.
 */
export interface StepOptions {
  dropoutSeed?: number;
  /** Stage 2: the loss alone, no backward (evaluation). */
  lossOnly?: boolean;
}

function dropoutFeed(seed: number | undefined): Record<string, ort.Tensor> {
  if (seed === undefined) return {};
  if (!Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) throw new Blip2Error(`dropout seed must be an integer in [0, 2^32), got ${seed}`);
  return { [DROPOUT_SEED]: new ort.Tensor("int64", BigInt64Array.from([BigInt(seed)]), []) };
}

const int64 = (rows: number[][]) => new ort.Tensor("int64", BigInt64Array.from(rows.flat().map(BigInt)), [rows.length, rows[0]!.length]);
const vector = (xs: number[]) => new ort.Tensor("int64", BigInt64Array.from(xs.map(BigInt)), [xs.length]);

export class Stage1Step {
  private readonly graphs: GraphsByShape;

  constructor(
    readonly checkpoint: Checkpoint,
    runtime: RuntimeOptions = {},
  ) {
    this.graphs = new GraphsByShape(runtime);
  }

  /**
   * Loss terms and gradients for a batch. `negatives`: given, or drawn in the graph from the ITC
   * similarities (LAVIS: softmax of each row with its own pair masked out) with uniforms from `rng`.
   */
  async run(batch: Stage1Batch, features: ort.Tensor, params: ReadonlyMap<string, Float32Array>, negatives: Negatives | Rng, options: { logits?: boolean } & StepOptions = {}): Promise<StepOutput> {
    const shape: Stage1Shape = { batch: batch.inputIds.length, length: batch.inputIds[0]!.length };
    const dropout = options.dropoutSeed !== undefined;
    const given = "imageForText" in negatives;
    const q = this.checkpoint.config.numQueryTokens;
    const decoderIds = batch.inputIds.map((row) => [batch.decTokenId, ...row.slice(1)]);
    const labels = decoderIds.map((row, i) => row.map((id, j) => (batch.attentionMask[i]![j] === 0 || id === batch.padTokenId ? -100 : id)));
    const itg = shiftedTargets(labels);
    const feeds: Record<string, ort.Tensor> = {
      image_features: features,
      input_ids: int64(batch.inputIds),
      attention_mask: int64(batch.attentionMask),
      ...dropoutFeed(options.dropoutSeed),
      decoder_input_ids: int64(decoderIds),
      itg_bias: new ort.Tensor("float32", multimodalCausalBias(batch.attentionMask, q), [shape.batch, 1, q + shape.length, q + shape.length]),
      itg_targets: new ort.Tensor("int64", itg.targets, itg.shape),
      itg_weights: new ort.Tensor("float32", itg.weights, itg.shape),
    };
    if (given) {
      feeds.image_for_text = vector(negatives.imageForText);
      feeds.text_for_image = vector(negatives.textForImage);
    } else {
      // In (0, 1]: see stage1.ts's drawNegatives.
      feeds.negative_draws = new ort.Tensor("float32", Float32Array.from({ length: 2 * shape.batch }, () => 1 - negatives.uniform()), [2, shape.batch]);
    }
    const key = `stage1 ${shape.batch}x${shape.length}${options.logits ? " logits" : ""}${dropout ? " dropout" : ""}${given ? " given" : ""}`;
    const { graph, session } = await this.graphs.get(key, () => stage1Graph(this.checkpoint, shape, { logits: options.logits, dropout, negatives: given ? "given" : "drawn" }));
    const out = await runTraining(graph, session, feeds, params);
    out.outputs.image_for_text = out.outputs.image_for_text_drawn!;
    out.outputs.text_for_image = out.outputs.text_for_image_drawn!;
    return out;
  }

  release(): Promise<void> {
    return this.graphs.release();
  }
}

export class Stage2Step {
  private readonly graphs: GraphsByShape;

  constructor(
    readonly checkpoint: Checkpoint,
    runtime: RuntimeOptions = {},
  ) {
    this.graphs = new GraphsByShape(runtime);
  }

  async run(batch: Stage2Batch, features: ort.Tensor, params: ReadonlyMap<string, Float32Array>, options: StepOptions = {}): Promise<StepOutput> {
    const { shape, feeds } = stage2Feeds(this.checkpoint.config, batch);
    const seed = dropoutFeed(options.dropoutSeed);
    const dropout = options.dropoutSeed !== undefined;
    const lossOnly = options.lossOnly === true;
    const key = `stage2 ${shapeKey(shape)}${dropout ? " dropout" : ""}${lossOnly ? " loss" : ""}`;
    const { graph, session } = await this.graphs.get(key, () => stage2Graph(this.checkpoint, shape, { dropout, gradients: !lossOnly }));
    return runTraining(graph, session, { ...feeds, image_features: features, ...seed }, params);
  }

  release(): Promise<void> {
    return this.graphs.release();
  }
}

const shapeKey = (s: Stage2Shape) => `${s.batch}x${s.length}x${s.targetLength ?? 0}`;
