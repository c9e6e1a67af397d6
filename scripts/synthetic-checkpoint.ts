/**
 * Deterministic random-weight checkpoints with the exact shapes of Salesforce/blip2-opt-2.7b,
 * Salesforce/blip2-flan-t5-xl and Salesforce/blip2-itm-vit-g, in Hugging Face layout (config,
 * sharded safetensors + index, processor and tokenizer files), for benchmarks. Written once under
 * the cache folder and reused.
 *
 * "itm-vit-g" is the stage-1 starting point (Blip2ForImageTextRetrieval) with stage 1's extras
 * already in place ([DEC] as the tokenizer's bos_token and its row of the word embeddings, the ITG
 * head, temp), so training adds nothing. Of the image encoder it has only `post_layernorm`: stage 1
 * trains on cached features taken before that LayerNorm, and its graph reads no other vision weight.
 *
 * Weights are uniform with the variance of the usual initialisation (1/fan_in for matrices), norms
 * are 1 and biases 0, so activations stay O(1) through every layer.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "test", "fixtures");

export type Variant = "opt-2.7b" | "flan-t5-xl" | "itm-vit-g";

const VISION = { hidden_size: 1408, intermediate_size: 6144, num_hidden_layers: 39, num_attention_heads: 16, image_size: 224, patch_size: 14, qkv_bias: true, layer_norm_eps: 1e-6, model_type: "blip_2_vision_model" };
const QFORMER = { hidden_size: 768, intermediate_size: 3072, num_hidden_layers: 12, num_attention_heads: 12, encoder_hidden_size: 1408, cross_attention_frequency: 2, vocab_size: 30522, max_position_embeddings: 512, model_type: "blip_2_qformer" };
const OPT = { model_type: "opt", vocab_size: 50304, hidden_size: 2560, ffn_dim: 10240, num_hidden_layers: 32, num_attention_heads: 32, max_position_embeddings: 2048, word_embed_proj_dim: 2560, do_layer_norm_before: true, activation_function: "relu", bos_token_id: 2, eos_token_id: 50118, pad_token_id: 1 };
const T5 = { model_type: "t5", vocab_size: 32128, d_model: 2048, d_kv: 64, d_ff: 5120, num_layers: 24, num_decoder_layers: 24, num_heads: 32, feed_forward_proj: "gated-gelu", relative_attention_num_buckets: 32, relative_attention_max_distance: 128, tie_word_embeddings: false, decoder_start_token_id: 0, eos_token_id: 1, pad_token_id: 0 };

export const IMAGE_TOKEN_INDEX: Record<Variant, number | null> = { "opt-2.7b": 50265, "flan-t5-xl": 32100, "itm-vit-g": null };

/** The retrieval checkpoint's text side: BERT's vocabulary plus [DEC], its 256-wide ITC space. */
const ITM = { vocabSize: 30523, decTokenId: 30522, imageTextHiddenSize: 256 };

type Init = { kind: "matrix"; fanIn: number } | { kind: "ones" } | { kind: "zeros" } | { kind: "normal"; std: number } | { kind: "constant"; value: number };
interface Spec {
  name: string;
  shape: number[];
  init: Init;
}

function linear(specs: Spec[], name: string, out: number, inF: number, bias = true): void {
  specs.push({ name: `${name}.weight`, shape: [out, inF], init: { kind: "matrix", fanIn: inF } });
  if (bias) specs.push({ name: `${name}.bias`, shape: [out], init: { kind: "zeros" } });
}

function norm(specs: Spec[], name: string, d: number, bias = true): void {
  specs.push({ name: `${name}.weight`, shape: [d], init: { kind: "ones" } });
  if (bias) specs.push({ name: `${name}.bias`, shape: [d], init: { kind: "zeros" } });
}

