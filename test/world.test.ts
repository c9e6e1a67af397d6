/**
 * The synthetic world: scenes, images, captions and questions from a seed. Answers and captions are
 * checked against the scene by readers written here, apart from the generator's own, and the
 * images by their pixels at the places the scene gives.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import sharp from "sharp";
import { afterAll, describe, expect, it } from "vitest";
import { loadExamples } from "../src/train/data.js";
import { writeDataset } from "../src/world/dataset.js";
import { askScene, captionMatchesScene, captionScene, parseCaption, QUESTION_TYPES, type Question } from "../src/world/language.js";
import { renderPng, renderScene } from "../src/world/render.js";
import { generateScene, sceneSeed, SPLIT_SEEDS, splitOfSeed, SPLITS, type Scene, type Split, type WorldObject } from "../src/world/scene.js";
import { COLOUR_RGB, COLOURS, HELD_OUT_PAIRS, isHeldOut, POSITIONS, SHAPES, SIZES, type Colour } from "../src/world/vocabulary.js";
import { cli } from "./helpers.js";

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-world-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const scenes = (split: Split, n: number, first = 0) => Array.from({ length: n }, (_, i) => generateScene(sceneSeed(split, first + i)));
const train = scenes("train", 1000);
const heldOutScenes = scenes("compositional", 400);
const everySplit = [...train.slice(0, 300), ...scenes("val", 300), ...scenes("test", 300), ...heldOutScenes.slice(0, 300)];

/** The words for the places, as docs/world.md gives them. */
const PLACES: Record<string, WorldObject["position"]> = {
  "at the top": "top",
  "near the top": "top",
  "on the left": "left",
  "at the left": "left",
  "in the centre": "centre",
  "in the middle": "centre",
  "on the right": "right",
  "at the right": "right",
  "at the bottom": "bottom",
  "near the bottom": "bottom",
};
const COUNTS = ["zero", "one", "two", "three"];

describe("world scenes", () => {
  it("are the same for the same seed, and differ between seeds", () => {
    expect(generateScene(12345)).toEqual(generateScene(12345));
    expect(generateScene(sceneSeed("test", 7))).toEqual(generateScene(2 * SPLIT_SEEDS + 7));
    const distinct = new Set(train.slice(0, 200).map((s) => JSON.stringify(s.objects)));
    expect(distinct.size).toBeGreaterThan(190);
  });

  it("hold 1-3 objects at distinct places in reading order, never two alike, near their places' centres", () => {
    const counts = [0, 0, 0, 0];
    for (const s of everySplit) {
      counts[s.objects.length]!++;
      const order = s.objects.map((o) => POSITIONS.indexOf(o.position));
      expect(order).toEqual([...new Set(order)].sort((a, b) => a - b));
      const kinds = s.objects.map((o) => `${o.size} ${o.colour} ${o.shape}`);
      expect(new Set(kinds).size).toBe(kinds.length);
      for (const o of s.objects) {
        expect(SHAPES).toContain(o.shape);
        expect(COLOURS).toContain(o.colour);
        expect(SIZES).toContain(o.size);
        const centre = { top: [0.5, 0.18], left: [0.18, 0.5], centre: [0.5, 0.5], right: [0.82, 0.5], bottom: [0.5, 0.82] }[o.position];
        expect(Math.abs(o.x - centre[0]!)).toBeLessThanOrEqual(0.015 + 1e-12);
        expect(Math.abs(o.y - centre[1]!)).toBeLessThanOrEqual(0.015 + 1e-12);
      }
    }
    // Each object count about a third of the time.
    for (const n of [1, 2, 3]) expect(counts[n]! / everySplit.length).toBeGreaterThan(0.25);
    expect(counts[0]).toBe(0);
  });

  it("vary their backgrounds: gradients of mid-tones, stripes on some, noise on all", () => {
    const bgs = train.slice(0, 300).map((s) => s.background);
    expect(new Set(bgs.map((b) => b.from.join())).size).toBeGreaterThan(250);
    const striped = bgs.filter((b) => b.stripes !== null).length / bgs.length;
    expect(striped).toBeGreaterThan(0.3);
    expect(striped).toBeLessThan(0.5);
    for (const b of bgs) {
      expect(b.noise).toBeGreaterThanOrEqual(2);
      for (const c of [...b.from, ...b.to]) expect(c).toBeGreaterThanOrEqual(95 - 18);
      for (const c of [...b.from, ...b.to]) expect(c).toBeLessThanOrEqual(155 + 18);
    }
  });
});

