/** `blip2 search`: rank the indexed images for a text, by ITC, optionally re-ranked with ITM. */
import fs from "node:fs";
import { Blip2ForImageTextRetrieval } from "../../api/retrieval.js";
import { Blip2Error } from "../../errors.js";
import type { Hit } from "../../search/store.js";
import { openStore } from "../../search/store.js";
import { intOption, stringOption, UsageError, type Command } from "../command.js";
import { modelHelp, modelLoadOptions, modelOptions } from "../shared.js";
import { DEFAULT_DB, dbHelp, indexedModel, modelFor } from "./index.js";

interface Ranked extends Hit {
  /** ITM match logit (with --rerank). */
  itm?: number;
  score: number;
}

export const search: Command = {
  name: "search",
  summary: "find the indexed images that best match a text",
  usage: "blip2 search [--db FILE] \"TEXT\" [--k 10] [--rerank N] [--json]",
  help: [
    dbHelp,
    "--k N                    how many results (default 10)",
    "--rerank N               re-rank the N best by ITC with ITM; score = ITM match logit + ITC (default 0: ITC only)",
    "--json                   one JSON object per result: {\"path\", \"score\", \"itc\", \"itm\"}",
    ...modelHelp.map((l) => l.replace(/\(default [^)]*\)/, "(default: the index's model)")),
  ].join("\n"),
  options: { ...modelOptions, db: { type: "string" }, k: { type: "string" }, rerank: { type: "string" }, json: { type: "boolean" } },
  async run(args, io) {
    if (args.positionals.length !== 1 || !args.positionals[0]!.trim()) throw new UsageError("search: give one TEXT");
    const text = args.positionals[0]!;
    const db = stringOption(args, "db") ?? DEFAULT_DB;
    if (!fs.existsSync(db)) throw new Blip2Error(`${db}: no such index (build one with 'blip2 index')`);
    const k = intOption(args, "k", 1) ?? 10;
    const rerank = intOption(args, "rerank", 0) ?? 0;
    const model = await Blip2ForImageTextRetrieval.fromPretrained(await modelFor(args, db), modelLoadOptions(args, io));
    const store = await openStore(db, indexedModel(model, await modelFor(args, db)), false);
    try {
      const embedding = (await model.embedTexts([text])).data;
      const hits = await store.search(embedding, Math.max(k, rerank));
      const ranked = rerank > 0 ? await rerankWithItm(model, text, hits.slice(0, rerank), io.stderr) : hits.map((h) => ({ ...h, score: h.itc }));
      for (const r of ranked.slice(0, k)) {
        io.stdout.write(args.values.json ? `${JSON.stringify(r)}\n` : `${r.score.toFixed(4)}\t${r.path}\n`);
      }
    } finally {
      await store.close();
      await model.dispose();
    }
    return 0;
  },
};

/** The paper's protocol: ITM on the ITC top candidates, final score = ITM match logit + ITC. */
async function rerankWithItm(model: Blip2ForImageTextRetrieval, text: string, hits: Hit[], stderr: NodeJS.WritableStream): Promise<Ranked[]> {
  const [ids, mask] = model.tokenize([text]);
  const present = hits.filter((h) => {
    if (fs.existsSync(h.path)) return true;
    stderr.write(`not re-ranked (file gone since indexing): ${h.path}\n`);
    return false;
  });
  const ranked: Ranked[] = [];
  const batch = 8;
  for (let i = 0; i < present.length; i += batch) {
    const part = present.slice(i, i + batch);
    const [features] = await model.imageFeatures(part.map((h) => h.path), { batchSize: batch });
    const logits = await model.matchFeatures(features!, ids, mask);
    part.forEach((h, j) => {
      const itm = logits[j]![0]![1];
      ranked.push({ ...h, itm, score: itm + h.itc });
    });
  }
  return ranked.sort((a, b) => b.score - a.score);
}
