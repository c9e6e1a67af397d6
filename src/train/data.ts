/**
 * Training data: image–caption pairs from one of three sources, chosen by the path:
 *
 *   - a `.jsonl` file: one `{"image": "path", "text": "caption"}` per line, optionally with
 *     `"prefix"` (the T5 encoder's text, e.g. "a photo of"); blank lines are skipped, other fields
 *     ignored; image paths are absolute or relative to the JSONL's folder.
 *   - a `.json` file in COCO captions form: `{"images": [{"id", "file_name"}], "annotations":
 *     [{"image_id", "caption"}]}`, one example per annotation; `file_name` is absolute or relative
 *     to the JSON's folder, and only that folder: not an `images/` or `train2014/` beside it (put the
 *     JSON next to the images, or rewrite the names).
 *   - a folder: every image in it (png, jpg, jpeg, webp, gif, bmp, any case; not its subfolders,
 *     not hidden files) with a `.txt` of the same name beside it (`cat.jpg` → `cat.txt`), one example
 *     per non-empty line of the txt. An image without its txt is an error naming it rather than
 *     skipped: a silently smaller data set is harder to notice than a message. Text files without an
 *     image are ignored (notes, licences).
 *
 * Captions are trimmed of surrounding whitespace (a trailing newline or `\r` is not part of the
 * caption; stage 2 adds its own "\n"). Errors name the file and line (or annotation) at fault.
 * Images are checked to exist here; whether they decode is found when they are decoded.
 *
 * `Batches` deals examples out in shuffled batches, epoch after epoch, and can say where it is
 * and go back there, so a resumed run sees the very batches the uninterrupted one would have.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { Rng, type RngState } from "./rng.js";

export interface Example {
  /** Absolute path of the image. */
  image: string;
  text: string;
  /** T5 only: text given to the encoder after the image tokens. */
  prefix?: string;
  /** Where the example was written: "data.jsonl:12", "captions.json:annotations[3]", "cat.txt:1". */
  where: string;
}

/** Extensions (lower case) of the images a caption folder may hold. */
export const IMAGE_EXTENSIONS: ReadonlySet<string> = new Set([".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"]);

const SOURCES = "a .jsonl file, a COCO captions .json file or a folder of images with .txt captions";

/** Every example of the data set at `source` (see the module comment for the three forms). */
export function loadExamples(source: string): Example[] {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(source);
  } catch {
    throw new Blip2Error(`${source}: training data not found (expected ${SOURCES})`);
  }
  const ext = path.extname(source).toLowerCase();
  let examples: Example[];
  if (stat.isDirectory()) examples = fromFolder(source);
  else if (ext === ".jsonl") examples = fromJsonl(source);
  else if (ext === ".json") examples = fromCoco(source);
  else throw new Blip2Error(`${source}: not a training data set (expected ${SOURCES})`);
  if (examples.length === 0) throw new Blip2Error(`${source}: the data set has no examples`);
  return examples;
}

/** "data.jsonl:12 (image /abs/cat.png)", for messages about one example. */
export function describeExample(e: Example): string {
  return `${e.where} (image ${e.image})`;
}

function fromJsonl(file: string): Example[] {
  const dir = path.dirname(path.resolve(file));
  const lines = readText(file).split(/\r?\n/);
  const examples: Example[] = [];
  lines.forEach((line, i) => {
    if (line.trim() === "") return;
    const where = `${file}:${i + 1}`;
    let record: unknown;
    try {
      record = JSON.parse(line);
    } catch (err) {
      throw new Blip2Error(`${where}: not valid JSON (${(err as Error).message})`);
    }
    if (record === null || typeof record !== "object" || Array.isArray(record)) {
      throw new Blip2Error(`${where}: expected a JSON object {"image": ..., "text": ...}, got ${kind(record)}`);
    }
    const r = record as Record<string, unknown>;
    const image = field(r, "image", where);
    if (image.trim() === "") throw new Blip2Error(`${where}: "image" is empty`);
    const example: Example = { image: path.resolve(dir, image), text: caption(field(r, "text", where), `${where}: "text"`), where };
    if (r.prefix !== undefined) {
      if (typeof r.prefix !== "string") throw new Blip2Error(`${where}: "prefix" must be a string, got ${kind(r.prefix)}`);
      example.prefix = r.prefix;
    }
    examples.push(example);
  });
  checkImagesExist(examples);
  return examples;
}

