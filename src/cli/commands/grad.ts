/**
 * `blip2 grad`: one batch's loss terms and the gradient of every trained tensor, written to a
 * safetensors file (no dropout, no update), to compare blip2's training with another implementation.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../../errors.js";
import { writeSafetensors, type TensorToWrite } from "../../io/safetensors.js";
import { batchGradients, type GradBatch } from "../../train/grad.js";
import { requiredOption, UsageError, type Command } from "../command.js";
import { imageBackendOption } from "../shared.js";
import { dtypeOption, stageOption } from "./train.js";

export const grad: Command = {
  name: "grad",
  summary: "write one training batch's loss terms and gradients to a safetensors file",
  usage: "blip2 grad --model DIR --stage 1|2 --batch batch.json --out FILE.safetensors [--force]",
  help: [
    "--model DIR              checkpoint folder (stage 1: image-text retrieval; stage 2: see blip2 compose)",
    "--stage 1|2              1: ITC + ITM + ITG; 2: language modelling through the frozen LM",
    "--batch FILE             JSON: images (paths relative to it), texts, optional prompt, input_ids,",
    "                         attention_mask, labels, decoder_attention_mask (T5), negatives (stage 1)",
    "--out FILE               the safetensors file: loss, loss_itc/itm/itg (stage 1), grad.<tensor>",
    "--dtype D                precision of the frozen parts: fp32 (default), fp16, q8, q4",
    "--image-backend B        torchvision (transformers 5 resizing, default) or pil (transformers 4)",
    "--force                  overwrite --out if it exists",
  ].join("\n"),
  options: { model: { type: "string" }, stage: { type: "string" }, batch: { type: "string" }, out: { type: "string" }, dtype: { type: "string" }, "image-backend": { type: "string" }, force: { type: "boolean" } },
  async run(args, io) {
    if (args.positionals.length) throw new UsageError(`grad: unexpected argument ${JSON.stringify(args.positionals[0])}`);
    const model = requiredOption(args, "grad", "model");
    const stage = stageOption(args, "grad");
    const batchFile = requiredOption(args, "grad", "batch");
    const out = requiredOption(args, "grad", "out");
    if (fs.existsSync(out) && !args.values.force) throw new Blip2Error(`${out}: already exists (use --force to overwrite)`);
    let batch: GradBatch;
    try {
      batch = JSON.parse(fs.readFileSync(batchFile, "utf8")) as GradBatch;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new Blip2Error(`${batchFile}: ${code === "ENOENT" ? "not found" : code ? `cannot read (${code})` : `not valid JSON (${(err as Error).message})`}`);
    }
    if (typeof batch !== "object" || batch === null || Array.isArray(batch)) throw new Blip2Error(`${batchFile}: expected a JSON object with images and texts`);
    const result = await batchGradients({ stage, model, batch, baseDir: path.dirname(path.resolve(batchFile)), dtype: dtypeOption(args), imageBackend: imageBackendOption(args) });
    const tensors: Record<string, TensorToWrite> = {};
    for (const [k, v] of Object.entries(result.losses)) tensors[k] = { dtype: "F32", shape: [], data: Float32Array.of(v) };
    for (const [k, v] of result.grads) tensors[`grad.${k}`] = { dtype: "F32", shape: gradShape(result, k, v), data: v };
    writeSafetensors(out, tensors, { producer: "blip2 grad", stage: String(stage) });
    io.stdout.write(`${Object.entries(result.losses).map(([k, v]) => `${k} ${v.toFixed(6)}`).join("  ")}\nwrote ${result.grads.size} gradients to ${out}\n`);
    return 0;
  },
};

function gradShape(result: Awaited<ReturnType<typeof batchGradients>>, name: string, data: Float32Array): number[] {
  return result.shapes.get(name) ?? [data.length];
}
