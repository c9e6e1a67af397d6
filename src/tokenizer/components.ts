/**
 * Pipeline components of a tokenizer.json, with the semantics of the Rust `tokenizers` crate that
 * transformers runs. `@huggingface/tokenizers` does the added-token splitting and the models (BPE,
 * WordPiece, Unigram); where its normalizers, pre-tokenizers, post-processors or decoders differ
 * from Rust in ways that change ids or text, these replace them:
 * - Precompiled: the real SentencePiece charsmap (the library approximates it with NFKC);
 * - Metaspace: `split` on the replacement character and `prepend_scheme` (the library never splits);
 * - BertNormalizer: Rust's control/whitespace classes, per-character lowercasing, CJK outside the BMP;
 * - decoders: unknown ids dropped, ByteLevel over all tokens at once with lossy UTF-8,
 *   WordPiece cleanup incl. " do not", Metaspace `prepend_scheme`, ByteFallback per-byte U+FFFD;
 * - TemplateProcessing with the special tokens' ids from the template.
 * Components the library implements the same way as Rust are delegated to it.
 */
import { lib } from "./lib.js";
import { PrecompiledCharsmap, ProtobufError } from "./sentencepiece.js";
import { isRecord } from "./config.js";

/** An unsupported or malformed component; the caller adds the file name. */
export class ComponentError extends Error {}

type Json = Record<string, unknown>;
export type NormalizeFn = (text: string) => string;
/** Pre-tokenizes one section; `first` is true when the section starts the input (offset 0). */
export type PreTokenizeFn = (text: string, first: boolean) => string[];
export type DecodeChainFn = (tokens: string[]) => string[];
export type PostProcessFn = (ids: number[]) => number[];

function typeOf(cfg: Json, what: string): string {
  const t = cfg["type"];
  if (typeof t !== "string") throw new ComponentError(`${what} has no "type"`);
  return t;
}

function asList(v: unknown, what: string): Json[] {
  if (!Array.isArray(v) || !v.every(isRecord)) throw new ComponentError(`${what} must be a list of objects`);
  return v as Json[];
}

/** Rust's `char::is_whitespace` (Unicode White_Space). */
const WHITE_SPACE = /\p{White_Space}/u;
const LEADING_WS = /^\p{White_Space}+/u;
const TRAILING_WS = /\p{White_Space}+$/u;

/** Lowercases character by character, like Rust's `NormalizedString::lowercase` (no final-sigma rule). */
export function lowercasePerChar(text: string): string {
  let out = "";
  for (const ch of text) out += ch.toLowerCase();
  return out;
}

function isChineseChar(cp: number): boolean {
  return (
    (cp >= 0x4e00 && cp <= 0x9fff) ||
    (cp >= 0x3400 && cp <= 0x4dbf) ||
    (cp >= 0x20000 && cp <= 0x2a6df) ||
    (cp >= 0x2a700 && cp <= 0x2b73f) ||
    (cp >= 0x2b740 && cp <= 0x2b81f) ||
    (cp >= 0x2b920 && cp <= 0x2ceaf) ||
    (cp >= 0xf900 && cp <= 0xfaff) ||
    (cp >= 0x2f800 && cp <= 0x2fa1f)
  );
}

const OTHER = /^\p{C}$/u; // Cc, Cf, Cs, Co, Cn
const NONSPACING_MARK = /\p{Mn}/gu;
const ANY_MARK = /\p{M}/gu;

/** The Rust `BertNormalizer`. */
export function bertNormalize(text: string, cfg: { cleanText: boolean; handleChineseChars: boolean; stripAccents: boolean | null; lowercase: boolean }): string {
  if (cfg.cleanText) {
    let out = "";
    for (const ch of text) {
      const cp = ch.codePointAt(0)!;
      const isWs = ch === "\t" || ch === "\n" || ch === "\r" || WHITE_SPACE.test(ch);
      const isControl = !(ch === "\t" || ch === "\n" || ch === "\r") && OTHER.test(ch);
      if (cp === 0 || cp === 0xfffd || isControl) continue;
      out += isWs ? " " : ch;
    }
    text = out;
  }
  if (cfg.handleChineseChars) {
    let out = "";
    for (const ch of text) out += isChineseChar(ch.codePointAt(0)!) ? ` ${ch} ` : ch;
    text = out;
  }
  if (cfg.stripAccents ?? cfg.lowercase) text = text.normalize("NFD").replace(NONSPACING_MARK, "");
  if (cfg.lowercase) text = lowercasePerChar(text);
  return text;
}

