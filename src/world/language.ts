/**
 * The world's language: captions from a small grammar with paraphrases, a parser that reads them
 * back into objects (to score a model's captions), and questions with one-word answers.
 *
 * Caption grammar (docs/world.md has it in full):
 *
 *   object   := ("a" | "an") size colour shape             "a small red circle"
 *   place    := "on the left" | "at the left" | "in the centre" | "in the middle" | …
 *   caption  := list | "there is" list | "a picture of" list
 *             | inverted | relation
 *   list     := object place ("," object place)* ("and" object place)?
 *   inverted := place "is" object ("," place "is" object)* ("and" place "is" object)?
 *   relation := object ("to the left of" | "to the right of" | "above" | "below") object
 *
 * Every caption names every object with its size, colour, shape and place. A relation is used
 * only for two objects at opposite places (left and right, top and bottom), where it says both
 * places: "a small red circle to the left of a large blue square" puts the circle on the left and
 * the square on the right.
 */
import { Rng } from "../train/rng.js";
import type { Scene, WorldObject } from "./scene.js";
import { article, COLOURS, COUNT_WORDS, isHeldOut, plural, POSITIONS, SHAPES, SIZES, type Colour, type Position, type Shape, type Size } from "./vocabulary.js";

/** The words used for each place; the first is the one a parser maps back most often, all are read. */
export const PLACE_PHRASES: Record<Position, readonly string[]> = {
  top: ["at the top", "near the top"],
  left: ["on the left", "at the left"],
  centre: ["in the centre", "in the middle"],
  right: ["on the right", "at the right"],
  bottom: ["at the bottom", "near the bottom"],
};

/** Relations between two objects at opposite places: the places they say the first and second object are at. */
const RELATIONS: Record<string, readonly [Position, Position]> = {
  "to the left of": ["left", "right"],
  "to the right of": ["right", "left"],
  above: ["top", "bottom"],
  below: ["bottom", "top"],
};

/** Caption streams and question streams of a scene are their own, apart from the scene's and the noise's. */
const CAPTION_STREAM = 2 * 2 ** 32;
const QUESTION_STREAM = 3 * 2 ** 32;

/** What a caption says about one object. */
export type ObjectDescription = Pick<WorldObject, "size" | "colour" | "shape" | "position">;

/** `count` captions of the scene (paraphrases drawn from the scene's own stream: the same seed, the same captions). */
export function captionScene(scene: Scene, count = 1): string[] {
  const rng = new Rng(scene.seed + CAPTION_STREAM);
  return Array.from({ length: count }, () => caption(scene.objects, rng));
}

function caption(objects: WorldObject[], rng: Rng): string {
  const relation = relationOf(objects);
  switch (rng.int(relation ? 5 : 4)) {
    case 0:
      return list(objects.map((o) => `${nounPhrase(o)} ${place(o.position, rng)}`));
    case 1:
      return `there is ${list(objects.map((o) => `${nounPhrase(o)} ${place(o.position, rng)}`))}`;
    case 2:
      return `a picture of ${list(objects.map((o) => `${nounPhrase(o)} ${place(o.position, rng)}`))}`;
    case 3:
      // Listed in the other direction half the time, so that the order is no cue to the place.
      return list((rng.int(2) ? objects : [...objects].reverse()).map((o) => `${place(o.position, rng)} is ${nounPhrase(o)}`));
    default: {
      const [first, second] = relation!;
      const words = Object.entries(RELATIONS).filter(([, [a]]) => a === first.position || a === second.position);
      const [phrase, [at]] = words[rng.int(words.length)]!;
      const [subject, object] = at === first.position ? [first, second] : [second, first];
      return `${nounPhrase(subject)} ${phrase} ${nounPhrase(object)}`;
    }
  }
}

/** The two objects of a scene that a relation can describe (two objects at opposite places), or null. */
function relationOf(objects: WorldObject[]): [WorldObject, WorldObject] | null {
  if (objects.length !== 2) return null;
  const places = objects.map((o) => o.position).sort().join(",");
  return places === "left,right" || places === "bottom,top" ? [objects[0]!, objects[1]!] : null;
}

function nounPhrase(o: Pick<WorldObject, "size" | "colour" | "shape">): string {
  return `${article(o.size)} ${o.size} ${o.colour} ${o.shape}`;
}

function place(position: Position, rng: Rng): string {
  const phrases = PLACE_PHRASES[position];
  return phrases[rng.int(phrases.length)]!;
}