function visionSpecs(specs: Spec[]): void {
  const d = VISION.hidden_size;
  const p = VISION.patch_size;
  const positions = (VISION.image_size / p) ** 2 + 1;
  specs.push({ name: "vision_model.embeddings.class_embedding", shape: [1, 1, d], init: { kind: "normal", std: 0.02 } });
  specs.push({ name: "vision_model.embeddings.patch_embedding.weight", shape: [d, 3, p, p], init: { kind: "matrix", fanIn: 3 * p * p } });
  specs.push({ name: "vision_model.embeddings.patch_embedding.bias", shape: [d], init: { kind: "zeros" } });
  specs.push({ name: "vision_model.embeddings.position_embedding", shape: [1, positions, d], init: { kind: "normal", std: 0.02 } });
  for (let i = 0; i < VISION.num_hidden_layers; i++) {
    const l = `vision_model.encoder.layers.${i}`;
    norm(specs, `${l}.layer_norm1`, d);
    // As the released checkpoints store it: a bias-free qkv with separate q and v biases.
    specs.push({ name: `${l}.self_attn.qkv.weight`, shape: [3 * d, d], init: { kind: "matrix", fanIn: d } });
    specs.push({ name: `${l}.self_attn.q_bias`, shape: [d], init: { kind: "zeros" } });
    specs.push({ name: `${l}.self_attn.v_bias`, shape: [d], init: { kind: "zeros" } });
    linear(specs, `${l}.self_attn.projection`, d, d);
    norm(specs, `${l}.layer_norm2`, d);
    linear(specs, `${l}.mlp.fc1`, VISION.intermediate_size, d);
    linear(specs, `${l}.mlp.fc2`, d, VISION.intermediate_size);
  }
  norm(specs, "vision_model.post_layernorm", d);
}

/** The Q-Former; `text`: also the text side's feed-forward per layer (retrieval checkpoints have it). */
function qformerSpecs(specs: Spec[], text = false): void {
  const d = QFORMER.hidden_size;
  specs.push({ name: "query_tokens", shape: [1, 32, d], init: { kind: "normal", std: 1 } });
  norm(specs, "qformer.layernorm", d);
  for (let i = 0; i < QFORMER.num_hidden_layers; i++) {
    const l = `qformer.encoder.layer.${i}`;
    const attention = (prefix: string, kv: number) => {
      for (const x of ["query"]) linear(specs, `${prefix}.attention.${x}`, d, d);
      for (const x of ["key", "value"]) linear(specs, `${prefix}.attention.${x}`, d, kv);
      linear(specs, `${prefix}.output.dense`, d, d);
      norm(specs, `${prefix}.output.LayerNorm`, d);
    };
    attention(`${l}.attention`, d);
    if (i % QFORMER.cross_attention_frequency === 0) attention(`${l}.crossattention`, QFORMER.encoder_hidden_size);
    linear(specs, `${l}.intermediate_query.dense`, QFORMER.intermediate_size, d);
    linear(specs, `${l}.output_query.dense`, d, QFORMER.intermediate_size);
    norm(specs, `${l}.output_query.LayerNorm`, d);
    if (!text) continue;
    linear(specs, `${l}.intermediate.dense`, QFORMER.intermediate_size, d);
    linear(specs, `${l}.output.dense`, d, QFORMER.intermediate_size);
    norm(specs, `${l}.output.LayerNorm`, d);
  }
}

/** Blip2ForImageTextRetrieval's text side and heads, and stage 1's ITG head and temperature. */
function retrievalSpecs(specs: Spec[]): void {
  const d = QFORMER.hidden_size;
  specs.push({ name: "embeddings.word_embeddings.weight", shape: [ITM.vocabSize, d], init: { kind: "normal", std: 0.02 } });
  specs.push({ name: "embeddings.position_embeddings.weight", shape: [QFORMER.max_position_embeddings, d], init: { kind: "normal", std: 0.02 } });
  linear(specs, "vision_projection", ITM.imageTextHiddenSize, d);
  linear(specs, "text_projection", ITM.imageTextHiddenSize, d);
  linear(specs, "itm_head", 2, d);
  linear(specs, "cls.predictions.transform.dense", d, d);
  norm(specs, "cls.predictions.transform.LayerNorm", d);
  specs.push({ name: "cls.predictions.bias", shape: [ITM.vocabSize], init: { kind: "zeros" } });
  specs.push({ name: "temp", shape: [], init: { kind: "constant", value: 0.07 } });
}

