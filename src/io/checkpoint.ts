/**
 * A Hugging Face checkpoint folder: `config.json`, weights in `model.safetensors` or in shards listed
 * by `model.safetensors.index.json`, and the processor/tokenizer/generation files beside them.
 * Only safetensors headers are read here; tensor bytes stay in their files.
 */
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { parseBlip2Config, type Blip2Config } from "../config.js";
import { Blip2Error } from "../errors.js";
import { partOf, WEIGHT_DTYPES, WEIGHTS_FORMAT, weightDType, type PartDTypes, type WeightDType } from "./weightFormat.js";
import { readSafetensorsHeader, type TensorInfo } from "./safetensors.js";

export class Checkpoint {
  private constructor(
    readonly dir: string,
    readonly config: Blip2Config,
    private readonly tensors: Map<string, TensorInfo>,
    /** The precision each part's linear weights are used in (io/weightFormat.ts; quantize/ converts them). */
    readonly dtypes: PartDTypes = { vision: "fp32", qformer: "fp32", language: "fp32" },
    /** Written by `blip2 quantize --out`: its linear weights exist only in `dtypes`. */
    readonly converted = false,
  ) {}

  static open(dir: string): Checkpoint {
    const abs = path.resolve(dir);
    let stat: fs.Stats;
    try {
      stat = fs.statSync(abs);
    } catch {
      throw new Blip2Error(`${dir}: model folder not found`);
    }
    if (!stat.isDirectory()) throw new Blip2Error(`${dir}: not a folder (expected a Hugging Face checkpoint folder with config.json)`);
    const configFile = path.join(abs, "config.json");
    const json = readJsonFile(configFile);
    if (json === undefined) throw new Blip2Error(`${configFile}: missing (a BLIP-2 checkpoint folder needs config.json)`);
    const config = parseBlip2Config(json, configFile);
    const converted = readConvertedDTypes(path.join(abs, CONVERTED_FILE));
    return new Checkpoint(abs, config, loadWeights(abs), converted ?? undefined, converted !== null);
  }

  /** The same weights under a modified config (e.g. to run a checkpoint the legacy way). */
  withConfig(patch: Partial<Blip2Config>): Checkpoint {
    return new Checkpoint(this.dir, { ...this.config, ...patch }, this.tensors, this.dtypes, this.converted);
  }

  /** The same checkpoint with more tensors (e.g. quantized copies) and the parts' precisions. */
  withWeights(extra: Map<string, TensorInfo>, dtypes: PartDTypes): Checkpoint {
    return new Checkpoint(this.dir, this.config, new Map([...this.tensors, ...extra]), dtypes, this.converted);
  }

  /** The precision a weight is used in: its part's. */
  dtypeOf(name: string): WeightDType {
    return weightDType(name, this.dtypes[partOf(name)]);
  }

  /**
   * Identifies the model by content, whatever folder or Hub id it was loaded from, without reading
   * gigabytes: a hash of config.json and, per weight file, its header, its size and 64 samples of
   * 4 kB spread over its data (so two checkpoints with the same shapes but other weights, such as
   * a fine-tuned copy, differ).
   */
  fingerprint(): string {
    const hash = createHash("sha256").update(fs.readFileSync(this.file("config.json")));
    const files = [...new Set([...this.tensors.values()].map((t) => t.file))].sort((a, b) => path.basename(a).localeCompare(path.basename(b)));
    const sample = Buffer.alloc(4096);
    for (const file of files) {
      const dataStart = [...this.tensors.values()].reduce((min, t) => (t.file === file ? Math.min(min, t.offset) : min), Infinity);
      const fd = fs.openSync(file, "r");
      try {
        const size = fs.fstatSync(fd).size;
        const header = Buffer.alloc(dataStart);
        fs.readSync(fd, header, 0, dataStart, 0);
        hash.update(header).update(String(size));
        for (let i = 0; i < 64; i++) {
          const at = dataStart + Math.floor(((size - dataStart) * i) / 64);
          hash.update(sample.subarray(0, fs.readSync(fd, sample, 0, sample.length, at)));
        }
      } finally {
        fs.closeSync(fd);
      }
    }
    return hash.digest("hex").slice(0, 32);
  }

  /** Absolute path of a file in the checkpoint folder. */
  file(name: string): string {
    return path.join(this.dir, name);
  }

