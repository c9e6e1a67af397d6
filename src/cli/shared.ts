/** Options shared by the model commands: which model, how to run it, how to generate. */
import type { ModelLoadOptions } from "../api/conditionalGeneration.js";
import { Blip2 } from "../api/tasks.js";
import { ArchitectureError, Blip2Error } from "../errors.js";
import { parseDTypeSpec, type DTypeSpec } from "../quantize/dtype.js";
import type { GenerationOptions } from "../generation/options.js";
import { isDevice, type Device } from "../runtime/session.js";
import { intOption, numberOption, stringOption, UsageError, type Io, type OptionSpec, type ParsedArgs } from "./command.js";
import { progressSink, type ProgressSink } from "./progress.js";

export const DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b";

export const modelOptions: OptionSpec = {
  model: { type: "string", short: "m" },
  revision: { type: "string" },
  dtype: { type: "string" },
  threads: { type: "string" },
  device: { type: "string" },
  "image-backend": { type: "string" },
  "no-packed-cache": { type: "boolean" },
  quiet: { type: "boolean", short: "q" },
};

export const modelHelp = [
  `--model, -m M            local folder or Hub model id (default ${DEFAULT_MODEL})`,
  "--revision REV           Hub branch, tag or commit (default main)",
  "--dtype D                fp32 (default), fp16, q8, q4, or per part: vision=q8,qformer=q8,language=q4",
  "--threads N              threads per ONNX Runtime session (default: all cores)",
  "--device D               cpu (default), webgpu or cuda",
  "--image-backend B        torchvision (transformers 5 resizing, default) or pil (transformers 4)",
  "--no-packed-cache        with q8/q4 on the CPU, pack the weights in memory at each load instead of",
  "                         mapping the packed copy kept in the blip2 cache (slower load, more",
  "                         private memory; decoding can be faster: docs/performance.md)",
  "--quiet, -q              no progress bars",
];

export const generationOptionSpec: OptionSpec = {
  "max-new-tokens": { type: "string" },
  "min-new-tokens": { type: "string" },
  "num-beams": { type: "string" },
  "length-penalty": { type: "string" },
  "num-return-sequences": { type: "string" },
  "repetition-penalty": { type: "string" },
  "no-repeat-ngram-size": { type: "string" },
  "do-sample": { type: "boolean" },
  temperature: { type: "string" },
  "top-k": { type: "string" },
  "top-p": { type: "string" },
  seed: { type: "string" },
};

export const generationHelp = [
  "--max-new-tokens N       tokens to generate at most (default: the model's generation_config.json, else 20)",
  "--min-new-tokens N       tokens before the end token is allowed",
  "--num-beams N            beam search with N beams",
  "--length-penalty X       beam search length penalty (default 1)",
  "--num-return-sequences N sequences per image (beams or samples)",
  "--repetition-penalty X   penalize tokens already present (e.g. 1.5)",
  "--no-repeat-ngram-size N never repeat an n-gram of this size",
  "--do-sample              sample instead of taking the most likely token",
  "--temperature T          sample with this temperature",
  "--top-k K, --top-p P     sample among the k best / the top-p mass",
  "--seed S                 sampling seed (same seed, same text; does not turn sampling on)",
];

export function generationFromArgs(args: ParsedArgs): GenerationOptions {
  const o: GenerationOptions = {
    // Unset, the checkpoint's generation_config.json decides, as in the library.
    maxNewTokens: intOption(args, "max-new-tokens", 1),
    minNewTokens: intOption(args, "min-new-tokens", 0),
    numBeams: intOption(args, "num-beams", 1),
    lengthPenalty: numberOption(args, "length-penalty", () => true, "a number"),
    numReturnSequences: intOption(args, "num-return-sequences", 1),
    repetitionPenalty: numberOption(args, "repetition-penalty", (x) => x > 0, "a number > 0"),
    noRepeatNgramSize: intOption(args, "no-repeat-ngram-size", 0),
    temperature: numberOption(args, "temperature", (x) => x >= 0, "a number >= 0"),
    topK: intOption(args, "top-k", 0),
    topP: numberOption(args, "top-p", (x) => x > 0 && x <= 1, "a number in (0, 1]"),
    seed: intOption(args, "seed", 0),
    doSample: args.values["do-sample"] === true ? true : undefined,
  };
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
}

export interface LoadedModel {
  blip2: Blip2;
  progress: ProgressSink;
}

/** Hub, runtime and preprocessing options from the command line. */
export function modelLoadOptions(args: ParsedArgs, io: Io): ModelLoadOptions & { progressSink: ProgressSink } {
  const progress = progressSink(io.stderr, args.values.quiet === true);
  const device = stringOption(args, "device");
  if (device !== undefined && !isDevice(device)) throw new UsageError(`invalid value for --device: expected cpu, webgpu or cuda, got ${JSON.stringify(device)}`);
  const imageBackend = imageBackendOption(args);
  return {
    dtype: dtypeOption(args),
    conversionProgress: (p) => progress.items(`converting ${p.part} weights to ${p.dtype}`, p.done, p.total),
    revision: stringOption(args, "revision"),
    threads: intOption(args, "threads", 1),
    device: device as Device | undefined,
    imageBackend,
    // Photos upright by their EXIF orientation, for the retrieval commands too (Blip2.load does it).
    exifOrientation: true,
    packedWeights: args.values["no-packed-cache"] !== true,
    packingProgress: (p) => (p.done ? progress.clear() : progress.items(`saving packed weights of ${p.graph} for this CPU (once)`, 0, 1)),
    progress: (p) => progress.download(p),
    progressSink: progress,
  };
}

/** --dtype, a mistake in it being a usage error like any other option's. */
export function dtypeOption(args: ParsedArgs): DTypeSpec | undefined {
  const dtype = stringOption(args, "dtype");
  return dtype === undefined ? undefined : asUsageError(() => parseDTypeSpec(dtype));
}

/** A Blip2Error of `check` as a usage error: for options that only the library can check. */
function asUsageError<T>(check: () => T): T {
  try {
    return check();
  } catch (err) {
    throw err instanceof Blip2Error ? new UsageError(err.message) : err;
  }
}

/**
 * The model, with the generation options checked against it: what only the checkpoint decides (its
 * generation_config.json's max_new_tokens under --min-new-tokens, say) is a usage error too.
 */
export async function loadModel(args: ParsedArgs, io: Io, generation: GenerationOptions = {}): Promise<LoadedModel> {
  const options = modelLoadOptions(args, io);
  const src = stringOption(args, "model") ?? process.env.BLIP2_MODEL ?? DEFAULT_MODEL;
  const blip2 = await Blip2.load(src, options).catch((err) => {
    if (err instanceof ArchitectureError && err.architecture === "Blip2ForImageTextRetrieval") {
      throw new Blip2Error(`${src}: is an image-text retrieval checkpoint, which cannot generate text: use it with 'blip2 match', 'blip2 index' and 'blip2 search'`);
    }
    throw err;
  });
  try {
    asUsageError(() => blip2.model.generationConfig(generation));
  } catch (err) {
    await blip2.dispose();
    throw err;
  }
  return { blip2, progress: options.progressSink };
}

/** --image-backend: torchvision (transformers 5's resizing) or pil (transformers 4's). */
export function imageBackendOption(args: ParsedArgs): "torchvision" | "pil" | undefined {
  const v = stringOption(args, "image-backend");
  if (v !== undefined && v !== "torchvision" && v !== "pil") throw new UsageError(`invalid value for --image-backend: expected torchvision or pil, got ${JSON.stringify(v)}`);
  return v;
}
