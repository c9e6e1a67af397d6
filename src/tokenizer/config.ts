/**
 * Tokenizer settings as transformers reads them from a checkpoint folder: `tokenizer_config.json`
 * (init kwargs, `added_tokens_decoder`), and — only when that config has no `added_tokens_decoder`,
 * as in `PreTrainedTokenizerBase._from_pretrained` — the legacy `special_tokens_map.json` and
 * `added_tokens.json`. Also the added-vocabulary bookkeeping of the Rust `AddedVocabulary`
 * (`add_tokens`: an existing content keeps its id, a new one gets the next free id).
 */
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { readJsonFile } from "../io/checkpoint.js";

/** The named special-token attributes of `PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES`. */
export const SPECIAL_TOKEN_KEYS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] as const;
export type SpecialTokenKey = (typeof SPECIAL_TOKEN_KEYS)[number];

/** An `AddedToken` (tokenizers' flags). */
export interface AddedTokenSpec {
  content: string;
  special: boolean;
  normalized: boolean;
  lstrip: boolean;
  rstrip: boolean;
  singleWord: boolean;
}

/** An added token with its id, as in tokenizer.json's `added_tokens`. */
export interface AddedTokenEntry extends AddedTokenSpec {
  id: number;
}

/** Which slow tokenizer class (for its constructor defaults and its converter). */
export type TokenizerFamily = "gpt2" | "t5" | "bert" | "other";

export interface TokenizerSettings {
  /** The init kwargs: tokenizer_config.json, with special_tokens_map.json merged in the legacy case. */
  config: Record<string, unknown>;
  /** Named special tokens; `null` when the tokenizer has none. */
  special: Record<SpecialTokenKey, AddedTokenSpec | null>;
  /** `additional_special_tokens` / `extra_special_tokens`. */
  additionalSpecial: AddedTokenSpec[];
  /** `added_tokens_decoder` (or the legacy `added_tokens.json`), sorted by id. */
  addedTokensDecoder: Array<[number, AddedTokenSpec]>;
  /** Written by transformers 5 (its tokenizer_config.json carries `"backend"`). */
  savedByV5: boolean;
}

export function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}


/** Reads a JSON file that must hold an object. */
export function readJsonObject(file: string): Record<string, unknown> | undefined {
  const value = readJsonFile(file);
  if (value === undefined) return undefined;
  if (!isRecord(value)) throw new Blip2Error(`${file}: expected a JSON object at the top level`);
  return value;
}

/**
 * An AddedToken from a string or a serialized dict (`{"content": ..., "special": ...}`, possibly
 * with `"__type": "AddedToken"`). `normalized` defaults to `!special`, as in tokenizers.
 */
export function toAddedToken(value: unknown, special: boolean | undefined, file: string, what: string): AddedTokenSpec {
  if (typeof value === "string") {
    const sp = special ?? false;
    return { content: value, special: sp, normalized: !sp, lstrip: false, rstrip: false, singleWord: false };
  }
  if (isRecord(value) && typeof value["content"] === "string") {
    const sp = typeof value["special"] === "boolean" ? value["special"] : (special ?? false);
    const flag = (k: string, d: boolean) => (typeof value[k] === "boolean" ? (value[k] as boolean) : d);
    return {
      content: value["content"],
      special: special === true ? true : sp,
      normalized: flag("normalized", !sp),
      lstrip: flag("lstrip", false),
      rstrip: flag("rstrip", false),
      singleWord: flag("single_word", false),
    };
  }
  throw new Blip2Error(`${file}: ${what} must be a string or an object with a "content" string`);
}

/** Constructor defaults of the slow tokenizer classes for their special tokens. */
const CLASS_DEFAULTS: Record<TokenizerFamily, Partial<Record<SpecialTokenKey, string>>> = {
  gpt2: { unk_token: "<|endoftext|>", bos_token: "<|endoftext|>", eos_token: "<|endoftext|>" },
  t5: { eos_token: "</s>", unk_token: "<unk>", pad_token: "<pad>" },
  bert: { unk_token: "[UNK]", sep_token: "[SEP]", pad_token: "[PAD]", cls_token: "[CLS]", mask_token: "[MASK]" },
  other: {},
};

/** The family from `tokenizer_class` (GPT2/OPT, T5, BERT and their Fast variants). */
export function familyFromClass(tokenizerClass: unknown): TokenizerFamily | undefined {
  if (typeof tokenizerClass !== "string") return undefined;
  const name = tokenizerClass.replace(/Fast$/, "");
  if (name === "GPT2Tokenizer") return "gpt2";
  if (name === "T5Tokenizer") return "t5";
  if (name === "BertTokenizer") return "bert";
  return undefined;
}

