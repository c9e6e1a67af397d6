/**
 * BLIP-2 `config.json`: the top-level Blip2Config with nested `vision_config`, `qformer_config` and
 * `text_config` (OPT or T5). Absent fields take the defaults transformers applies; present fields
 * are type-checked, and a wrong one is reported with the file, the field and what was expected.
 */
import { Blip2Error } from "./errors.js";

export interface VisionConfig {
  hiddenSize: number;
  intermediateSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  imageSize: number;
  patchSize: number;
  hiddenAct: string;
  layerNormEps: number;
  qkvBias: boolean;
}

export interface QFormerConfig {
  vocabSize: number;
  hiddenSize: number;
  numHiddenLayers: number;
  numAttentionHeads: number;
  intermediateSize: number;
  hiddenAct: string;
  maxPositionEmbeddings: number;
  layerNormEps: number;
  padTokenId: number;
  crossAttentionFrequency: number;
  encoderHiddenSize: number;
  useQformerTextInput: boolean;
  /** Dropout on the embeddings and on each attention and feed-forward output, in training. */
  hiddenDropoutProb: number;
  /** Dropout on the attention probabilities, in training. */
  attentionProbsDropoutProb: number;
}

export interface OptConfig {
  modelType: "opt";
  vocabSize: number;
  hiddenSize: number;
  numHiddenLayers: number;
  ffnDim: number;
  maxPositionEmbeddings: number;
  numAttentionHeads: number;
  doLayerNormBefore: boolean;
  removeFinalLayerNorm: boolean;
  wordEmbedProjDim: number;
  activationFunction: string;
  enableBias: boolean;
  layerNormElementwiseAffine: boolean;
  /** Dropout on each self-attention and feed-forward output before its residual, in training. */
  dropout: number;
  /** Dropout on the attention probabilities, in training. */
  attentionDropout: number;
  padTokenId: number | null;
  bosTokenId: number | null;
  eosTokenId: number | number[] | null;
}

export interface T5Config {
  modelType: "t5";
  vocabSize: number;
  dModel: number;
  dKv: number;
  dFf: number;
  numLayers: number;
  numDecoderLayers: number;
  numHeads: number;
  relativeAttentionNumBuckets: number;
  relativeAttentionMaxDistance: number;
  layerNormEpsilon: number;
  /** Activation of the feed-forward block ("relu", "gelu_new", ...), derived from `feed_forward_proj`. */
  denseActFn: string;
  isGatedAct: boolean;
  tieWordEmbeddings: boolean;
  /** Multiply the decoder output by d_model^-0.5 before the head. */
  scaleDecoderOutputs: boolean;
  /** Dropout after the embeddings, on attention probabilities, in and after each sublayer and after the final norm, in training. */
  dropoutRate: number;
  padTokenId: number | null;
  eosTokenId: number | number[] | null;
  decoderStartTokenId: number;
}

export type TextConfig = OptConfig | T5Config;

export interface Blip2Config {
  architectures: string[];
  vision: VisionConfig;
  qformer: QFormerConfig;
  text: TextConfig;
  numQueryTokens: number;
  imageTextHiddenSize: number;
  /** Id of the `<image>` token whose positions receive the projected queries; null in older checkpoints. */
  imageTokenIndex: number | null;
  useDecoderOnlyLanguageModel: boolean;
}

type Json = Record<string, unknown>;

/** Reads typed fields from one JSON object, naming the file and field path in errors. */
class Fields {
  constructor(private readonly obj: Json, readonly file: string, private readonly path: string) {}

  private where(key: string): string {
    return `${this.file}: ${this.path}${key}`;
  }

  private get(key: string): unknown {
    return this.obj[key];
  }

  int(key: string, fallback: number, min = 0): number {
    const v = this.get(key);
    if (v === undefined || v === null) return fallback;
    if (typeof v !== "number" || !Number.isInteger(v) || v < min) {
      throw new Blip2Error(`${this.where(key)}: expected an integer >= ${min}, got ${JSON.stringify(v)}`);
    }
    return v;
  }

  positive(key: string, fallback: number): number {
    return this.int(key, fallback, 1);
  }

  float(key: string, fallback: number): number {
    const v = this.get(key);
    if (v === undefined || v === null) return fallback;
    if (typeof v !== "number" || !Number.isFinite(v)) throw new Blip2Error(`${this.where(key)}: expected a number, got ${JSON.stringify(v)}`);
    return v;
  }

  /** A probability in [0, 1] (a dropout rate). */
  probability(key: string, fallback: number): number {
    const v = this.float(key, fallback);
    if (v < 0 || v > 1) throw new Blip2Error(`${this.where(key)}: expected a probability in [0, 1], got ${v}`);
    return v;
  }

