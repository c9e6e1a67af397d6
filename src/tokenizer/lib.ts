/**
 * Typed access to the parts of `@huggingface/tokenizers` 0.2.0 this package uses. The package's
 * own .d.ts files use extensionless relative imports, which TypeScript's NodeNext resolution does
 * not follow, so its exports would otherwise type as missing or `any`.
 */
import * as tokenizers from "@huggingface/tokenizers";

/** The library's `Tokenizer` instance (only what we touch). */
export interface LibTokenizer {
  encode(text: string, options?: { add_special_tokens?: boolean }): { ids: number[]; tokens: string[] };
  normalizer: unknown;
  pre_tokenizer: unknown;
  post_processor: unknown;
  decoder: unknown;
  model: { vocab: Array<string | undefined>; tokens_to_ids: Map<string, number> } | null;
}

/** A library component built from its tokenizer.json config (e.g. a `Split` pre-tokenizer). */
export interface LibPreTokenizer {
  pre_tokenize_text(text: string, options?: unknown): string[];
}
export interface LibNormalizer {
  normalize(text: string): string;
}
export interface LibDecoder {
  decode_chain(tokens: string[]): string[];
}

interface LibModule {
  Tokenizer: new (tokenizerJson: object, config: object) => LibTokenizer;
  Normalizer: abstract new (config: unknown) => { normalize(text: string): string };
  PreTokenizer: abstract new () => { pre_tokenize_text(text: string, options?: unknown): string[] };
  ReplaceNormalizer: new (config: unknown) => LibNormalizer;
  ReplaceDecoder: new (config: unknown) => LibDecoder;
  ByteLevelPreTokenizer: new (config: unknown) => LibPreTokenizer;
  SplitPreTokenizer: new (config: unknown) => LibPreTokenizer;
  PunctuationPreTokenizer: new (config: unknown) => LibPreTokenizer;
  DigitsPreTokenizer: new (config: unknown) => LibPreTokenizer;
  ReplacePreTokenizer: new (config: unknown) => LibPreTokenizer;
  FixedLengthPreTokenizer: new (config: unknown) => LibPreTokenizer;
}

export const lib = tokenizers as unknown as LibModule;
