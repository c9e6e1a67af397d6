/**
 * Fresh, randomly initialised models for BLIP-2 trained from scratch on the synthetic world, in
 * Hugging Face layouts:
 * - `writeFreshRetrieval`: a Blip2ForImageTextRetrieval checkpoint (vision encoder, Q-Former with
 *   text input, ITM head, ITC projections; the Q-Former's WordPiece tokenizer with `[DEC]`; the
 *   image processor at the model's image size), what the vision pretraining and then stage 1 start from;
 * - `writeFreshOpt`: an OPTForCausalLM folder (`model.decoder.*`, the head tied to the token
 *   embeddings; a byte-level BPE learned from the world's text), what the text pretraining starts from.
 *
 * Initialised as transformers' `_init_weights` does: Linear, Conv2d and Embedding weights
 * normal(0, initializer_range), biases 0, LayerNorm weight 1 and bias 0, OPT's padding row 0. One
 * departure: the query tokens are drawn normal(0, initializer_range) as LAVIS draws them, where
 * transformers zeroes them (its checkpoints are always loaded over it): the Q-Former's queries have
 * no position embedding, so equal queries would get equal gradients and never become different.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { OPENAI_CLIP_MEAN, OPENAI_CLIP_STD } from "../image/imageProcessor.js";
import { checkOutDir, encodeFloats, writeModelFolder, type TensorEntry } from "./checkpoint.js";
import { Rng } from "./rng.js";
import { worldBpeTokenizer, worldCorpus, worldWordPieceTokenizer } from "./worldTokenizers.js";

export interface VisionSize {
  hiddenSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  intermediateSize: number;
  imageSize: number;
  patchSize: number;
}

export interface QFormerSize {
  hiddenSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  intermediateSize: number;
  /** A cross-attention layer every this many layers (the first is one). */
  crossAttentionFrequency: number;
  numQueryTokens: number;
  /** The ITC embedding size (`image_text_hidden_size`). */
  imageTextHiddenSize: number;
  maxPositionEmbeddings: number;
}

export interface OptSize {
  hiddenSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  ffnDim: number;
  maxPositionEmbeddings: number;
}

/** A ViT of four blocks at 64 px (8 px patches, 65 tokens). */
export const SMALL_VISION: VisionSize = { hiddenSize: 128, numHiddenLayers: 4, numAttentionHeads: 4, intermediateSize: 512, imageSize: 64, patchSize: 8 };
export const SMALL_QFORMER: QFormerSize = { hiddenSize: 128, numHiddenLayers: 4, numAttentionHeads: 4, intermediateSize: 512, crossAttentionFrequency: 1, numQueryTokens: 8, imageTextHiddenSize: 128, maxPositionEmbeddings: 64 };
export const SMALL_OPT: OptSize = { hiddenSize: 128, numHiddenLayers: 4, numAttentionHeads: 4, ffnDim: 512, maxPositionEmbeddings: 128 };

const INITIALIZER_RANGE = 0.02;

/** Tensors drawn in a fixed order from one generator: the same seed, the same checkpoint. */
class Init {
  readonly tensors: TensorEntry[] = [];
  private readonly rng: Rng;

  constructor(seed: number) {
    this.rng = new Rng(seed);
  }

  private add(name: string, shape: number[], data: Float32Array): void {
    this.tensors.push({ name, dtype: "F32", shape, bytes: encodeFloats(data, "F32", name) });
  }

  /** normal(0, std); with `zeroRow`, that row is 0 (nn.Embedding's padding_idx). */
  normal(name: string, shape: number[], std = INITIALIZER_RANGE, zeroRow?: number): void {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < data.length; i++) data[i] = std * this.rng.normal();
    if (zeroRow !== undefined) data.fill(0, zeroRow * shape[1]!, (zeroRow + 1) * shape[1]!);
    this.add(name, shape, data);
  }

  fill(name: string, shape: number[], value: number): void {
    this.add(name, shape, new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(value));
  }

  linear(prefix: string, outF: number, inF: number, bias = true): void {
    this.normal(`${prefix}.weight`, [outF, inF]);
    if (bias) this.fill(`${prefix}.bias`, [outF], 0);
  }

  layerNorm(prefix: string, dim: number): void {
    this.fill(`${prefix}.weight`, [dim], 1);
    this.fill(`${prefix}.bias`, [dim], 0);
  }

  sorted(): TensorEntry[] {
    return [...this.tensors].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }
}