  bool(key: string, fallback: boolean): boolean {
    const v = this.get(key);
    if (v === undefined || v === null) return fallback;
    if (typeof v !== "boolean") throw new Blip2Error(`${this.where(key)}: expected true or false, got ${JSON.stringify(v)}`);
    return v;
  }

  string(key: string, fallback: string): string {
    const v = this.get(key);
    if (v === undefined || v === null) return fallback;
    if (typeof v !== "string") throw new Blip2Error(`${this.where(key)}: expected a string, got ${JSON.stringify(v)}`);
    return v;
  }

  optionalInt(key: string, fallback: number | null): number | null {
    const v = this.get(key);
    if (v === undefined) return fallback;
    if (v === null) return null;
    return this.int(key, 0);
  }

  /** An id or a list of ids (eos_token_id may be either). */
  ids(key: string, fallback: number | number[] | null): number | number[] | null {
    const v = this.get(key);
    if (v === undefined) return fallback;
    if (v === null) return null;
    if (Array.isArray(v)) {
      if (!v.every((x) => Number.isInteger(x) && x >= 0)) throw new Blip2Error(`${this.where(key)}: expected token ids, got ${JSON.stringify(v)}`);
      return v as number[];
    }
    return this.int(key, 0);
  }

  object(key: string): Fields {
    const v = this.get(key);
    if (v === undefined || v === null) return new Fields({}, this.file, `${this.path}${key}.`);
    if (typeof v !== "object" || Array.isArray(v)) throw new Blip2Error(`${this.where(key)}: expected an object, got ${JSON.stringify(v)}`);
    return new Fields(v as Json, this.file, `${this.path}${key}.`);
  }

  has(key: string): boolean {
    return this.get(key) !== undefined;
  }

  raw(key: string): unknown {
    return this.get(key);
  }
}

export function parseBlip2Config(json: unknown, file: string): Blip2Config {
  if (json === null || typeof json !== "object" || Array.isArray(json)) throw new Blip2Error(`${file}: expected a JSON object`);
  const root = new Fields(json as Json, file, "");
  const modelType = root.raw("model_type");
  if (modelType === undefined) throw new Blip2Error(`${file}: missing model_type (expected "blip-2")`);
  if (modelType !== "blip-2" && modelType !== "blip_2") {
    throw new Blip2Error(`${file}: model_type is ${JSON.stringify(modelType)}, expected "blip-2"`);
  }
  const vision = parseVision(root.object("vision_config"));
  const qformer = parseQFormer(root.object("qformer_config"), vision);
  const text = parseText(root.object("text_config"), file);
  const architectures = root.raw("architectures");
  const decoderOnly = root.bool("use_decoder_only_language_model", text.modelType === "opt");
  if (decoderOnly !== (text.modelType === "opt")) {
    throw new Blip2Error(`${file}: use_decoder_only_language_model is ${decoderOnly} but text_config.model_type is ${text.modelType}`);
  }
  return {
    architectures: Array.isArray(architectures) ? architectures.map(String) : ["Blip2ForConditionalGeneration"],
    vision,
    qformer,
    text,
    numQueryTokens: root.positive("num_query_tokens", 32),
    imageTextHiddenSize: root.positive("image_text_hidden_size", 256),
    imageTokenIndex: root.optionalInt("image_token_index", null),
    useDecoderOnlyLanguageModel: decoderOnly,
  };
}

function parseVision(f: Fields): VisionConfig {
  const c: VisionConfig = {
    hiddenSize: f.positive("hidden_size", 1408),
    intermediateSize: f.positive("intermediate_size", 6144),
    numHiddenLayers: f.int("num_hidden_layers", 39),
    numAttentionHeads: f.positive("num_attention_heads", 16),
    imageSize: f.positive("image_size", 224),
    patchSize: f.positive("patch_size", 14),
    hiddenAct: f.string("hidden_act", "gelu"),
    layerNormEps: f.float("layer_norm_eps", 1e-6),
    qkvBias: f.bool("qkv_bias", true),
  };
  divisible(f, "vision_config", c.hiddenSize, c.numAttentionHeads);
  return c;
}

