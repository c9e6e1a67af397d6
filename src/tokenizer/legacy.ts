/**
 * Slow-tokenizer files → an in-memory tokenizer.json, as transformers' `convert_slow_tokenizer`
 * (4.4x) builds it when a checkpoint has no tokenizer.json:
 * - `vocab.json` + `merges.txt` → `GPT2Converter` (byte-level BPE, `add_prefix_space`, `add_bos_token`);
 * - `spiece.model` → `T5Converter` (SentencePiece Unigram, Precompiled + Strip + Replace normalizer,
 *   Metaspace with the `legacy`/`add_prefix_space` prepend scheme, `$A </s>` template);
 * - `vocab.txt` → `BertConverter` (WordPiece, BertNormalizer from `do_lower_case`,
 *   `tokenize_chinese_chars`, `strip_accents`, `[CLS] $A [SEP]`, WordPiece decoder).
 * The added vocabulary is then completed from the tokenizer config the way
 * `PreTrainedTokenizerFast.__init__` does, and the template's special-token ids come from it.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { readJsonFile } from "../io/checkpoint.js";
import {
  AddedVocabulary,
  applySettingsToAddedVocabulary,
  isRecord,
  type TokenizerFamily,
  type TokenizerSettings,
} from "./config.js";
import { parseSentencePieceModel, PieceType, ProtobufError, SpmModelType, type SentencePieceModel } from "./sentencepiece.js";

type Json = Record<string, unknown>;

/** The legacy files each family is built from. */
export const LEGACY_FILES: Record<Exclude<TokenizerFamily, "other">, string[]> = {
  gpt2: ["vocab.json", "merges.txt"],
  t5: ["spiece.model"],
  bert: ["vocab.txt"],
};

/** A converted tokenizer: the tokenizer.json object and the added vocabulary it was built with. */
export interface ConvertedTokenizer {
  json: Json;
  addedVocab: AddedVocabulary;
}

function readText(file: string): string {
  try {
    return fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new Blip2Error(`${file}: cannot read (${(err as Error).message})`, { cause: err });
  }
}

function templateSingle(pieces: Array<string | { special: string; id: number }>): Json {
  const single = pieces.map((p) => (typeof p === "string" ? { Sequence: { id: p, type_id: 0 } } : { SpecialToken: { id: p.special, type_id: 0 } }));
  const specialTokens: Json = {};
  for (const p of pieces) if (typeof p !== "string") specialTokens[p.special] = { id: p.special, ids: [p.id], tokens: [p.special] };
  return { type: "TemplateProcessing", single, pair: single, special_tokens: specialTokens };
}

/** `convert_tokens_to_ids`: the token's id, or the unk token's id when it has none. */
function idOrUnk(vocab: AddedVocabulary, settings: TokenizerSettings, content: string): number {
  const id = vocab.tokenToId(content);
  if (id !== undefined) return id;
  const unk = settings.special.unk_token;
  const unkId = unk ? vocab.tokenToId(unk.content) : undefined;
  if (unkId === undefined) throw new Blip2Error(`tokenizer: special token "${content}" is not in the vocabulary and there is no unk token`);
  return unkId;
}

