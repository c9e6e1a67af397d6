/** `blip2 match`: ITM match probabilities and ITC similarities of images against texts. */
import { Blip2ForImageTextRetrieval } from "../../api/retrieval.js";
import { listOption, stringOption, UsageError, type Command } from "../command.js";
import { modelHelp, modelLoadOptions, modelOptions } from "../shared.js";

export const DEFAULT_RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g";

export const match: Command = {
  name: "match",
  summary: "score images against texts (ITM match probability and ITC similarity)",
  usage: "blip2 match [--model M] --image F... --text T... [--json] [--logits]",
  help: [
    "--image F                an image (repeat for several)",
    "--text T                 a text (repeat for several)",
    "--json                   print {\"itm\": [[...]], \"itc\": [[...]]} (rows = images, columns = texts)",
    "--logits                 with --json, also \"itm_logits\": [images][texts][no-match, match]",
    ...modelHelp.map((l) => l.replace(/\(default [^)]*\)/, `(default ${DEFAULT_RETRIEVAL_MODEL})`)),
  ].join("\n"),
  options: { ...modelOptions, image: { type: "string", multiple: true }, text: { type: "string", multiple: true }, json: { type: "boolean" }, logits: { type: "boolean" } },
  async run(args, io) {
    const images = listOption(args, "image");
    const texts = listOption(args, "text");
    if (!images.length || !texts.length) throw new UsageError("match: give at least one --image and one --text");
    if (args.positionals.length) throw new UsageError(`match: unexpected argument ${JSON.stringify(args.positionals[0])} (use --image and --text)`);
    if (args.values.logits && !args.values.json) throw new UsageError("match: --logits needs --json");
    const model = await Blip2ForImageTextRetrieval.fromPretrained(stringOption(args, "model") ?? DEFAULT_RETRIEVAL_MODEL, modelLoadOptions(args, io));
    try {
      const itm = await model.match(images, texts);
      const itc = await model.similarity(images, texts);
      if (args.values.json) {
        io.stdout.write(`${JSON.stringify({ itm: itm.probability, itc, ...(args.values.logits ? { itm_logits: itm.logits } : {}) })}\n`);
      } else {
        images.forEach((image, i) => texts.forEach((text, t) => io.stdout.write(`${itm.probability[i]![t]!.toFixed(4)}\t${itc[i]![t]!.toFixed(4)}\t${image}\t${text}\n`)));
      }
    } finally {
      await model.dispose();
    }
    return 0;
  },
};
