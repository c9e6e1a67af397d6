/**
 * Drawing a scene: its background, then each object in its colour, then noise over everything.
 *
 * Objects are drawn with 4×4 samples per pixel (their edges blend into the background by coverage),
 * so that at 64 px, where a small object is about 10 pixels across, a star keeps its points and a
 * cross its arms instead of turning into a blob of stair steps. The same scene renders at any size;
 * the pixels (noise included) are a function of the scene and the size only.
 */
import sharp from "sharp";
import { Blip2Error } from "../errors.js";
import type { RawImage } from "../image/decode.js";
import { Rng } from "../train/rng.js";
import type { Background, Scene, WorldObject } from "./scene.js";
import { COLOUR_RGB, SIZE_EXTENT, type Shape } from "./vocabulary.js";

export const DEFAULT_IMAGE_SIZE = 224;
export const MIN_IMAGE_SIZE = 32;
export const MAX_IMAGE_SIZE = 1024;

/** Samples per pixel side when drawing objects. */
const SUPERSAMPLE = 4;

/** The noise stream of a scene is its own, apart from the stream that drew the scene. */
const NOISE_STREAM = 2 ** 32;

/** The scene's pixels: `size` × `size`, RGB. */
export function renderScene(scene: Scene, size = DEFAULT_IMAGE_SIZE): RawImage & { channels: 3 } {
  checkImageSize(size);
  const pixels = new Float32Array(size * size * 3);
  paintBackground(pixels, size, scene.background);
  for (const object of scene.objects) paintObject(pixels, size, object);
  addNoise(pixels, scene.background.noise, new Rng(scene.seed + NOISE_STREAM));
  const data = new Uint8Array(pixels.length);
  for (let i = 0; i < pixels.length; i++) data[i] = Math.min(255, Math.max(0, Math.round(pixels[i]!)));
  return { data, width: size, height: size, channels: 3 };
}

/** The scene as PNG bytes (the same scene and size give the same bytes). */
export async function renderPng(scene: Scene, size = DEFAULT_IMAGE_SIZE): Promise<Buffer> {
  const image = renderScene(scene, size);
  return sharp(image.data, { raw: { width: image.width, height: image.height, channels: 3 } })
    .png({ compressionLevel: 9, adaptiveFiltering: false })
    .toBuffer();
}

export function checkImageSize(size: number): void {
  if (!Number.isInteger(size) || size < MIN_IMAGE_SIZE || size > MAX_IMAGE_SIZE) {
    throw new Blip2Error(`world image size must be an integer from ${MIN_IMAGE_SIZE} to ${MAX_IMAGE_SIZE} pixels, got ${size}`);
  }
}

function paintBackground(pixels: Float32Array, size: number, bg: Background): void {
  const [gx, gy] = [Math.cos(bg.angle), Math.sin(bg.angle)];
  // Projections of the corners onto the gradient span ±(|gx| + |gy|) / 2: that range maps to [0, 1].
  const span = Math.abs(gx) + Math.abs(gy);
  const stripes = bg.stripes;
  const [sx, sy] = stripes ? [Math.cos(stripes.angle), Math.sin(stripes.angle)] : [0, 0];
  for (let py = 0; py < size; py++) {
    for (let px = 0; px < size; px++) {
      const u = (px + 0.5) / size - 0.5;
      const v = (py + 0.5) / size - 0.5;
      const t = 0.5 + (u * gx + v * gy) / span;
      const stripe = stripes ? stripes.amplitude * Math.sin((2 * Math.PI * (u * sx + v * sy)) / stripes.period) : 0;
      const i = (py * size + px) * 3;
      for (let c = 0; c < 3; c++) pixels[i + c] = bg.from[c]! * (1 - t) + bg.to[c]! * t + stripe;
    }
  }
}