/** "a", "a and b", "a, b and c". */
function list(items: string[]): string {
  return items.length === 1 ? items[0]! : `${items.slice(0, -1).join(", ")} and ${items.at(-1)}`;
}

const NOUN = `(?:a|an) (${SIZES.join("|")}) (${COLOURS.join("|")}) (${SHAPES.join("|")})`;
const PLACE = `(${Object.values(PLACE_PHRASES).flat().join("|")})`;
const RELATION = `(${Object.keys(RELATIONS).join("|")})`;
const OBJECT_PLACE = new RegExp(`^${NOUN} ${PLACE}$`);
const PLACE_OBJECT = new RegExp(`^${PLACE} is ${NOUN}$`);
const RELATION_CAPTION = new RegExp(`^${NOUN} ${RELATION} ${NOUN}$`);

/**
 * The objects a caption of the grammar describes, in reading order of their places; null when the
 * text is not a caption of the grammar (a model's half-sentence, a repeated place, an unknown word).
 * Case, surrounding spaces and a final full stop are ignored.
 */
export function parseCaption(text: string): ObjectDescription[] | null {
  let s = text.trim().toLowerCase().replace(/\s+/g, " ").replace(/\.$/, "").trim();
  s = s.replace(/^(there is|there are|a picture of) /, ""); // "there are" too: a model may say it
  const relation = RELATION_CAPTION.exec(s);
  let objects: ObjectDescription[];
  if (relation) {
    const [, size1, colour1, shape1, phrase, size2, colour2, shape2] = relation;
    const [at1, at2] = RELATIONS[phrase!]!;
    objects = [describe(size1!, colour1!, shape1!, at1), describe(size2!, colour2!, shape2!, at2)];
  } else {
    const items = s.split(/, | and /);
    const parsed = items.map((item) => {
      const m = OBJECT_PLACE.exec(item);
      if (m) return describe(m[1]!, m[2]!, m[3]!, positionOf(m[4]!));
      const n = PLACE_OBJECT.exec(item);
      return n ? describe(n[2]!, n[3]!, n[4]!, positionOf(n[1]!)) : null;
    });
    if (parsed.some((p) => p === null)) return null;
    objects = parsed as ObjectDescription[];
  }
  if (new Set(objects.map((o) => o.position)).size !== objects.length) return null;
  return objects.sort((a, b) => POSITIONS.indexOf(a.position) - POSITIONS.indexOf(b.position));
}

/** Whether the caption describes exactly the scene's objects, every attribute right, and nothing else. */
export function captionMatchesScene(text: string, scene: Scene): boolean {
  const parsed = parseCaption(text);
  if (!parsed || parsed.length !== scene.objects.length) return false;
  return parsed.every((p, i) => {
    const o = scene.objects[i]!;
    return p.position === o.position && p.size === o.size && p.colour === o.colour && p.shape === o.shape;
  });
}

function describe(size: string, colour: string, shape: string, position: Position): ObjectDescription {
  return { size: size as Size, colour: colour as Colour, shape: shape as Shape, position };
}

function positionOf(phrase: string): Position {
  return POSITIONS.find((p) => PLACE_PHRASES[p].includes(phrase))!;
}

// ---------------------------------------------------------------------------------------------
// Questions

export const QUESTION_TYPES = ["colour", "shape", "count", "position", "existence"] as const;
export type QuestionType = (typeof QUESTION_TYPES)[number];

export interface Question {
  /** The question alone, as a user would ask it: "what colour is the circle?". */
  question: string;
  /** One word. */
  answer: string;
  type: QuestionType;
}

/** The prompt a question is asked in, the seed's format (BLIP-2's zero-shot VQA prompt). */
export const questionPrompt = (question: string) => `Question: ${question} Answer:`;

/**
 * One question of each type about the scene, drawn from the scene's own stream. Only questions
 * about compositional scenes may name a held-out colour–shape pair that the scene does not hold
 * (an existence question answered "no"): in the other splits a held-out pair never appears.
 */
export function askScene(scene: Scene): Question[] {
  const rng = new Rng(scene.seed + QUESTION_STREAM);
  const objects = scene.objects;
  const allowHeldOut = scene.split === "compositional";
  return [colourQuestion(objects, rng), shapeQuestion(objects, rng), countQuestion(objects, rng), positionQuestion(objects, rng), existenceQuestion(objects, rng, allowHeldOut)];
}

