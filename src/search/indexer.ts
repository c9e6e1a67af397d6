/**
 * Bringing an index up to date with a folder: new and changed images are embedded, deleted ones
 * removed, unchanged ones (same size and modification time) left alone; a renamed or copied image
 * (same content) reuses its embedding. Unreadable images, folders that cannot be listed and symbolic
 * links that lead nowhere are skipped and reported.
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
  for (const entry of walk(root)) {
    if ("error" in entry) {
      report.unreadable.push(entry);
      continue;
    }
    const file = entry.path;
    if (exclude.has(file)) continue;
    if (!IMAGE_EXTENSIONS.has(path.extname(file).toLowerCase())) {
      report.skipped.push(file);
      continue;
    }
    const stat = fs.statSync(file, { throwIfNoEntry: false });
    if (!stat) continue; // removed since it was listed
    seen.add(file);
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
    // Copies of an image embedded in this batch (by content): they take its embedding, as they
    // would from the index had they come in a later batch, so the counts do not depend on batches.
    const pendingByHash = new Map<string, number>();
    const copies: { record: Omit<ImageRecord, "embedding">; of: number }[] = [];
    for (const file of todo.slice(i, i + batchSize)) {
      const read = await readImage(file, model.processor.imageProcessor.exifOrientation);
      if ("error" in read) {
        report.unreadable.push({ path: file, error: read.error });
        continue;
      }
      const record = { path: file, ...read.stamp };
      const reused = store.embeddingByHash(record.sha256);
      const twin = pendingByHash.get(record.sha256);
      (known.has(file) ? report.updated : reused || twin !== undefined ? report.reused : report.added).push(file);
      if (reused) records.push({ ...record, embedding: reused });
      else if (twin !== undefined) copies.push({ record, of: twin });
      else {
        pendingByHash.set(record.sha256, pending.length);
        pending.push({ record, image: read.image });
      }
    }
    if (pending.length) {
      const embeddings = await model.embedImages(
        pending.map((p) => ({ ...p.image, channels: 3 as const })),
        { batchSize },
      );
      const size = embeddings.data.length / pending.length;
      pending.forEach((p, k) => records.push({ ...p.record, embedding: embeddings.data.slice(k * size, (k + 1) * size) }));
      for (const c of copies) records.push({ ...c.record, embedding: embeddings.data.slice(c.of * size, (c.of + 1) * size) });
    }
    store.upsert(records);
    done += Math.min(batchSize, todo.length - i);
    options.progress?.(done, todo.length);
  }
  // Removed last, so a renamed image still finds its old embedding by content.
  store.remove(report.removed);
  return report;
}

async function readImage(file: string, exifOrientation: boolean): Promise<{ stamp: { size: number; mtimeMs: number; sha256: string }; image: RgbImage } | { error: string }> {
  try {
    const stat = fs.statSync(file);
    const bytes = fs.readFileSync(file);
    const image = await loadImage(bytes, file, { exifOrientation });
    return { stamp: { size: stat.size, mtimeMs: stat.mtimeMs, sha256: createHash("sha256").update(bytes).digest("hex") }, image };
  } catch (err) {
    return { error: describeError(err) };
  }
}

/**
 * Every file under `dir` (sorted, hidden entries and symlinked folders left out), and what cannot be
 * read: a folder that cannot be listed, a symbolic link that leads nowhere or into a loop.
 */
function* walk(dir: string): Generator<{ path: string } | { path: string; error: string }> {
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name));
  } catch (err) {
    yield { path: dir, error: `cannot list this folder (${describeError(err)})` };
    return;
  }
  for (const e of entries) {
    if (e.name.startsWith(".")) continue;
    const full = path.join(dir, e.name);
    if (e.isDirectory()) yield* walk(full);
    else if (e.isFile()) yield { path: full };
    else if (e.isSymbolicLink()) {
      const target = linkTarget(full);
      if (typeof target === "string") yield { path: full, error: target };
      else if (target.isFile()) yield { path: full };
    }
  }
}

/** What a symbolic link leads to, or why it leads nowhere. */
function linkTarget(link: string): fs.Stats | string {
  try {
    return fs.statSync(link);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ELOOP") return "a symbolic link in a loop";
    if (code === "ENOENT") return "a symbolic link to nothing (its target does not exist)";
    return `a symbolic link that cannot be followed (${describeError(err)})`;
  }
}