export interface FreshRetrievalOptions {
  out: string;
  seed?: number;
  vision?: VisionSize;
  qformer?: QFormerSize;
  /** The language model stage 2 will use, its config.json (recorded as `text_config`; default: `SMALL_OPT` with the world's BPE). */
  text?: Record<string, unknown>;
  /** The text the tokenizer is built from (default `worldCorpus()`). */
  corpus?: string[];
}

/** Writes a fresh Blip2ForImageTextRetrieval checkpoint into `out` (missing or empty). */
export function writeFreshRetrieval(options: FreshRetrievalOptions): void {
  const v = options.vision ?? SMALL_VISION;
  const q = options.qformer ?? SMALL_QFORMER;
  checkSizes(v, q);
  checkOutDir(options.out, null);
  const corpus = options.corpus ?? worldCorpus();
  const tokenizer = worldWordPieceTokenizer(corpus);
  const text = options.text ?? optConfig(SMALL_OPT, worldBpeTokenizer(corpus).vocabSize);
  const init = new Init(options.seed ?? 0);
  visionTensors(init, "vision_model.", v);
  qformerTensors(init, q, v.hiddenSize, tokenizer.vocabSize);
  const files: Record<string, string> = { ...tokenizer.files };
  files["config.json"] = toJson(retrievalConfig(v, q, tokenizer.vocabSize, text));
  files["preprocessor_config.json"] = toJson(imageProcessorConfig(v.imageSize));
  files["processor_config.json"] = toJson({ num_query_tokens: q.numQueryTokens, processor_class: "Blip2Processor" });
  writeModelFolder({ out: options.out, tensors: init.sorted(), files });
}

/** The tensors of Blip2VisionModel under `prefix` (`vision_model.` in BLIP-2, nothing in a Blip2VisionModel folder). */
function visionTensors(init: Init, prefix: string, v: VisionSize): void {
  const d = v.hiddenSize;
  const tokens = (v.imageSize / v.patchSize) ** 2 + 1;
  init.normal(`${prefix}embeddings.class_embedding`, [1, 1, d]);
  init.normal(`${prefix}embeddings.patch_embedding.weight`, [d, 3, v.patchSize, v.patchSize]);
  init.fill(`${prefix}embeddings.patch_embedding.bias`, [d], 0);
  init.normal(`${prefix}embeddings.position_embedding`, [1, tokens, d]);
  for (let i = 0; i < v.numHiddenLayers; i++) {
    const layer = `${prefix}encoder.layers.${i}.`;
    init.layerNorm(`${layer}layer_norm1`, d);
    // The fused query/key/value projection; its bias is [q_bias, 0, v_bias] (keys have none).
    init.linear(`${layer}self_attn.qkv`, 3 * d, d);
    init.linear(`${layer}self_attn.projection`, d, d);
    init.layerNorm(`${layer}layer_norm2`, d);
    init.linear(`${layer}mlp.fc1`, v.intermediateSize, d);
    init.linear(`${layer}mlp.fc2`, d, v.intermediateSize);
  }
  init.layerNorm(`${prefix}post_layernorm`, d);
}

function qformerTensors(init: Init, q: QFormerSize, visionHidden: number, vocabSize: number): void {
  const h = q.hiddenSize;
  init.normal("query_tokens", [1, q.numQueryTokens, h]);
  init.normal("embeddings.word_embeddings.weight", [vocabSize, h]);
  init.normal("embeddings.position_embeddings.weight", [q.maxPositionEmbeddings, h]);
  init.layerNorm("qformer.layernorm", h);
  const attention = (prefix: string, keyDim: number) => {
    init.linear(`${prefix}.attention.query`, h, h);
    init.linear(`${prefix}.attention.key`, h, keyDim);
    init.linear(`${prefix}.attention.value`, h, keyDim);
    init.linear(`${prefix}.output.dense`, h, h);
    init.layerNorm(`${prefix}.output.LayerNorm`, h);
  };
  for (let i = 0; i < q.numHiddenLayers; i++) {
    const layer = `qformer.encoder.layer.${i}`;
    attention(`${layer}.attention`, h);
    if (i % q.crossAttentionFrequency === 0) attention(`${layer}.crossattention`, visionHidden);
    // The text's feed-forward and the queries' own.
    for (const [inner, outer] of [["intermediate", "output"], ["intermediate_query", "output_query"]]) {
      init.linear(`${layer}.${inner}.dense`, q.intermediateSize, h);
      init.linear(`${layer}.${outer}.dense`, h, q.intermediateSize);
      init.layerNorm(`${layer}.${outer}.LayerNorm`, h);
    }
  }
  init.linear("vision_projection", q.imageTextHiddenSize, h);
  init.linear("text_projection", q.imageTextHiddenSize, h);
  init.linear("itm_head", 2, h);
}

