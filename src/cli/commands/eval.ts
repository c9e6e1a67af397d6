/**
 * `blip2 eval`: how a trained model does on a data set: retrieval recall for a stage-1 checkpoint,
 * language-modelling loss and perplexity (and with --generate, captions) for a stage-2 one.
 */
import { evaluateLanguageModel, evaluateRetrieval } from "../../api/evaluate.js";
import { Checkpoint } from "../../io/checkpoint.js";
import { intOption, requiredOption, stringOption, UsageError, type Command } from "../command.js";

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

export const evalCommand: Command = {
  name: "eval",
  summary: "evaluate a trained model on a data set (recall@k, or loss, perplexity and captions)",
  usage: "blip2 eval --model DIR --data FILE [--generate] [--prompt TEXT] [--rerank K] [--json]",
  help: [
    "--model DIR              a checkpoint folder: retrieval (stage 1) or captioning (stage 2)",
    "--data FILE              JSONL {\"image\", \"text\"} lines, a COCO captions JSON, or a caption folder",
    "--rerank K               stage 1: ITC candidates per query that ITM re-ranks (default 128)",
    "--generate               stage 2: also caption every image and count exact matches",
    "--prompt TEXT            stage 2: the prompt the model was trained with",
    "--batch-size N           images per run (default 8)",
    "--threads N              threads per ONNX Runtime session (default: all cores)",
    "--json                   the results as one JSON object",
  ].join("\n"),
  options: {
    model: { type: "string", short: "m" },
    data: { type: "string" },
    rerank: { type: "string" },
    generate: { type: "boolean" },
    prompt: { type: "string" },
    "batch-size": { type: "string" },
    threads: { type: "string" },
    json: { type: "boolean" },
  },
  async run(args, io) {
    if (args.positionals.length) throw new UsageError(`eval: unexpected argument ${JSON.stringify(args.positionals[0])}`);
    const model = requiredOption(args, "eval", "model");
    const data = requiredOption(args, "eval", "data");
    const options = { rerank: intOption(args, "rerank", 1), batchSize: intOption(args, "batch-size", 1), threads: intOption(args, "threads", 1), generate: args.values.generate === true, prompt: stringOption(args, "prompt") };
    const retrieval = Checkpoint.open(model).config.architectures.includes("Blip2ForImageTextRetrieval");
    if (retrieval && (options.generate || options.prompt !== undefined)) throw new UsageError("eval: --generate and --prompt are for stage-2 (captioning) models");
    if (retrieval) {
      const r = await evaluateRetrieval(model, data, options);
      if (args.values.json) io.stdout.write(`${JSON.stringify(r)}\n`);
      else {
        const line = (name: string, x: Record<string, number>) => `${name.padEnd(26)} R@1 ${pct(x.r1!)}  R@5 ${pct(x.r5!)}  R@10 ${pct(x.r10!)}\n`;
        io.stdout.write(`${r.images} images, ${r.texts} texts\n`);
        io.stdout.write(line("image→text (ITC + ITM)", r.imageToText) + line("text→image (ITC + ITM)", r.textToImage));
        io.stdout.write(line("image→text (ITC)", r.itcImageToText) + line("text→image (ITC)", r.itcTextToImage));
      }
      return 0;
    }
    const r = await evaluateLanguageModel(model, data, options);
    if (args.values.json) io.stdout.write(`${JSON.stringify(r)}\n`);
    else {
      io.stdout.write(`${r.examples} examples: loss ${r.loss.toFixed(4)} per token, perplexity ${r.perplexity.toFixed(2)}\n`);
      if (r.captions) io.stdout.write(`${r.captions.map((c) => `${c.exact ? "=" : "≠"} ${c.image}: ${c.caption}`).join("\n")}\nexact match ${pct(r.exactMatch!)}\n`);
    }
    return 0;
  },
};
