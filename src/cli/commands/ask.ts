/** `blip2 ask`: visual question answering about one image. */
import { vqaPrompt } from "../../api/tasks.js";
import { UsageError, type Command } from "../command.js";
import { generationFromArgs, generationHelp, generationOptionSpec, loadModel, modelHelp, modelOptions } from "../shared.js";

export const ask: Command = {
  name: "ask",
  summary: "answer a question about an image",
  usage: "blip2 ask [--model M] [generation options] [--json] IMAGE \"QUESTION\"",
  help: ["--json                   print {\"image\", \"question\", \"ids\", \"text\", \"answer\"}", ...generationHelp, ...modelHelp].join("\n"),
  options: { ...modelOptions, ...generationOptionSpec, json: { type: "boolean" } },
  async run(args, io) {
    if (args.positionals.length !== 2) throw new UsageError("ask: give an IMAGE and a QUESTION");
    const [image, question] = args.positionals as [string, string];
    if (!question.trim()) throw new UsageError("ask: the question is empty");
    const generation = generationFromArgs(args);
    const { blip2 } = await loadModel(args, io, generation);
    try {
      const [r] = await blip2.captionAll([image], { ...generation, numReturnSequences: 1, prompt: vqaPrompt(question) });
      io.stdout.write(args.values.json ? `${JSON.stringify({ image, question, ids: r!.ids, text: r!.text, answer: r!.caption })}\n` : `${r!.caption}\n`);
    } finally {
      await blip2.dispose();
    }
    return 0;
  },
};
