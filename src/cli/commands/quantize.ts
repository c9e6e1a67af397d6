/** `blip2 quantize`: write a checkpoint folder whose linear weights are stored in lower precision. */
import { Checkpoint } from "../../io/checkpoint.js";
import { resolveModel } from "../../hub/download.js";
import { resolveDTypes } from "../../quantize/dtype.js";
import { writeConvertedFolder } from "../../quantize/export.js";
import { requiredOption, stringOption, UsageError, type Command } from "../command.js";
import { progressSink } from "../progress.js";
import { DEFAULT_MODEL, dtypeOption } from "../shared.js";

export const quantize: Command = {
  name: "quantize",
  summary: "write a copy of a model with fp16, q8 or q4 weights (loads faster, uses less memory)",
  usage: "blip2 quantize [--model M] --dtype D --out DIR",
  help: [
    `--model, -m M            local folder or Hub model id (default ${DEFAULT_MODEL})`,
    "--dtype D                fp16, q8, q4, or per part: vision=q8,qformer=q8,language=q4",
    "--out DIR                the new folder (must not exist or be empty)",
    "--revision REV           Hub branch, tag or commit (default main)",
    "--quiet, -q              no progress bars",
  ].join("\n"),
  options: { model: { type: "string", short: "m" }, dtype: { type: "string" }, out: { type: "string" }, revision: { type: "string" }, quiet: { type: "boolean", short: "q" } },
  async run(args, io) {
    if (args.positionals.length) throw new UsageError(`quantize: unexpected argument ${JSON.stringify(args.positionals[0])}`);
    requiredOption(args, "quantize", "dtype");
    const dtypes = resolveDTypes(dtypeOption(args));
    const out = requiredOption(args, "quantize", "out");
    const progress = progressSink(io.stderr, args.values.quiet === true);
    const dir = await resolveModel(stringOption(args, "model") ?? DEFAULT_MODEL, { revision: stringOption(args, "revision"), progress: (p) => progress.download(p) });
    await writeConvertedFolder(Checkpoint.open(dir), dtypes, out, (done, total) => progress.items("writing", done, total));
    io.stdout.write(`wrote ${out} (vision ${dtypes.vision}, qformer ${dtypes.qformer}, language ${dtypes.language})\n`);
    return 0;
  },
};
