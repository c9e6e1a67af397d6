/**
 * Layers the weights hold beyond those config.json asks for. A checkpoint whose config says 1 layer
 * where its weights hold 2 runs the first only, which is the config's word; but the user should
 * hear of it, as transformers warns of weights "not used when initializing" the model.
 */
import { warnOnce } from "../warn.js";
import type { Checkpoint } from "./checkpoint.js";

/** Each stack of numbered layers, by the prefix of its tensors' names, and the config field that counts it. */
function stacks(ckpt: Checkpoint): [prefix: string, field: string, layers: number][] {
  const c = ckpt.config;
  const common: [string, string, number][] = [
    ["vision_model.encoder.layers", "vision_config.num_hidden_layers", c.vision.numHiddenLayers],
    ["qformer.encoder.layer", "qformer_config.num_hidden_layers", c.qformer.numHiddenLayers],
  ];
  if (c.architectures.includes("Blip2ForImageTextRetrieval")) return common;
  const t = c.text;
  if (t.modelType === "opt") return [...common, ["language_model.model.decoder.layers", "text_config.num_hidden_layers", t.numHiddenLayers]];
  return [...common, ["language_model.encoder.block", "text_config.num_layers", t.numLayers], ["language_model.decoder.block", "text_config.num_decoder_layers", t.numDecoderLayers]];
}

/** Warns, once per stack, of the weights' layers that config.json leaves unused. */
export function warnUnusedLayers(ckpt: Checkpoint): void {
  const names = ckpt.names();
  for (const [prefix, field, layers] of stacks(ckpt)) {
    const unused = names.filter((n) => n.startsWith(`${prefix}.`) && Number(n.slice(prefix.length + 1).split(".")[0]) >= layers);
    if (!unused.length) continue;
    const held = Math.max(...unused.map((n) => Number(n.slice(prefix.length + 1).split(".")[0]))) + 1;
    warnOnce(`${ckpt.dir}: the weights hold ${held} layers under ${prefix} but config.json's ${field} is ${layers}: ${unused.length} tensors of layers ${layers}..${held - 1} are not used`);
  }
}