/** vocab.json + merges.txt, as GPT2Tokenizer reads them and GPT2Converter converts them. */
export function convertGpt2(dir: string, settings: TokenizerSettings): ConvertedTokenizer {
  const vocabFile = path.join(dir, "vocab.json");
  const mergesFile = path.join(dir, "merges.txt");
  const vocabJson = readJsonFile(vocabFile);
  if (!isRecord(vocabJson)) throw new Blip2Error(`${vocabFile}: expected a JSON object mapping tokens to ids`);
  const vocab = new Map<string, number>();
  for (const [token, id] of Object.entries(vocabJson)) {
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0) throw new Blip2Error(`${vocabFile}: the id of ${JSON.stringify(token)} must be a non-negative integer`);
    vocab.set(token, id);
  }
  if (!fs.existsSync(mergesFile)) throw new Blip2Error(`${mergesFile}: missing (vocab.json needs its merges.txt)`);
  // GPT2Tokenizer: read().split("\n")[1:-1] (drops the "#version" line and what follows the last newline),
  // each line split on whitespace; a later duplicate pair takes the later rank.
  const lines = readText(mergesFile).split("\n").slice(1, -1);
  // list(bpe_ranks) — the order the converter hands to BPE — is the order of first occurrence.
  const merges: Array<[string, string]> = [];
  const seen = new Set<string>();
  lines.forEach((line, i) => {
    const parts = line.split(/\s+/).filter((p) => p !== "");
    if (parts.length === 0) return;
    if (parts.length !== 2) throw new Blip2Error(`${mergesFile}: line ${i + 2} is not a pair of symbols`);
    const key = `${parts[0]} ${parts[1]}`;
    if (seen.has(key)) return;
    seen.add(key);
    merges.push([parts[0]!, parts[1]!]);
  });

  const addedVocab = new AddedVocabulary(vocab, vocab.size);
  applySettingsToAddedVocabulary(addedVocab, settings);

  const cfg = settings.config;
  const addPrefixSpace = cfg["add_prefix_space"] === true;
  let postProcessor: Json = { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true };
  if (cfg["add_bos_token"] === true) {
    const bos = settings.special.bos_token;
    if (!bos) throw new Blip2Error(`${path.join(dir, "tokenizer_config.json")}: "add_bos_token" is set but there is no bos_token`);
    postProcessor = templateSingle([{ special: bos.content, id: idOrUnk(addedVocab, settings, bos.content) }, "A"]);
  }
  const json: Json = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: addedVocab.entries().map(toJsonAdded),
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: addPrefixSpace, trim_offsets: true, use_regex: true },
    post_processor: postProcessor,
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab: Object.fromEntries(vocab),
      merges,
    },
  };
  return { json, addedVocab };
}

/** spiece.model, as T5Tokenizer loads it and T5Converter (SpmConverter) converts it. */
export function convertT5(dir: string, settings: TokenizerSettings): ConvertedTokenizer {
  const file = path.join(dir, "spiece.model");
  let proto: SentencePieceModel;
  try {
    proto = parseSentencePieceModel(new Uint8Array(fs.readFileSync(file)));
  } catch (err) {
    if (err instanceof ProtobufError) throw new Blip2Error(`${file}: corrupt SentencePiece model (${err.message})`, { cause: err });
    throw new Blip2Error(`${file}: cannot read (${(err as Error).message})`, { cause: err });
  }
  if (proto.trainerSpec.modelType !== SpmModelType.Unigram) {
    const name = SpmModelType[proto.trainerSpec.modelType] ?? String(proto.trainerSpec.modelType);
    throw new Blip2Error(`${file}: SentencePiece model type ${name} is not supported (T5 uses Unigram)`);
  }
  const cfg = settings.config;
  const extraIdsRaw = cfg["extra_ids"] ?? 100;
  if (typeof extraIdsRaw !== "number" || !Number.isInteger(extraIdsRaw) || extraIdsRaw < 0) {
    throw new Blip2Error(`${path.join(dir, "tokenizer_config.json")}: "extra_ids" must be a non-negative integer`);
  }
  const extraIds = extraIdsRaw;
  // T5Converter.vocab: the pieces, then <extra_id_{n-1}> … <extra_id_0> with score 0.
  const vocabList: Array<[string, number]> = proto.pieces.map((p) => [p.piece, p.score]);
  for (let i = extraIds - 1; i >= 0; i--) vocabList.push([`<extra_id_${i}>`, 0]);
  const vocab = new Map<string, number>();
  vocabList.forEach(([piece], i) => {
    if (!vocab.has(piece)) vocab.set(piece, i);
  });

  // T5Tokenizer(Fast): without any <extra_id_*> among the additional special tokens, the extra ids are added to them.
  const settingsWithExtras: TokenizerSettings = { ...settings, additionalSpecial: [...settings.additionalSpecial] };
  if (extraIds > 0 && !settings.additionalSpecial.some((t) => t.content.includes("<extra_id_"))) {
    for (let i = 0; i < extraIds; i++) {
      settingsWithExtras.additionalSpecial.push({ content: `<extra_id_${i}>`, special: true, normalized: false, lstrip: false, rstrip: false, singleWord: false });
    }
  }

  const addedVocab = new AddedVocabulary(vocab, vocabList.length);
  // SpmConverter: control pieces (special) and user-defined pieces become added tokens, unnormalized.
  proto.pieces.forEach((p) => {
    if (p.type === PieceType.Control || p.type === PieceType.UserDefined) {
      addedVocab.add({ content: p.piece, special: p.type === PieceType.Control, normalized: false, lstrip: false, rstrip: false, singleWord: false });
    }
  });
  applySettingsToAddedVocabulary(addedVocab, settingsWithExtras);

  // _get_prepend_scheme: add_prefix_space (default True) → "always", or "first" when legacy is False.
  const addPrefixSpace = cfg["add_prefix_space"] === undefined || cfg["add_prefix_space"] === null ? true : cfg["add_prefix_space"] === true;
  const legacy = cfg["legacy"] === undefined || cfg["legacy"] === null ? true : cfg["legacy"] === true;
  const prependScheme = addPrefixSpace ? (legacy ? "always" : "first") : "never";

  const charsmap = proto.normalizerSpec.precompiledCharsmap;
  const tail: Json[] = [
    { type: "Strip", strip_left: false, strip_right: true },
    { type: "Replace", pattern: { Regex: " {2,}" }, content: "\u2581" },
  ];
  const normalizer: Json = {
    type: "Sequence",
    normalizers: charsmap.length > 0 ? [{ type: "Precompiled", precompiled_charsmap: Buffer.from(charsmap).toString("base64") }, ...tail] : tail,
  };
  const metaspace = { type: "Metaspace", replacement: "\u2581", prepend_scheme: prependScheme, split: true };
  const json: Json = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: addedVocab.entries().map(toJsonAdded),
    normalizer,
    pre_tokenizer: metaspace,
    post_processor: templateSingle(["A", { special: "</s>", id: idOrUnk(addedVocab, settings, "</s>") }]),
    decoder: { ...metaspace },
    model: { type: "Unigram", unk_id: proto.trainerSpec.unkId, vocab: vocabList, byte_fallback: false },
  };
  return { json, addedVocab };
}