function visionConfig(v: VisionSize): Record<string, unknown> {
  return {
    attention_dropout: 0.0,
    hidden_act: "gelu",
    hidden_size: v.hiddenSize,
    image_size: v.imageSize,
    initializer_range: 1e-10,
    intermediate_size: v.intermediateSize,
    layer_norm_eps: 1e-6,
    model_type: "blip_2_vision_model",
    num_attention_heads: v.numAttentionHeads,
    num_hidden_layers: v.numHiddenLayers,
    patch_size: v.patchSize,
    qkv_bias: true,
  };
}

function retrievalConfig(v: VisionSize, q: QFormerSize, vocabSize: number, text: Record<string, unknown>): Record<string, unknown> {
  return {
    architectures: ["Blip2ForImageTextRetrieval"],
    image_text_hidden_size: q.imageTextHiddenSize,
    image_token_index: null,
    initializer_factor: 1.0,
    initializer_range: INITIALIZER_RANGE,
    model_type: "blip-2",
    num_query_tokens: q.numQueryTokens,
    qformer_config: {
      attention_probs_dropout_prob: 0.1,
      cross_attention_frequency: q.crossAttentionFrequency,
      encoder_hidden_size: v.hiddenSize,
      hidden_act: "gelu",
      hidden_dropout_prob: 0.1,
      hidden_size: q.hiddenSize,
      initializer_range: INITIALIZER_RANGE,
      intermediate_size: q.intermediateSize,
      layer_norm_eps: 1e-12,
      max_position_embeddings: q.maxPositionEmbeddings,
      model_type: "blip_2_qformer",
      num_attention_heads: q.numAttentionHeads,
      num_hidden_layers: q.numHiddenLayers,
      pad_token_id: 0,
      use_qformer_text_input: true,
      vocab_size: vocabSize,
    },
    text_config: Object.fromEntries(Object.entries(text).filter(([k]) => k !== "architectures")),
    torch_dtype: "float32",
    use_decoder_only_language_model: true,
    vision_config: visionConfig(v),
  };
}

/** BlipImageProcessor at `size`: bicubic resize, rescale 1/255, CLIP mean and std. */
function imageProcessorConfig(size: number): Record<string, unknown> {
  return {
    do_convert_rgb: true,
    do_normalize: true,
    do_rescale: true,
    do_resize: true,
    image_mean: OPENAI_CLIP_MEAN,
    image_processor_type: "BlipImageProcessor",
    image_std: OPENAI_CLIP_STD,
    resample: 3,
    rescale_factor: 1 / 255,
    size: { height: size, width: size },
  };
}

// ---- OPT ---------------------------------------------------------------------------------------

export interface FreshOptOptions {
  out: string;
  seed?: number;
  size?: OptSize;
  corpus?: string[];
}

/** OPT's learned positions start at 2 (fairseq's padding offset). */
const OPT_POSITION_OFFSET = 2;
const OPT_PAD = 1;