function bool(cfg: Json, key: string, dflt: boolean): boolean {
  const v = cfg[key];
  return typeof v === "boolean" ? v : dflt;
}

/** Builds a normalizer function from a tokenizer.json `normalizer` object. */
export function buildNormalizer(cfg: unknown): NormalizeFn | null {
  if (cfg === null || cfg === undefined) return null;
  if (!isRecord(cfg)) throw new ComponentError(`normalizer must be an object`);
  const type = typeOf(cfg, "normalizer");
  switch (type) {
    case "Sequence": {
      const parts = asList(cfg["normalizers"], "Sequence normalizer").map((c) => buildNormalizer(c));
      return (text) => parts.reduce((t, f) => (f ? f(t) : t), text);
    }
    case "BertNormalizer": {
      const sa = cfg["strip_accents"];
      const opts = {
        cleanText: bool(cfg, "clean_text", true),
        handleChineseChars: bool(cfg, "handle_chinese_chars", true),
        stripAccents: typeof sa === "boolean" ? sa : null,
        lowercase: bool(cfg, "lowercase", true),
      };
      return (text) => bertNormalize(text, opts);
    }
    case "Precompiled": {
      const b64 = cfg["precompiled_charsmap"];
      if (b64 === null || b64 === undefined || b64 === "") return (text) => text;
      if (typeof b64 !== "string") throw new ComponentError(`Precompiled normalizer: precompiled_charsmap must be a base64 string`);
      let charsmap: PrecompiledCharsmap;
      try {
        charsmap = new PrecompiledCharsmap(new Uint8Array(Buffer.from(b64, "base64")));
      } catch (err) {
        if (err instanceof ProtobufError) throw new ComponentError(`Precompiled normalizer: ${err.message}`);
        throw err;
      }
      return (text) => charsmap.normalize(text);
    }
    case "Strip": {
      const left = bool(cfg, "strip_left", true);
      const right = bool(cfg, "strip_right", true);
      return (text) => {
        if (left) text = text.replace(LEADING_WS, "");
        if (right) text = text.replace(TRAILING_WS, "");
        return text;
      };
    }
    case "StripAccents":
      return (text) => text.replace(ANY_MARK, "");
    case "Lowercase":
      return lowercasePerChar;
    case "NFC":
    case "NFD":
    case "NFKC":
    case "NFKD":
      return (text) => text.normalize(type);
    case "Prepend": {
      const prepend = cfg["prepend"];
      if (typeof prepend !== "string") throw new ComponentError(`Prepend normalizer: "prepend" must be a string`);
      return (text) => (text.length > 0 ? prepend + text : text);
    }
    case "Replace": {
      const impl = new lib.ReplaceNormalizer(cfg);
      return (text) => impl.normalize(text);
    }
    default:
      throw new ComponentError(`unsupported normalizer type "${type}"`);
  }
}

/** Splits before every occurrence of `delim` (SplitDelimiterBehavior::MergedWithNext), dropping empty pieces. */
function splitMergedWithNext(text: string, delim: string): string[] {
  const out: string[] = [];
  let current = "";
  for (const ch of text) {
    if (ch === delim && current !== "") {
      out.push(current);
      current = "";
    }
    current += ch;
  }
  if (current !== "") out.push(current);
  return out;
}

type PrependScheme = "always" | "first" | "never";

function prependScheme(cfg: Json, what: string): PrependScheme {
  const aps = cfg["add_prefix_space"];
  const raw = cfg["prepend_scheme"] ?? "always";
  if (raw !== "always" && raw !== "first" && raw !== "never") throw new ComponentError(`${what}: unknown prepend_scheme "${String(raw)}"`);
  return aps === false ? "never" : raw;
}

function replacementChar(cfg: Json, what: string): string {
  const r = cfg["replacement"] ?? "\u2581";
  if (typeof r !== "string" || [...r].length !== 1) throw new ComponentError(`${what}: "replacement" must be one character`);
  return r;
}

