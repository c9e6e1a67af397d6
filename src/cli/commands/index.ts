/** `blip2 index`: embed every image under a folder into an index (incrementally). */
import fs from "node:fs";
import path from "node:path";
import { Blip2ForImageTextRetrieval } from "../../api/retrieval.js";
import { Blip2Error } from "../../errors.js";
import { updateIndex } from "../../search/indexer.js";
import { openStore, type ImageStore } from "../../search/store.js";
import { intOption, stringOption, UsageError, type Command, type ParsedArgs } from "../command.js";
import { modelHelp, modelLoadOptions, modelOptions } from "../shared.js";
import { DEFAULT_RETRIEVAL_MODEL } from "./match.js";

export const DEFAULT_DB = "blip2-index.sqlite";

export const dbHelp = `--db FILE                the index database (default ./${DEFAULT_DB})`;

export const index: Command = {
  name: "index",
  summary: "embed every image under a folder into a searchable index (only new or changed files)",
  usage: "blip2 index [--model M] DIR [--db FILE] [--batch-size N] [--json]",
  help: [
    dbHelp,
    "--batch-size N           images per batch (default 8)",
    "--json                   print the report as JSON",
    ...modelHelp.map((l) => l.replace(/\(default [^)]*\)/, `(default: the index's model, else ${DEFAULT_RETRIEVAL_MODEL})`)),
  ].join("\n"),
  options: { ...modelOptions, db: { type: "string" }, "batch-size": { type: "string" }, json: { type: "boolean" } },
  async run(args, io) {
    if (args.positionals.length !== 1) throw new UsageError("index: give exactly one DIR");
    const dir = args.positionals[0]!;
    if (!fs.statSync(dir, { throwIfNoEntry: false })?.isDirectory()) throw new Blip2Error(`${dir}: not a folder`);
    const db = stringOption(args, "db") ?? DEFAULT_DB;
    const batchSize = intOption(args, "batch-size", 1);
    const options = modelLoadOptions(args, io);
    const model = await Blip2ForImageTextRetrieval.fromPretrained(await modelFor(args, db), options);
    let store: ImageStore | null = null;
    try {
      store = await openStore(db, indexedModel(model, await modelFor(args, db)), true);
      const report = await updateIndex(store, model, dir, {
        batchSize,
        exclude: ["", "-wal", "-shm", ".itc"].map((s) => path.resolve(db + s)),
        progress: (done, total) => total && options.progressSink.items("indexing", done, total),
      });
      for (const u of report.unreadable) io.stderr.write(`unreadable: ${u.path}: ${u.error}\n`);
      if (args.values.json) {
        io.stdout.write(`${JSON.stringify({ ...report, total: store.count() })}\n`);
      } else {
        io.stdout.write(
          `${store.count()} images indexed in ${db}: ${report.added.length} new, ${report.updated.length} changed, ${report.reused.length} renamed or copied, ` +
            `${report.removed.length} removed, ${report.unchanged} unchanged; ${report.skipped.length} non-image files skipped, ${report.unreadable.length} unreadable\n`,
        );
      }
    } finally {
      await store?.close();
      await model.dispose();
    }
    return 0;
  },
};

/**
 * --model, else the model an existing index was built with, else the default retrieval model. An
 * existing file is opened (read-only) even with --model: one that is not a blip2 index is refused
 * before the model loads, and before anything is written.
 */
export async function modelFor(args: ParsedArgs, db: string): Promise<string> {
  const given = stringOption(args, "model");
  if (!fs.existsSync(db)) return given ?? DEFAULT_RETRIEVAL_MODEL;
  const store = await openStore(db, null, false);
  try {
    return given ?? store.model.id;
  } finally {
    await store.close();
  }
}

export function indexedModel(model: Blip2ForImageTextRetrieval, src: string) {
  // A local folder is recorded by its absolute path, so the index works from any directory.
  const id = fs.existsSync(src) ? path.resolve(src) : src;
  return { id, fingerprint: model.checkpoint.fingerprint(), numQueries: model.config.numQueryTokens, dim: model.config.imageTextHiddenSize };
}