describe("world splits", () => {
  it("own disjoint seed ranges, and every seed names its split", () => {
    for (const [k, split] of SPLITS.entries()) {
      expect(sceneSeed(split, 0)).toBe(k * SPLIT_SEEDS);
      expect(splitOfSeed(sceneSeed(split, 0))).toBe(split);
      expect(splitOfSeed(sceneSeed(split, SPLIT_SEEDS - 1))).toBe(split);
      expect(generateScene(sceneSeed(split, 3)).split).toBe(split);
    }
    expect(() => splitOfSeed(SPLITS.length * SPLIT_SEEDS)).toThrow(/world seed must be an integer in \[0, 4000000000\), got 4000000000/);
    expect(() => sceneSeed("train", SPLIT_SEEDS)).toThrow(/scene index of split train/);
    expect(() => sceneSeed("dev" as Split, 0)).toThrow(/unknown world split "dev"/);
    // The same index in two splits is two different scenes.
    const a = scenes("train", 50).map((s) => JSON.stringify(s.objects));
    const b = scenes("test", 50).map((s) => JSON.stringify(s.objects));
    expect(a.filter((x, i) => x === b[i]).length).toBeLessThan(5);
  });

  it("keep the held-out colour-shape pairs out of train, validation and test: images, captions and questions", () => {
    const heldOutWords = HELD_OUT_PAIRS.map(([c, s]) => new RegExp(`\\b${c} ${s}`));
    for (const split of ["train", "val", "test"] as const) {
      for (const s of split === "train" ? train : scenes(split, 500)) {
        for (const o of s.objects) expect(isHeldOut(o.colour, o.shape), `${split} seed ${s.seed}`).toBe(false);
        const texts = [...captionScene(s, 3), ...askScene(s).map((q) => q.question)];
        for (const t of texts) for (const w of heldOutWords) expect(t, `${split} seed ${s.seed}`).not.toMatch(w);
      }
    }
  });

  it("show every other pair and every word in training, and a held-out pair in every compositional scene", () => {
    const seen = new Set(train.flatMap((s) => s.objects.map((o) => `${o.colour} ${o.shape}`)));
    const allowed = COLOURS.flatMap((c) => SHAPES.filter((s) => !isHeldOut(c, s)).map((s) => `${c} ${s}`));
    expect(allowed.length).toBe(COLOURS.length * SHAPES.length - HELD_OUT_PAIRS.length);
    expect([...seen].sort()).toEqual(allowed.sort());
    const heldOutSeen = new Set<string>();
    for (const s of heldOutScenes) {
      const held = s.objects.filter((o) => isHeldOut(o.colour, o.shape));
      expect(held.length, `seed ${s.seed}`).toBeGreaterThan(0);
      for (const o of held) heldOutSeen.add(`${o.colour} ${o.shape}`);
    }
    expect(heldOutSeen.size).toBe(HELD_OUT_PAIRS.length);
    // One pair per shape, a colour at most once: every word stays in training.
    expect(new Set(HELD_OUT_PAIRS.map(([, s]) => s)).size).toBe(HELD_OUT_PAIRS.length);
    expect(new Set(HELD_OUT_PAIRS.map(([c]) => c)).size).toBe(HELD_OUT_PAIRS.length);
  });
});