/** Rust `\w` (regex crate, Unicode): Alphabetic, M, Nd, Pc, Join_Control. */
const WORD = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}";
const WHITESPACE_SPLIT = /[^\p{White_Space}]+/gu;
const WHITESPACE_PRETOK = new RegExp(`[${WORD}]+|[^${WORD}\\p{White_Space}]+`, "gu");
const BERT_PUNCT = /[\p{P}\u0021-\u002F\u003A-\u0040\u005B-\u0060\u007B-\u007E]/u;

/** Builds a pre-tokenizer function from a tokenizer.json `pre_tokenizer` object. */
export function buildPreTokenizer(cfg: unknown): PreTokenizeFn | null {
  if (cfg === null || cfg === undefined) return null;
  if (!isRecord(cfg)) throw new ComponentError(`pre_tokenizer must be an object`);
  const type = typeOf(cfg, "pre_tokenizer");
  switch (type) {
    case "Sequence": {
      const parts = asList(cfg["pretokenizers"], "Sequence pre_tokenizer").map((c) => buildPreTokenizer(c));
      return (text, first) => {
        // Each piece keeps whether it starts at the beginning of the input.
        let pieces: Array<{ text: string; first: boolean }> = [{ text, first }];
        for (const p of parts) {
          if (!p) continue;
          const next: Array<{ text: string; first: boolean }> = [];
          for (const piece of pieces) {
            // Only the first sub-piece of a piece that starts the input can start the input;
            // a split that drops leading text (WhitespaceSplit) moves it past offset 0.
            const subs = p(piece.text, piece.first);
            subs.forEach((s, i) => next.push({ text: s, first: piece.first && i === 0 && piece.text.startsWith(s) }));
          }
          pieces = next;
        }
        return pieces.map((p) => p.text);
      };
    }
    case "Metaspace": {
      const replacement = replacementChar(cfg, "Metaspace pre_tokenizer");
      const scheme = prependScheme(cfg, "Metaspace pre_tokenizer");
      const split = bool(cfg, "split", true);
      return (text, first) => {
        let normalized = text.replaceAll(" ", replacement);
        if (!normalized.startsWith(replacement) && (scheme === "always" || (scheme === "first" && first))) {
          normalized = replacement + normalized;
        }
        if (normalized === "") return [];
        return split ? splitMergedWithNext(normalized, replacement) : [normalized];
      };
    }
    case "WhitespaceSplit":
      return (text) => text.match(WHITESPACE_SPLIT) ?? [];
    case "Whitespace":
      return (text) => text.match(WHITESPACE_PRETOK) ?? [];
    case "BertPreTokenizer":
      return (text) => {
        const out: string[] = [];
        for (const word of text.match(WHITESPACE_SPLIT) ?? []) {
          let current = "";
          for (const ch of word) {
            if (BERT_PUNCT.test(ch)) {
              if (current) out.push(current);
              out.push(ch);
              current = "";
            } else {
              current += ch;
            }
          }
          if (current) out.push(current);
        }
        return out;
      };
    case "ByteLevel":
    case "Split":
    case "Punctuation":
    case "Digits":
    case "Replace":
    case "FixedLength": {
      const ctor = {
        ByteLevel: lib.ByteLevelPreTokenizer,
        Split: lib.SplitPreTokenizer,
        Punctuation: lib.PunctuationPreTokenizer,
        Digits: lib.DigitsPreTokenizer,
        Replace: lib.ReplacePreTokenizer,
        FixedLength: lib.FixedLengthPreTokenizer,
      }[type];
      const impl = new ctor(cfg);
      return (text) => impl.pre_tokenize_text(text);
    }
    default:
      throw new ComponentError(`unsupported pre_tokenizer type "${type}"`);
  }
}

/** GPT-2's bytes_to_unicode, reversed: the byte each printable stand-in character encodes. */
const CHAR_TO_BYTE: ReadonlyMap<string, number> = (() => {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n);
      n++;
    }
  }
  return new Map(bs.map((b, i) => [String.fromCharCode(cs[i]!), b]));
})();

const lossyUtf8 = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const utf8Encoder = new TextEncoder();

/** transformers' (Python) `clean_up_tokenization` rules, in order. */
export const CLEANUP_RULES: readonly (readonly [string, string])[] = [
  [" .", "."], [" ?", "?"], [" !", "!"], [" ,", ","], [" ' ", "'"], [" n't", "n't"], [" 'm", "'m"], [" 's", "'s"], [" 've", "'ve"], [" 're", "'re"],
];