function optSpecs(specs: Spec[]): void {
  const d = OPT.hidden_size;
  const p = "language_model.model.decoder";
  specs.push({ name: `${p}.embed_tokens.weight`, shape: [OPT.vocab_size, d], init: { kind: "normal", std: 0.02 } });
  specs.push({ name: `${p}.embed_positions.weight`, shape: [OPT.max_position_embeddings + 2, d], init: { kind: "normal", std: 0.02 } });
  for (let i = 0; i < OPT.num_hidden_layers; i++) {
    const l = `${p}.layers.${i}`;
    for (const x of ["q_proj", "k_proj", "v_proj", "out_proj"]) linear(specs, `${l}.self_attn.${x}`, d, d);
    norm(specs, `${l}.self_attn_layer_norm`, d);
    linear(specs, `${l}.fc1`, OPT.ffn_dim, d);
    linear(specs, `${l}.fc2`, d, OPT.ffn_dim);
    norm(specs, `${l}.final_layer_norm`, d);
  }
  norm(specs, `${p}.final_layer_norm`, d);
}

function t5Specs(specs: Spec[]): void {
  const d = T5.d_model;
  const inner = T5.num_heads * T5.d_kv;
  const p = "language_model";
  specs.push({ name: `${p}.shared.weight`, shape: [T5.vocab_size, d], init: { kind: "normal", std: 1 } });
  const attention = (prefix: string, relative: boolean) => {
    // T5 does not scale its attention scores: like transformers' initialisation, the query
    // weights carry the 1/sqrt(d_kv) instead (else random scores saturate every softmax).
    specs.push({ name: `${prefix}.q.weight`, shape: [inner, d], init: { kind: "matrix", fanIn: d * T5.d_kv } });
    for (const x of ["k", "v"]) linear(specs, `${prefix}.${x}`, inner, d, false);
    linear(specs, `${prefix}.o`, d, inner, false);
    if (relative) specs.push({ name: `${prefix}.relative_attention_bias.weight`, shape: [T5.relative_attention_num_buckets, T5.num_heads], init: { kind: "normal", std: 0.1 } });
  };
  const ff = (prefix: string) => {
    linear(specs, `${prefix}.DenseReluDense.wi_0`, T5.d_ff, d, false);
    linear(specs, `${prefix}.DenseReluDense.wi_1`, T5.d_ff, d, false);
    linear(specs, `${prefix}.DenseReluDense.wo`, d, T5.d_ff, false);
    norm(specs, `${prefix}.layer_norm`, d, false);
  };
  for (let i = 0; i < T5.num_layers; i++) {
    const b = `${p}.encoder.block.${i}`;
    attention(`${b}.layer.0.SelfAttention`, i === 0);
    norm(specs, `${b}.layer.0.layer_norm`, d, false);
    ff(`${b}.layer.1`);
  }
  norm(specs, `${p}.encoder.final_layer_norm`, d, false);
  for (let i = 0; i < T5.num_decoder_layers; i++) {
    const b = `${p}.decoder.block.${i}`;
    attention(`${b}.layer.0.SelfAttention`, i === 0);
    norm(specs, `${b}.layer.0.layer_norm`, d, false);
    attention(`${b}.layer.1.EncDecAttention`, false);
    norm(specs, `${b}.layer.1.layer_norm`, d, false);
    ff(`${b}.layer.2`);
  }
  norm(specs, `${p}.decoder.final_layer_norm`, d, false);
  linear(specs, `${p}.lm_head`, T5.vocab_size, d, false);
}

