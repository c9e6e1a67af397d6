/**
 * The checkpoint stage 2 starts from (Blip2ForConditionalGeneration's layout), composed from a
 * stage-1 checkpoint (Blip2ForImageTextRetrieval's layout) and a Hugging Face language model
 * (OPTForCausalLM or T5ForConditionalGeneration), as BLIP-2's second stage starts: the vision
 * encoder, the queries and the Q-Former from stage 1, the language model as it was published, and
 * a fresh `language_projection` between them.
 *
 * - Kept from stage 1, byte for byte: `vision_model.*`, `query_tokens`, `qformer.*` except each
 *   layer's text feed-forward (`intermediate`, `output`): the conditional-generation Q-Former has
 *   no text input (`use_qformer_text_input` false), so transformers builds only the query path.
 *   Left out: the text embeddings, the ITM/ITC/ITG heads and `temp`.
 * - `language_model.*`: the LM's tensors under transformers' names (`model.decoder.*` for OPT,
 *   `shared`, `encoder.*`, `decoder.*`, `lm_head` for T5), without the copies transformers ties
 *   to the input embeddings and leaves out of its files.
 * - `language_projection`: [LM hidden, Q-Former hidden], initialized as transformers'
 *   `Blip2PreTrainedModel._init_weights` does a Linear: weight normal(0, initializer_range), bias 0.
 * - The LM's tokenizer with `<image>` added as an additional special token; its id is
 *   `image_token_index`. The embeddings grow only when that id has no row yet (the new rows are the
 *   mean of the others, so the new token's logit sits among theirs).
 */
import fs from "node:fs";
import path from "node:path";
import { parseBlip2Config } from "../config.js";
import { Blip2Error } from "../errors.js";
import { Checkpoint, readJsonFile } from "../io/checkpoint.js";
import { readSafetensorsHeader, readTensorF32, type TensorInfo } from "../io/safetensors.js";
import { IMAGE_TOKEN } from "../processor.js";
import { Blip2Tokenizer } from "../tokenizer/tokenizer.js";
import { checkOutDir, encodeFloats, writeModelFolder, type TensorEntry } from "./checkpoint.js";
import { addSpecialTokenFiles, type NormalSource } from "./extras.js";

export interface ComposeOptions {
  /** A stage-1 checkpoint folder (Blip2ForImageTextRetrieval). */
  stage1: string;
  /** A Hugging Face OPTForCausalLM or T5ForConditionalGeneration folder. */
  languageModel: string;
  /** The folder to write; it must be missing or empty. */
  out: string;
  /** Draws the language projection's initial weights. */
  rng: NormalSource;
  maxShardBytes?: number;
}

/** The tokenizer files of the language model that the composed checkpoint carries. */
const TOKENIZER_FILE = /^(special_tokens_map\.json|added_tokens\.json|merges\.txt|spiece\.model|tokenizer[^/]*|vocab[^/]*)$/;

/** Stage 1's Q-Former tensors that the conditional-generation layout has no place for. */
const QFORMER_TEXT_PATH = /^qformer\.encoder\.layer\.\d+\.(intermediate|output)\./;