/** The raw settings files of a tokenizer folder (each undefined when absent) and their paths. */
export interface RawTokenizerFiles {
  config?: Record<string, unknown>;
  configFile: string;
  specialTokensMap?: Record<string, unknown>;
  specialTokensMapFile: string;
  addedTokens?: Record<string, unknown>;
  addedTokensFile: string;
}

/**
 * Reads tokenizer_config.json, special_tokens_map.json and added_tokens.json of `dir` the way
 * transformers' `_from_pretrained` does.
 */
export function loadTokenizerSettings(dir: string, family: TokenizerFamily): TokenizerSettings {
  const configFile = path.join(dir, "tokenizer_config.json");
  const specialTokensMapFile = path.join(dir, "special_tokens_map.json");
  const addedTokensFile = path.join(dir, "added_tokens.json");
  const config = readJsonObject(configFile);
  // The legacy files are only read when the config has no added_tokens_decoder.
  const legacy = !(config && "added_tokens_decoder" in config);
  return resolveTokenizerSettings(
    {
      config,
      configFile,
      specialTokensMap: legacy ? readJsonObject(specialTokensMapFile) : undefined,
      specialTokensMapFile,
      addedTokens: legacy ? readJsonObject(addedTokensFile) : undefined,
      addedTokensFile,
    },
    family,
  );
}

/** The settings from already-parsed files. */
export function resolveTokenizerSettings(files: RawTokenizerFiles, family: TokenizerFamily): TokenizerSettings {
  const { configFile } = files;
  const config: Record<string, unknown> = { ...(files.config ?? {}) };
  const addedTokensDecoder = new Map<number, AddedTokenSpec>();

  if ("added_tokens_decoder" in config) {
    const atd = config["added_tokens_decoder"];
    if (atd !== null && !isRecord(atd)) throw new Blip2Error(`${configFile}: "added_tokens_decoder" must be an object`);
    for (const [key, value] of Object.entries(atd ?? {})) {
      const id = Number(key);
      if (!Number.isInteger(id) || id < 0) throw new Blip2Error(`${configFile}: "added_tokens_decoder" has a non-integer id "${key}"`);
      addedTokensDecoder.set(id, toAddedToken(value, undefined, configFile, `added_tokens_decoder["${key}"]`));
    }
  } else {
    // Legacy: special_tokens_map.json overrides the config's special tokens.
    const mapFile = files.specialTokensMapFile;
    const map = files.specialTokensMap;
    if (map) {
      for (const [key, value] of Object.entries(map)) {
        if (key === "additional_special_tokens" && Array.isArray(value)) {
          const current = Array.isArray(config[key]) ? [...(config[key] as unknown[])] : [];
          const contents = new Set(current.map((t) => (isRecord(t) ? t["content"] : t)));
          for (const tok of value) {
            const spec = toAddedToken(tok, true, mapFile, `"${key}" entry`);
            if (!contents.has(spec.content)) {
              current.push(isRecord(tok) ? { ...tok, special: true } : tok);
              contents.add(spec.content);
            }
          }
          config[key] = current;
        } else if (isRecord(value)) {
          config[key] = { ...value, special: true };
        } else {
          config[key] = value;
        }
      }
    }
    // Legacy: added_tokens.json ({content: id}); special when it is one of the special tokens.
    const addedFile = files.addedTokensFile;
    const added = files.addedTokens;
    if (added) {
      const specialContents = new Set<string>();
      for (const key of [...SPECIAL_TOKEN_KEYS, "additional_special_tokens"]) {
        const v = config[key];
        for (const t of Array.isArray(v) ? v : [v]) {
          if (typeof t === "string") specialContents.add(t);
          else if (isRecord(t) && typeof t["content"] === "string") specialContents.add(t["content"]);
        }
      }
      for (const [content, id] of Object.entries(added)) {
        if (typeof id !== "number" || !Number.isInteger(id) || id < 0) {
          throw new Blip2Error(`${addedFile}: the id of "${content}" must be a non-negative integer`);
        }
        const special = specialContents.has(content);
        addedTokensDecoder.set(id, { content, special, normalized: !special, lstrip: false, rstrip: false, singleWord: false });
      }
    }
  }

  const defaults = CLASS_DEFAULTS[familyFromClass(config["tokenizer_class"]) ?? family];
  const special = {} as Record<SpecialTokenKey, AddedTokenSpec | null>;
  for (const key of SPECIAL_TOKEN_KEYS) {
    const value = key in config ? config[key] : defaults[key];
    special[key] = value === undefined || value === null ? null : toAddedToken(value, true, configFile, `"${key}"`);
  }

  const additionalSpecial: AddedTokenSpec[] = [];
  const seen = new Set<string>();
  const pushAdditional = (value: unknown, what: string) => {
    const spec = toAddedToken(value, true, configFile, what);
    if (!seen.has(spec.content)) {
      seen.add(spec.content);
      additionalSpecial.push(spec);
    }
  };
  for (const key of ["additional_special_tokens", "extra_special_tokens"]) {
    const v = config[key];
    if (v === undefined || v === null) continue;
    if (Array.isArray(v)) v.forEach((t, i) => pushAdditional(t, `"${key}"[${i}]`));
    else if (isRecord(v) && !("content" in v)) for (const [name, t] of Object.entries(v)) pushAdditional(t, `"${key}".${name}`);
    else throw new Blip2Error(`${configFile}: "${key}" must be a list of tokens`);
  }

  return {
    config,
    special,
    additionalSpecial,
    addedTokensDecoder: [...addedTokensDecoder.entries()].sort((a, b) => a[0] - b[0]),
    savedByV5: "backend" in config,
  };
}