function specsFor(variant: Variant): Spec[] {
  const specs: Spec[] = [];
  if (variant === "itm-vit-g") {
    norm(specs, "vision_model.post_layernorm", VISION.hidden_size);
    qformerSpecs(specs, true);
    retrievalSpecs(specs);
    return specs;
  }
  visionSpecs(specs);
  qformerSpecs(specs);
  const textHidden = variant === "opt-2.7b" ? OPT.hidden_size : T5.d_model;
  linear(specs, "language_projection", textHidden, QFORMER.hidden_size);
  if (variant === "opt-2.7b") optSpecs(specs);
  else t5Specs(specs);
  return specs;
}

function configFor(variant: Variant) {
  if (variant === "itm-vit-g") {
    return {
      architectures: ["Blip2ForImageTextRetrieval"],
      model_type: "blip-2",
      num_query_tokens: 32,
      image_text_hidden_size: ITM.imageTextHiddenSize,
      image_token_index: null,
      initializer_range: 0.02,
      use_decoder_only_language_model: true,
      vision_config: VISION,
      qformer_config: { ...QFORMER, vocab_size: ITM.vocabSize, use_qformer_text_input: true, hidden_act: "gelu", layer_norm_eps: 1e-12, pad_token_id: 0, hidden_dropout_prob: 0.1, attention_probs_dropout_prob: 0.1 },
      // Unused by retrieval; transformers' config carries its default language model all the same.
      text_config: OPT,
    };
  }
  return {
    architectures: ["Blip2ForConditionalGeneration"],
    model_type: "blip-2",
    num_query_tokens: 32,
    image_token_index: IMAGE_TOKEN_INDEX[variant],
    use_decoder_only_language_model: variant === "opt-2.7b",
    vision_config: VISION,
    qformer_config: QFORMER,
    text_config: variant === "opt-2.7b" ? OPT : T5,
  };
}

/** xorshift32 uniform values in [-1, 1), one seed per tensor so shards can be written in any order. */
function fill(out: Float32Array, init: Init, seed: number): void {
  if (init.kind === "ones") return void out.fill(1);
  if (init.kind === "zeros") return void out.fill(0);
  if (init.kind === "constant") return void out.fill(init.value);
  const scale = init.kind === "matrix" ? Math.sqrt(3 / init.fanIn) : init.std * Math.sqrt(3);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < out.length; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out[i] = ((s >>> 0) / 2147483648 - 1) * scale;
  }
}

const SHARD_BYTES = 5e9;

/**
 * Writes the checkpoint unless it is already complete; returns its folder. `zeros`: every weight 0,
 * written as sparse files (no data on disk, in no time), for tests that need only names and shapes.
 */