describe("world captions", () => {
  it("name every object's size, colour, shape and place, and read back as the scene", () => {
    const forms = new Set<string>();
    for (const s of everySplit) {
      for (const c of captionScene(s, 4)) {
        for (const o of s.objects) expect(c, `seed ${s.seed}`).toContain(`${o.size} ${o.colour} ${o.shape}`);
        expect(mentionedPlaces(c, s.objects), `${c} (seed ${s.seed})`).toEqual(s.objects.map((o) => o.position));
        expect(captionMatchesScene(c, s), c).toBe(true);
        forms.add(c.startsWith("there is") ? "there" : c.startsWith("a picture of") ? "picture" : / is an? /.test(c) ? "inverted" : / (to the left of|to the right of|above|below) /.test(c) ? "relation" : "list");
      }
    }
    expect([...forms].sort()).toEqual(["inverted", "list", "picture", "relation", "there"]);
  });

  it("are the same for the same seed, with paraphrases among them", () => {
    const s = train[5]!;
    expect(captionScene(s, 6)).toEqual(captionScene(s, 6));
    expect(new Set(captionScene(s, 10)).size).toBeGreaterThan(2);
  });

  it("say a relation only for two objects at opposite places, which it names", () => {
    expect(parseCaption("a small red circle to the left of a large blue square")).toEqual([
      { size: "small", colour: "red", shape: "circle", position: "left" },
      { size: "large", colour: "blue", shape: "square", position: "right" },
    ]);
    expect(parseCaption("A large white star below a small green cross.")).toEqual([
      { size: "small", colour: "green", shape: "cross", position: "top" },
      { size: "large", colour: "white", shape: "star", position: "bottom" },
    ]);
    for (const s of everySplit) {
      for (const c of captionScene(s, 4)) {
        if (!/ (to the left of|to the right of|above|below) /.test(c)) continue;
        expect([["left", "right"], ["bottom", "top"]]).toContainEqual(s.objects.map((o) => o.position).sort());
      }
    }
  });

  it("are told apart from a wrong or ungrammatical caption", () => {
    const s = generateScene(sceneSeed("test", 0));
    const truth = captionScene(s)[0]!;
    expect(captionMatchesScene(truth, s)).toBe(true);
    const o = s.objects[0]!;
    const otherColour = COLOURS.find((c) => c !== o.colour)!;
    expect(captionMatchesScene(truth.replace(`${o.size} ${o.colour}`, `${o.size} ${otherColour}`), s)).toBe(false);
    expect(captionMatchesScene(truth.replace(`${o.size} ${o.colour}`, `${o.size === "small" ? "large" : "small"} ${o.colour}`), s)).toBe(false);
    expect(parseCaption("a small red circle on the left and a small red circle on the left")).toBeNull(); // one place twice
    expect(parseCaption("a small red circle on the")).toBeNull();
    expect(parseCaption("a tiny red circle on the left")).toBeNull();
    expect(parseCaption("")).toBeNull();
    expect(parseCaption("  There are a small red circle on the left, a large black star at the top and in the middle is a small white cross. ")).toEqual([
      { size: "large", colour: "black", shape: "star", position: "top" },
      { size: "small", colour: "red", shape: "circle", position: "left" },
      { size: "small", colour: "white", shape: "cross", position: "centre" },
    ]);
    // A caption that leaves an object out is wrong, even if what it says is true.
    const two = everySplit.find((x) => x.objects.length === 2)!;
    const [a] = two.objects;
    expect(captionMatchesScene(`a ${a!.size} ${a!.colour} ${a!.shape} ${Object.keys(PLACES).find((p) => PLACES[p] === a!.position)}`, two)).toBe(false);
  });
});