/**
 * The added vocabulary of a tokenizers `Tokenizer`: ids of added tokens by content, their flags,
 * and the (sticky) set of special contents. `add` follows `AddedVocabulary::add_tokens`.
 */
export class AddedVocabulary {
  private readonly byContent = new Map<string, number>();
  private readonly byId = new Map<number, AddedTokenSpec>();
  readonly specialContents = new Set<string>();

  constructor(
    /** The model's own vocabulary (without added tokens). */
    private readonly modelVocab: ReadonlyMap<string, number>,
    private readonly modelVocabSize: number,
  ) {}

  /** Registers a token that already has an id (tokenizer.json's `added_tokens`). */
  addWithId(token: AddedTokenSpec, id: number): void {
    const previous = this.byContent.get(token.content);
    if (previous !== undefined && previous !== id) this.byId.delete(previous);
    this.byContent.set(token.content, id);
    this.byId.set(id, { ...token });
    if (token.special) this.specialContents.add(token.content);
  }

  /** `add_tokens([token])`: returns the token's id (an existing content keeps its id). */
  add(token: AddedTokenSpec): number {
    if (token.content === "") return -1;
    const existing = this.byContent.get(token.content);
    const id = existing ?? this.modelVocab.get(token.content) ?? this.nextId();
    this.byContent.set(token.content, id);
    this.byId.set(id, { ...token });
    if (token.special) this.specialContents.add(token.content);
    return id;
  }

  private nextId(): number {
    let max = -1;
    for (const id of this.byId.keys()) max = Math.max(max, id);
    if (max < 0) return this.modelVocabSize;
    return max >= this.modelVocabSize || this.modelVocabSize === 0 ? max + 1 : this.modelVocabSize;
  }

  /** Added first, then the model vocabulary (`Tokenizer::token_to_id`). */
  tokenToId(content: string): number | undefined {
    return this.byContent.get(content) ?? this.modelVocab.get(content);
  }

  has(content: string): boolean {
    return this.byContent.has(content);
  }

  get(content: string): AddedTokenSpec | undefined {
    const id = this.byContent.get(content);
    return id === undefined ? undefined : this.byId.get(id);
  }

  /** tokenizer.json `added_tokens`, sorted by id, `special` from the special set. */
  entries(): AddedTokenEntry[] {
    return [...this.byId.entries()]
      .sort((a, b) => a[0] - b[0])
      .map(([id, t]) => ({ ...t, id, special: this.specialContents.has(t.content) }));
  }
}

/**
 * What `PreTrainedTokenizerFast.__init__` adds on top of the backend's added tokens: the
 * `added_tokens_decoder` entries (by ascending id) that differ from what the backend has, then
 * every special token whose content is not yet an added token. A token is special when its flag
 * says so or its content is one of the special tokens.
 */
export function applySettingsToAddedVocabulary(vocab: AddedVocabulary, settings: TokenizerSettings): void {
  const specialContents = new Set<string>();
  for (const key of SPECIAL_TOKEN_KEYS) {
    const t = settings.special[key];
    if (t) specialContents.add(t.content);
  }
  for (const t of settings.additionalSpecial) specialContents.add(t.content);

  const same = (a: AddedTokenSpec, b: AddedTokenSpec) =>
    a.content === b.content && a.special === b.special && a.normalized === b.normalized && a.lstrip === b.lstrip && a.rstrip === b.rstrip && a.singleWord === b.singleWord;

  const toAdd: AddedTokenSpec[] = [];
  for (const [, token] of settings.addedTokensDecoder) {
    const current = vocab.get(token.content);
    if (current && same(current, token)) continue;
    toAdd.push(token);
  }
  const queued = new Set(toAdd.map((t) => t.content));
  const extended: AddedTokenSpec[] = [];
  for (const key of SPECIAL_TOKEN_KEYS) {
    const t = settings.special[key];
    if (t) extended.push(t);
  }
  extended.push(...settings.additionalSpecial);
  for (const t of extended) {
    if (vocab.has(t.content) || queued.has(t.content)) continue;
    toAdd.push(t);
    queued.add(t.content);
  }
  for (const t of toAdd) vocab.add({ ...t, special: t.special || specialContents.has(t.content) });
}
