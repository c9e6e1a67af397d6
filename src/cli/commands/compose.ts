/** `blip2 compose`: the checkpoint stage 2 starts from, made of a stage-1 checkpoint and a language model. */
import { composeStage2 } from "../../train/compose.js";
import { Rng } from "../../train/rng.js";
import { intOption, requiredOption, UsageError, type Command } from "../command.js";

export const compose: Command = {
  name: "compose",
  summary: "make a stage-2 starting checkpoint from a stage-1 checkpoint and a language model",
  usage: "blip2 compose --stage1 DIR --language-model DIR --out DIR [--seed N]",
  help: [
    "--stage1 DIR             a stage-1 checkpoint (Blip2ForImageTextRetrieval layout)",
    "--language-model DIR     a Hugging Face OPTForCausalLM or T5ForConditionalGeneration folder",
    "--out DIR                the new folder (must not exist or be empty)",
    "--seed N                 seed of the new language projection's initial weights (default 0)",
  ].join("\n"),
  options: { stage1: { type: "string" }, "language-model": { type: "string" }, out: { type: "string" }, seed: { type: "string" } },
  async run(args, io) {
    if (args.positionals.length) throw new UsageError(`compose: unexpected argument ${JSON.stringify(args.positionals[0])}`);
    const lines = await composeStage2({
      stage1: requiredOption(args, "compose", "stage1"),
      languageModel: requiredOption(args, "compose", "language-model"),
      out: requiredOption(args, "compose", "out"),
      rng: new Rng(intOption(args, "seed", 0) ?? 0),
    });
    io.stdout.write(`${lines.join("\n")}\n`);
    return 0;
  },
};
