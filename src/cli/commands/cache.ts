/**
 * `blip2 cache`: list the converted weights and packed weights kept in the blip2 cache, and remove
 * what is no longer wanted.
 */
import fs from "node:fs";
import { blip2CacheDir, listWeightCaches, pruneWeightCaches, removeWeightCache, weightCacheRoot, type RemovedFiles, type WeightCacheEntry } from "../../quantize/weightCache.js";
import { listPacked, packedRoot, pruneStalePacked, removePackedFrom, type PackedEntry } from "../../runtime/packedModels.js";
import { stringOption, UsageError, type Command, type Io } from "../command.js";
import { formatBytes } from "../progress.js";

/** Fingerprints are shown, and may be given to --remove, by their first characters. */
const ID_LENGTH = 12;

export const cache: Command = {
  name: "cache",
  summary: "list the converted (fp16/q8/q4) weights in the blip2 cache; remove old or unwanted ones",
  usage: "blip2 cache [--prune | --remove ID] [--cache-dir DIR] [--json]",
  help: [
    "--prune                  remove conversions in an older weight format (this version never reads",
    "                         them), partial files of conversions that were killed, and packed",
    "                         weights this machine will not open again (other ONNX Runtime or CPU,",
    "                         weight files changed or gone)",
    "--remove ID              remove every conversion of one checkpoint (ID as listed, or a prefix),",
    "                         and the packed weights made from it",
    "--cache-dir DIR          the blip2 cache (default $BLIP2_CACHE, else ~/.cache/blip2)",
    "--json                   print JSON instead of a table",
  ].join("\n"),
  options: { prune: { type: "boolean" }, remove: { type: "string" }, "cache-dir": { type: "string" }, json: { type: "boolean" } },
  async run(args, io) {
    if (args.positionals.length) throw new UsageError(`cache: unexpected argument ${JSON.stringify(args.positionals[0])}`);
    const remove = stringOption(args, "remove");
    if (args.values.prune && remove !== undefined) throw new UsageError("cache: --prune and --remove cannot be combined");
    const dir = blip2CacheDir(stringOption(args, "cache-dir"));
    const json = args.values.json === true;
    if (args.values.prune || remove !== undefined) {
      const removed = args.values.prune ? pruneWeightCaches(dir) : removeWeightCache(remove!, dir);
      const packed = args.values.prune ? pruneStalePacked(dir) : removePackedFrom(dir, removed.paths);
      printRemoved({ paths: [...removed.paths, ...packed.paths], bytes: removed.bytes + packed.bytes }, json, io);
    } else {
      printList(dir, listWeightCaches(dir), listPacked(dir), json, io);
    }
    return 0;
  },
};

function printList(dir: string, entries: WeightCacheEntry[], packed: PackedEntry[], json: boolean, io: Io): void {
  if (json) {
    io.stdout.write(JSON.stringify({ root: weightCacheRoot(dir), entries, packed: { root: packedRoot(dir), entries: packed } }) + "\n");
    return;
  }
  io.stdout.write(`${weightCacheRoot(dir)}\n`);
  for (const e of entries) {
    const what = e.age === "older" ? "older format, not read by this version (--prune removes it)"
      : e.age === "newer" ? "newer format, written by a later version of blip2"
      : e.files.map((f) => f.name.replace(/\.safetensors$/, "")).join(", ");
    const source = e.source && e.age === "current" ? `  from ${e.source}${fs.existsSync(e.source) ? "" : " (no longer there)"}` : "";
    io.stdout.write(`${e.fingerprint.slice(0, ID_LENGTH)}  ${e.format}  ${formatBytes(e.bytes).padStart(8)}  ${what}${source}\n`);
  }
  const total = entries.reduce((s, e) => s + e.bytes, 0);
  io.stdout.write(entries.length ? `total ${formatBytes(total)}\n` : "no converted weights\n");
  if (!packed.length) return;
  const stale = packed.filter((e) => e.stale);
  const sum = (list: PackedEntry[]) => formatBytes(list.reduce((s, e) => s + e.bytes, 0));
  io.stdout.write(`${packedRoot(dir)}\npacked weights of ${packed.length} session(s), ${sum(packed)}`);
  io.stdout.write(stale.length ? `; ${stale.length} (${sum(stale)}) not to be opened again here (--prune removes them)\n` : "\n");
}

function printRemoved(removed: RemovedFiles, json: boolean, io: Io): void {
  if (json) {
    io.stdout.write(JSON.stringify(removed) + "\n");
    return;
  }
  for (const p of removed.paths) io.stdout.write(`removed ${p}\n`);
  io.stdout.write(`freed ${formatBytes(removed.bytes)}\n`);
}
