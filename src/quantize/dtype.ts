/** Weight precisions, chosen per model part. */
import { Blip2Error } from "../errors.js";

export type WeightDType = "fp32" | "fp16" | "q8" | "q4";
export type ModelPart = "vision" | "qformer" | "language";
export type DTypeSpec = WeightDType | Partial<Record<ModelPart, WeightDType>>;
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

/** Integer weights (8-bit channels, 4-bit blocks), as against float ones. */
export const isQuantized = (d: WeightDType): d is "q8" | "q4" => d === "q8" || d === "q4";

/** T5's encoder weights: read once per prompt, where the decoder's are read once per generated token. */
export const readOncePerPrompt = (name: string) => name.startsWith("language_model.encoder.");

/**
 * The precision of each part. The shorthand "q4" puts the language model in q4 and the vision
 * encoder and Q-Former in q8: they are compute-bound (257 image tokens per layer), where 8-bit
 * channels run fastest (integer matrix products; 4-bit blocks ran about 3x slower on ViT-g's
 * shapes) and 4 bits cost accuracy. Name the parts to choose otherwise: `{ vision: "q4", ... }`.
 */
export function resolveDTypes(spec: DTypeSpec | undefined): PartDTypes {
  const all: PartDTypes = { vision: "fp32", qformer: "fp32", language: "fp32" };
  if (spec === undefined) return all;
  if (typeof spec === "string") {
    checkDType(spec, "dtype");
    return spec === "q4" ? { vision: "q8", qformer: "q8", language: "q4" } : { vision: spec, qformer: spec, language: spec };
  }
  for (const [part, d] of Object.entries(spec)) {
    if (!MODEL_PARTS.includes(part as ModelPart)) throw new Blip2Error(`invalid dtype: unknown model part ${JSON.stringify(part)} (parts: ${MODEL_PARTS.join(", ")})`);
    checkDType(d, `dtype.${part}`);
    all[part as ModelPart] = d;
  }
  return all;
}

/** "q4", or per part: "vision=fp32,language=q4" (parts not named stay fp32). */
export function parseDTypeSpec(text: string): DTypeSpec {
  if (!text.includes("=")) {
    checkDType(text, "--dtype");
    return text as WeightDType;
  }
  const spec: Partial<Record<ModelPart, WeightDType>> = {};
  for (const item of text.split(",")) {
    const [part, d] = item.split("=").map((s) => s.trim()) as [string, string];
    if (!MODEL_PARTS.includes(part as ModelPart)) throw new Blip2Error(`invalid value for --dtype: unknown part ${JSON.stringify(part)} (parts: ${MODEL_PARTS.join(", ")})`);
    checkDType(d, `--dtype ${part}`);
    spec[part as ModelPart] = d as WeightDType;
  }
  return spec;
}

function checkDType(d: unknown, where: string): asserts d is WeightDType {
  if (!WEIGHT_DTYPES.includes(d as WeightDType)) throw new Blip2Error(`invalid ${where}: expected one of ${WEIGHT_DTYPES.join(", ")}, got ${JSON.stringify(d)}`);
}

/**
 * The precision one linear weight gets when its part is `partDType`. Under "q4" only the weights
 * that are read once per generated token and carry the most parameters, the feed-forward layers,
 * take 4 bits; attention projections and the output head keep 8, where 4-bit rounding costs the
 * most accuracy. T5's encoder runs once per prompt, compute-bound, where 4 bits bring no speed: it
 * keeps 8 (on the synthetic Flan-T5-XL this lifts the logits' cosine from 0.988 to 0.996).
 */
export function weightDType(name: string, partDType: WeightDType): WeightDType {
  if (partDType !== "q4") return partDType;
  if (readOncePerPrompt(name)) return "q8";
  return /\.(fc1|fc2|DenseReluDense\.wi|DenseReluDense\.wi_0|DenseReluDense\.wi_1|DenseReluDense\.wo)\.weight$/.test(name) ? "q4" : "q8";
}
