/** Weight precisions as the user asks for them: one for all parts, or per model part. */
import { Blip2Error } from "../errors.js";
import { MODEL_PARTS, WEIGHT_DTYPES, type ModelPart, type PartDTypes, type WeightDType } from "../io/weightFormat.js";

export type DTypeSpec = WeightDType | Partial<Record<ModelPart, WeightDType>>;

/**
 * The precision of each part. The shorthand "q4" puts the language model in q4 and the vision
 * encoder and Q-Former in q8: they are compute-bound (every image token goes through every layer),
 * where 8-bit channels run fastest (integer matrix products, where 4-bit blocks are unpacked
 * first) and 4 bits cost accuracy. Name the parts to choose otherwise: `{ vision: "q4", ... }`.
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
