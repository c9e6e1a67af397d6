/** blip2: BLIP-2 in TypeScript on ONNX Runtime. */
export { Blip2ForImageTextRetrieval, type Embeddings, type MatchResult, type RetrievalOptions } from "./api/retrieval.js";
export { Blip2ForConditionalGeneration, type GenerateArgs, type ModelLoadOptions } from "./api/conditionalGeneration.js";
export { Blip2, Chat, pipeline, vqaPrompt, type CaptionOptions, type CaptionResult, type ChatOptions, type ChatReply, type ImageToTextPipeline, type Turn } from "./api/tasks.js";
export { Blip2Error } from "./errors.js";
export type { GenerationOptions } from "./generation/options.js";
export type { DownloadProgress, HubOptions } from "./hub/download.js";
export type { ImageInput, RawImage } from "./image/decode.js";
export { blip2CacheDir, listWeightCaches, pruneWeightCaches, removeWeightCache, type RemovedFiles, type WeightCacheEntry } from "./quantize/weightCache.js";
export { listPacked, pruneStalePacked, type PackedEntry, type PackingProgress } from "./runtime/packedModels.js";
export { Blip2Processor, type ProcessorInputs, type ProcessorOutputs } from "./processor.js";
export { Blip2Tokenizer } from "./tokenizer/tokenizer.js";
