/** `blip2 caption`: caption images, zero-shot or continuing a prompt. */
import { intOption, stringOption, UsageError, type Command } from "../command.js";
import { generationFromArgs, generationHelp, generationOptionSpec, loadModel, modelHelp, modelOptions } from "../shared.js";

export const caption: Command = {
  name: "caption",
  summary: "caption images (zero-shot, or continuing --prompt)",
  usage: "blip2 caption [--model M] [--prompt P] [generation options] [--json] IMAGE...",
  help: [
    "--prompt P               text the caption continues, e.g. \"this is a cartoon of\"",
    "--batch-size N           images per batch (default 4)",
    "--json                   one JSON object per line: {\"image\", \"ids\", \"text\", \"caption\"}",
    ...generationHelp,
    ...modelHelp,
  ].join("\n"),
  options: { ...modelOptions, ...generationOptionSpec, prompt: { type: "string" }, "batch-size": { type: "string" }, json: { type: "boolean" } },
  async run(args, io) {
    const images = args.positionals;
    if (!images.length) throw new UsageError("caption: give at least one IMAGE");
    const generation = generationFromArgs(args);
    const batchSize = intOption(args, "batch-size", 1) ?? 4;
    const prompt = stringOption(args, "prompt");
    const { blip2, progress } = await loadModel(args, io, generation);
    try {
      for (let start = 0; start < images.length; start += batchSize) {
        progress.items("captioning", start, images.length);
        const batch = images.slice(start, start + batchSize);
        const results = await blip2.captionAll(batch, { ...generation, prompt });
        const perImage = results.length / batch.length;
        results.forEach((r, i) => {
          const image = batch[Math.floor(i / perImage)]!;
          if (args.values.json) io.stdout.write(`${JSON.stringify({ image, ids: r.ids, text: r.text, caption: r.caption })}\n`);
          else io.stdout.write(images.length > 1 ? `${image}\t${r.caption}\n` : `${r.caption}\n`);
        });
      }
      progress.items("captioning", images.length, images.length);
    } finally {
      await blip2.dispose();
    }
    return 0;
  },
};