/** Writes the composed checkpoint into `out`; returns what it did, one line each. */
export async function composeStage2(options: ComposeOptions): Promise<string[]> {
  const out = path.resolve(options.out);
  checkOutDir(out, null);
  const stage1 = openStage1(options.stage1);
  const lm = openLanguageModel(options.languageModel);
  const tokenizer = await Blip2Tokenizer.fromDirectory(lm.dir);
  const imageTokenId = tokenizer.tokenToId(IMAGE_TOKEN) ?? tokenizer.vocabSize;
  const grown = imageTokenId >= lm.vocabRows ? imageTokenId + 1 : null;

  const s1 = stage1.json("config.json") as Record<string, unknown>;
  const config = composedConfig(s1, lm, imageTokenId, grown);
  const parsed = parseBlip2Config(config, path.join(out, "config.json"));
  const qformerHidden = stage1.config.qformer.hiddenSize;
  const lmHidden = lm.hiddenSize;

  const tensors: TensorEntry[] = [];
  const dropped = new Set<string>();
  for (const name of stage1.names()) {
    const keep = name.startsWith("vision_model.") || name === "query_tokens" || (name.startsWith("qformer.") && !QFORMER_TEXT_PATH.test(name));
    if (keep) tensors.push(copied(name, stage1.tensor(name)));
    else dropped.add(name.split(".")[0] === "qformer" ? "the Q-Former's text feed-forward" : name.split(".")[0]!);
  }
  const std = typeof s1["initializer_range"] === "number" ? s1["initializer_range"] : 0.02;
  const projection = new Float32Array(lmHidden * qformerHidden).map(() => std * options.rng.normal());
  tensors.push({ name: "language_projection.weight", dtype: "F32", shape: [lmHidden, qformerHidden], bytes: encodeFloats(projection, "F32", "language_projection.weight") });
  tensors.push({ name: "language_projection.bias", dtype: "F32", shape: [lmHidden], bytes: encodeFloats(new Float32Array(lmHidden), "F32", "language_projection.bias") });
  for (const [name, info] of lm.tensors) {
    tensors.push(grown !== null && lm.vocabTensors.includes(name) ? withRows(name, info, grown) : copied(name, info));
  }
  tensors.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));

  const files: Record<string, string | Uint8Array | { copy: string }> = {};
  for (const f of fs.readdirSync(lm.dir).filter((f) => TOKENIZER_FILE.test(f)).sort()) files[f] = { copy: path.join(lm.dir, f) };
  if (tokenizer.tokenToId(IMAGE_TOKEN) === undefined) Object.assign(files, addSpecialTokenFiles(lm.dir, IMAGE_TOKEN, imageTokenId, "additional_special_tokens"));
  files["config.json"] = toJson(config);
  files["processor_config.json"] = toJson({ num_query_tokens: parsed.numQueryTokens, processor_class: "Blip2Processor" });
  files["generation_config.json"] = fs.existsSync(path.join(lm.dir, "generation_config.json")) ? { copy: path.join(lm.dir, "generation_config.json") } : toJson(generationConfig(parsed.text));
  if (fs.existsSync(stage1.file("preprocessor_config.json"))) files["preprocessor_config.json"] = { copy: stage1.file("preprocessor_config.json") };

  writeModelFolder({ out, tensors, files, maxShardBytes: options.maxShardBytes });
  return [
    `${out}: Blip2ForConditionalGeneration from ${options.stage1} (vision encoder, queries, Q-Former) and ${options.languageModel} (${lm.architecture}, ${lm.tensors.size} tensors)`,
    `  new language_projection [${lmHidden}, ${qformerHidden}]; <image> is token ${imageTokenId}${grown !== null ? `, a new row of the language model's embeddings (${grown} rows)` : ""}`,
    `  left out from stage 1: ${[...dropped].sort().join(", ") || "nothing"}`,
  ];
}

function openStage1(dir: string): Checkpoint {
  const ckpt = Checkpoint.open(dir);
  if (!ckpt.config.architectures.includes("Blip2ForImageTextRetrieval")) {
    throw new Blip2Error(`${dir}: config.json says ${ckpt.config.architectures.join(", ")}; --stage1 must be a stage-1 checkpoint (Blip2ForImageTextRetrieval)`);
  }
  const { vision, qformer, numQueryTokens } = ckpt.config;
  ckpt.tensor("query_tokens", [1, numQueryTokens, qformer.hiddenSize]);
  ckpt.tensor("qformer.layernorm.weight", [qformer.hiddenSize]);
  ckpt.tensor("vision_model.post_layernorm.weight", [vision.hiddenSize]);
  return ckpt;
}

interface LanguageModel {
  dir: string;
  family: "opt" | "t5";
  architecture: string;
  /** config.json as it is. */
  config: Record<string, unknown>;
  hiddenSize: number;
  vocabRows: number;
  /** Under their names in the composed checkpoint (`language_model.` ...). */
  tensors: Map<string, TensorInfo>;
  /** The composed names of the tensors with a row per token. */
  vocabTensors: string[];
}

