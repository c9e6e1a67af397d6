/**
 * Search over an index made by `blip2 index`: ITC top-k over the stored embeddings, optionally
 * re-ranked with ITM as the paper does (score = ITM match logit + ITC), as `blip2 search` does.
 */
import fs from "node:fs";
import sharp from "sharp";
import type { Blip2ForImageTextRetrieval } from "../api/retrieval.js";
import type { Hit, ImageStore } from "../search/store.js";
import { HttpError } from "./errors.js";

export interface Ranked extends Hit {
  itm?: number;
  score: number;
}

export async function searchIndex(model: Blip2ForImageTextRetrieval, store: ImageStore, text: string, k: number, rerank: number): Promise<Ranked[]> {
  const embedding = (await model.embedTexts([text])).data;
  const hits = await store.search(embedding, Math.max(k, rerank));
  if (rerank <= 0) return hits.slice(0, k).map((h) => ({ ...h, score: h.itc }));
  const [ids, mask] = model.tokenize([text]);
  const ranked: Ranked[] = [];
  // Files gone since indexing cannot be re-ranked: they are left out, as the CLI does.
  const present = hits.slice(0, rerank).filter((h) => fs.existsSync(h.path));
  for (let i = 0; i < present.length; i += 8) {
    const part = present.slice(i, i + 8);
    const [features] = await model.imageFeatures(part.map((h) => h.path), { batchSize: 8 });
    const logits = await model.matchFeatures(features!, ids, mask);
    part.forEach((h, j) => ranked.push({ ...h, itm: logits[j]![0]![1], score: logits[j]![0]![1] + h.itc }));
  }
  return ranked.sort((a, b) => b.score - a.score).slice(0, k);
}

/**
 * Thumbnails of indexed images only: a path is served when the index lists it, so no other file
 * can be read through this route, whatever the path says (`..`, links, other folders).
 */
export class Thumbnails {
  private known: { at: number; paths: Set<string> } | null = null;

  constructor(private readonly store: ImageStore) {}

  private indexed(file: string): boolean {
    // The list is read again when a path is not in it and it is older than a few seconds: an index
    // updated meanwhile is seen without reading it for every thumbnail.
    const now = Date.now();
    if (!this.known || (!this.known.paths.has(file) && now - this.known.at > 5000)) this.known = { at: now, paths: new Set(this.store.files().keys()) };
    return this.known.paths.has(file);
  }

  async jpeg(file: string, size: number): Promise<Buffer> {
    if (!this.indexed(file)) throw new HttpError(404, "not_indexed", `${JSON.stringify(file)} is not an image of this server's index`);
    try {
      return await sharp(file, { limitInputPixels: 178_956_970 }).rotate().resize(size, size, { fit: "inside", withoutEnlargement: true }).jpeg({ quality: 80 }).toBuffer();
    } catch {
      throw new HttpError(404, "not_indexed", `${JSON.stringify(file)} can no longer be read (moved or changed since indexing)`);
    }
  }
}
