/**
 * What stage 1 needs that Hugging Face's retrieval checkpoint (Blip2ForImageTextRetrieval) lacks,
 * as LAVIS's Blip2Qformer has it:
 * - a `[DEC]` token, the tokenizer's `bos_token`, that starts the text of image-grounded text
 *   generation (ITG), with its own row in the Q-Former's `embeddings.word_embeddings.weight`;
 * - the ITG head, BERT's `cls.predictions` (transform: dense, gelu, LayerNorm; the decoder tied
 *   to the word embeddings, plus its own bias);
 * - `temp`, the image-text contrastive temperature.
 * Fresh values follow BERT's init (as LAVIS gets them from `BertLMHeadModel`): weights
 * normal(0, initializer_range), biases 0, LayerNorm 1 and 0; `temp` starts at 0.07.
 * transformers loads a checkpoint with these extras as Blip2ForImageTextRetrieval and ignores them.
 */
import path from "node:path";
import { Blip2Error } from "../errors.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { readTensorF32 } from "../io/safetensors.js";
import { isRecord, readJsonObject } from "../tokenizer/config.js";
import { Blip2Tokenizer } from "../tokenizer/tokenizer.js";
import type { TensorValue } from "./checkpoint.js";

export const DEC_TOKEN = "[DEC]";
const INITIAL_TEMP = 0.07;
const WORD_EMBEDDINGS = "embeddings.word_embeddings.weight";

/** A source of standard normal draws (the trainer's seeded Rng). */
export interface NormalSource {
  normal(): number;
}

export interface Stage1Extras {
  /** The id of `[DEC]` in the (patched) tokenizer. */
  decTokenId: number;
  /** New tensors and the grown word embeddings, float32; empty when nothing is missing. */
  tensors: Map<string, TensorValue>;
  /** config.json with the grown `qformer_config.vocab_size`; undefined when unchanged. */
  config: Record<string, unknown> | undefined;
  /** Tokenizer files with `[DEC]` as `bos_token`: file name → contents; empty when unchanged. */
  files: Record<string, string>;
  /** One line saying what was added, or null when the checkpoint had everything. */
  notice: string | null;
}

/** The extras `checkpoint` lacks, with fresh values drawn from `rng`. */
export async function stage1Extras(checkpoint: Checkpoint, rng: NormalSource): Promise<Stage1Extras> {
  const cfg = checkpoint.config;
  if (!cfg.architectures.includes("Blip2ForImageTextRetrieval") || !checkpoint.has(WORD_EMBEDDINGS)) {
    throw new Blip2Error(`${checkpoint.dir}: stage 1 trains a Blip2ForImageTextRetrieval checkpoint (Q-Former with text input and ${WORD_EMBEDDINGS}); config.json says ${cfg.architectures.join(", ")}`);
  }
  const hidden = cfg.qformer.hiddenSize;
  const std = initializerRange(checkpoint);
  const tokenizer = await Blip2Tokenizer.fromDirectory(checkpoint.dir);
  const decTokenId = tokenizer.tokenToId(DEC_TOKEN) ?? tokenizer.vocabSize;
  const tokenizerDone = tokenizer.specialTokenMap.bos_token === DEC_TOKEN && tokenizer.tokenToId(DEC_TOKEN) !== undefined;

  const tensors = new Map<string, TensorValue>();
  const added: string[] = [];
  const embeddings = checkpoint.tensor(WORD_EMBEDDINGS, [cfg.qformer.vocabSize, hidden]);
  const rows = Math.max(embeddings.shape[0]!, decTokenId + 1);
  if (rows > embeddings.shape[0]!) {
    const data = new Float32Array(rows * hidden);
    data.set(readTensorF32(embeddings));
    for (let i = embeddings.shape[0]! * hidden; i < data.length; i++) data[i] = std * rng.normal();
    tensors.set(WORD_EMBEDDINGS, { shape: [rows, hidden], data });
    added.push(`${DEC_TOKEN} (token ${decTokenId}, a new row of ${WORD_EMBEDDINGS}: ${rows} rows)`);
  } else if (!tokenizerDone) {
    added.push(`${DEC_TOKEN} (token ${decTokenId})`);
  }

  const fresh: [string, number[], () => number][] = [
    ["cls.predictions.transform.dense.weight", [hidden, hidden], () => std * rng.normal()],
    ["cls.predictions.transform.dense.bias", [hidden], () => 0],
    ["cls.predictions.transform.LayerNorm.weight", [hidden], () => 1],
    ["cls.predictions.transform.LayerNorm.bias", [hidden], () => 0],
    ["cls.predictions.bias", [rows], () => 0],
    ["temp", [], () => INITIAL_TEMP],
  ];
  const missingHead: string[] = [];
  for (const [name, shape, init] of fresh) {
    if (checkpoint.has(name)) {
      checkpoint.tensor(name, shape); // present: it must fit the (grown) vocabulary
      continue;
    }
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < data.length; i++) data[i] = init();
    tensors.set(name, { shape, data });
    missingHead.push(name);
  }
  if (missingHead.some((n) => n.startsWith("cls."))) added.push(missingHead.length === fresh.length ? "the ITG head" : `the ITG head's ${missingHead.filter((n) => n !== "temp").join(", ")}`);
  if (missingHead.includes("temp")) added.push(`temp (${INITIAL_TEMP})`);

  let config: Record<string, unknown> | undefined;
  if (rows !== cfg.qformer.vocabSize) {
    config = structuredClone(checkpoint.json("config.json")) as Record<string, unknown>;
    config["qformer_config"] = { ...(config["qformer_config"] as Record<string, unknown>), vocab_size: rows };
  }
  const files = tokenizerDone ? {} : addSpecialTokenFiles(checkpoint.dir, DEC_TOKEN, decTokenId, "bos_token");
  const notice = added.length ? `added ${joinWords(added)}: stage 1 needs them and ${path.basename(checkpoint.dir)} lacks them (${[...tensors.keys()].join(", ")})` : null;
  return { decTokenId, tensors, config, files, notice };
}