function openLanguageModel(dir: string): LanguageModel {
  const configFile = path.join(dir, "config.json");
  if (!fs.existsSync(dir)) throw new Blip2Error(`${dir}: language model folder not found`);
  const config = readJsonFile(configFile) as Record<string, unknown> | undefined;
  if (config === undefined) throw new Blip2Error(`${configFile}: missing (a Hugging Face language model folder needs config.json)`);
  const type = config["model_type"];
  const architecture = Array.isArray(config["architectures"]) ? String(config["architectures"][0]) : `${type} model`;
  if (type !== "opt" && type !== "t5") {
    throw new Blip2Error(`${configFile}: model_type is ${JSON.stringify(type)} (${architecture}); --language-model must be an OPTForCausalLM or T5ForConditionalGeneration folder`);
  }
  const weights = readFolderWeights(dir);
  const tensors = new Map<string, TensorInfo>();
  const tie = config["tie_word_embeddings"] !== false; // both configs default to tied embeddings
  const int = (key: string, fallback?: number) => {
    const v = config[key] ?? fallback;
    if (!Number.isInteger(v) || (v as number) <= 0) throw new Blip2Error(`${configFile}: ${key} must be a positive integer, got ${JSON.stringify(config[key])}`);
    return v as number;
  };
  const check = (name: string, shape: number[], why: string) => {
    const info = weights.get(name);
    if (!info) throw new Blip2Error(`${dir}: no tensor ${name} (expected in an ${architecture === `${type} model` ? type : architecture} folder)`);
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
      throw new Blip2Error(`${path.basename(info.file)}: tensor ${name} has shape [${info.shape.join(", ")}] but config.json's ${why} implies [${shape.join(", ")}]`);
    }
    return info;
  };

  if (type === "opt") {
    const hidden = int("hidden_size", 768);
    const proj = int("word_embed_proj_dim", hidden);
    for (const [name, info] of weights) {
      // OPTModel's own files name the decoder without OPTForCausalLM's `model.`.
      const key = name.startsWith("decoder.") ? `model.${name}` : name;
      if (!key.startsWith("model.decoder.") && key !== "lm_head.weight") throw new Blip2Error(`${info.file}: tensor ${name} is not part of an OPTForCausalLM (expected model.decoder.* and lm_head.weight)`);
      if (key === "lm_head.weight" && tie) continue; // tied to the input embeddings
      tensors.set(`language_model.${key}`, info);
    }
    const embed = check(weights.has("decoder.embed_tokens.weight") ? "decoder.embed_tokens.weight" : "model.decoder.embed_tokens.weight", [int("vocab_size", 50272), proj], "vocab_size and word_embed_proj_dim");
    const layer0 = [...weights.keys()].find((n) => /(^|\.)decoder\.layers\.0\.self_attn\.q_proj\.weight$/.test(n));
    if (layer0) check(layer0, [hidden, hidden], "hidden_size");
    if (!tie) check("lm_head.weight", [embed.shape[0]!, proj], "vocab_size and word_embed_proj_dim");
    const vocabTensors = ["language_model.model.decoder.embed_tokens.weight", ...(tie ? [] : ["language_model.lm_head.weight"])];
    return { dir, family: "opt", architecture, config, hiddenSize: hidden, vocabRows: embed.shape[0]!, tensors, vocabTensors };
  }

  const dModel = int("d_model", 512);
  for (const [name, info] of weights) {
    if (name === "encoder.embed_tokens.weight" || name === "decoder.embed_tokens.weight") continue; // tied to `shared`
    if (name === "lm_head.weight" && tie) continue;
    if (!/^(shared\.weight|lm_head\.weight|encoder\.|decoder\.)/.test(name)) throw new Blip2Error(`${info.file}: tensor ${name} is not part of a T5ForConditionalGeneration (expected shared, encoder.*, decoder.*, lm_head)`);
    tensors.set(`language_model.${name}`, info);
  }
  const shared = check("shared.weight", [int("vocab_size", 32128), dModel], "vocab_size and d_model");
  const heads = int("num_heads", 8) * int("d_kv", 64);
  if (weights.has("encoder.block.0.layer.0.SelfAttention.q.weight")) check("encoder.block.0.layer.0.SelfAttention.q.weight", [heads, dModel], "num_heads × d_kv and d_model");
  if (!tie) check("lm_head.weight", [shared.shape[0]!, dModel], "vocab_size and d_model");
  if (![...weights.keys()].some((n) => n.startsWith("decoder."))) throw new Blip2Error(`${dir}: no decoder.* tensors: a T5 encoder alone cannot generate (expected a T5ForConditionalGeneration folder)`);
  const vocabTensors = ["language_model.shared.weight", ...(tie ? [] : ["language_model.lm_head.weight"])];
  return { dir, family: "t5", architecture, config, hiddenSize: dModel, vocabRows: shared.shape[0]!, tensors, vocabTensors };
}