/** The Rust WordPiece decoder's cleanup: the same rules, plus " do not" -> " don't" after " 'm". */
const WORDPIECE_RULES = [...CLEANUP_RULES.slice(0, 7), [" do not", " don't"] as const, ...CLEANUP_RULES.slice(7)];

export function applyCleanup(text: string, rules: readonly (readonly [string, string])[]): string {
  return rules.reduce((t, [from, to]) => t.replaceAll(from, to), text);
}

/** The Rust `decoders::wordpiece::cleanup`. */
export const wordpieceCleanup = (s: string): string => applyCleanup(s, WORDPIECE_RULES);

/** Builds a decoder chain from a tokenizer.json `decoder` object. */
export function buildDecoder(cfg: unknown): DecodeChainFn | null {
  if (cfg === null || cfg === undefined) return null;
  if (!isRecord(cfg)) throw new ComponentError(`decoder must be an object`);
  const type = typeOf(cfg, "decoder");
  switch (type) {
    case "Sequence": {
      const parts = asList(cfg["decoders"], "Sequence decoder").map((c) => buildDecoder(c));
      return (tokens) => parts.reduce((t, f) => (f ? f(t) : t), tokens);
    }
    case "ByteLevel":
      return (tokens) => {
        const bytes: number[] = [];
        for (const t of tokens) {
          const mapped: number[] = [];
          let ok = true;
          for (const ch of t) {
            const b = CHAR_TO_BYTE.get(ch);
            if (b === undefined) {
              ok = false;
              break;
            }
            mapped.push(b);
          }
          if (ok) bytes.push(...mapped);
          else bytes.push(...utf8Encoder.encode(t));
        }
        return [lossyUtf8.decode(new Uint8Array(bytes))];
      };
    case "WordPiece": {
      const prefix = typeof cfg["prefix"] === "string" ? (cfg["prefix"] as string) : "##";
      const cleanup = bool(cfg, "cleanup", true);
      return (tokens) =>
        tokens.map((token, i) => {
          if (i !== 0) token = token.startsWith(prefix) ? token.slice(prefix.length) : ` ${token}`;
          return cleanup ? wordpieceCleanup(token) : token;
        });
    }
    case "Metaspace": {
      const replacement = replacementChar(cfg, "Metaspace decoder");
      const scheme = prependScheme(cfg, "Metaspace decoder");
      return (tokens) =>
        tokens.map((token, i) => {
          let out = "";
          for (const ch of token) {
            if (ch === replacement) {
              if (!(i === 0 && scheme !== "never")) out += " ";
            } else {
              out += ch;
            }
          }
          return out;
        });
    }
    case "BPEDecoder": {
      const suffix = typeof cfg["suffix"] === "string" ? (cfg["suffix"] as string) : "</w>";
      return (tokens) => tokens.map((t, i) => t.replaceAll(suffix, i === tokens.length - 1 ? "" : " "));
    }
    case "CTC": {
      const pad = typeof cfg["pad_token"] === "string" ? (cfg["pad_token"] as string) : "<pad>";
      const delim = typeof cfg["word_delimiter_token"] === "string" ? (cfg["word_delimiter_token"] as string) : "|";
      const cleanup = bool(cfg, "cleanup", true);
      return (tokens) => {
        const out: string[] = [];
        tokens.forEach((t, i) => {
          if (i > 0 && tokens[i - 1] === t) return;
          let r = t.replaceAll(pad, "");
          if (cleanup) r = wordpieceCleanup(r).replaceAll(delim, " ");
          if (r !== "") out.push(r);
        });
        return out;
      };
    }
    case "Replace": {
      const impl = new lib.ReplaceDecoder(cfg);
      return (tokens) => impl.decode_chain(tokens);
    }
    case "Fuse":
      return (tokens) => [tokens.join("")];
    case "Strip": {
      const content = typeof cfg["content"] === "string" ? (cfg["content"] as string) : " ";
      const start = typeof cfg["start"] === "number" ? (cfg["start"] as number) : 0;
      const stop = typeof cfg["stop"] === "number" ? (cfg["stop"] as number) : 0;
      return (tokens) =>
        tokens.map((token) => {
          const chars = [...token];
          let startCut = 0;
          for (let i = 0; i < chars.length && i < start && chars[i] === content; i++) startCut = i + 1;
          let stopCut = chars.length;
          for (let i = 0; i < chars.length && i < stop && chars[chars.length - 1 - i] === content; i++) stopCut = chars.length - 1 - i;
          return chars.slice(startCut, Math.max(startCut, stopCut)).join("");
        });
    }
    case "ByteFallback":
      return (tokens) => {
        const out: string[] = [];
        let pending: number[] = [];
        const flush = () => {
          if (pending.length === 0) return;
          try {
            out.push(strictUtf8.decode(new Uint8Array(pending)));
          } catch {
            for (let i = 0; i < pending.length; i++) out.push("\uFFFD");
          }
          pending = [];
        };
        for (const t of tokens) {
          const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(t);
          if (m) {
            pending.push(parseInt(m[1]!, 16));
          } else {
            flush();
            out.push(t);
          }
        }
        flush();
        return out;
      };
    default:
      throw new ComponentError(`unsupported decoder type "${type}"`);
  }
}

