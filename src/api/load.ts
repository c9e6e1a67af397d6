/** Options and checkpoint loading shared by the model classes. */
import { resolveModel, type HubOptions } from "../hub/download.js";
import { Checkpoint } from "../io/checkpoint.js";
import { warnUnusedLayers } from "../io/unusedLayers.js";
import type { ProcessorLoadOptions } from "../processor.js";
import { resolveDTypes, type DTypeSpec } from "../quantize/dtype.js";
import { withDTypes, type QuantizeProgress } from "../quantize/quantize.js";
import { blip2CacheDir } from "../quantize/weightCache.js";
import { packedRoot, type PackingProgress } from "../runtime/packedModels.js";
import type { Device, RuntimeOptions } from "../runtime/session.js";

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
  /**
   * Keep ONNX Runtime's packed q8/q4 weights in the blip2 cache (default true): the first load on a
   * machine saves them (as large again as the converted weights), later loads map them from disk
   * instead of packing them into private memory. Decoding from the mapped copy can be slower
   * (docs/performance.md), so `false` trades load time and memory for that. On the CPU only.
   */
  packedWeights?: boolean;
  /** Told when a session's packed weights start and finish being saved (the first load on a machine, tens of seconds). */
  packingProgress?: (p: PackingProgress) => void;
}

/** How the model's sessions run. */
export function runtimeOptions(options: ModelLoadOptions): RuntimeOptions {
  const packedDir = options.packedWeights === false ? undefined : packedRoot(blip2CacheDir(options.blip2Cache));
  return { device: options.device, threads: options.threads, worker: options.worker, packedDir, packingProgress: options.packingProgress };
}

export async function loadCheckpoint(src: string, options: ModelLoadOptions): Promise<Checkpoint> {
  const ckpt = Checkpoint.open(await resolveModel(src, options));
  warnUnusedLayers(ckpt);
  return withDTypes(ckpt, resolveDTypes(options.dtype ?? (ckpt.converted ? ckpt.dtypes : undefined)), { cacheDir: options.blip2Cache, progress: options.conversionProgress });
}
