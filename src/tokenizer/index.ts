export { Blip2Tokenizer, cleanUpTokenization, TOKENIZER_FILES, type DecodeOptions, type EncodeOptions, type PaddedBatch } from "./tokenizer.js";
export { parseSentencePieceModel, PrecompiledCharsmap, type SentencePieceModel } from "./sentencepiece.js";