/** Builds the single-sequence post-processor (`add_special_tokens=True`) from a tokenizer.json `post_processor`. */
export function buildPostProcessor(cfg: unknown): PostProcessFn | null {
  if (cfg === null || cfg === undefined) return null;
  if (!isRecord(cfg)) throw new ComponentError(`post_processor must be an object`);
  const type = typeOf(cfg, "post_processor");
  const pairId = (v: unknown, what: string): number => {
    if (Array.isArray(v) && v.length === 2 && typeof v[1] === "number") return v[1];
    throw new ComponentError(`${type} post_processor: "${what}" must be [token, id]`);
  };
  switch (type) {
    case "TemplateProcessing": {
      const single = asList(cfg["single"], "TemplateProcessing single");
      const specials = cfg["special_tokens"];
      const table = new Map<string, number[]>();
      if (isRecord(specials)) {
        for (const [key, v] of Object.entries(specials)) {
          if (!isRecord(v) || !Array.isArray(v["ids"]) || !v["ids"].every((x) => typeof x === "number")) {
            throw new ComponentError(`TemplateProcessing: special token "${key}" has no "ids" list`);
          }
          table.set(key, v["ids"] as number[]);
        }
      }
      const pieces: Array<number[] | "A"> = single.map((item) => {
        const sp = item["SpecialToken"];
        const seq = item["Sequence"];
        if (isRecord(sp)) {
          const ids = table.get(String(sp["id"]));
          if (!ids) throw new ComponentError(`TemplateProcessing: special token "${String(sp["id"])}" is missing from special_tokens`);
          return ids;
        }
        if (isRecord(seq)) {
          if (seq["id"] !== "A") throw new ComponentError(`TemplateProcessing: the single template refers to sequence "${String(seq["id"])}"`);
          return "A";
        }
        throw new ComponentError(`TemplateProcessing: a template piece is neither SpecialToken nor Sequence`);
      });
      return (ids) => pieces.flatMap((p) => (p === "A" ? ids : p));
    }
    case "BertProcessing":
    case "RobertaProcessing": {
      const cls = pairId(cfg["cls"], "cls");
      const sep = pairId(cfg["sep"], "sep");
      return (ids) => [cls, ...ids, sep];
    }
    case "ByteLevel":
      return (ids) => ids;
    case "Sequence": {
      const parts = asList(cfg["processors"], "Sequence post_processor").map((c) => buildPostProcessor(c));
      return (ids) => parts.reduce((acc, f) => (f ? f(acc) : acc), ids);
    }
    default:
      throw new ComponentError(`unsupported post_processor type "${type}"`);
  }
}

/** A library Normalizer that runs a function (installed on the library tokenizer). */
export class FunctionNormalizer extends lib.Normalizer {
  constructor(private readonly fn: NormalizeFn) {
    super({ type: "NFC" });
  }
  override normalize(text: string): string {
    return this.fn(text);
  }
}

/** A library PreTokenizer that runs a function; the library passes the section index. */
export class FunctionPreTokenizer extends lib.PreTokenizer {
  constructor(private readonly fn: PreTokenizeFn) {
    super();
  }
  override pre_tokenize_text(text: string, options?: { section_index?: number }): string[] {
    return this.fn(text, (options?.section_index ?? 0) === 0);
  }
}