export function syntheticCheckpoint(variant: Variant, root = path.join(process.env.BLIP2_BENCH_DIR ?? path.join(os.homedir(), ".cache", "blip2", "bench")), options: { zeros?: boolean } = {}): string {
  const dir = path.join(root, `blip2-${variant}-${options.zeros ? "zeros" : "random"}`);
  const done = path.join(dir, ".complete");
  if (fs.existsSync(done)) return dir;
  fs.mkdirSync(dir, { recursive: true });
  const specs = specsFor(variant);
  const shards: Spec[][] = [[]];
  let bytes = 0;
  for (const s of specs) {
    const size = s.shape.reduce((a, b) => a * b, 1) * 4;
    if (bytes + size > SHARD_BYTES && shards.at(-1)!.length) (shards.push([]), (bytes = 0));
    shards.at(-1)!.push(s);
    bytes += size;
  }
  const weightMap: Record<string, string> = {};
  shards.forEach((shard, i) => {
    const name = `model-${String(i + 1).padStart(5, "0")}-of-${String(shards.length).padStart(5, "0")}.safetensors`;
    writeShard(path.join(dir, name), shard, specs, options.zeros ?? false);
    for (const s of shard) weightMap[s.name] = name;
  });
  const json = (name: string, value: unknown) => fs.writeFileSync(path.join(dir, name), JSON.stringify(value, null, 2));
  json("model.safetensors.index.json", { metadata: {}, weight_map: weightMap });
  json("config.json", configFor(variant));
  if (variant !== "itm-vit-g") json("generation_config.json", variant === "opt-2.7b" ? { bos_token_id: 2, eos_token_id: 50118, pad_token_id: 1 } : { decoder_start_token_id: 0, eos_token_id: 1, pad_token_id: 0 });
  json("processor_config.json", { processor_class: "Blip2Processor", num_query_tokens: 32, image_processor: { image_processor_type: "BlipImageProcessor", size: { height: 224, width: 224 } } });
  // A small tokenizer of the same family: prompts only need ids inside the vocabulary.
  const tokenizerFrom = path.join(FIXTURES, { "opt-2.7b": "tiny-blip2-opt", "flan-t5-xl": "tiny-blip2-t5", "itm-vit-g": "tiny-blip2-itm" }[variant]);
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) fs.copyFileSync(path.join(tokenizerFrom, f), path.join(dir, f));
  const image = IMAGE_TOKEN_INDEX[variant];
  if (image !== null) addToken(path.join(dir, "tokenizer.json"), "<image>", image);
  else {
    // [DEC] as stage 1 has it: the bos_token, with the word embeddings' last row.
    addToken(path.join(dir, "tokenizer.json"), "[DEC]", ITM.decTokenId);
    const config = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
    json("tokenizer_config.json", { ...config, bos_token: "[DEC]" });
  }
  fs.writeFileSync(done, new Date().toISOString());
  return dir;
}

/** The tokenizer's added token `content` gets id `id` (the checkpoint's image_token_index, or [DEC]'s row). */
function addToken(file: string, content: string, id: number): void {
  const t = JSON.parse(fs.readFileSync(file, "utf8"));
  t.added_tokens = (t.added_tokens as { content: string }[]).filter((a) => a.content !== content);
  t.added_tokens.push({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  fs.writeFileSync(file, JSON.stringify(t));
}

function writeShard(file: string, shard: Spec[], all: Spec[], zeros: boolean): void {
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const s of shard) {
    const size = s.shape.reduce((a, b) => a * b, 1) * 4;
    header[s.name] = { dtype: "F32", shape: s.shape, data_offsets: [offset, offset + size] };
    offset += size;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + json.length) % 8)) % 8);
  const tmp = `${file}.tmp`;
  const fd = fs.openSync(tmp, "w");
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    fs.writeSync(fd, len);
    fs.writeSync(fd, json);
    // Zeros: the file's length alone, a hole the file system stores no data for.
    if (zeros) fs.ftruncateSync(fd, 8 + json.length + offset);
    else writeRandom(fd, shard, all);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

function writeRandom(fd: number, shard: Spec[], all: Spec[]): void {
  const chunk = new Float32Array(16 * 1024 * 1024);
  for (const s of shard) {
    const n = s.shape.reduce((a, b) => a * b, 1);
    const seed = all.indexOf(s) * 2654435761 + 1;
    // Large tensors in chunks, each chunk its own seed: bounded memory, deterministic.
    for (let at = 0, part = 0; at < n; at += chunk.length, part++) {
      const view = chunk.subarray(0, Math.min(chunk.length, n - at));
      fill(view, s.init, seed + part * 7919);
      fs.writeSync(fd, new Uint8Array(view.buffer, 0, view.byteLength));
    }
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  for (const v of (process.argv.slice(2).length ? process.argv.slice(2) : ["opt-2.7b"]) as Variant[]) console.log(syntheticCheckpoint(v));
}
