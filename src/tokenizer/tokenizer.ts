/**
 * Blip2Tokenizer: the tokenizer of a BLIP-2 checkpoint (OPT byte-level BPE, T5 SentencePiece
 * Unigram, or the Q-Former's BERT WordPiece), giving the same ids and texts as transformers'
 * `tokenizer(text)["input_ids"]` and `tokenizer.decode(...)`.
 *
 * A folder's `tokenizer.json` is used as is; without one, the slow-tokenizer files are converted
 * (see legacy.ts). `@huggingface/tokenizers` runs the added-token splitting and the model; the
 * normalizer, pre-tokenizer, post-processor and decoder follow the Rust crate (components.ts).
 */
import fs from "node:fs";
import path from "node:path";
import { lib as tokenizersLib, type LibTokenizer } from "./lib.js";
import { Blip2Error } from "../errors.js";
import { warnOnce } from "../warn.js";
import { readJsonFile } from "../io/checkpoint.js";
import {
  AddedVocabulary,
  applySettingsToAddedVocabulary,
  familyFromClass,
  isRecord,
  loadTokenizerSettings,
  resolveTokenizerSettings,
  SPECIAL_TOKEN_KEYS,
  type SpecialTokenKey,
  type TokenizerFamily,
  type TokenizerSettings,
} from "./config.js";
import {
  applyCleanup,
  buildDecoder,
  buildNormalizer,
  buildPostProcessor,
  buildPreTokenizer,
  CLEANUP_RULES,
  ComponentError,
  FunctionNormalizer,
  FunctionPreTokenizer,
  type DecodeChainFn,
  type PostProcessFn,
} from "./components.js";
import { convertBert, convertGpt2, convertT5, LEGACY_FILES, toJsonAdded } from "./legacy.js";

type Json = Record<string, unknown>;

export interface EncodeOptions {
  /** Add the post-processor's special tokens (BOS for OPT, `</s>` for T5, `[CLS]`/`[SEP]` for BERT). Default true. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Drop special added tokens. Default false. */
  skipSpecialTokens?: boolean;
  /** Override the tokenizer's `clean_up_tokenization_spaces`. */
  cleanUpTokenizationSpaces?: boolean;
}

export interface PaddedBatch {
  inputIds: number[][];
  attentionMask: number[][];
}

/** The files `fromDirectory` looks for, in order of preference. */
export const TOKENIZER_FILES = ["tokenizer.json", "vocab.json + merges.txt", "spiece.model", "vocab.txt"] as const;

/** transformers' `clean_up_tokenization` (Python): spaces before punctuation and contractions removed. */
export const cleanUpTokenization = (text: string): string => applyCleanup(text, CLEANUP_RULES);

/** The model's own vocabulary (without added tokens) of a tokenizer.json `model`. */
function modelVocabulary(model: Json, file: string): { vocab: Map<string, number>; size: number } {
  const v = model["vocab"];
  const vocab = new Map<string, number>();
  if (Array.isArray(v)) {
    v.forEach((entry, i) => {
      if (!Array.isArray(entry) || typeof entry[0] !== "string" || typeof entry[1] !== "number") {
        throw new Blip2Error(`${file}: model.vocab entry ${i} is not a [piece, score] pair`);
      }
      if (!vocab.has(entry[0])) vocab.set(entry[0], i);
    });
    return { vocab, size: v.length };
  }
  if (isRecord(v)) {
    for (const [token, id] of Object.entries(v)) {
      if (typeof id !== "number" || !Number.isInteger(id) || id < 0) throw new Blip2Error(`${file}: model.vocab id of ${JSON.stringify(token)} is not a non-negative integer`);
      vocab.set(token, id);
    }
    return { vocab, size: vocab.size };
  }
  throw new Blip2Error(`${file}: model has no "vocab"`);
}