function paintObject(pixels: Float32Array, size: number, object: WorldObject): void {
  const inside = SHAPE_TEST[object.shape];
  const colour = COLOUR_RGB[object.colour];
  const r = (SIZE_EXTENT[object.size] * size) / 2;
  const [cx, cy] = [object.x * size, object.y * size];
  const x0 = Math.max(0, Math.floor(cx - r));
  const x1 = Math.min(size - 1, Math.ceil(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r));
  const y1 = Math.min(size - 1, Math.ceil(cy + r));
  const samples = SUPERSAMPLE * SUPERSAMPLE;
  for (let py = y0; py <= y1; py++) {
    for (let px = x0; px <= x1; px++) {
      let hits = 0;
      for (let j = 0; j < SUPERSAMPLE; j++) {
        for (let i = 0; i < SUPERSAMPLE; i++) {
          const u = (px + (i + 0.5) / SUPERSAMPLE - cx) / r;
          const v = (py + (j + 0.5) / SUPERSAMPLE - cy) / r;
          if (inside(u, v)) hits++;
        }
      }
      if (hits === 0) continue;
      const coverage = hits / samples;
      const k = (py * size + px) * 3;
      for (let c = 0; c < 3; c++) pixels[k + c] = pixels[k + c]! * (1 - coverage) + colour[c]! * coverage;
    }
  }
}

/**
 * Nearly Gaussian noise of standard deviation `sigma`: the sum of the four bytes of one 32-bit draw
 * (Irwin–Hall with four terms), centred and scaled. One integer draw per value instead of
 * Box–Muller's two doubles and a logarithm: most of the time of a large image went there.
 */
function addNoise(pixels: Float32Array, sigma: number, rng: Rng): void {
  const mean = 4 * 127.5;
  const sd = Math.sqrt((4 * (256 * 256 - 1)) / 12);
  for (let i = 0; i < pixels.length; i++) {
    const x = rng.nextUint32();
    const sum = (x & 255) + ((x >>> 8) & 255) + ((x >>> 16) & 255) + (x >>> 24);
    pixels[i] = pixels[i]! + (sigma * (sum - mean)) / sd;
  }
}

/**
 * Whether the point (u, v) is inside each shape, in the shape's own frame: the object's centre at
 * the origin, its bounding circle of radius 1, v pointing down. Every shape covers its centre.
 */
const SHAPE_TEST: Record<Shape, (u: number, v: number) => boolean> = {
  circle: (u, v) => u * u + v * v <= 1,
  square: (u, v) => Math.max(Math.abs(u), Math.abs(v)) <= 0.8,
  diamond: (u, v) => Math.abs(u) + Math.abs(v) <= 1,
  triangle: (u, v) => insidePolygon(TRIANGLE, u, v),
  star: (u, v) => insidePolygon(STAR, u, v),
  cross: (u, v) => (Math.abs(u) <= 0.32 && Math.abs(v) <= 0.95) || (Math.abs(v) <= 0.32 && Math.abs(u) <= 0.95),
};

/** Pointing up, its base a little below the centre so that it looks centred. */
const TRIANGLE: [number, number][] = [
  [0, -0.95],
  [1, 0.75],
  [-1, 0.75],
];

/** Five points, the first straight up; inner radius 0.42 keeps the points wide enough to see at 10 pixels. */
const STAR: [number, number][] = Array.from({ length: 10 }, (_, i) => {
  const radius = i % 2 === 0 ? 1 : 0.42;
  const angle = -Math.PI / 2 + (i * Math.PI) / 5;
  return [radius * Math.cos(angle), radius * Math.sin(angle)];
});

/** Even–odd rule: a ray from the point crosses the outline an odd number of times when it is inside. */
function insidePolygon(polygon: [number, number][], u: number, v: number): boolean {
  let inside = false;
  for (let i = 0, j = polygon.length - 1; i < polygon.length; j = i++) {
    const [xi, yi] = polygon[i]!;
    const [xj, yj] = polygon[j]!;
    if (yi > v !== yj > v && u < ((xj - xi) * (v - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}