describe("world questions", () => {
  it("have answers that the scene gives, one word each, for every type", () => {
    const answers = new Map<string, Set<string>>();
    for (const s of everySplit) {
      const qs = askScene(s);
      expect(qs.map((q) => q.type)).toEqual([...QUESTION_TYPES]);
      for (const q of qs) {
        expect(q.answer).toMatch(/^[a-z]+$/);
        expect(answerFromScene(q, s), `${q.question} (seed ${s.seed})`).toBe(q.answer);
        if (!answers.has(q.type)) answers.set(q.type, new Set());
        answers.get(q.type)!.add(q.answer);
      }
    }
    expect([...answers.get("colour")!].sort()).toEqual([...COLOURS].sort());
    expect([...answers.get("shape")!].sort()).toEqual([...SHAPES].sort());
    expect([...answers.get("count")!].sort()).toEqual([...COUNTS].sort());
    expect([...answers.get("position")!].sort()).toEqual([...POSITIONS].sort());
    expect([...answers.get("existence")!].sort()).toEqual(["no", "yes"]);
  });

  it("answer yes to about half of the existence questions", () => {
    const yes = everySplit.filter((s) => askScene(s)[4]!.answer === "yes").length / everySplit.length;
    expect(yes).toBeGreaterThan(0.4);
    expect(yes).toBeLessThan(0.6);
  });

  it("are the same for the same seed", () => {
    expect(askScene(generateScene(99))).toEqual(askScene(generateScene(99)));
  });
});

describe("world images", () => {
  it("are the same bytes for the same seed and size, and differ between seeds", async () => {
    const s = train[3]!;
    const a = await renderPng(s, 64);
    expect(a.equals(await renderPng(generateScene(s.seed), 64))).toBe(true);
    expect(a.subarray(1, 4).toString()).toBe("PNG");
    expect(a.equals(await renderPng(train[4]!, 64))).toBe(false);
    const meta = await sharp(a).metadata();
    expect([meta.width, meta.height, meta.channels]).toEqual([64, 64, 3]);
    expect(() => renderScene(s, 16)).toThrow(/world image size must be an integer from 32 to 1024 pixels, got 16/);
  });

  it("add noise of the scene's standard deviation, centred on the background", () => {
    const plain: Scene = { seed: 5, split: "train", background: { from: [120, 100, 140], to: [120, 100, 140], angle: 0, stripes: null, noise: 5 }, objects: [] };
    const img = renderScene(plain, 128);
    for (let c = 0; c < 3; c++) {
      const values = Array.from({ length: 128 * 128 }, (_, i) => img.data[i * 3 + c]!);
      const mean = values.reduce((a, b) => a + b, 0) / values.length;
      const sd = Math.sqrt(values.reduce((a, b) => a + (b - mean) ** 2, 0) / values.length);
      expect(mean).toBeCloseTo(plain.background.from[c]!, 0);
      expect(sd).toBeGreaterThan(4.8);
      expect(sd).toBeLessThan(5.2);
    }
  });

  for (const size of [64, 224]) {
    it(`show each object at ${size} px in its colour where the scene puts it, at its size, and nothing else`, () => {
      for (const s of everySplit.filter((_, i) => i % (size === 64 ? 10 : 100) === 0)) {
        const img = renderScene(s, size);
        const pixel = (x: number, y: number) => Array.from(img.data.subarray((y * size + x) * 3, (y * size + x) * 3 + 3));
        const owned = new Uint8Array(size * size);
        for (const o of s.objects) {
          const [x, y] = [Math.floor(o.x * size), Math.floor(o.y * size)];
          expect(nearestColour(pixel(x, y)), `${o.colour} ${o.shape} at ${o.position}, seed ${s.seed}`).toEqual({ colour: o.colour, close: true });
          // Its area: the pixels of its colour around its centre, against the shape's area (edge
          // pixels, blended with the background, count only when mostly covered).
          const r = ((o.size === "large" ? 0.29 : 0.17) * size) / 2;
          let count = 0;
          for (let py = Math.floor(o.y * size - r - 1); py <= o.y * size + r + 1; py++) {
            for (let px = Math.floor(o.x * size - r - 1); px <= o.x * size + r + 1; px++) {
              owned[py * size + px] = 1;
              const n = nearestColour(pixel(px, py));
              if (n.close && n.colour === o.colour) count++;
            }
          }
          const area = SHAPE_AREA[o.shape] * r * r;
          expect(count / area, `${o.size} ${o.colour} ${o.shape}, seed ${s.seed}`).toBeGreaterThan(0.6);
          expect(count / area, `${o.size} ${o.colour} ${o.shape}, seed ${s.seed}`).toBeLessThan(1.2);
        }
        // Away from the objects, the background only: no pixel close to an object colour.
        const strays = [];
        for (let i = 0; i < size * size; i++) if (!owned[i] && nearestColour(pixel(i % size, Math.floor(i / size))).close) strays.push(i);
        expect(strays, `seed ${s.seed}`).toEqual([]);
      }
    });
  }
});