function modelType(model: Json): string {
  if (typeof model["type"] === "string") return model["type"];
  if (Array.isArray(model["vocab"])) return "Unigram";
  if ("merges" in model) return "BPE";
  if ("continuing_subword_prefix" in model) return "WordPiece";
  return "WordLevel";
}

interface Backend {
  /** The effective tokenizer.json. */
  json: Json;
  /** Where it came from, for error messages. */
  source: string;
  family: TokenizerFamily;
}

export class Blip2Tokenizer {
  /** Tokens are padded on this side by `pad` (tokenizer_config `padding_side`, default "right"). */
  paddingSide: "left" | "right";
  /** tokenizer_config `model_max_length` (transformers' VERY_LARGE_INTEGER when absent). */
  readonly modelMaxLength: number;
  /**
   * Whether `decode` applies transformers' `clean_up_tokenization`: tokenizer_config
   * `clean_up_tokenization_spaces` (default false), ignored for BPE models in configs written by
   * transformers 5 (as transformers 5 does) unless `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output`.
   */
  readonly cleanUpTokenizationSpaces: boolean;
  /** The folder or file the tokenizer was read from. */
  readonly source: string;

  private json: Json;
  private readonly modelVocab: Map<string, number>;
  private readonly addedVocab: AddedVocabulary;
  private readonly specialTokens: Record<SpecialTokenKey, string | null>;
  private lib!: LibTokenizer;
  private cachedVocabSize: number | undefined;
  private readonly normalizer: FunctionNormalizer | null;
  private readonly preTokenizer: FunctionPreTokenizer | null;
  private readonly postProcess: PostProcessFn | null;
  private readonly decodeChain: DecodeChainFn | null;

