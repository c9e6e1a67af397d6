/**
 * The frozen image encoder (EVA ViT-g in the released checkpoints): patch embedding, a class token,
 * learned position embeddings, pre-LN transformer blocks, and a final LayerNorm.
 */
import type { VisionConfig } from "../config.js";
import type { Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { activation, attend, expandToBatch, layerNormLayer, linearLayer, linearWith, mergeHeads, Params, splitHeads } from "./layers.js";

export interface VisionOutputs {
  lastHiddenState: Value;
  /** transformers applies post_layernorm a second time to the class token. */
  poolerOutput: Value;
  /** Embeddings, then each block's output before post_layernorm. */
  hiddenStates: Value[];
}

export function visionEncoder(p: Params, cfg: VisionConfig, pixelValues: Value): VisionOutputs {
  let x = embeddings(p.at("embeddings"), cfg, pixelValues);
  const hiddenStates = [x];
  for (let i = 0; i < cfg.numHiddenLayers; i++) {
    x = encoderLayer(p.at("encoder.layers").at(i), cfg, x);
    hiddenStates.push(x);
  }
  const post = p.at("post_layernorm");
  const lastHiddenState = layerNormLayer(post, x, cfg.hiddenSize, cfg.layerNormEps);
  const cls = op.squeeze(op.slice(lastHiddenState, [0], [1], [1]), [1]);
  const poolerOutput = layerNormLayer(post, cls, cfg.hiddenSize, cfg.layerNormEps);
  return { lastHiddenState, poolerOutput, hiddenStates };
}

function embeddings(p: Params, cfg: VisionConfig, pixelValues: Value): Value {
  const d = cfg.hiddenSize;
  const k = cfg.patchSize;
  const numPositions = (Math.floor(cfg.imageSize / k)) ** 2 + 1;
  // Patch embedding: a strided convolution, then [B, D, gh, gw] -> [B, gh*gw, D].
  const patches = op.conv(pixelValues, p.get("patch_embedding.weight", [d, 3, k, k]), p.get("patch_embedding.bias", [d]), k);
  const tokens = op.transpose(op.reshape(patches, [0, 0, -1]), [0, 2, 1]);
  const cls = expandToBatch(p.get("class_embedding", [1, 1, d]), pixelValues);
  const x = op.concat([cls, tokens], 1);
  return op.add(x, p.get("position_embedding", [1, numPositions, d]));
}

function encoderLayer(p: Params, cfg: VisionConfig, x: Value): Value {
  const d = cfg.hiddenSize;
  const h = op.add(x, selfAttention(p.at("self_attn"), cfg, layerNormLayer(p.at("layer_norm1"), x, d, cfg.layerNormEps)));
  const mlp = p.at("mlp");
  // The MLP runs on the tokens as one matrix [B * tokens, D]: ONNX Runtime's arena for the image
  // path then holds less memory beyond its weights than with [B, tokens, D] tensors throughout.
  const y = op.byRows(layerNormLayer(p.at("layer_norm2"), h, d, cfg.layerNormEps), d, (tokens) =>
    linearLayer(mlp.at("fc2"), activation(linearLayer(mlp.at("fc1"), tokens, d, cfg.intermediateSize), cfg.hiddenAct), cfg.intermediateSize, d),
  );
  return op.add(h, y);
}

/** Fused qkv projection; its bias is [q_bias, 0, v_bias] (keys have no bias). */
function selfAttention(p: Params, cfg: VisionConfig, x: Value): Value {
  const d = cfg.hiddenSize;
  const heads = cfg.numAttentionHeads;
  const qkv = linearWith(p, "qkv.weight", x, d, 3 * d, qkvBias(p, cfg));
  const part = (i: number) => splitHeads(op.slice(qkv, [i * d], [(i + 1) * d], [-1]), heads);
  const context = attend(part(0), part(1), part(2), (d / heads) ** -0.5, null);
  return linearLayer(p.at("projection"), mergeHeads(context), d, d);
}

/**
 * Checkpoints converted by older transformers store `q_bias` and `v_bias`; newer ones store the
 * fused `qkv.bias` directly (and it is used as stored).
 */
function qkvBias(p: Params, cfg: VisionConfig): Value | null {
  const d = cfg.hiddenSize;
  if (p.has("qkv.bias")) return p.get("qkv.bias", [3 * d]);
  if (!cfg.qkvBias) return null;
  const zeros = p.graph.constant(new Float32Array(d), "float32", [d]);
  return op.concat([p.get("q_bias", [d]), zeros, p.get("v_bias", [d])], 0);
}