describe("world data sets", () => {
  it("write images and JSONL that blip2 train reads, the same bytes every time", async () => {
    const a = path.join(tmp, "a");
    const b = path.join(tmp, "b");
    const summary = await writeDataset({ split: "val", count: 6, first: 10, out: a, imageSize: 64, captionsPerImage: 2 });
    expect(summary).toEqual({ out: a, images: 6, captions: 12, questions: 30, seeds: [SPLIT_SEEDS + 10, SPLIT_SEEDS + 15] });
    await writeDataset({ split: "val", count: 6, first: 10, out: b, imageSize: 64, captionsPerImage: 2 });
    const files = (dir: string) => fs.readdirSync(dir, { recursive: true, encoding: "utf8" }).sort();
    expect(files(a)).toEqual(["captions.jsonl", "images", ...Array.from({ length: 6 }, (_, i) => `images/val-0000${10 + i}.png`), "questions.jsonl", "scenes.jsonl"]);
    for (const f of files(a)) if (f !== "images") expect(fs.readFileSync(path.join(a, f)).equals(fs.readFileSync(path.join(b, f))), f).toBe(true);

    const examples = loadExamples(path.join(a, "captions.jsonl"));
    expect(examples.length).toBe(12);
    const sceneLines = readJsonl(path.join(a, "scenes.jsonl")) as { image: string; scene: Scene }[];
    expect(sceneLines.map((l) => l.scene)).toEqual(scenes("val", 6, 10));
    for (const e of examples) {
      const { scene } = sceneLines.find((l) => path.join(a, l.image) === e.image)!;
      expect(captionMatchesScene(e.text, scene), e.text).toBe(true);
    }
    const png = fs.readFileSync(path.join(a, sceneLines[2]!.image));
    expect(png.equals(await renderPng(sceneLines[2]!.scene, 64))).toBe(true);
    const questions = readJsonl(path.join(a, "questions.jsonl")) as (Question & { image: string })[];
    expect(Object.keys(questions[0]!).sort()).toEqual(["answer", "image", "question", "type"]);
    for (const q of questions) expect(answerFromScene(q, sceneLines.find((l) => l.image === q.image)!.scene)).toBe(q.answer);
  });

  it("refuse a folder that holds anything, and bad counts, before writing", async () => {
    const full = path.join(tmp, "full");
    fs.mkdirSync(full);
    fs.writeFileSync(path.join(full, "notes.txt"), "mine");
    await expect(writeDataset({ split: "train", count: 2, out: full })).rejects.toThrow(/full: is not empty \(holds notes\.txt\); nothing was written/);
    expect(fs.readdirSync(full)).toEqual(["notes.txt"]);
    await expect(writeDataset({ split: "train", count: 0, out: path.join(tmp, "zero") })).rejects.toThrow(/count must be a positive integer, got 0/);
    await expect(writeDataset({ split: "train", count: 2, first: SPLIT_SEEDS - 1, out: path.join(tmp, "past") })).rejects.toThrow(/outside split train/);
    expect(fs.existsSync(path.join(tmp, "zero")) || fs.existsSync(path.join(tmp, "past"))).toBe(false);
  });
});