  /** A JSON file of the checkpoint, or undefined when absent. */
  json(name: string): unknown | undefined {
    return readJsonFile(this.file(name));
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  names(): string[] {
    return [...this.tensors.keys()];
  }

  /** A tensor that must exist, with the shape the config implies. */
  tensor(name: string, shape?: readonly number[]): TensorInfo {
    const info = this.tensors.get(name);
    if (!info) throw new Blip2Error(`${this.dir}: the weights have no tensor ${name}, which this config needs`);
    if (shape && (shape.length !== info.shape.length || shape.some((d, i) => d !== info.shape[i]))) {
      throw new Blip2Error(
        `${path.basename(info.file)}: tensor ${name} has shape [${info.shape.join(", ")}] but config.json implies [${shape.join(", ")}]`,
      );
    }
    return info;
  }
}

/** Marks a folder written by `blip2 quantize --out`, with the precision of each part. */
export const CONVERTED_FILE = "blip2_weights.json";

function readConvertedDTypes(file: string): PartDTypes | null {
  const json = readJsonFile(file) as { format?: unknown; dtypes?: unknown } | undefined;
  if (json === undefined) return null;
  if (json.format !== WEIGHTS_FORMAT) throw new Blip2Error(`${file}: written in weight format ${JSON.stringify(json.format ?? "blip2-weights/1")}, this version of blip2 reads ${WEIGHTS_FORMAT}; convert the original checkpoint again (blip2 quantize --out)`);
  const d = json.dtypes as Record<string, unknown> | undefined;
  const ok = (v: unknown) => WEIGHT_DTYPES.includes(v as WeightDType);
  if (!d || !ok(d.vision) || !ok(d.qformer) || !ok(d.language)) throw new Blip2Error(`${file}: expected {"format", "dtypes": {"vision", "qformer", "language"}} with fp32, fp16, q8 or q4`);
  return d as unknown as PartDTypes;
}

export function readJsonFile(file: string): unknown | undefined {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw new Blip2Error(`${file}: cannot read (${(err as NodeJS.ErrnoException).code ?? err})`);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Blip2Error(`${file}: not valid JSON (${(err as Error).message.split("\n")[0]})`);
  }
}

function loadWeights(dir: string): Map<string, TensorInfo> {
  const single = path.join(dir, "model.safetensors");
  const indexFile = path.join(dir, "model.safetensors.index.json");
  if (fs.existsSync(indexFile)) return loadSharded(dir, indexFile);
  if (fs.existsSync(single)) return readSafetensorsHeader(single).tensors;
  const legacy = ["pytorch_model.bin", "pytorch_model.bin.index.json"].filter((f) => fs.existsSync(path.join(dir, f)));
  const hint = legacy.length ? ` (found ${legacy.join(", ")}: PyTorch pickles are not supported, convert to safetensors)` : "";
  throw new Blip2Error(`${dir}: no model.safetensors or model.safetensors.index.json${hint}`);
}

function loadSharded(dir: string, indexFile: string): Map<string, TensorInfo> {
  const index = readJsonFile(indexFile) as { weight_map?: unknown };
  const map = index?.weight_map;
  if (!map || typeof map !== "object" || Array.isArray(map)) throw new Blip2Error(`${indexFile}: missing weight_map`);
  const shards = new Map<string, Map<string, TensorInfo>>();
  const tensors = new Map<string, TensorInfo>();
  for (const [name, shard] of Object.entries(map as Record<string, unknown>)) {
    if (typeof shard !== "string" || shard.includes("/") || shard.includes("\\")) {
      throw new Blip2Error(`${indexFile}: weight_map entry for ${name} is ${JSON.stringify(shard)}, expected a shard file name`);
    }
    let header = shards.get(shard);
    if (!header) {
      const file = path.join(dir, shard);
      if (!fs.existsSync(file)) throw new Blip2Error(`${indexFile}: lists shard ${shard}, which is missing from ${dir}`);
      header = readSafetensorsHeader(file).tensors;
      shards.set(shard, header);
    }
    const info = header.get(name);
    if (!info) throw new Blip2Error(`${path.join(dir, shard)}: has no tensor ${name}, though ${path.basename(indexFile)} says it does`);
    tensors.set(name, info);
  }
  return tensors;
}
