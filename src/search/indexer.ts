/**
 * Bringing an index up to date with a folder: new and changed images are embedded, deleted ones
 * removed, unchanged ones (same size and modification time) left alone; a renamed or copied image
 * (same content) reuses its embedding. Unreadable images are skipped and reported.
 */
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { Blip2ForImageTextRetrieval } from "../api/retrieval.js";
import { describeError } from "../errors.js";
import { loadImage, type RgbImage } from "../image/decode.js";
import type { ImageRecord, ImageStore } from "./store.js";

export const IMAGE_EXTENSIONS = new Set([".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"]);

export interface IndexReport {
  added: string[];
  updated: string[];
  /** New paths whose content was already indexed: no embedding computed. */
  reused: string[];
  removed: string[];
  unchanged: number;
  /** Files that are not images (by extension), not indexed. */
  skipped: string[];
  unreadable: { path: string; error: string }[];
}

export interface IndexOptions {
  batchSize?: number;
  /** Called as images are embedded. */
  progress?: (done: number, total: number) => void;
  /** Files to leave out (e.g. the index database itself). */
  exclude?: string[];
}

export async function updateIndex(store: ImageStore, model: Blip2ForImageTextRetrieval, folder: string, options: IndexOptions = {}): Promise<IndexReport> {
  const root = path.resolve(folder);
  const exclude = new Set((options.exclude ?? []).map((p) => path.resolve(p)));
  const report: IndexReport = { added: [], updated: [], reused: [], removed: [], unchanged: 0, skipped: [], unreadable: [] };
  const known = store.files();
  const seen = new Set<string>();
  const todo: string[] = [];
  for (const file of walk(root)) {
    if (exclude.has(file)) continue;
    if (!IMAGE_EXTENSIONS.has(path.extname(file).toLowerCase())) {
      report.skipped.push(file);
      continue;
    }
    seen.add(file);
    const stat = fs.statSync(file);
    const old = known.get(file);
    if (old && old.size === stat.size && old.mtimeMs === stat.mtimeMs) report.unchanged++;
    else todo.push(file);
  }
  report.removed = [...known.keys()].filter((p) => (p === root || p.startsWith(root + path.sep)) && !seen.has(p));

  const batchSize = options.batchSize ?? 8;
  let done = 0;
  options.progress?.(0, todo.length);
  for (let i = 0; i < todo.length; i += batchSize) {
    const records: ImageRecord[] = [];
    const pending: { record: Omit<ImageRecord, "embedding">; image: RgbImage }[] = [];
    for (const file of todo.slice(i, i + batchSize)) {
      const read = await readImage(file);
      if ("error" in read) {
        report.unreadable.push({ path: file, error: read.error });
        continue;
      }
      const record = { path: file, ...read.stamp };
      const reused = store.embeddingByHash(record.sha256);
      (known.has(file) ? report.updated : reused ? report.reused : report.added).push(file);
      if (reused) records.push({ ...record, embedding: reused });
      else pending.push({ record, image: read.image });
    }
    if (pending.length) {
      const embeddings = await model.embedImages(
        pending.map((p) => ({ ...p.image, channels: 3 as const })),
        { batchSize },
      );
      const size = embeddings.data.length / pending.length;
      pending.forEach((p, k) => records.push({ ...p.record, embedding: embeddings.data.slice(k * size, (k + 1) * size) }));
    }
    store.upsert(records);
    done += Math.min(batchSize, todo.length - i);
    options.progress?.(done, todo.length);
  }
  // Removed last, so a renamed image still finds its old embedding by content.
  store.remove(report.removed);
  return report;
}

async function readImage(file: string): Promise<{ stamp: { size: number; mtimeMs: number; sha256: string }; image: RgbImage } | { error: string }> {
  try {
    const stat = fs.statSync(file);
    const bytes = fs.readFileSync(file);
    const image = await loadImage(bytes, file);
    return { stamp: { size: stat.size, mtimeMs: stat.mtimeMs, sha256: createHash("sha256").update(bytes).digest("hex") }, image };
  } catch (err) {
    return { error: describeError(err) };
  }
}

/** Every file under `dir` (sorted, hidden entries and symlinked folders left out). */
function* walk(dir: string): Generator<string> {
  const entries = fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name));
  for (const e of entries) {
    if (e.name.startsWith(".")) continue;
    const full = path.join(dir, e.name);
    if (e.isDirectory()) yield* walk(full);
    else if (e.isFile() || (e.isSymbolicLink() && fs.statSync(full, { throwIfNoEntry: false })?.isFile())) yield full;
  }
}