/** The tensors of a Hugging Face folder: `model.safetensors`, or the shards its index lists. */
function readFolderWeights(dir: string): Map<string, TensorInfo> {
  const single = path.join(dir, "model.safetensors");
  const indexFile = path.join(dir, "model.safetensors.index.json");
  if (!fs.existsSync(indexFile)) {
    if (!fs.existsSync(single)) throw new Blip2Error(`${dir}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)`);
    return readSafetensorsHeader(single).tensors;
  }
  const map = (readJsonFile(indexFile) as { weight_map?: Record<string, unknown> } | undefined)?.weight_map;
  if (!map || typeof map !== "object") throw new Blip2Error(`${indexFile}: missing weight_map`);
  const tensors = new Map<string, TensorInfo>();
  for (const shard of new Set(Object.values(map))) {
    if (typeof shard !== "string" || shard.includes("/") || shard.includes("\\")) throw new Blip2Error(`${indexFile}: weight_map lists ${JSON.stringify(shard)}, expected a shard file name`);
    for (const [name, info] of readSafetensorsHeader(path.join(dir, shard)).tensors) tensors.set(name, info);
  }
  return tensors;
}

function composedConfig(s1: Record<string, unknown>, lm: LanguageModel, imageTokenId: number, grown: number | null): Record<string, unknown> {
  const { _name_or_path: _a, transformers_version: _b, ...text } = lm.config;
  if (grown !== null) text["vocab_size"] = grown;
  const { use_qformer_text_input: _c, ...qformer } = s1["qformer_config"] as Record<string, unknown>;
  const t5 = lm.family === "t5";
  const config: Record<string, unknown> = {
    architectures: ["Blip2ForConditionalGeneration"],
    image_text_hidden_size: s1["image_text_hidden_size"],
    image_token_index: imageTokenId,
    initializer_factor: s1["initializer_factor"],
    initializer_range: s1["initializer_range"],
    // Blip2Config takes these two from the text model's config.
    is_encoder_decoder: t5 ? true : undefined,
    model_type: "blip-2",
    num_query_tokens: s1["num_query_tokens"],
    qformer_config: qformer,
    text_config: text,
    tie_word_embeddings: text["tie_word_embeddings"] === false ? false : undefined,
    torch_dtype: s1["torch_dtype"],
    use_decoder_only_language_model: !t5,
    vision_config: s1["vision_config"],
  };
  return Object.fromEntries(Object.entries(config).filter(([, v]) => v !== undefined));
}

/** generation_config.json as transformers derives it from the text model's config (for an LM folder without one). */
function generationConfig(text: ReturnType<typeof parseBlip2Config>["text"]): Record<string, unknown> {
  const ids = text.modelType === "opt" ? { bos_token_id: text.bosTokenId, eos_token_id: text.eosTokenId, pad_token_id: text.padTokenId } : { decoder_start_token_id: text.decoderStartTokenId, eos_token_id: text.eosTokenId, pad_token_id: text.padTokenId };
  return { _from_model_config: true, ...Object.fromEntries(Object.entries(ids).filter(([, v]) => v !== null)) };
}

const copied = (name: string, info: TensorInfo): TensorEntry => ({ name, dtype: info.dtype, shape: info.shape, from: info });

/** An embedding (or LM head) grown to `rows` rows, the new ones the mean of the existing rows. */
function withRows(name: string, info: TensorInfo, rows: number): TensorEntry {
  const [old, width] = info.shape as [number, number];
  const data = new Float32Array(rows * width);
  data.set(readTensorF32(info));
  const mean = new Float64Array(width);
  for (let r = 0; r < old; r++) for (let c = 0; c < width; c++) mean[c] += data[r * width + c]! / old;
  for (let r = old; r < rows; r++) data.set(mean, r * width);
  return { name, dtype: info.dtype, shape: [rows, width], bytes: encodeFloats(data, info.dtype, name) };
}

const toJson = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;
