/**
 * `blip2 quantize --out DIR`: a self-contained checkpoint folder whose linear weights are stored in
 * the chosen precisions (the config, processor and tokenizer files copied as they are). blip2
 * loads it directly; it is not a transformers checkpoint.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { CONVERTED_FILE, type Checkpoint } from "../io/checkpoint.js";
import { readTensorBytes, writeSafetensorsStreamed, type StreamedTensor } from "../io/safetensors.js";
import { MODEL_FILES } from "../hub/download.js";
import { MODEL_PARTS, partOf, WEIGHTS_FORMAT, weightDType, type PartDTypes, type WeightDType } from "../io/weightFormat.js";
import { linearWeights, variantTensors, withQuantizePool } from "./quantize.js";

export async function writeConvertedFolder(ckpt: Checkpoint, dtypes: PartDTypes, out: string, progress?: (done: number, total: number) => void): Promise<void> {
  if (ckpt.converted) throw new Blip2Error(`${ckpt.dir}: is already a converted folder; convert the original checkpoint`);
  if (fs.existsSync(out) && fs.readdirSync(out).length) throw new Blip2Error(`${out}: exists and is not empty (choose a new folder)`);
  const { byPart, sharedWithOtherOps } = linearWeights(ckpt);
  const converted = new Set(MODEL_PARTS.filter((p) => dtypes[p] !== "fp32").flatMap((p) => byPart[p]));
  await withQuantizePool(async (pool, ahead) => {
    const tensors: StreamedTensor[] = [];
    for (const name of ckpt.names().sort()) {
      const info = ckpt.tensor(name);
      // The float original stays when nothing converts it or another op (a lookup) still reads it.
      if (!converted.has(name) || sharedWithOtherOps.has(name)) tensors.push({ name, dtype: info.dtype, shape: info.shape, data: () => readTensorBytes(info) });
      if (converted.has(name)) tensors.push(...variantTensors(info, weightDType(name, dtypes[partOf(name)]) as Exclude<WeightDType, "fp32">, pool));
    }
    fs.mkdirSync(out, { recursive: true });
    for (const f of MODEL_FILES) {
      if (f.endsWith(".safetensors") || f.endsWith(".index.json")) continue;
      if (fs.existsSync(ckpt.file(f))) fs.copyFileSync(ckpt.file(f), path.join(out, f));
    }
    let done = 0;
    await writeSafetensorsStreamed(path.join(out, "model.safetensors"), tensors, { format: "pt" }, () => progress?.(++done, tensors.length), ahead);
  });
  fs.writeFileSync(path.join(out, CONVERTED_FILE), JSON.stringify({ format: WEIGHTS_FORMAT, dtypes, source: ckpt.fingerprint() }, null, 2) + "\n");
}