function parseQFormer(f: Fields, vision: VisionConfig): QFormerConfig {
  const c: QFormerConfig = {
    vocabSize: f.positive("vocab_size", 30522),
    hiddenSize: f.positive("hidden_size", 768),
    numHiddenLayers: f.int("num_hidden_layers", 12),
    numAttentionHeads: f.positive("num_attention_heads", 12),
    intermediateSize: f.positive("intermediate_size", 3072),
    hiddenAct: f.string("hidden_act", "gelu"),
    maxPositionEmbeddings: f.positive("max_position_embeddings", 512),
    layerNormEps: f.float("layer_norm_eps", 1e-12),
    padTokenId: f.int("pad_token_id", 0),
    crossAttentionFrequency: f.positive("cross_attention_frequency", 2),
    encoderHiddenSize: f.positive("encoder_hidden_size", 1408),
    useQformerTextInput: f.bool("use_qformer_text_input", false),
    // BERT's defaults, which Blip2QFormerConfig keeps.
    hiddenDropoutProb: f.probability("hidden_dropout_prob", 0.1),
    attentionProbsDropoutProb: f.probability("attention_probs_dropout_prob", 0.1),
  };
  divisible(f, "qformer_config", c.hiddenSize, c.numAttentionHeads);
  if (c.encoderHiddenSize !== vision.hiddenSize) {
    throw new Blip2Error(`${f.file}: qformer_config.encoder_hidden_size is ${c.encoderHiddenSize} but vision_config.hidden_size is ${vision.hiddenSize}`);
  }
  return c;
}

function parseText(f: Fields, file: string): TextConfig {
  const type = f.raw("model_type") ?? "opt"; // Blip2Config defaults to an OPT text model.
  if (type === "opt") return parseOpt(f);
  if (type === "t5") return parseT5(f);
  throw new Blip2Error(`${file}: text_config.model_type is ${JSON.stringify(type)}; supported: "opt", "t5"`);
}

function parseOpt(f: Fields): OptConfig {
  const hiddenSize = f.positive("hidden_size", 768);
  const c: OptConfig = {
    modelType: "opt",
    vocabSize: f.positive("vocab_size", 50272),
    hiddenSize,
    numHiddenLayers: f.int("num_hidden_layers", 12),
    ffnDim: f.positive("ffn_dim", 3072),
    maxPositionEmbeddings: f.positive("max_position_embeddings", 2048),
    numAttentionHeads: f.positive("num_attention_heads", 12),
    doLayerNormBefore: f.bool("do_layer_norm_before", true),
    removeFinalLayerNorm: f.bool("_remove_final_layer_norm", false),
    wordEmbedProjDim: f.positive("word_embed_proj_dim", hiddenSize),
    activationFunction: f.string("activation_function", "relu"),
    enableBias: f.bool("enable_bias", true),
    layerNormElementwiseAffine: f.bool("layer_norm_elementwise_affine", true),
    dropout: f.probability("dropout", 0.1),
    attentionDropout: f.probability("attention_dropout", 0.0),
    padTokenId: f.optionalInt("pad_token_id", 1),
    bosTokenId: f.optionalInt("bos_token_id", 2),
    eosTokenId: f.ids("eos_token_id", 2),
  };
  divisible(f, "text_config", c.hiddenSize, c.numAttentionHeads);
  return c;
}

function parseT5(f: Fields): T5Config {
  const proj = f.string("feed_forward_proj", "relu");
  const parts = proj.split("-");
  const gated = parts[0] === "gated";
  if (!((parts.length === 1) || (parts.length === 2 && gated))) {
    throw new Blip2Error(`${f.file}: text_config.feed_forward_proj is ${JSON.stringify(proj)}; expected "{ACT}" or "gated-{ACT}"`);
  }
  // transformers maps "gated-gelu" to the tanh approximation, for compatibility with the original T5 v1.1.
  const act = proj === "gated-gelu" ? "gelu_new" : parts[parts.length - 1]!;
  const numLayers = f.int("num_layers", 6);
  const tie = f.bool("tie_word_embeddings", true);
  const padTokenId = f.optionalInt("pad_token_id", 0);
  return {
    modelType: "t5",
    vocabSize: f.positive("vocab_size", 32128),
    dModel: f.positive("d_model", 512),
    dKv: f.positive("d_kv", 64),
    dFf: f.positive("d_ff", 2048),
    numLayers,
    numDecoderLayers: f.int("num_decoder_layers", numLayers),
    numHeads: f.positive("num_heads", 8),
    relativeAttentionNumBuckets: f.positive("relative_attention_num_buckets", 32),
    relativeAttentionMaxDistance: f.positive("relative_attention_max_distance", 128),
    layerNormEpsilon: f.float("layer_norm_epsilon", 1e-6),
    denseActFn: act,
    isGatedAct: gated,
    tieWordEmbeddings: tie,
    // Configs saved by transformers >= 5 carry the flag; older ones scale exactly when tied.
    scaleDecoderOutputs: f.bool("scale_decoder_outputs", tie),
    dropoutRate: f.probability("dropout_rate", 0.1),
    padTokenId,
    eosTokenId: f.ids("eos_token_id", 1),
    decoderStartTokenId: f.int("decoder_start_token_id", padTokenId ?? 0),
  };
}

function divisible(f: Fields, section: string, hidden: number, heads: number): void {
  if (hidden % heads !== 0) {
    throw new Blip2Error(`${f.file}: ${section}: hidden size ${hidden} is not divisible by the number of attention heads ${heads}`);
  }
}