/** Writes a fresh OPTForCausalLM folder into `out` (missing or empty). */
export function writeFreshOpt(options: FreshOptOptions): void {
  const s = options.size ?? SMALL_OPT;
  if (s.hiddenSize % s.numAttentionHeads !== 0) throw new Blip2Error(`OPT size: hidden size ${s.hiddenSize} is not divisible by ${s.numAttentionHeads} heads`);
  checkOutDir(options.out, null);
  const tokenizer = worldBpeTokenizer(options.corpus ?? worldCorpus());
  const init = new Init(options.seed ?? 0);
  const h = s.hiddenSize;
  const vocab = tokenizer.vocabSize;
  init.normal("model.decoder.embed_tokens.weight", [vocab, h], INITIALIZER_RANGE, OPT_PAD);
  init.normal("model.decoder.embed_positions.weight", [s.maxPositionEmbeddings + OPT_POSITION_OFFSET, h]);
  for (let i = 0; i < s.numHiddenLayers; i++) {
    const layer = `model.decoder.layers.${i}`;
    init.layerNorm(`${layer}.self_attn_layer_norm`, h);
    for (const p of ["q_proj", "k_proj", "v_proj", "out_proj"]) init.linear(`${layer}.self_attn.${p}`, h, h);
    init.layerNorm(`${layer}.final_layer_norm`, h);
    init.linear(`${layer}.fc1`, s.ffnDim, h);
    init.linear(`${layer}.fc2`, h, s.ffnDim);
  }
  init.layerNorm("model.decoder.final_layer_norm", h);
  const files: Record<string, string> = { ...tokenizer.files };
  files["config.json"] = toJson({ architectures: ["OPTForCausalLM"], ...optConfig(s, vocab) });
  files["generation_config.json"] = toJson({ _from_model_config: true, bos_token_id: 2, eos_token_id: 2, pad_token_id: OPT_PAD });
  writeModelFolder({ out: options.out, tensors: init.sorted(), files });
}

/** OPTConfig's fields for `s` (pre-LayerNorm blocks, ReLU, tied head, no dropout: the data is endless). */
export function optConfig(s: OptSize, vocabSize: number): Record<string, unknown> {
  return {
    _remove_final_layer_norm: false,
    activation_dropout: 0.0,
    activation_function: "relu",
    attention_dropout: 0.0,
    bos_token_id: 2,
    do_layer_norm_before: true,
    dropout: 0.0,
    enable_bias: true,
    eos_token_id: 2,
    ffn_dim: s.ffnDim,
    hidden_size: s.hiddenSize,
    init_std: INITIALIZER_RANGE,
    layer_norm_elementwise_affine: true,
    layerdrop: 0.0,
    max_position_embeddings: s.maxPositionEmbeddings,
    model_type: "opt",
    num_attention_heads: s.numAttentionHeads,
    num_hidden_layers: s.numHiddenLayers,
    pad_token_id: OPT_PAD,
    tie_word_embeddings: true,
    torch_dtype: "float32",
    use_cache: true,
    vocab_size: vocabSize,
    word_embed_proj_dim: s.hiddenSize,
  };
}

function checkSizes(v: VisionSize, q: QFormerSize): void {
  if (v.imageSize % v.patchSize !== 0) throw new Blip2Error(`vision size: image size ${v.imageSize} is not a multiple of the patch size ${v.patchSize}`);
  if (v.hiddenSize % v.numAttentionHeads !== 0) throw new Blip2Error(`vision size: hidden size ${v.hiddenSize} is not divisible by ${v.numAttentionHeads} heads`);
  if (q.hiddenSize % q.numAttentionHeads !== 0) throw new Blip2Error(`Q-Former size: hidden size ${q.hiddenSize} is not divisible by ${q.numAttentionHeads} heads`);
}

const toJson = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;

export interface FreshModelsOptions {
  /** The Blip2ForImageTextRetrieval folder to write. */
  retrieval: string;
  /** The OPTForCausalLM folder to write. */
  languageModel: string;
  seed?: number;
  vision?: VisionSize;
  qformer?: QFormerSize;
  opt?: OptSize;
}

/** Both fresh models, the retrieval checkpoint's `text_config` that of the OPT written beside it. */
export function writeFreshModels(options: FreshModelsOptions): void {
  const corpus = worldCorpus();
  const seed = options.seed ?? 0;
  const opt = options.opt ?? SMALL_OPT;
  writeFreshOpt({ out: options.languageModel, seed: seed + 1, size: opt, corpus });
  const text = JSON.parse(fs.readFileSync(path.join(options.languageModel, "config.json"), "utf8")) as Record<string, unknown>;
  writeFreshRetrieval({ out: options.retrieval, seed, vision: options.vision, qformer: options.qformer, text, corpus });
}