/** The initializer range transformers' `_init_weights` uses for the Q-Former (default 0.02). */
function initializerRange(checkpoint: Checkpoint): number {
  const json = checkpoint.json("config.json") as { initializer_range?: unknown; qformer_config?: { initializer_range?: unknown } };
  const v = json.qformer_config?.initializer_range ?? json.initializer_range ?? 0.02;
  if (typeof v !== "number" || !(v >= 0)) throw new Blip2Error(`${checkpoint.file("config.json")}: initializer_range must be a non-negative number, got ${JSON.stringify(v)}`);
  return v;
}

const joinWords = (items: string[]) => (items.length < 2 ? items.join("") : `${items.slice(0, -1).join(", ")} and ${items.at(-1)}`);

/**
 * The tokenizer files of `dir` with a special token added as transformers' `save_pretrained`
 * writes them after `add_special_tokens`: `tokenizer_config.json` (its `added_tokens_decoder`,
 * and the role), `special_tokens_map.json`, `added_tokens.json`, and `tokenizer.json` when there
 * is one. `role` is a named special token (`bos_token`) or `additional_special_tokens`.
 */
export function addSpecialTokenFiles(dir: string, content: string, id: number, role: "bos_token" | "additional_special_tokens"): Record<string, string> {
  const token = { content, lstrip: false, normalized: false, rstrip: false, single_word: false };
  const files: Record<string, string> = {};
  const read = (name: string) => readJsonObject(path.join(dir, name));

  const config = read("tokenizer_config.json");
  if (config) {
    const decoder = config["added_tokens_decoder"];
    if (isRecord(decoder)) config["added_tokens_decoder"] = { ...decoder, [String(id)]: { ...token, special: true } };
    if (role === "bos_token") config["bos_token"] = content;
    else config[role] = appendOnce(config[role], content, (t) => t === content);
    files["tokenizer_config.json"] = toJson(config);
  }

  const map = read("special_tokens_map.json") ?? {};
  if (role === "bos_token") map["bos_token"] = token;
  else map[role] = appendOnce(map[role], token, (t) => t === content || (isRecord(t) && t["content"] === content));
  files["special_tokens_map.json"] = toJson(map);

  const addedTokens = read("added_tokens.json") ?? {};
  addedTokens[content] = id;
  files["added_tokens.json"] = toJson(Object.fromEntries(Object.entries(addedTokens).sort(([, a], [, b]) => Number(a) - Number(b))), false);

  const fast = read("tokenizer.json");
  if (fast) {
    const list = Array.isArray(fast["added_tokens"]) ? (fast["added_tokens"] as Record<string, unknown>[]) : [];
    if (!list.some((t) => t["content"] === content)) list.push({ id, ...token, special: true });
    fast["added_tokens"] = list.sort((a, b) => Number(a["id"]) - Number(b["id"]));
    files["tokenizer.json"] = toJson(fast, false);
  }
  return files;
}

function appendOnce<T>(list: unknown, item: T, same: (t: unknown) => boolean): unknown[] {
  const items = Array.isArray(list) ? list : [];
  return items.some(same) ? items : [...items, item];
}

/** JSON as transformers writes its tokenizer files: indent 2, keys sorted (except where order means something), a final newline. */
function toJson(value: Record<string, unknown>, sortKeys = true): string {
  const sorted = sortKeys ? Object.fromEntries(Object.entries(value).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) : value;
  return `${JSON.stringify(sorted, null, 2)}\n`;
}
