/**
 * Tokenizers for models trained from scratch on the synthetic world (src/world/), in the formats
 * the released checkpoints use, so that everything downstream (Blip2Tokenizer, the processor,
 * compose, transformers) reads them as it reads the real ones:
 *
 * - the language model's: GPT-2 byte-level BPE with OPT's special tokens (`<s>` 0, `<pad>` 1,
 *   `</s>` 2 as BOS and EOS, `<unk>` 3), its merges learned from the world's text. The world's
 *   language has about a hundred distinct words, so merging until no pair repeats makes nearly every
 *   word one token ("Ġsmall", "Ġleft", "Ġyes"): answers are single tokens and sequences are half
 *   as long as with the test fixtures' general-English BPE (which spells "small" in five pieces).
 *   Every byte stays in the vocabulary, so any text still encodes.
 * - the Q-Former's: BERT WordPiece (lower-cased), with the letters and their `##` continuations
 *   (any word still encodes) and every word of the world as one token, plus `[DEC]` as `bos_token`
 *   (the token that starts image-grounded text generation in stage 1, see extras.ts).
 *
 * Both are functions of the world's grammar and the number of scenes read: the same call gives the
 * same files.
 */
import { askScene, captionScene, questionPrompt } from "../world/language.js";
import { generateScene, sceneSeed } from "../world/scene.js";
import { DEC_TOKEN } from "./extras.js";

/** Text files of a tokenizer: file name -> contents. */
export type TokenizerFiles = Record<string, string>;

/** Scenes whose captions and questions the tokenizers are built from (enough to meet every word many times). */
const CORPUS_SCENES = 2000;

/** Captions (four paraphrases each) and questions with answers of the first train scenes. */
export function worldCorpus(scenes = CORPUS_SCENES): string[] {
  const texts: string[] = [];
  for (let i = 0; i < scenes; i++) {
    const scene = generateScene(sceneSeed("train", i));
    for (const caption of captionScene(scene, 4)) texts.push(`${caption}\n`);
    for (const q of askScene(scene)) texts.push(`${questionPrompt(q.question)} ${q.answer}\n`);
  }
  return texts;
}

// ---- byte-level BPE (the language model's) -----------------------------------------------------

/**
 * GPT-2's map from bytes to printable characters: printable Latin-1 bytes stand for themselves,
 * the others (space, control bytes) are shifted past 255, so a space becomes "Ġ" and "\n" "Ċ".
 */
function byteToUnicode(): string[] {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const map: string[] = [];
  let shifted = 0;
  for (let b = 0; b < 256; b++) map[b] = String.fromCodePoint(printable(b) ? b : 256 + shifted++);
  return map;
}

/** GPT-2's pre-tokenization: contractions, words and numbers with their leading space, punctuation runs, spaces. */
const GPT2_PATTERN = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

const OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"] as const;

/**
 * Learns BPE merges from `texts` (Sennrich et al. 2016, on bytes as GPT-2): start from the bytes of
 * each pre-tokenized word, repeatedly merge the most frequent adjacent pair (ties: the first in
 * code-point order, so the result is deterministic) until no pair occurs `minCount` times.
 */
export function learnMerges(texts: string[], minCount = 2): [string, string][] {
  const bytes = byteToUnicode();
  const encoder = new TextEncoder();
  const counts = new Map<string, number>();
  for (const text of texts) {
    for (const word of text.match(GPT2_PATTERN) ?? []) {
      const symbols = Array.from(encoder.encode(word), (b) => bytes[b]!).join("\u0000");
      counts.set(symbols, (counts.get(symbols) ?? 0) + 1);
    }
  }
  const words = [...counts].map(([w, n]) => ({ symbols: w.split("\u0000"), n }));
  const merges: [string, string][] = [];
  for (;;) {
    const pairs = new Map<string, number>();
    for (const { symbols, n } of words) {
      for (let i = 0; i + 1 < symbols.length; i++) {
        const key = `${symbols[i]}\u0000${symbols[i + 1]}`;
        pairs.set(key, (pairs.get(key) ?? 0) + n);
      }
    }
    let best: string | null = null;
    let bestCount = minCount - 1;
    for (const [key, n] of pairs) if (n > bestCount || (n === bestCount && best !== null && key < best)) [best, bestCount] = [key, n];
    if (best === null) return merges;
    const [a, b] = best.split("\u0000") as [string, string];
    merges.push([a, b]);
    for (const w of words) {
      const out: string[] = [];
      for (let i = 0; i < w.symbols.length; i++) {
        if (i + 1 < w.symbols.length && w.symbols[i] === a && w.symbols[i + 1] === b) {
          out.push(a + b);
          i++;
        } else out.push(w.symbols[i]!);
      }
      w.symbols = out;
    }
  }
}