  private constructor(backend: Backend, settings: TokenizerSettings) {
    const { json, source } = backend;
    this.source = source;
    const model = json["model"];
    if (!isRecord(model)) throw new Blip2Error(`${source}: no "model" object`);
    const type = modelType(model);
    if (type !== "BPE" && type !== "WordPiece" && type !== "Unigram") throw new Blip2Error(`${source}: unsupported model type "${type}"`);
    const { vocab, size } = modelVocabulary(model, source);
    this.modelVocab = vocab;

    try {
      const n = buildNormalizer(json["normalizer"]);
      this.normalizer = n ? new FunctionNormalizer(n) : null;
      const p = buildPreTokenizer(json["pre_tokenizer"]);
      this.preTokenizer = p ? new FunctionPreTokenizer(p) : null;
      this.postProcess = buildPostProcessor(json["post_processor"]);
      this.decodeChain = buildDecoder(json["decoder"]);
    } catch (err) {
      if (err instanceof ComponentError) throw new Blip2Error(`${source}: ${err.message}`, { cause: err });
      throw err;
    }

    // The added vocabulary: tokenizer.json's added tokens, then what the config adds.
    this.addedVocab = new AddedVocabulary(vocab, size);
    const added = json["added_tokens"] ?? [];
    if (!Array.isArray(added)) throw new Blip2Error(`${source}: "added_tokens" must be a list`);
    added.forEach((t, i) => {
      if (!isRecord(t) || typeof t["content"] !== "string" || typeof t["id"] !== "number" || !Number.isInteger(t["id"])) {
        throw new Blip2Error(`${source}: added_tokens[${i}] needs an integer "id" and a string "content"`);
      }
      const special = t["special"] === true;
      const flag = (k: string, d: boolean) => (typeof t[k] === "boolean" ? (t[k] as boolean) : d);
      this.addedVocab.addWithId(
        { content: t["content"], special, normalized: flag("normalized", !special), lstrip: flag("lstrip", false), rstrip: flag("rstrip", false), singleWord: flag("single_word", false) },
        t["id"],
      );
    });
    applySettingsToAddedVocabulary(this.addedVocab, settings);

    this.specialTokens = {} as Record<SpecialTokenKey, string | null>;
    for (const key of SPECIAL_TOKEN_KEYS) this.specialTokens[key] = settings.special[key]?.content ?? null;

    const cfg = settings.config;
    const side = cfg["padding_side"] ?? "right";
    if (side !== "left" && side !== "right") throw new Blip2Error(`${source}: tokenizer_config "padding_side" must be "left" or "right", not ${JSON.stringify(side)}`);
    this.paddingSide = side;
    const mml = cfg["model_max_length"];
    this.modelMaxLength = typeof mml === "number" && mml > 0 ? mml : 1e30;

    // clean_up_tokenization_spaces defaults to False (transformers >= 4.45). transformers 5 ignores
    // it for BPE models unless clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output.
    let cleanup = cfg["clean_up_tokenization_spaces"] === true;
    if (cleanup && settings.savedByV5 && type === "BPE" && cfg["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] !== true) cleanup = false;
    this.cleanUpTokenizationSpaces = cleanup;

    this.json = { ...json, added_tokens: this.addedVocab.entries().map(toJsonAdded) };
    this.rebuildLibrary();
  }

  /** (Re)creates the library tokenizer from the current tokenizer.json and installs the Rust-faithful components. */
  private rebuildLibrary(): void {
    const json = this.json;
    const base = { ...json, normalizer: json["normalizer"] ?? null, pre_tokenizer: json["pre_tokenizer"] ?? null, post_processor: null, decoder: null };
    const eos = this.specialTokens.eos_token;
    const libConfig = eos === null ? {} : { eos_token: eos };
    const lib = this.buildLibrary(base, libConfig);
    lib.normalizer = this.normalizer;
    lib.pre_tokenizer = this.preTokenizer;
    lib.post_processor = null;
    lib.decoder = null;
    this.lib = lib;
  }

  /**
   * The library's tokenizer for `json`. Its normalizer and pre-tokenizer are replaced by ours
   * (components.ts), so where the library cannot build one of them (a type or option it lacks), it
   * is built without that one, and the user is told. A failure that leaving them out does not cure
   * lies elsewhere (the model, the vocabulary) and is reported as it is.
   */
  private buildLibrary(json: Record<string, unknown>, config: object): LibTokenizer {
    try {
      return new tokenizersLib.Tokenizer(json, config);
    } catch (err) {
      const reason = (err as Error).message.split("\n")[0];
      for (const left of [["normalizer"], ["pre_tokenizer"], ["normalizer", "pre_tokenizer"]]) {
        const lib = this.tryBuildLibrary({ ...json, ...Object.fromEntries(left.map((k) => [k, null])) }, config);
        if (!lib) continue;
        warnOnce(`${this.source}: the tokenizers library cannot build this tokenizer's ${left.join(" and ")} (${reason}); blip2's own is used`);
        return lib;
      }
      throw new Blip2Error(`${this.source}: cannot build the tokenizer (${reason})`, { cause: err });
    }
  }

  /** The library's tokenizer, or null where it fails to build (the caller reports the first failure). */
  private tryBuildLibrary(json: Record<string, unknown>, config: object): LibTokenizer | null {
    try {
      return new tokenizersLib.Tokenizer(json, config);
    } catch {
      return null;
    }
  }

  /**
   * Loads the tokenizer of a checkpoint folder: `tokenizer.json` when present, else `vocab.json` +
   * `merges.txt` (GPT-2/OPT), `spiece.model` (T5) or `vocab.txt` (BERT), converted like
   * transformers' `convert_slow_tokenizer`; `tokenizer_class` in tokenizer_config.json picks among
   * legacy files when several are present. Settings come from tokenizer_config.json (and, in the
   * legacy layout without `added_tokens_decoder`, special_tokens_map.json and added_tokens.json).
   */
  static async fromDirectory(dir: string): Promise<Blip2Tokenizer> {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(dir);
    } catch {
      throw new Blip2Error(`${dir}: tokenizer folder does not exist`);
    }
    if (!stat.isDirectory()) throw new Blip2Error(`${dir}: not a folder (expected a tokenizer folder)`);
    const has = (f: string) => fs.existsSync(path.join(dir, f));

    const tokenizerJsonFile = path.join(dir, "tokenizer.json");
    if (has("tokenizer.json")) {
      const json = readJsonFile(tokenizerJsonFile);
      if (!isRecord(json)) throw new Blip2Error(`${tokenizerJsonFile}: expected a JSON object at the top level`);
      if (!isRecord(json["model"])) throw new Blip2Error(`${tokenizerJsonFile}: no "model" object`);
      const type = modelType(json["model"]);
      const familyGuess: TokenizerFamily = type === "BPE" ? "gpt2" : type === "Unigram" ? "t5" : type === "WordPiece" ? "bert" : "other";
      const settings = loadTokenizerSettings(dir, "other");
      const family = familyFromClass(settings.config["tokenizer_class"]) ?? familyGuess;
      return new Blip2Tokenizer({ json: applyClassOverrides(json, settings, family), source: tokenizerJsonFile, family }, settings);
    }

    const available = (Object.keys(LEGACY_FILES) as Array<keyof typeof LEGACY_FILES>).filter((f) => LEGACY_FILES[f].some(has));
    if (available.length === 0) {
      throw new Blip2Error(`${dir}: no tokenizer files (looked for ${TOKENIZER_FILES.join(", ")})`);
    }
    // Peek at tokenizer_class to choose among several legacy layouts.
    const preferred = familyFromClass(loadTokenizerSettings(dir, "other").config["tokenizer_class"]);
    const family = preferred && available.includes(preferred as keyof typeof LEGACY_FILES) ? (preferred as keyof typeof LEGACY_FILES) : available[0]!;
    for (const f of LEGACY_FILES[family]) {
      if (!has(f)) throw new Blip2Error(`${path.join(dir, f)}: missing (a ${family === "gpt2" ? "GPT-2/OPT" : family} tokenizer needs ${LEGACY_FILES[family].join(" + ")})`);
    }
    const settings = loadTokenizerSettings(dir, family);
    const converted = family === "gpt2" ? convertGpt2(dir, settings) : family === "t5" ? convertT5(dir, settings) : convertBert(dir, settings);
    const source = path.join(dir, LEGACY_FILES[family][0]!);
    return new Blip2Tokenizer({ json: converted.json, source, family }, settings);
  }

  /** Builds a tokenizer from an in-memory tokenizer.json and tokenizer_config objects. */
  static fromObjects(tokenizerJson: Json, tokenizerConfig: Json = {}, source = "tokenizer.json"): Blip2Tokenizer {
    const model = tokenizerJson["model"];
    if (!isRecord(model)) throw new Blip2Error(`${source}: no "model" object`);
    const settings = resolveTokenizerSettings(
      { config: tokenizerConfig, configFile: "tokenizer_config.json", specialTokensMapFile: "special_tokens_map.json", addedTokensFile: "added_tokens.json" },
      "other",
    );
    const type = modelType(model);
    const family = familyFromClass(tokenizerConfig["tokenizer_class"]) ?? (type === "BPE" ? "gpt2" : type === "Unigram" ? "t5" : "bert");
    return new Blip2Tokenizer({ json: applyClassOverrides(tokenizerJson, settings, family), source, family }, settings);
  }

  /** `tokenizer(text)["input_ids"]`. */
  encode(text: string, opts: EncodeOptions = {}): number[] {
    if (typeof text !== "string") throw new Blip2Error(`tokenizer: encode expects a string, got ${typeof text}`);
    const ids = this.lib.encode(text, { add_special_tokens: false }).ids;
    for (const id of ids) {
      if (id === undefined || id === null) throw new Blip2Error(`${this.source}: text has a piece with no id and the model has no unk token: ${JSON.stringify(text)}`);
    }
    if ((opts.addSpecialTokens ?? true) && this.postProcess) return this.postProcess(ids);
    return ids;
  }

  /** The tokens of `encode(text, opts)`. */
  tokenize(text: string, opts: EncodeOptions = {}): string[] {
    return this.encode(text, opts).map((id) => this.idToToken(id) ?? "");
  }

  /** `tokenizer.decode(ids, skip_special_tokens=...)`. Ids the vocabulary lacks are dropped, as in tokenizers. */
  decode(ids: readonly number[], opts: DecodeOptions = {}): string {
    const skip = opts.skipSpecialTokens ?? false;
    const tokens: string[] = [];
    for (const id of ids) {
      const token = this.idToToken(id);
      if (token === undefined) continue;
      if (skip && this.addedVocab.specialContents.has(token)) continue;
      tokens.push(token);
    }
    let text = this.decodeChain ? this.decodeChain(tokens).join("") : tokens.join(" ");
    if (opts.cleanUpTokenizationSpaces ?? this.cleanUpTokenizationSpaces) text = cleanUpTokenization(text);
    return text;
  }

  /** `tokenizer.batch_decode(batch, ...)`. */
  batchDecode(batch: readonly (readonly number[])[], opts: DecodeOptions = {}): string[] {
    return batch.map((ids) => this.decode(ids, opts));
  }

  /** Added tokens first, then the model vocabulary. */
  tokenToId(token: string): number | undefined {
    return this.addedVocab.tokenToId(token);
  }

  idToToken(id: number): string | undefined {
    if (!Number.isInteger(id) || id < 0) return undefined;
    const token = this.lib.model?.vocab[id];
    return typeof token === "string" ? token : undefined;
  }

  /** `len(tokenizer)`: the number of distinct tokens, added tokens included. */
  get vocabSize(): number {
    if (this.cachedVocabSize === undefined) {
      let extra = 0;
      for (const t of this.addedVocab.entries()) if (!this.modelVocab.has(t.content)) extra++;
      this.cachedVocabSize = this.modelVocab.size + extra;
    }
    return this.cachedVocabSize;
  }

  /** The named special tokens' contents (`null` when absent). */
  get specialTokenMap(): Readonly<Record<SpecialTokenKey, string | null>> {
    return this.specialTokens;
  }

  /** Ids of all special added tokens, ascending. */
  get allSpecialIds(): number[] {
    return this.addedVocab
      .entries()
      .filter((t) => t.special)
      .map((t) => t.id);
  }

  private specialId(key: SpecialTokenKey): number | undefined {
    const content = this.specialTokens[key];
    if (content === null) return undefined;
    const id = this.tokenToId(content);
    if (id !== undefined) return id;
    const unk = this.specialTokens.unk_token;
    return unk === null ? undefined : this.tokenToId(unk);
  }

  get bosTokenId(): number | undefined {
    return this.specialId("bos_token");
  }
  get eosTokenId(): number | undefined {
    return this.specialId("eos_token");
  }
  get padTokenId(): number | undefined {
    return this.specialId("pad_token");
  }
  get unkTokenId(): number | undefined {
    return this.specialId("unk_token");
  }
  get clsTokenId(): number | undefined {
    return this.specialId("cls_token");
  }
  get sepTokenId(): number | undefined {
    return this.specialId("sep_token");
  }
  get maskTokenId(): number | undefined {
    return this.specialId("mask_token");
  }

  /**
   * `tokenizer.add_tokens([content], special_tokens=True)`: the id of the token with that content
   * if there is one (a model-vocabulary token becomes a special added token), else a new special
   * added token with the next id (the vocabulary size).
   */
  addSpecialToken(content: string): number {
    if (typeof content !== "string" || content === "") throw new Blip2Error(`tokenizer: a special token needs non-empty content`);
    const existing = this.addedVocab.get(content);
    if (existing) {
      const id = this.addedVocab.tokenToId(content)!;
      if (!this.addedVocab.specialContents.has(content)) {
        this.addedVocab.add({ ...existing, special: true });
        this.json = { ...this.json, added_tokens: this.addedVocab.entries().map(toJsonAdded) };
      }
      return id;
    }
    const id = this.addedVocab.add({ content, special: true, normalized: false, lstrip: false, rstrip: false, singleWord: false });
    this.json = { ...this.json, added_tokens: this.addedVocab.entries().map(toJsonAdded) };
    this.cachedVocabSize = undefined;
    this.rebuildLibrary();
    return id;
  }

  /** Pads every sequence with the pad token to the longest, on `side` (default `paddingSide`). */
  pad(batch: readonly (readonly number[])[], side: "left" | "right" = this.paddingSide): PaddedBatch {
    const longest = batch.reduce((m, ids) => Math.max(m, ids.length), 0);
    const needsPadding = batch.some((ids) => ids.length < longest);
    const padId = this.padTokenId;
    if (needsPadding && padId === undefined) throw new Blip2Error(`${this.source}: cannot pad: the tokenizer has no pad token`);
    const inputIds: number[][] = [];
    const attentionMask: number[][] = [];
    for (const ids of batch) {
      const n = longest - ids.length;
      const pads = new Array<number>(n).fill(padId ?? 0);
      const zeros = new Array<number>(n).fill(0);
      const ones = new Array<number>(ids.length).fill(1);
      if (side === "left") {
        inputIds.push([...pads, ...ids]);
        attentionMask.push([...zeros, ...ones]);
      } else {
        inputIds.push([...ids, ...pads]);
        attentionMask.push([...ones, ...zeros]);
      }
    }
    return { inputIds, attentionMask };
  }

  /** The effective tokenizer.json (for a legacy folder: the converted one). */
  toTokenizerJson(): Json {
    return structuredClone(this.json);
  }
}

/**
 * The 4.x fast-tokenizer classes re-apply some init kwargs to a loaded tokenizer.json:
 * GPT2TokenizerFast `add_prefix_space` on the ByteLevel pre-tokenizer, BertTokenizerFast
 * `do_lower_case`/`strip_accents`/`tokenize_chinese_chars` on the BertNormalizer.
 */
function applyClassOverrides(json: Json, settings: TokenizerSettings, family: TokenizerFamily): Json {
  const cls = familyFromClass(settings.config["tokenizer_class"]);
  if (!cls || cls !== family) return json;
  const cfg = settings.config;
  if (family === "gpt2" && typeof cfg["add_prefix_space"] === "boolean") {
    const pre = json["pre_tokenizer"];
    if (isRecord(pre) && pre["type"] === "ByteLevel" && pre["add_prefix_space"] !== cfg["add_prefix_space"]) {
      return { ...json, pre_tokenizer: { ...pre, add_prefix_space: cfg["add_prefix_space"] } };
    }
  }
  if (family === "bert") {
    const norm = json["normalizer"];
    if (isRecord(norm) && norm["type"] === "BertNormalizer") {
      const lowercase = typeof cfg["do_lower_case"] === "boolean" ? cfg["do_lower_case"] : true;
      const sa = cfg["strip_accents"];
      const stripAccents = typeof sa === "boolean" ? sa : null;
      const chinese = typeof cfg["tokenize_chinese_chars"] === "boolean" ? cfg["tokenize_chinese_chars"] : true;
      if ((norm["lowercase"] ?? lowercase) !== lowercase || (norm["strip_accents"] ?? stripAccents) !== stripAccents || (norm["handle_chinese_chars"] ?? chinese) !== chinese) {
        return { ...json, normalizer: { ...norm, lowercase, strip_accents: stripAccents, handle_chinese_chars: chinese } };
      }
    }
  }
  return json;
}