/** "what colour is the circle?": the object named by its shape, or by size and shape, or by shape and place, whichever is the first to name one object only. */
function colourQuestion(objects: WorldObject[], rng: Rng): Question {
  const o = objects[rng.int(objects.length)]!;
  const unique = (f: (x: WorldObject) => boolean) => objects.filter(f).length === 1;
  const ref = unique((x) => x.shape === o.shape)
    ? o.shape
    : unique((x) => x.shape === o.shape && x.size === o.size)
      ? `${o.size} ${o.shape}`
      : `${o.shape} ${PLACE_PHRASES[o.position][0]}`;
  const question = rng.int(2) ? `what colour is the ${ref}?` : `what is the colour of the ${ref}?`;
  return { question, answer: o.colour, type: "colour" };
}

/** "what shape is the red object?": named by colour, or size and colour, or place. */
function shapeQuestion(objects: WorldObject[], rng: Rng): Question {
  const o = objects[rng.int(objects.length)]!;
  const unique = (f: (x: WorldObject) => boolean) => objects.filter(f).length === 1;
  const ref = unique((x) => x.colour === o.colour)
    ? `${o.colour} object`
    : unique((x) => x.colour === o.colour && x.size === o.size)
      ? `${o.size} ${o.colour} object`
      : `object ${PLACE_PHRASES[o.position][0]}`;
  const question = rng.int(2) ? `what shape is the ${ref}?` : `what is the shape of the ${ref}?`;
  return { question, answer: o.shape, type: "shape" };
}

/** How many objects, or how many of a shape, or of a colour; half of the shapes and colours asked about are in the scene. */
function countQuestion(objects: WorldObject[], rng: Rng): Question {
  const answer = (n: number): Question => ({ question: "", answer: COUNT_WORDS[n]!, type: "count" });
  switch (rng.int(3)) {
    case 0: {
      const question = rng.int(2) ? "how many objects are there?" : "how many shapes are in the picture?";
      return { ...answer(objects.length), question };
    }
    case 1: {
      const shape = rng.int(2) ? objects[rng.int(objects.length)]!.shape : SHAPES[rng.int(SHAPES.length)]!;
      return { ...answer(objects.filter((o) => o.shape === shape).length), question: `how many ${plural(shape)} are there?` };
    }
    default: {
      const colour = rng.int(2) ? objects[rng.int(objects.length)]!.colour : COLOURS[rng.int(COLOURS.length)]!;
      return { ...answer(objects.filter((o) => o.colour === colour).length), question: `how many ${colour} objects are there?` };
    }
  }
}

/** "where is the red circle?": named by colour and shape, or by size, colour and shape (never two alike). */
function positionQuestion(objects: WorldObject[], rng: Rng): Question {
  const o = objects[rng.int(objects.length)]!;
  const ref = objects.filter((x) => x.colour === o.colour && x.shape === o.shape).length === 1 ? `${o.colour} ${o.shape}` : `${o.size} ${o.colour} ${o.shape}`;
  const question = rng.int(2) ? `where is the ${ref}?` : `in which part of the picture is the ${ref}?`;
  return { question, answer: o.position, type: "position" };
}

/** "is there a red circle?" (or a shape alone, or a colour alone): yes half of the time. */
function existenceQuestion(objects: WorldObject[], rng: Rng, allowHeldOut: boolean): Question {
  const present = rng.int(2) === 1;
  const kind = rng.int(4); // 0, 1: colour and shape; 2: shape; 3: colour
  const has = (f: (o: WorldObject) => boolean) => objects.some(f);
  let colour: Colour | null = null;
  let shape: Shape | null = null;
  if (present) {
    const o = objects[rng.int(objects.length)]!;
    if (kind !== 3) shape = o.shape;
    if (kind !== 2) colour = o.colour;
  } else {
    // Rejection: an absent colour–shape pair (not held out, where that is asked), shape or colour.
    // Three objects leave at least three shapes and five colours absent, so this ends.
    for (;;) {
      const c = COLOURS[rng.int(COLOURS.length)]!;
      const s = SHAPES[rng.int(SHAPES.length)]!;
      if (kind === 2 ? has((o) => o.shape === s) : kind === 3 ? has((o) => o.colour === c) : has((o) => o.colour === c && o.shape === s)) continue;
      if (kind < 2 && !allowHeldOut && isHeldOut(c, s)) continue;
      if (kind !== 3) shape = s;
      if (kind !== 2) colour = c;
      break;
    }
  }
  const thing = shape === null ? `${colour} object` : colour === null ? shape : `${colour} ${shape}`;
  const question = rng.int(2) ? `is there ${article(thing)} ${thing}?` : `is there ${article(thing)} ${thing} in the picture?`;
  return { question, answer: present ? "yes" : "no", type: "existence" };
}
