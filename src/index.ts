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
export { writeDataset, type DatasetOptions, type DatasetSummary } from "./world/dataset.js";
export { askScene, captionMatchesScene, captionScene, parseCaption, questionPrompt, QUESTION_TYPES, type ObjectDescription, type Question, type QuestionType } from "./world/language.js";
export { renderPng, renderScene } from "./world/render.js";
export { generateScene, sceneSeed, splitOfSeed, SPLITS, type Background, type Scene, type Split, type WorldObject } from "./world/scene.js";
export { COLOURS, HELD_OUT_PAIRS, POSITIONS, SHAPES, SIZES, type Colour, type Position, type Shape, type Size } from "./world/vocabulary.js";