describe("blip2 world", () => {
  it("renders one scene to a PNG and prints its caption, never over an existing file", async () => {
    const out = path.join(tmp, "seed42.png");
    const r = await cli("world", "render", "--seed", "42", "--out", out, "--size", "96");
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const scene = generateScene(42);
    expect(r.stdout).toBe(`${out}: ${captionScene(scene)[0]} (seed 42, split train)\n`);
    expect(fs.readFileSync(out).equals(await renderPng(scene, 96))).toBe(true);
    const again = await cli("world", "render", "--seed", "7", "--out", out);
    expect(again.code).toBe(1);
    expect(again.stderr).toBe(`blip2: error: ${out}: already exists; nothing was written (choose another --out)\n`);
    expect(fs.readFileSync(out).equals(await renderPng(scene, 96))).toBe(true);

    const json = await cli("world", "render", "--seed", String(sceneSeed("compositional", 1)), "--out", path.join(tmp, "c1.png"), "--json");
    const record = JSON.parse(json.stdout);
    expect(record.scene).toEqual(generateScene(sceneSeed("compositional", 1)));
    expect(record.questions).toEqual(askScene(record.scene));
  });

  it("writes a data set", async () => {
    const out = path.join(tmp, "cli-ds");
    const r = await cli("world", "dataset", "--split", "test", "--count", "3", "--size", "64", "--out", out);
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe(`${out}: 3 images (test, seeds 2000000000-2000000002), 3 captions, 15 questions\n`);
    expect(readJsonl(path.join(out, "captions.jsonl")).length).toBe(3);
  });

  it("refuses bad calls with one line", async () => {
    const cases: [string[], string][] = [
      [["world"], "blip2: error: world: missing subcommand (render or dataset) (see 'blip2 world --help')\n"],
      [["world", "draw"], `blip2: error: world: unknown subcommand "draw" (expected render or dataset) (see 'blip2 world --help')\n`],
      [["world", "render", "--out", "x.png"], "blip2: error: world render: missing --seed (see 'blip2 world --help')\n"],
      [["world", "render", "--seed", "1", "--out", "x.png", "--split", "train"], "blip2: error: world render: --split is an option of 'world dataset' (see 'blip2 world --help')\n"],
      [["world", "render", "--seed", "4000000000", "--out", path.join(tmp, "x.png")], "blip2: error: world seed must be an integer in [0, 4000000000), got 4000000000\n"],
      [["world", "render", "--seed", "1", "--out", path.join(tmp, "none", "x.png")], `blip2: error: ${path.join(tmp, "none", "x.png")}: its folder does not exist\n`],
      [["world", "render", "--seed", "1", "--size", "8", "--out", path.join(tmp, "y.png")], "blip2: error: world image size must be an integer from 32 to 1024 pixels, got 8\n"],
      [["world", "dataset", "--split", "dev", "--count", "2", "--out", "d"], `blip2: error: invalid value for --split: expected train, val, test, compositional, got "dev" (see 'blip2 world --help')\n`],
      [["world", "dataset", "--split", "train", "--out", "d"], "blip2: error: world dataset: missing --count (see 'blip2 world --help')\n"],
      [["world", "dataset", "--split", "train", "--count", "2", "--out", "d", "--seed", "3"], "blip2: error: world dataset: --seed is an option of 'world render' (see 'blip2 world --help')\n"],
    ];
    for (const [argv, stderr] of cases) {
      const r = await cli(...argv);
      expect(r.stderr, argv.join(" ")).toBe(stderr);
      expect(r.code).toBeGreaterThan(0);
    }
    expect(fs.existsSync(path.join(tmp, "x.png")) || fs.existsSync(path.join(tmp, "y.png"))).toBe(false);
  });
});

// ---------------------------------------------------------------------------------------------
// Readers of the world's language, written apart from the generator.

/** The places a caption names, in reading order, from its place phrases or its relation. */
function mentionedPlaces(caption: string, objects: WorldObject[]): string[] {
  const relation = / (to the left of|to the right of|above|below) /.exec(caption);
  if (relation) return objects.length === 2 ? (/left of|right of/.test(relation[1]!) ? ["left", "right"] : ["top", "bottom"]) : [];
  const found = Object.entries(PLACES).filter(([phrase]) => caption.includes(phrase)).map(([, p]) => p);
  return POSITIONS.filter((p) => found.includes(p));
}

