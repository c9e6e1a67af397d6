/** Options and checkpoint loading shared by the model classes. */
import { resolveModel, type HubOptions } from "../hub/download.js";
import { Checkpoint } from "../io/checkpoint.js";
import type { ProcessorLoadOptions } from "../processor.js";
import { resolveDTypes, type DTypeSpec } from "../quantize/dtype.js";
import { withDTypes, type QuantizeProgress } from "../quantize/quantize.js";
import type { Device } from "../runtime/session.js";

export interface ModelLoadOptions extends HubOptions, ProcessorLoadOptions {
  /**
   * Precision of the linear weights: "fp32" (default), "fp16", "q8" (8-bit channels, run in integer
   * arithmetic), "q4" (4-bit blocks for the language model's feed-forward weights, 8-bit channels
   * elsewhere), or per part, e.g. `{ vision: "fp32", language: "q4" }`. Converted
   * weights are written once to the blip2 cache and memory-mapped from there afterwards.
   */
  dtype?: DTypeSpec;
  device?: Device;
  /** Threads per ONNX Runtime session (default: one per core). */
  threads?: number;
  /** Run inference in a worker thread so the event loop stays free (default true). */
  worker?: boolean;
  /** Root of the blip2 cache for converted weights (default $BLIP2_CACHE, else ~/.cache/blip2). */
  blip2Cache?: string;
  /** Told how the one-time conversion of weights to `dtype` advances. */
  conversionProgress?: (p: QuantizeProgress) => void;
}

export async function loadCheckpoint(src: string, options: ModelLoadOptions): Promise<Checkpoint> {
  const ckpt = Checkpoint.open(await resolveModel(src, options));
  return withDTypes(ckpt, resolveDTypes(options.dtype ?? (ckpt.converted ? ckpt.dtypes : undefined)), { cacheDir: options.blip2Cache, progress: options.conversionProgress });
}