function fromCoco(file: string): Example[] {
  const dir = path.dirname(path.resolve(file));
  let doc: unknown;
  try {
    doc = JSON.parse(readText(file));
  } catch (err) {
    throw new Blip2Error(`${file}: not valid JSON (${(err as Error).message})`);
  }
  const d = doc as { images?: unknown; annotations?: unknown } | null;
  if (d === null || typeof d !== "object" || !Array.isArray(d.images) || !Array.isArray(d.annotations)) {
    throw new Blip2Error(`${file}: not a COCO captions file (expected an object with "images" and "annotations" arrays)`);
  }
  const imageById = new Map<unknown, string>();
  d.images.forEach((img: unknown, i) => {
    const where = `${file}:images[${i}]`;
    const r = asObject(img, where);
    if (typeof r.id !== "number" && typeof r.id !== "string") {
      throw new Blip2Error(`${where}: "id" must be a number or a string, got ${kind(r.id)}`);
    }
    const fileName = field(r, "file_name", where);
    if (imageById.has(r.id)) throw new Blip2Error(`${where}: image id ${JSON.stringify(r.id)} appears twice in "images"`);
    imageById.set(r.id, path.resolve(dir, fileName));
  });
  const examples = d.annotations.map((ann: unknown, i): Example => {
    const where = `${file}:annotations[${i}]`;
    const r = asObject(ann, where);
    const image = imageById.get(r.image_id);
    if (image === undefined) throw new Blip2Error(`${where}: image_id ${JSON.stringify(r.image_id)} is not the id of any entry of "images"`);
    return { image, text: caption(field(r, "caption", where), `${where}: "caption"`), where };
  });
  checkImagesExist(examples);
  return examples;
}

function fromFolder(dir: string): Example[] {
  const names = fs.readdirSync(dir).filter((n) => !n.startsWith(".")).sort(byCodePoint);
  const present = new Set(names);
  const images = names.filter((n) => IMAGE_EXTENSIONS.has(path.extname(n).toLowerCase()) && isFile(path.join(dir, n)));
  const missing = images.filter((n) => !present.has(captionFileOf(n)));
  if (missing.length > 0) {
    const shown = missing.slice(0, 5).join(", ") + (missing.length > 5 ? `, and ${missing.length - 5} more` : "");
    throw new Blip2Error(`${dir}: ${missing.length} of ${images.length} images have no caption file beside them (image.png needs image.txt): ${shown}`);
  }
  const examples: Example[] = [];
  for (const name of images) {
    const txt = path.join(dir, captionFileOf(name));
    const image = path.resolve(dir, name);
    const before = examples.length;
    readText(txt).split(/\r?\n/).forEach((line, i) => {
      if (line.trim() !== "") examples.push({ image, text: line.trim(), where: `${txt}:${i + 1}` });
    });
    if (examples.length === before) throw new Blip2Error(`${txt}: no caption (the file is empty) for ${name}`);
  }
  return examples;
}

function captionFileOf(imageName: string): string {
  return imageName.slice(0, imageName.length - path.extname(imageName).length) + ".txt";
}

/** One error for all missing images: the first by name, and how many others (a wrong base folder shows). */
function checkImagesExist(examples: Example[]): void {
  const checked = new Map<string, boolean>();
  let first: Example | undefined;
  let missing = 0;
  for (const e of examples) {
    if (!checked.has(e.image)) {
      const ok = isFile(e.image);
      checked.set(e.image, ok);
      if (!ok) {
        missing += 1;
        first ??= e;
      }
    }
  }
  if (first) {
    const others = missing > 1 ? ` (and ${missing - 1} other image${missing > 2 ? "s" : ""} of the data set)` : "";
    throw new Blip2Error(`${first.where}: image ${first.image} does not exist or is not a file${others}`);
  }
}

function readText(file: string): string {
  try {
    return fs.readFileSync(file, "utf8").replace(/^\uFEFF/, "");
  } catch (err) {
    throw new Blip2Error(`${file}: cannot read (${(err as NodeJS.ErrnoException).code ?? err})`);
  }
}

function asObject(value: unknown, where: string): Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Blip2Error(`${where}: expected an object, got ${kind(value)}`);
  return value as Record<string, unknown>;
}

function field(r: Record<string, unknown>, name: string, where: string): string {
  const v = r[name];
  if (v === undefined) throw new Blip2Error(`${where}: missing "${name}"`);
  if (typeof v !== "string") throw new Blip2Error(`${where}: "${name}" must be a string, got ${kind(v)}`);
  return v;
}

function caption(text: string, what: string): string {
  const trimmed = text.trim();
  if (trimmed === "") throw new Blip2Error(`${what} is empty`);
  return trimmed;
}

function kind(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return typeof v === "object" ? "an object" : `${typeof v} ${JSON.stringify(v)}`;
}

