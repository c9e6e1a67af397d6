/**
 * Scenes: the ground truth of one image of the synthetic world, drawn from a seed.
 *
 * A scene holds 1–3 objects, each at its own position (top, left, centre, right, bottom), listed in
 * reading order, with no two objects alike in size, colour and shape (so every object can be named
 * without pointing at it), on a background of two desaturated mid-tones blended across the image,
 * sometimes with faint stripes, always with some pixel noise.
 *
 * Every seed belongs to exactly one split (SPLIT_SEEDS): the splits are disjoint by construction,
 * and `generateScene(seed)` needs nothing else. Train, validation and test scenes never hold a
 * held-out colour–shape pair (vocabulary.ts); every compositional scene holds at least one.
 */
import { Blip2Error } from "../errors.js";
import { Rng } from "../train/rng.js";
import { COLOURS, HELD_OUT_PAIRS, isHeldOut, POSITION_CENTRE, POSITION_JITTER, POSITIONS, SHAPES, SIZES, type Colour, type Position, type Shape, type Size } from "./vocabulary.js";

export const SPLITS = ["train", "val", "test", "compositional"] as const;
export type Split = (typeof SPLITS)[number];

/** How many seeds each split owns: split k owns [k * SPLIT_SEEDS, (k + 1) * SPLIT_SEEDS). */
export const SPLIT_SEEDS = 1_000_000_000;

export type Rgb = [number, number, number];

export interface WorldObject {
  shape: Shape;
  colour: Colour;
  size: Size;
  position: Position;
  /** The object's centre, as fractions of the image side (x to the right, y down). */
  x: number;
  y: number;
}

export interface Background {
  /** The colours at the two ends of the gradient. */
  from: Rgb;
  to: Rgb;
  /** Direction of the gradient, radians (0: left to right). */
  angle: number;
  /** Faint stripes over the gradient, or null. `period`: fraction of the side; `amplitude`: 0–255. */
  stripes: { period: number; angle: number; amplitude: number } | null;
  /** Standard deviation of the (nearly Gaussian) noise added to every pixel and channel (0–255 scale). */
  noise: number;
}

export interface Scene {
  seed: number;
  split: Split;
  background: Background;
  /** In reading order of their positions (POSITIONS). */
  objects: WorldObject[];
}

/** The split a seed belongs to. */
export function splitOfSeed(seed: number): Split {
  if (!Number.isSafeInteger(seed) || seed < 0 || seed >= SPLITS.length * SPLIT_SEEDS) {
    throw new Blip2Error(`world seed must be an integer in [0, ${SPLITS.length * SPLIT_SEEDS}), got ${seed}`);
  }
  return SPLITS[Math.floor(seed / SPLIT_SEEDS)]!;
}

/** The seed of the `index`-th scene of a split. */
export function sceneSeed(split: Split, index: number): number {
  const k = SPLITS.indexOf(split);
  if (k < 0) throw new Blip2Error(`unknown world split ${JSON.stringify(split)} (expected ${SPLITS.join(", ")})`);
  if (!Number.isSafeInteger(index) || index < 0 || index >= SPLIT_SEEDS) {
    throw new Blip2Error(`scene index of split ${split} must be an integer in [0, ${SPLIT_SEEDS}), got ${index}`);
  }
  return k * SPLIT_SEEDS + index;
}

/** The scene of a seed (its split follows from the seed). */
export function generateScene(seed: number): Scene {
  const split = splitOfSeed(seed);
  const rng = new Rng(seed);
  const count = 1 + rng.int(3);
  const positions = rng.shuffle([...POSITIONS]).slice(0, count);
  positions.sort((a, b) => POSITIONS.indexOf(a) - POSITIONS.indexOf(b));
  // A compositional scene shows one held-out pair at one of its objects, chosen at random.
  const heldOutAt = split === "compositional" ? rng.int(count) : -1;
  const objects: WorldObject[] = [];
  for (let i = 0; i < count; i++) {
    const position = positions[i]!;
    const { shape, colour, size } = i === heldOutAt ? heldOutAttributes(rng) : attributes(rng, split, objects);
    const [cx, cy] = POSITION_CENTRE[position];
    objects.push({ shape, colour, size, position, x: round4(cx + jitter(rng)), y: round4(cy + jitter(rng)) });
  }
  // The held-out object was drawn without looking at the others; an earlier one may be its twin.
  if (heldOutAt >= 0) dropTwins(rng, objects, heldOutAt, split);
  return { seed, split, background: background(rng), objects };
}

type Attributes = Pick<WorldObject, "shape" | "colour" | "size">;

/** Attributes for a new object: not a twin of an earlier one, and no held-out pair outside the compositional split. */
function attributes(rng: Rng, split: Split, earlier: Attributes[]): Attributes {
  for (;;) {
    const a = { shape: pick(rng, SHAPES), colour: pick(rng, COLOURS), size: pick(rng, SIZES) };
    if (split !== "compositional" && isHeldOut(a.colour, a.shape)) continue;
    if (earlier.some((e) => alike(e, a))) continue;
    return a;
  }
}

function heldOutAttributes(rng: Rng): Attributes {
  const [colour, shape] = HELD_OUT_PAIRS[rng.int(HELD_OUT_PAIRS.length)]!;
  return { colour, shape, size: pick(rng, SIZES) };
}

/** Redraws any object other than `keep` that is alike in size, colour and shape to another. */
function dropTwins(rng: Rng, objects: WorldObject[], keep: number, split: Split): void {
  for (let i = 0; i < objects.length; i++) {
    if (i === keep) continue;
    const others = objects.filter((_, j) => j !== i);
    if (others.some((o) => alike(o, objects[i]!))) Object.assign(objects[i]!, attributes(rng, split, others));
  }
}

function alike(a: Attributes, b: Attributes): boolean {
  return a.shape === b.shape && a.colour === b.colour && a.size === b.size;
}

/**
 * Two mid-tone greys, each tinted a little, so that saturated colours, white and black all stand
 * out; stripes on two scenes in five; noise on every one.
 */
function background(rng: Rng): Background {
  const tone = (): Rgb => {
    const grey = 95 + 60 * rng.uniform();
    return [0, 1, 2].map(() => Math.round(grey + 36 * (rng.uniform() - 0.5))) as Rgb;
  };
  const from = tone();
  const to = tone();
  const angle = round4(2 * Math.PI * rng.uniform());
  const stripes = rng.uniform() < 0.4 ? { period: round4(0.08 + 0.12 * rng.uniform()), angle: round4(Math.PI * rng.uniform()), amplitude: round4(4 + 6 * rng.uniform()) } : null;
  const noise = round4(2 + 5 * rng.uniform());
  return { from, to, angle, stripes, noise };
}

function jitter(rng: Rng): number {
  return POSITION_JITTER * (2 * rng.uniform() - 1);
}

function pick<T>(rng: Rng, options: readonly T[]): T {
  return options[rng.int(options.length)]!;
}

/** Scenes are written as JSON: four decimals keep them short and lose nothing the renderer can show. */
function round4(x: number): number {
  return Math.round(x * 1e4) / 1e4;
}
