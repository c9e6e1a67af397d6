/**
 * The image index in SQLite (better-sqlite3): one row per image with its file stamp and embedding,
 * and the model it was built with. Searching scores a contiguous copy of the embeddings kept beside
 * the database (`<db>.itc`), rebuilt when the index has changed since it was written.
 */
import Database from "better-sqlite3";
import fs from "node:fs";
import path from "node:path";
import { Blip2Error, describeError } from "../errors.js";
import { isMatrixOrMissing, ItcScorer, readMatrixHeader, topK, writeMatrix } from "./itcMatrix.js";
import type { FileStamp, Hit, ImageRecord, ImageStore, IndexedModel } from "./store.js";

const SCHEMA = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
  id INTEGER PRIMARY KEY,
  path TEXT UNIQUE NOT NULL,
  size INTEGER NOT NULL,
  mtime_ms REAL NOT NULL,
  sha256 TEXT NOT NULL,
  embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
`;

type Row = { path: string; size: number; mtime_ms: number; sha256: string };

export class SqliteStore implements ImageStore {
  private scorer: { generation: number; scorer: ItcScorer; paths: string[] } | null = null;

  private constructor(
    private readonly db: Database.Database,
    readonly file: string,
    readonly model: IndexedModel,
  ) {}

  /**
   * Opens the index in `file`: read-only unless `create`, which also makes a new one where no file
   * is. A file that is not a blip2 index (another program's database, an empty file, not SQLite at
   * all) is refused before anything is written to it.
   */
  static open(file: string, model: IndexedModel | null, create: boolean): SqliteStore {
    const exists = fs.existsSync(file);
    if (!exists && !create) throw new Blip2Error(`${file}: no such index (build one with 'blip2 index')`);
    if (exists) checkIsIndex(file);
    if (!exists && !model) throw new Blip2Error(`internal: a new index needs its model`);
    let db: Database.Database;
    try {
      db = new Database(file, { readonly: !create });
      if (!exists) {
        db.pragma("journal_mode = WAL");
        // One transaction: a run killed here leaves no index without its model.
        db.transaction(() => {
          db.exec(SCHEMA);
          db.pragma(`application_id = ${APPLICATION_ID}`);
          const put = db.prepare("INSERT INTO meta (key, value) VALUES (?, ?)");
          for (const [k, v] of Object.entries({ ...model, generation: 0 })) put.run(k, String(v));
        })();
      }
    } catch (err) {
      throw new Blip2Error(`${file}: cannot open the index database (${describeError(err)})`);
    }
    const stored = readModel(db)!;
    if (model && stored.fingerprint !== model.fingerprint) {
      db.close();
      throw new Blip2Error(`${file}: this index was built with model ${stored.id}; refusing to use it with ${model.id} (a different model): use another --db`);
    }
    return new SqliteStore(db, path.resolve(file), stored);
  }

  files(): Map<string, FileStamp> {
    const rows = this.db.prepare("SELECT path, size, mtime_ms, sha256 FROM images").all() as Row[];
    return new Map(rows.map((r) => [r.path, { size: r.size, mtimeMs: r.mtime_ms, sha256: r.sha256 }]));
  }

  embeddingByHash(sha256: string): Float32Array | undefined {
    const row = this.db.prepare("SELECT embedding FROM images WHERE sha256 = ? LIMIT 1").get(sha256) as { embedding: Buffer } | undefined;
    return row ? toFloats(row.embedding) : undefined;
  }

  upsert(records: ImageRecord[]): void {
    const expected = this.model.numQueries * this.model.dim;
    const put = this.db.prepare(
      "INSERT INTO images (path, size, mtime_ms, sha256, embedding) VALUES (@path, @size, @mtimeMs, @sha256, @embedding) " +
        "ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ms = excluded.mtime_ms, sha256 = excluded.sha256, embedding = excluded.embedding",
    );
    this.db.transaction(() => {
      for (const r of records) {
        if (r.embedding.length !== expected) throw new Blip2Error(`internal: embedding of ${r.embedding.length} values, expected ${expected}`);
        put.run({ ...r, embedding: Buffer.from(r.embedding.buffer, r.embedding.byteOffset, r.embedding.byteLength) });
      }
      if (records.length) this.bumpGeneration();
    })();
  }

  remove(paths: string[]): void {
    const del = this.db.prepare("DELETE FROM images WHERE path = ?");
    this.db.transaction(() => {
      for (const p of paths) del.run(p);
      if (paths.length) this.bumpGeneration();
    })();
  }

  count(): number {
    return (this.db.prepare("SELECT COUNT(*) AS n FROM images").get() as { n: number }).n;
  }

  async search(text: Float32Array, k: number): Promise<Hit[]> {
    if (text.length !== this.model.dim) throw new Blip2Error(`internal: text embedding of ${text.length} values, expected ${this.model.dim}`);
    const { scorer, paths } = await this.scoring();
    if (!paths.length) return [];
    const scores = await scorer!.scores(text);
    return topK(scores, k).map((i) => ({ path: paths[i]!, itc: scores[i]! }));
  }

  async close(): Promise<void> {
    await this.scorer?.scorer.release();
    this.scorer = null;
    this.db.close();
  }

  private get generation(): number {
    return Number((this.db.prepare("SELECT value FROM meta WHERE key = 'generation'").get() as { value: string }).value);
  }

  private bumpGeneration(): void {
    this.db.prepare("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'").run();
  }

  /** The scorer over an up-to-date matrix file, and the path of each matrix row. */
  private async scoring(): Promise<{ scorer: ItcScorer | null; paths: string[] }> {
    const generation = this.generation;
    if (this.scorer?.generation === generation) return this.scorer;
    await this.scorer?.scorer.release();
    this.scorer = null;
    const paths = (this.db.prepare("SELECT path FROM images ORDER BY id").all() as { path: string }[]).map((r) => r.path);
    if (!paths.length) return { scorer: null, paths };
    const matrixFile = `${this.file}.itc`;
    const header = { generation, rows: paths.length, queries: this.model.numQueries, dim: this.model.dim };
    const onDisk = readMatrixHeader(matrixFile);
    if (!onDisk || onDisk.generation !== generation || onDisk.rows !== header.rows) {
      if (!isMatrixOrMissing(matrixFile)) throw new Blip2Error(`${matrixFile}: a file blip2 did not write is where the index keeps its embeddings' matrix; move it away`);
      const rows = this.db.prepare("SELECT embedding FROM images ORDER BY id").pluck().iterate() as IterableIterator<Buffer>;
      writeMatrix(matrixFile, header, (function* () {
        for (const b of rows) yield toFloats(b);
      })());
    }
    this.scorer = { generation, scorer: await ItcScorer.open(matrixFile, header), paths };
    return this.scorer;
  }
}