function isFile(p: string): boolean {
  try {
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

function byCodePoint(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

export interface BatchesOptions {
  batchSize: number;
  epochs: number;
  /** Seeds the per-epoch shuffles. */
  seed: number;
  /**
   * Drop each epoch's last, incomplete batch (default true, as LAVIS's training loader): every
   * step then has the same batch size, which stage 1's in-batch contrastive loss and hard
   * negatives depend on, and since each epoch is shuffled anew no example is left out every time.
   */
  dropLast?: boolean;
}

/** Where a `Batches` is: enough to continue exactly (and to refuse a different data set). */
export interface BatchPosition {
  /** The epoch of the next batch (== epochs when done). */
  epoch: number;
  /** The next batch's index within its epoch. */
  index: number;
  /** The generator's state before this epoch's shuffle. */
  rng: RngState;
  examples: number;
  batchSize: number;
  dropLast: boolean;
}

export interface Batch {
  epoch: number;
  /** Index within the epoch. */
  index: number;
  /** Index over the whole run: epoch * batchesPerEpoch + index (the optimizer step). */
  step: number;
  examples: Example[];
}

/** Shuffled batches for `epochs` epochs, resumable with `position()` / `seek()`. */
export class Batches implements Iterable<Batch> {
  readonly batchSize: number;
  readonly epochs: number;
  readonly dropLast: boolean;
  readonly batchesPerEpoch: number;
  private readonly rng: Rng;
  private epoch = 0;
  private index = 0;
  /** This epoch's order, or null before its shuffle. */
  private order: number[] | null = null;
  private epochStart: RngState;

  constructor(private readonly examples: readonly Example[], options: BatchesOptions) {
    const { batchSize, epochs, seed } = options;
    if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw new Blip2Error(`batch size must be an integer >= 1, got ${batchSize}`);
    if (!Number.isSafeInteger(epochs) || epochs < 1) throw new Blip2Error(`epochs must be an integer >= 1, got ${epochs}`);
    this.batchSize = batchSize;
    this.epochs = epochs;
    this.dropLast = options.dropLast ?? true;
    const n = examples.length;
    this.batchesPerEpoch = this.dropLast ? Math.floor(n / batchSize) : Math.ceil(n / batchSize);
    if (this.batchesPerEpoch === 0) {
      throw new Blip2Error(`the data set has ${n} example${n === 1 ? "" : "s"}, fewer than the batch size ${batchSize} (an incomplete batch is dropped)`);
    }
    this.rng = new Rng(seed);
    this.epochStart = this.rng.state();
  }

  /** Batches over the whole run. */
  get totalBatches(): number {
    return this.batchesPerEpoch * this.epochs;
  }

  /** The next batch, or undefined after the last epoch. */
  next(): Batch | undefined {
    if (this.epoch >= this.epochs) return undefined;
    if (this.order === null) {
      this.epochStart = this.rng.state();
      this.order = this.rng.shuffle(Array.from(this.examples, (_, i) => i));
    }
    const start = this.index * this.batchSize;
    const batch: Batch = {
      epoch: this.epoch,
      index: this.index,
      step: this.epoch * this.batchesPerEpoch + this.index,
      examples: this.order.slice(start, start + this.batchSize).map((i) => this.examples[i]!),
    };
    this.index += 1;
    if (this.index === this.batchesPerEpoch) {
      this.epoch += 1;
      this.index = 0;
      this.order = null;
    }
    return batch;
  }

  *[Symbol.iterator](): Iterator<Batch> {
    for (let b = this.next(); b; b = this.next()) yield b;
  }

  /** Where the next batch comes from (plain JSON, for a checkpoint). */
  position(): BatchPosition {
    const rng = this.order === null ? this.rng.state() : this.epochStart;
    return {
      epoch: this.epoch, index: this.index, rng: { s: [...rng.s], spare: rng.spare },
      examples: this.examples.length, batchSize: this.batchSize, dropLast: this.dropLast,
    };
  }

  /** Continue from `position()` of a run over the same examples and batch settings. */
  seek(position: BatchPosition): void {
    const p = position;
    const same = p.examples === this.examples.length && p.batchSize === this.batchSize && p.dropLast === this.dropLast;
    if (!same) {
      throw new Blip2Error(
        `cannot resume: the saved position is for ${p.examples} examples in batches of ${p.batchSize}` +
          ` (dropLast ${p.dropLast}), this run has ${this.examples.length} in batches of ${this.batchSize} (dropLast ${this.dropLast})`,
      );
    }
    const atEnd = p.epoch === this.epochs && p.index === 0;
    const inRange = Number.isSafeInteger(p.epoch) && Number.isSafeInteger(p.index) && p.index >= 0 && p.index < this.batchesPerEpoch && p.epoch >= 0 && p.epoch < this.epochs;
    if (!atEnd && !inRange) {
      throw new Blip2Error(`cannot resume: position epoch ${p.epoch}, batch ${p.index} is outside this run (${this.epochs} epochs of ${this.batchesPerEpoch} batches)`);
    }
    this.rng.restore(p.rng);
    this.epoch = p.epoch;
    this.index = p.index;
    this.order = null;
  }
}
