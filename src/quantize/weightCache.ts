/**
 * The converted-weight cache on disk: `<blip2 cache>/weights/<checkpoint fingerprint>/<format>/`,
 * one safetensors file per model part and precision. Listing it, and removing what this version of
 * blip2 can no longer read (folders of an older weight format, files of conversions that were
 * killed) or what the user names.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { abandonedPartial, partialFileWriter, partialWriterAlive } from "../io/partialFile.js";
import { WEIGHTS_FORMAT } from "../io/weightFormat.js";

/** A format as a folder name: "blip2-weights/2" is kept in "blip2-weights-2". */
export const formatFolder = (format: string) => format.replace("/", "-");
const FORMAT_FOLDER = /^blip2-weights-(\d+)$/;
const CURRENT_VERSION = Number(FORMAT_FOLDER.exec(formatFolder(WEIGHTS_FORMAT))![1]);

/** Written beside the converted files: where they came from, for `blip2 cache`. */
const SOURCE_FILE = "source.json";

export interface WeightCacheEntry {
  /** The folder holding one checkpoint's conversions in one format. */
  dir: string;
  fingerprint: string;
  /** "blip2-weights/2" */
  format: string;
  /** Older than this version of blip2 reads (never read again), current, or newer (another version's). */
  age: "older" | "current" | "newer";
  /** Its files and their sizes in bytes. */
  files: { name: string; bytes: number }[];
  bytes: number;
  /** The checkpoint folder it was converted from, where that was recorded. */
  source?: string;
}

/** The blip2 cache: `override`, else $BLIP2_CACHE, else ~/.cache/blip2. */
export function blip2CacheDir(override?: string): string {
  return override ?? process.env.BLIP2_CACHE ?? path.join(os.homedir(), ".cache", "blip2");
}

export function weightCacheRoot(cacheDir: string): string {
  return path.join(cacheDir, "weights");
}

/** Every conversion folder under the cache, by fingerprint and format; other names are not ours and are skipped. */
export function listWeightCaches(cacheDir?: string): WeightCacheEntry[] {
  const root = weightCacheRoot(blip2CacheDir(cacheDir));
  const entries: WeightCacheEntry[] = [];
  for (const fingerprint of subfolders(root)) {
    for (const name of subfolders(path.join(root, fingerprint))) {
      const version = FORMAT_FOLDER.exec(name)?.[1];
      if (version === undefined) continue;
      const dir = path.join(root, fingerprint, name);
      // A file renamed into place or removed by another process while listed is left out.
      const files = fs.readdirSync(dir).filter((f) => f !== SOURCE_FILE).sort().flatMap((f) => {
        const stat = fs.statSync(path.join(dir, f), { throwIfNoEntry: false });
        return stat ? [{ name: f, bytes: stat.size }] : [];
      });
      const v = Number(version);
      entries.push({
        dir, fingerprint, format: `blip2-weights/${v}`,
        age: v < CURRENT_VERSION ? "older" : v > CURRENT_VERSION ? "newer" : "current",
        files, bytes: files.reduce((s, f) => s + f.bytes, 0), source: readSource(dir),
      });
    }
  }
  return entries;
}

function subfolders(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort();
}

function readSource(dir: string): string | undefined {
  try {
    const json = JSON.parse(fs.readFileSync(path.join(dir, SOURCE_FILE), "utf8"));
    return typeof json.checkpoint === "string" ? json.checkpoint : undefined;
  } catch {
    return undefined;
  }
}

/** Records the checkpoint a conversion folder was made from (shown by `blip2 cache`). */
export function recordSource(dir: string, checkpointDir: string): void {
  fs.writeFileSync(path.join(dir, SOURCE_FILE), JSON.stringify({ checkpoint: path.resolve(checkpointDir) }) + "\n");
}

export interface RemovedFiles {
  /** Folders and files removed. */
  paths: string[];
  bytes: number;
}

/**
 * What no version of blip2 from this one on reads: folders of older weight formats (unless an older
 * version is still writing into one) and the partial files of conversions whose process is gone.
 * Current and newer formats stay.
 */
export function prunableWeightCaches(cacheDir?: string): RemovedFiles {
  const prunable: RemovedFiles = { paths: [], bytes: 0 };
  for (const entry of listWeightCaches(cacheDir)) {
    if (entry.age === "older" && !entry.files.some((f) => livePartialFile(f.name))) add(prunable, entry.dir, entry.bytes);
    else for (const f of entry.files.filter((f) => abandonedPartial(f.name))) add(prunable, path.join(entry.dir, f.name), f.bytes);
  }
  return prunable;
}

/** Removes what `prunableWeightCaches` lists. */
export function pruneWeightCaches(cacheDir?: string): RemovedFiles {
  const removed = prunableWeightCaches(cacheDir);
  for (const p of removed.paths) fs.rmSync(p, { recursive: true, force: true });
  removeEmptyFingerprints(cacheDir);
  return removed;
}

/**
 * Removes every conversion of one checkpoint, named by its fingerprint or an unambiguous prefix of
 * it (as `blip2 cache` lists them). Refused while a conversion of it is still being written.
 */
export function removeWeightCache(id: string, cacheDir?: string): RemovedFiles {
  const all = listWeightCaches(cacheDir);
  const fingerprints = [...new Set(all.map((e) => e.fingerprint))].filter((f) => f.startsWith(id));
  if (!id || fingerprints.length === 0) throw new Blip2Error(`${weightCacheRoot(blip2CacheDir(cacheDir))}: no converted weights with id ${JSON.stringify(id)} (see blip2 cache)`);
  if (fingerprints.length > 1) throw new Blip2Error(`id ${JSON.stringify(id)} is ambiguous: it starts ${fingerprints.join(", ")}`);
  const entries = all.filter((e) => e.fingerprint === fingerprints[0]);
  const busy = entries.flatMap((e) => e.files.filter((f) => livePartialFile(f.name)).map((f) => path.join(e.dir, f.name)));
  if (busy.length) throw new Blip2Error(`${busy[0]}: a conversion is still being written by process ${partialFileWriter(busy[0]!)}; remove it when that ends`);
  const removed: RemovedFiles = { paths: [], bytes: 0 };
  for (const entry of entries) removeEntry(entry, removed);
  removeEmptyFingerprints(cacheDir);
  return removed;
}

function removeEntry(entry: WeightCacheEntry, removed: RemovedFiles): void {
  fs.rmSync(entry.dir, { recursive: true, force: true });
  add(removed, entry.dir, entry.bytes);
}

function add(removed: RemovedFiles, p: string, bytes: number): void {
  removed.paths.push(p);
  removed.bytes += bytes;
}

function removeEmptyFingerprints(cacheDir: string | undefined): void {
  const root = weightCacheRoot(blip2CacheDir(cacheDir));
  for (const fingerprint of subfolders(root)) {
    const dir = path.join(root, fingerprint);
    if (fs.readdirSync(dir).length === 0) fs.rmdirSync(dir);
  }
}

const livePartialFile = (file: string) => partialWriterAlive(file) === true;