/** SQLite's header field for the program a database belongs to: "Bli2". */
const APPLICATION_ID = 0x426c6932;

/** The tables and columns of an index (those made before application_id was set are known by them). */
const INDEX_TABLES: Record<string, string[]> = { meta: ["key", "value"], images: ["id", "path", "size", "mtime_ms", "sha256", "embedding"] };

/** Refuses, without writing anything, an existing file that is not a blip2 index. */
function checkIsIndex(file: string): void {
  if (!fs.statSync(file).isFile()) throw new Blip2Error(`${file}: not a blip2 index (not a file); give the index's file as --db`);
  const head = Buffer.alloc(16);
  const fd = fs.openSync(file, "r");
  let read: number;
  try {
    read = fs.readSync(fd, head, 0, 16, 0);
  } finally {
    fs.closeSync(fd);
  }
  const notIndex = (what: string) => new Blip2Error(`${file}: not a blip2 index (${what}); refusing to write into it: give another --db`);
  if (read === 0) throw notIndex("an empty file");
  if (head.toString("latin1") !== "SQLite format 3\0") throw notIndex("not an SQLite database");
  let db: Database.Database;
  try {
    db = new Database(file, { readonly: true, fileMustExist: true });
  } catch (err) {
    throw new Blip2Error(`${file}: cannot open the index database (${describeError(err)})`);
  }
  try {
    const id = db.pragma("application_id", { simple: true }) as number;
    if (id !== APPLICATION_ID && id !== 0) throw notIndex(`a database of another program, application_id ${id}`);
    const tables = (db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").pluck().all() as string[]).sort();
    const others = tables.filter((t) => !(t in INDEX_TABLES));
    if (others.length) throw notIndex(`it has tables blip2 does not make: ${others.slice(0, 5).join(", ")}`);
    for (const [table, columns] of Object.entries(INDEX_TABLES)) {
      if (!tables.includes(table)) throw notIndex(`no ${table} table`);
      const has = (db.prepare(`SELECT name FROM pragma_table_info('${table}')`).pluck().all() as string[]).sort();
      if (has.join() !== [...columns].sort().join()) throw notIndex(`its ${table} table has columns ${has.join(", ")}`);
    }
    if (!readModel(db)) throw notIndex("its meta table records no model");
  } finally {
    db.close();
  }
}

function readModel(db: Database.Database): IndexedModel | null {
  const rows = db.prepare("SELECT key, value FROM meta").all() as { key: string; value: string }[];
  const m = Object.fromEntries(rows.map((r) => [r.key, r.value]));
  if (!m.fingerprint) return null;
  return { id: m.id!, fingerprint: m.fingerprint, numQueries: Number(m.numQueries), dim: Number(m.dim) };
}

function toFloats(b: Buffer): Float32Array {
  // SQLite's buffers may be unaligned for floats: copy.
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}
