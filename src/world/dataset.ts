/**
 * A data set of the synthetic world on disk: the images of `count` consecutive scenes of a split,
 * and three JSONL files beside them, one line per record, image paths relative to the folder:
 *
 *   captions.jsonl   {"image", "text"}                          what `blip2 train` reads
 *   questions.jsonl  {"image", "question", "answer", "type"}    one question of each type per image
 *   scenes.jsonl     {"image", "scene"}                         the ground truth
 *
 * The JSONL files are written last, so a folder without them is an interrupted run.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { askScene, captionScene } from "./language.js";
import { DEFAULT_IMAGE_SIZE, checkImageSize, renderPng } from "./render.js";
import { generateScene, sceneSeed, SPLIT_SEEDS, SPLITS, type Split } from "./scene.js";

export interface DatasetOptions {
  split: Split;
  /** How many images. */
  count: number;
  /** The folder to write (must not exist, or be empty). */
  out: string;
  /** Index in the split of the first scene (default 0): a later range gives fresh scenes. */
  first?: number;
  /** Image side in pixels (default 224). */
  imageSize?: number;
  /** Captions per image (default 1), each a line of captions.jsonl. */
  captionsPerImage?: number;
  /** Called after each image with the number written so far. */
  onProgress?: (done: number, total: number) => void;
}

export interface DatasetSummary {
  out: string;
  images: number;
  captions: number;
  questions: number;
  /** The seeds of the scenes written: [first, last]. */
  seeds: [number, number];
}

export const IMAGES_FOLDER = "images";

export async function writeDataset(options: DatasetOptions): Promise<DatasetSummary> {
  const { split, count, out, first = 0, imageSize = DEFAULT_IMAGE_SIZE, captionsPerImage = 1, onProgress } = options;
  if (!SPLITS.includes(split)) throw new Blip2Error(`unknown world split ${JSON.stringify(split)} (expected ${SPLITS.join(", ")})`);
  if (!Number.isInteger(count) || count < 1) throw new Blip2Error(`world data set: count must be a positive integer, got ${count}`);
  if (!Number.isInteger(first) || first < 0 || first + count > SPLIT_SEEDS) {
    throw new Blip2Error(`world data set: scenes ${first} to ${first + count - 1} are outside split ${split}, which has ${SPLIT_SEEDS} (0 to ${SPLIT_SEEDS - 1})`);
  }
  if (!Number.isInteger(captionsPerImage) || captionsPerImage < 1) throw new Blip2Error(`world data set: captions per image must be a positive integer, got ${captionsPerImage}`);
  checkImageSize(imageSize);
  checkEmptyFolder(out);

  fs.mkdirSync(path.join(out, IMAGES_FOLDER), { recursive: true });
  const captions: string[] = [];
  const questions: string[] = [];
  const scenes: string[] = [];
  for (let i = 0; i < count; i++) {
    const index = first + i;
    const scene = generateScene(sceneSeed(split, index));
    const image = `${IMAGES_FOLDER}/${split}-${String(index).padStart(6, "0")}.png`;
    fs.writeFileSync(path.join(out, image), await renderPng(scene, imageSize));
    for (const text of captionScene(scene, captionsPerImage)) captions.push(JSON.stringify({ image, text }));
    for (const q of askScene(scene)) questions.push(JSON.stringify({ image, question: q.question, answer: q.answer, type: q.type }));
    scenes.push(JSON.stringify({ image, scene }));
    onProgress?.(i + 1, count);
  }
  const write = (name: string, lines: string[]) => fs.writeFileSync(path.join(out, name), `${lines.join("\n")}\n`);
  write("scenes.jsonl", scenes);
  write("questions.jsonl", questions);
  write("captions.jsonl", captions);
  return { out, images: count, captions: captions.length, questions: questions.length, seeds: [sceneSeed(split, first), sceneSeed(split, first + count - 1)] };
}

/** A data set goes into a new or empty folder only: nothing already there is overwritten or mixed in. */
function checkEmptyFolder(out: string): void {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(out);
  } catch {
    return;
  }
  if (!stat.isDirectory()) throw new Blip2Error(`${out}: is a file, not a folder; nothing was written (choose another --out)`);
  const entries = fs.readdirSync(out);
  if (entries.length) throw new Blip2Error(`${out}: is not empty (holds ${entries.sort().slice(0, 4).join(", ")}${entries.length > 4 ? ", …" : ""}); nothing was written (choose another --out or an empty folder)`);
}
