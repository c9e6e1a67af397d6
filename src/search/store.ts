/**
 * Where an image index lives. The CLI talks to this interface only, so another backend (e.g.
 * PostgreSQL + pgvector, one row per query vector, `max(inner product)` grouped by image) can stand
 * in for SQLite without changing the commands.
 */
import { Blip2Error } from "../errors.js";

export interface IndexedModel {
  /** What the user named (a Hub id or a folder). */
  id: string;
  /** Checkpoint.fingerprint(): the same model under another name is the same model. */
  fingerprint: string;
  numQueries: number;
  dim: number;
}

export interface FileStamp {
  size: number;
  mtimeMs: number;
  sha256: string;
}

export interface ImageRecord extends FileStamp {
  path: string;
  /** [numQueries * dim] normalized ITC embeddings. */
  embedding: Float32Array;
}

export interface Hit {
  path: string;
  /** ITC similarity: the best query's cosine similarity with the text. */
  itc: number;
}

export interface ImageStore {
  readonly model: IndexedModel;
  /** Every indexed file with its stamp. */
  files(): Map<string, FileStamp>;
  /** The embedding of an already indexed file with this content, if any (renames, copies). */
  embeddingByHash(sha256: string): Float32Array | undefined;
  upsert(records: ImageRecord[]): void;
  remove(paths: string[]): void;
  count(): number;
  /** The k best images for a normalized text embedding [dim], by ITC. */
  search(text: Float32Array, k: number): Promise<Hit[]>;
  close(): Promise<void>;
}

/**
 * Opens the store at `location`: read-only, unless `create`, which also makes a new one where there
 * is none. Refuses a store of another model, and a location that holds something else.
 */
export async function openStore(location: string, model: IndexedModel | null, create: boolean): Promise<ImageStore> {
  if (/^postgres(ql)?:\/\//.test(location)) throw new Blip2Error(`${location}: PostgreSQL stores are not available in this build; use a file path (SQLite)`);
  const { SqliteStore } = await import("./sqliteStore.js");
  return SqliteStore.open(location, model, create);
}
