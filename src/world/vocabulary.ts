/**
 * The words of the synthetic world, and what each one looks like. The vocabulary is small and
 * regular on purpose: the language model that learns to talk about this world is tiny and trained
 * from scratch, so every attribute has one name, and every name one look.
 */

export const SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross"] as const;
export type Shape = (typeof SHAPES)[number];

export const COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"] as const;
export type Colour = (typeof COLOURS)[number];

export const SIZES = ["small", "large"] as const;
export type Size = (typeof SIZES)[number];

/** In reading order (top to bottom, then left to right): the order in which a scene lists its objects. */
export const POSITIONS = ["top", "left", "centre", "right", "bottom"] as const;
export type Position = (typeof POSITIONS)[number];

/**
 * Saturated, well separated colours. Backgrounds are desaturated mid-tones (see scene.ts), so
 * every colour here, white and black included, stands out from every background.
 */
export const COLOUR_RGB: Record<Colour, readonly [number, number, number]> = {
  red: [220, 30, 35],
  orange: [245, 135, 20],
  yellow: [245, 225, 35],
  green: [35, 170, 60],
  blue: [35, 75, 225],
  purple: [145, 50, 195],
  white: [245, 245, 245],
  black: [20, 20, 20],
};

/**
 * An object's extent (the diameter of its bounding circle) as a fraction of the image side. Large
 * objects at neighbouring positions (POSITION_CENTRE: 0.32 apart) do not touch; a small object is
 * still about 10 pixels across at 64 px, enough to tell a star from a cross.
 */
export const SIZE_EXTENT: Record<Size, number> = { small: 0.17, large: 0.29 };

/** Where each position's objects are centred, as fractions of the image side (x right, y down). */
export const POSITION_CENTRE: Record<Position, readonly [number, number]> = {
  top: [0.5, 0.18],
  left: [0.18, 0.5],
  centre: [0.5, 0.5],
  right: [0.82, 0.5],
  bottom: [0.5, 0.82],
};

/** How far (fraction of the side) an object's centre may stray from its position's centre, in x and in y. */
export const POSITION_JITTER = 0.015;

/**
 * Colour–shape pairs that never occur in the train, validation or test splits (not in an image,
 * a caption or a question) and occur in every image of the compositional split. One per shape, each
 * colour at most once, so every word is still seen in training, only never in these combinations.
 */
export const HELD_OUT_PAIRS: readonly (readonly [Colour, Shape])[] = [
  ["red", "star"],
  ["orange", "circle"],
  ["yellow", "cross"],
  ["green", "triangle"],
  ["blue", "diamond"],
  ["purple", "square"],
];

export function isHeldOut(colour: Colour, shape: Shape): boolean {
  return HELD_OUT_PAIRS.some(([c, s]) => c === colour && s === shape);
}

/** "an orange …", "a red …": the article before a noun phrase starting with `word`. */
export function article(word: string): "a" | "an" {
  return /^[aeiou]/.test(word) ? "an" : "a";
}

/** "circles", "crosses". */
export function plural(shape: Shape): string {
  return shape.endsWith("s") ? `${shape}es` : `${shape}s`;
}

export const COUNT_WORDS = ["zero", "one", "two", "three"] as const;