/** The language model's tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) and its vocabulary size. */
export function worldBpeTokenizer(texts: string[] = worldCorpus()): { files: TokenizerFiles; vocabSize: number } {
  const vocab: Record<string, number> = {};
  const add = (token: string) => {
    if (!(token in vocab)) vocab[token] = Object.keys(vocab).length;
  };
  OPT_SPECIALS.forEach(add);
  byteToUnicode().forEach(add);
  const merges = learnMerges(texts);
  for (const [a, b] of merges) add(a + b);
  const json = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: OPT_SPECIALS.map((content, id) => addedToken(id, content)),
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
    // OPT's tokenizer puts </s> (its BOS) before every text.
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "</s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [{ SpecialToken: { id: "</s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { SpecialToken: { id: "</s>", type_id: 0 } }, { Sequence: { id: "B", type_id: 0 } }],
      special_tokens: { "</s>": { id: "</s>", ids: [2], tokens: ["</s>"] } },
    },
    decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: "BPE", dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges },
  };
  const config = { bos_token: "</s>", eos_token: "</s>", pad_token: "<pad>", unk_token: "<unk>", model_max_length: 1024, tokenizer_class: "GPT2Tokenizer", add_bos_token: true, added_tokens_decoder: decoderOf(OPT_SPECIALS) };
  const map = { bos_token: special("</s>"), eos_token: special("</s>"), pad_token: special("<pad>"), unk_token: special("<unk>") };
  return { files: { "tokenizer.json": toJson(json), "tokenizer_config.json": toJson(config), "special_tokens_map.json": toJson(map) }, vocabSize: Object.keys(vocab).length };
}

// ---- WordPiece (the Q-Former's) ----------------------------------------------------------------

const BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] as const;

/** The Q-Former's tokenizer files and its vocabulary size ([DEC] included, as the last token). */
export function worldWordPieceTokenizer(texts: string[] = worldCorpus()): { files: TokenizerFiles; vocabSize: number } {
  const vocab: Record<string, number> = {};
  const add = (token: string) => {
    if (!(token in vocab)) vocab[token] = Object.keys(vocab).length;
  };
  BERT_SPECIALS.forEach(add);
  const letters = "abcdefghijklmnopqrstuvwxyz0123456789";
  for (const c of `${letters}.,:;?!'"-()`) add(c);
  for (const c of letters) add(`##${c}`);
  // BERT's pre-tokenizer splits on spaces and punctuation; the normalizer lower-cases.
  const words = new Set<string>();
  for (const text of texts) for (const w of text.toLowerCase().match(/[a-z0-9]+/g) ?? []) words.add(w);
  [...words].sort().forEach(add);
  add(DEC_TOKEN);
  const specials = [...BERT_SPECIALS, DEC_TOKEN];
  const json = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: specials.map((content) => addedToken(vocab[content]!, content)),
    normalizer: { type: "BertNormalizer", clean_text: true, handle_chinese_chars: true, strip_accents: null, lowercase: true },
    pre_tokenizer: { type: "BertPreTokenizer" },
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "[CLS]", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { SpecialToken: { id: "[SEP]", type_id: 0 } }],
      pair: [{ SpecialToken: { id: "[CLS]", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }, { SpecialToken: { id: "[SEP]", type_id: 0 } }, { Sequence: { id: "B", type_id: 1 } }, { SpecialToken: { id: "[SEP]", type_id: 1 } }],
      special_tokens: { "[CLS]": { id: "[CLS]", ids: [vocab["[CLS]"]], tokens: ["[CLS]"] }, "[SEP]": { id: "[SEP]", ids: [vocab["[SEP]"]], tokens: ["[SEP]"] } },
    },
    decoder: { type: "WordPiece", prefix: "##", cleanup: true },
    model: { type: "WordPiece", unk_token: "[UNK]", continuing_subword_prefix: "##", max_input_chars_per_word: 100, vocab },
  };
  const config = {
    bos_token: DEC_TOKEN,
    cls_token: "[CLS]",
    do_lower_case: true,
    mask_token: "[MASK]",
    model_max_length: 512,
    pad_token: "[PAD]",
    sep_token: "[SEP]",
    tokenizer_class: "BertTokenizer",
    unk_token: "[UNK]",
    added_tokens_decoder: Object.fromEntries(specials.map((t) => [String(vocab[t]), { ...special(t), special: true }])),
  };
  const map = { bos_token: special(DEC_TOKEN), cls_token: special("[CLS]"), mask_token: special("[MASK]"), pad_token: special("[PAD]"), sep_token: special("[SEP]"), unk_token: special("[UNK]") };
  return { files: { "tokenizer.json": toJson(json), "tokenizer_config.json": toJson(config), "special_tokens_map.json": toJson(map) }, vocabSize: Object.keys(vocab).length };
}

// ---- helpers -----------------------------------------------------------------------------------

const special = (content: string) => ({ content, lstrip: false, normalized: false, rstrip: false, single_word: false });
const addedToken = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
const decoderOf = (tokens: readonly string[]) => Object.fromEntries(tokens.map((t, id) => [String(id), { ...special(t), special: true }]));
const toJson = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;
