/**
 * The format of a model's linear weights in each precision: which precisions exist, which part of
 * the model a tensor belongs to, and which precision each weight is stored in when its part is
 * converted. Checkpoint folders (io/), the graphs that read the weights (models/) and the
 * conversion that writes them (quantize/) all follow it, so it lives at the bottom, in io/.
 */

export type WeightDType = "fp32" | "fp16" | "q8" | "q4";
export type ModelPart = "vision" | "qformer" | "language";
export type PartDTypes = Record<ModelPart, WeightDType>;

export const WEIGHT_DTYPES: readonly WeightDType[] = ["fp32", "fp16", "q8", "q4"];
export const MODEL_PARTS: readonly ModelPart[] = ["vision", "qformer", "language"];

/**
 * The scheme of converted weights (which weights take which precision, the block layout). It names
 * the cache folder and is recorded in `blip2 quantize --out` folders, so a change of scheme never
 * reads files written under another. The block size is not part of it: each weight's shape records
 * its own.
 */
export const WEIGHTS_FORMAT = "blip2-weights/3";

/** Which part a checkpoint tensor belongs to. */
export function partOf(name: string): ModelPart {
  if (name.startsWith("vision_model.")) return "vision";
  if (name.startsWith("language_model.")) return "language";
  return "qformer";
}

/** T5's encoder weights: read once per prompt, where the decoder's are read once per generated token. */
export const readOncePerPrompt = (name: string) => name.startsWith("language_model.encoder.");

/**
 * The precision one linear weight gets when its part is `partDType`. Under "q4" only the weights
 * that are read once per generated token and carry the most parameters, the feed-forward layers,
 * take 4 bits; attention projections and the output head keep 8, where 4-bit rounding costs the
 * most accuracy. T5's encoder runs once per prompt, compute-bound, where 4 bits bring no speed: it
 * keeps 8 (docs/precision-and-caches.md gives the accuracy each choice measured).
 */
export function weightDType(name: string, partDType: WeightDType): WeightDType {
  if (partDType !== "q4") return partDType;
  if (readOncePerPrompt(name)) return "q8";
  return /\.(fc1|fc2|DenseReluDense\.wi|DenseReluDense\.wi_0|DenseReluDense\.wi_1|DenseReluDense\.wo)\.weight$/.test(name) ? "q4" : "q8";
}
