/**
 * `blip2 dump`: the activations of one image (and prompt) as float32 tensors in a safetensors file,
 * named as transformers names them, for comparing ports layer by layer.
 */
import fs from "node:fs";
import path from "node:path";
import type * as ort from "onnxruntime-node";
import { Blip2Error, describeError } from "../../errors.js";
import { checkPromptLength } from "../../generation/limits.js";
import { Checkpoint } from "../../io/checkpoint.js";
import { warnUnusedLayers } from "../../io/unusedLayers.js";
import { writeSafetensors, type TensorToWrite } from "../../io/safetensors.js";
import { Blip2Processor } from "../../processor.js";
import { Blip2Runtime } from "../../runtime/blip2Runtime.js";
import { RetrievalRuntime } from "../../runtime/retrievalRuntime.js";
import { imageBackendOption } from "../shared.js";
import { requiredOption, stringOption, UsageError, type Command } from "../command.js";

export const dump: Command = {
  name: "dump",
  summary: "write one image's activations (vision, Q-Former, logits) to a safetensors file",
  usage: "blip2 dump --model DIR --image FILE [--prompt TEXT] [--decoder-input-ids 0,3,8] --out FILE.safetensors [--force]",
  help: [
    "--model DIR              checkpoint folder (Hugging Face layout)",
    "--image FILE             the image",
    "--prompt TEXT            text after the image (default: none, as for captioning)",
    "--decoder-input-ids IDS  T5 only: decoder ids whose logits to dump (default: the decoder start token)",
    "--out FILE               the safetensors file to write",
    "--image-backend B        torchvision (transformers 5 resizing, default) or pil (transformers 4)",
    "--force                  overwrite --out if it exists",
  ].join("\n"),
  options: {
    model: { type: "string" },
    image: { type: "string" },
    prompt: { type: "string" },
    "decoder-input-ids": { type: "string" },
    out: { type: "string" },
    "image-backend": { type: "string" },
    force: { type: "boolean" },
  },
  async run(args, io) {
    const modelDir = requiredOption(args, "dump", "model");
    const image = requiredOption(args, "dump", "image");
    const out = requiredOption(args, "dump", "out");
    if (args.positionals.length) throw new UsageError(`dump: unexpected argument ${JSON.stringify(args.positionals[0])}`);
    if (fs.existsSync(out) && !args.values.force) throw new Blip2Error(`${out}: already exists (use --force to overwrite)`);
    if (!fs.statSync(path.dirname(path.resolve(out)), { throwIfNoEntry: false })?.isDirectory()) throw new Blip2Error(`${out}: no such folder ${path.dirname(out)}`);
    const decoderIds = parseIds(stringOption(args, "decoder-input-ids"));
    const imageBackend = imageBackendOption(args);
    const ckpt = Checkpoint.open(modelDir);
    warnUnusedLayers(ckpt);
    const processor = await Blip2Processor.fromDirectory(ckpt.dir, ckpt.config, { imageBackend });
    const inputs = await processor.process({ images: image, text: stringOption(args, "prompt") });
    const tensors: Record<string, TensorToWrite> = {
      pixel_values: { dtype: "F32", shape: inputs.pixelShape!, data: inputs.pixelValues! },
      input_ids: { dtype: "I64", shape: [1, inputs.inputIds[0]!.length], data: BigInt64Array.from(inputs.inputIds[0]!.map(BigInt)) },
    };
    const add = (name: string, t: ort.Tensor) => (tensors[name] = { dtype: "F32", shape: [...t.dims], data: t.data as Float32Array });
    if (ckpt.config.architectures.includes("Blip2ForImageTextRetrieval")) {
      if (decoderIds) throw new UsageError("dump: --decoder-input-ids applies to T5 checkpoints only");
      const rt = new RetrievalRuntime(ckpt);
      const r = await rt.images(inputs.pixelValues!, 1);
      for (const k of ["vision_last_hidden_state", "vision_pooler_output", "qformer_last_hidden_state"]) add(k, r[k]!);
      add("image_embeds", r.image_embeds!);
      await rt.release();
    } else {
      // One pass over the prompt (and T5's decoder ids): the same limits as generating after it.
      checkPromptLength(ckpt.config, inputs.inputIds[0]!.length, decoderIds ? decoderIds.length - 1 : 0);
      const rt = new Blip2Runtime(ckpt);
      const r = await rt.image(inputs.pixelValues!, 1);
      for (const k of ["vision_last_hidden_state", "vision_pooler_output", "qformer_last_hidden_state", "language_model_inputs"]) add(k, r[k]!);
      add("logits", await logits(rt, inputs.inputIds, inputs.attentionMask, r.language_model_inputs!, decoderIds));
      await rt.release();
    }
    try {
      writeSafetensors(out, tensors, { producer: "blip2 dump" });
    } catch (err) {
      // Named by the file asked for, not by the temporary file it is written through.
      throw new Blip2Error(`${out}: cannot write it (${(err as NodeJS.ErrnoException).code ?? describeError(err)})`);
    }
    io.stdout.write(`wrote ${Object.keys(tensors).length} tensors to ${out}\n`);
    return 0;
  },
};

async function logits(rt: Blip2Runtime, inputIds: number[][], attentionMask: number[][], features: ort.Tensor, decoderIds: number[] | null): Promise<ort.Tensor> {
  const text = rt.config.text;
  if (decoderIds && text.modelType === "opt") throw new UsageError("dump: --decoder-input-ids applies to T5 checkpoints only");
  const bad = decoderIds?.find((i) => i >= text.vocabSize);
  if (bad !== undefined) throw new UsageError(`dump: decoder input id ${bad} is outside the vocabulary (size ${text.vocabSize})`);
  return (await rt.forward(inputIds, attentionMask, features, { decoderInputIds: decoderIds ? [decoderIds] : undefined })).logits!;
}

function parseIds(text: string | undefined): number[] | null {
  if (text === undefined) return null;
  const parts = text.split(",").map((s) => s.trim());
  if (!parts.length || parts.some((p) => !/^\d+$/.test(p))) throw new UsageError(`invalid value for --decoder-input-ids: expected comma-separated token ids like 0,3,8, got ${JSON.stringify(text)}`);
  return parts.map(Number);
}
