/** `blip2 world`: images of the synthetic world with their scenes, captions and questions. */
import fs from "node:fs";
import { Blip2Error } from "../../errors.js";
import { writeDataset } from "../../world/dataset.js";
import { askScene, captionScene } from "../../world/language.js";
import { renderPng } from "../../world/render.js";
import { generateScene, SPLITS, type Split } from "../../world/scene.js";
import { intOption, requiredOption, UsageError, type Command, type Io, type ParsedArgs } from "../command.js";
import { progressSink } from "../progress.js";

/** The options only one subcommand takes. */
const ONLY: Record<"render" | "dataset", string[]> = { render: ["seed", "json"], dataset: ["split", "count", "first", "captions", "quiet"] };

export const world: Command = {
  name: "world",
  summary: "draw images of the synthetic world (shapes, colours, places) with captions and questions",
  usage: "blip2 world render --seed N --out FILE.png [--size PX] | blip2 world dataset --split S --count N --out DIR [options]",
  help: [
    "render                   one scene's image; prints its caption (or, with --json, its scene,",
    "                         captions and questions)",
    "dataset                  a folder: images/, captions.jsonl (for blip2 train), questions.jsonl,",
    "                         scenes.jsonl",
    "--seed N                 render: the scene (seeds 0-999999999 are train, then val, test,",
    "                         compositional, a billion each)",
    `--split S                dataset: ${SPLITS.join(", ")}`,
    "--count N                dataset: how many images",
    "--first N                dataset: index in the split of the first scene (default 0)",
    "--captions N             dataset: captions per image (default 1)",
    "--out PATH               the PNG file or the folder to write (must not exist; a folder may be empty)",
    "--size PX                image side in pixels (default 224)",
    "--json                   render: one JSON line instead of the caption",
    "--quiet, -q              dataset: no progress bar",
  ].join("\n"),
  options: {
    seed: { type: "string" },
    split: { type: "string" },
    count: { type: "string" },
    first: { type: "string" },
    captions: { type: "string" },
    out: { type: "string" },
    size: { type: "string" },
    json: { type: "boolean" },
    quiet: { type: "boolean", short: "q" },
  },
  async run(args, io) {
    const [sub, ...extra] = args.positionals;
    if (sub !== "render" && sub !== "dataset") {
      throw new UsageError(sub === undefined ? "world: missing subcommand (render or dataset)" : `world: unknown subcommand ${JSON.stringify(sub)} (expected render or dataset)`);
    }
    if (extra.length) throw new UsageError(`world ${sub}: unexpected argument ${JSON.stringify(extra[0])}`);
    const other = sub === "render" ? "dataset" : "render";
    const misplaced = ONLY[other].find((name) => args.values[name] !== undefined);
    if (misplaced) throw new UsageError(`world ${sub}: --${misplaced} is an option of 'world ${other}'`);
    return sub === "render" ? render(args, io.stdout) : dataset(args, io);
  },
};

async function render(args: ParsedArgs, stdout: NodeJS.WritableStream): Promise<number> {
  const seed = intOption(args, "seed", 0);
  if (seed === undefined) throw new UsageError("world render: missing --seed");
  const out = requiredOption(args, "world render", "out");
  const scene = generateScene(seed);
  const png = await renderPng(scene, intOption(args, "size", 1));
  try {
    fs.writeFileSync(out, png, { flag: "wx" }); // never over a file that is there
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === "EEXIST" ? "already exists; nothing was written (choose another --out)" : code === "ENOENT" ? "its folder does not exist" : (err as Error).message;
    throw new Blip2Error(`${out}: ${why}`);
  }
  const [caption] = captionScene(scene);
  if (args.values.json) stdout.write(`${JSON.stringify({ image: out, caption, questions: askScene(scene), scene })}\n`);
  else stdout.write(`${out}: ${caption} (seed ${seed}, split ${scene.split})\n`);
  return 0;
}

async function dataset(args: ParsedArgs, io: Io): Promise<number> {
  const split = requiredOption(args, "world dataset", "split");
  if (!(SPLITS as readonly string[]).includes(split)) throw new UsageError(`invalid value for --split: expected ${SPLITS.join(", ")}, got ${JSON.stringify(split)}`);
  const count = intOption(args, "count", 1);
  if (count === undefined) throw new UsageError("world dataset: missing --count");
  const progress = progressSink(io.stderr, args.values.quiet === true);
  const summary = await writeDataset({
    split: split as Split,
    count,
    out: requiredOption(args, "world dataset", "out"),
    first: intOption(args, "first", 0),
    imageSize: intOption(args, "size", 1),
    captionsPerImage: intOption(args, "captions", 1),
    onProgress: (done, total) => progress.items("rendering", done, total),
  });
  progress.clear();
  const { out, images, captions, questions, seeds } = summary;
  io.stdout.write(`${out}: ${images} images (${split}, seeds ${seeds[0]}-${seeds[1]}), ${captions} captions, ${questions} questions\n`);
  return 0;
}