/** The answer a question has in a scene, worked out from the question's words and the scene; throws when the question names no single object. */
function answerFromScene(q: Pick<Question, "question" | "type">, scene: Scene): string {
  const objects = scene.objects;
  const one = (matches: WorldObject[]) => {
    if (matches.length !== 1) throw new Error(`"${q.question}" names ${matches.length} objects`);
    return matches[0]!;
  };
  const placeOf = (phrase: string) => PLACES[phrase] ?? (() => { throw new Error(`no place "${phrase}"`); })();
  let m: RegExpExecArray | null;
  switch (q.type) {
    case "colour": {
      m = /^what (?:colour is|is the colour of) the (?:(small|large) )?([a-z]+)(?: (.+))?\?$/.exec(q.question);
      if (!m) throw new Error(`not a colour question: ${q.question}`);
      const [, size, shape, place] = m;
      return one(objects.filter((o) => o.shape === shape && (!size || o.size === size) && (!place || o.position === placeOf(place)))).colour;
    }
    case "shape": {
      m = /^what (?:shape is|is the shape of) the (?:(?:(small|large) )?([a-z]+) object|object (.+))\?$/.exec(q.question);
      if (!m) throw new Error(`not a shape question: ${q.question}`);
      const [, size, colour, place] = m;
      return one(objects.filter((o) => (place ? o.position === placeOf(place) : o.colour === colour && (!size || o.size === size)))).shape;
    }
    case "count": {
      if (/^how many (objects are there|shapes are in the picture)\?$/.test(q.question)) return COUNTS[objects.length]!;
      m = /^how many ([a-z]+) objects are there\?$/.exec(q.question);
      if (m) return COUNTS[objects.filter((o) => o.colour === m![1]).length]!;
      m = /^how many ([a-z]+) are there\?$/.exec(q.question);
      const shape = SHAPES.find((s) => m?.[1] === (s === "cross" ? "crosses" : `${s}s`));
      if (!shape) throw new Error(`not a count question: ${q.question}`);
      return COUNTS[objects.filter((o) => o.shape === shape).length]!;
    }
    case "position": {
      m = /^(?:where is|in which part of the picture is) the (?:(small|large) )?([a-z]+) ([a-z]+)\?$/.exec(q.question);
      if (!m) throw new Error(`not a position question: ${q.question}`);
      const [, size, colour, shape] = m;
      return one(objects.filter((o) => o.colour === colour && o.shape === shape && (!size || o.size === size))).position;
    }
    case "existence": {
      m = /^is there an? (?:([a-z]+) object|([a-z]+) ([a-z]+)|([a-z]+))(?: in the picture)?\?$/.exec(q.question);
      if (!m) throw new Error(`not an existence question: ${q.question}`);
      const [, colourOnly, colour, shape, shapeOnly] = m;
      const present = colourOnly ? objects.some((o) => o.colour === colourOnly) : shapeOnly ? objects.some((o) => o.shape === shapeOnly) : objects.some((o) => o.colour === colour && o.shape === shape);
      return present ? "yes" : "no";
    }
  }
}

/** Relative to the radius of the object's bounding circle, squared (render.ts's outlines). */
const SHAPE_AREA: Record<(typeof SHAPES)[number], number> = {
  circle: Math.PI,
  square: 1.6 * 1.6,
  diamond: 2,
  triangle: (2 * 1.7) / 2,
  star: 10 * 0.5 * 0.42 * Math.sin(Math.PI / 5),
  cross: 2 * (0.64 * 1.9) - 0.64 * 0.64,
};

/** The palette colour nearest a pixel, and whether the pixel is within noise of it. */
function nearestColour(rgb: number[]): { colour: Colour; close: boolean } {
  let best: Colour = "red";
  let bestDistance = Infinity;
  for (const c of COLOURS) {
    const [r, g, b] = COLOUR_RGB[c];
    const d = (r - rgb[0]!) ** 2 + (g - rgb[1]!) ** 2 + (b - rgb[2]!) ** 2;
    if (d < bestDistance) [best, bestDistance] = [c, d];
  }
  return { colour: best, close: bestDistance < 40 * 40 };
}

function readJsonl(file: string): unknown[] {
  return fs.readFileSync(file, "utf8").trim().split("\n").map((l) => JSON.parse(l));
}