/** vocab.txt, as BertTokenizer loads it (one token per line, id = line number) and BertConverter converts it. */
export function convertBert(dir: string, settings: TokenizerSettings): ConvertedTokenizer {
  const file = path.join(dir, "vocab.txt");
  const text = readText(file);
  const lines = text.split("\n");
  if (lines.length > 0 && lines[lines.length - 1] === "") lines.pop();
  if (lines.length === 0) throw new Blip2Error(`${file}: the vocabulary is empty`);
  // load_vocab: vocab[token] = index, a repeated token keeps its last index.
  const vocab = new Map<string, number>();
  lines.forEach((token, i) => vocab.set(token, i));

  const addedVocab = new AddedVocabulary(vocab, vocab.size);
  applySettingsToAddedVocabulary(addedVocab, settings);

  const cfg = settings.config;
  const unk = settings.special.unk_token;
  const cls = settings.special.cls_token;
  const sep = settings.special.sep_token;
  const configFile = path.join(dir, "tokenizer_config.json");
  if (!unk) throw new Blip2Error(`${configFile}: a BERT tokenizer needs an unk_token`);
  if (!cls || !sep) throw new Blip2Error(`${configFile}: a BERT tokenizer needs cls_token and sep_token`);
  const sa = cfg["strip_accents"];
  const json: Json = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: addedVocab.entries().map(toJsonAdded),
    normalizer: {
      type: "BertNormalizer",
      clean_text: true,
      handle_chinese_chars: cfg["tokenize_chinese_chars"] === undefined || cfg["tokenize_chinese_chars"] === null ? true : cfg["tokenize_chinese_chars"] === true,
      strip_accents: typeof sa === "boolean" ? sa : null,
      lowercase: cfg["do_lower_case"] === undefined || cfg["do_lower_case"] === null ? true : cfg["do_lower_case"] === true,
    },
    pre_tokenizer: { type: "BertPreTokenizer" },
    post_processor: templateSingle([
      { special: cls.content, id: idOrUnk(addedVocab, settings, cls.content) },
      "A",
      { special: sep.content, id: idOrUnk(addedVocab, settings, sep.content) },
    ]),
    decoder: { type: "WordPiece", prefix: "##", cleanup: true },
    model: {
      type: "WordPiece",
      unk_token: unk.content,
      continuing_subword_prefix: "##",
      max_input_chars_per_word: 100,
      vocab: Object.fromEntries(vocab),
    },
  };
  return { json, addedVocab };
}

function toJsonAdded(t: { id: number; content: string; special: boolean; normalized: boolean; lstrip: boolean; rstrip: boolean; singleWord: boolean }): Json {
  return { id: t.id, content: t.content, single_word: t.singleWord, lstrip: t.lstrip, rstrip: t.rstrip, normalized: t.normalized, special: t.special };
}

export { toJsonAdded };
