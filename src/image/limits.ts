/** What an image may be, and the one-line error for one that is not. */
import { Blip2Error } from "../errors.js";

/** Largest accepted width or height, in pixels. */
export const MAX_IMAGE_SIDE = 32768;
/** Largest accepted pixel count: Pillow raises DecompressionBombError above this (2 x 89,478,485). */
export const MAX_IMAGE_PIXELS = 178_956_970;

/** `label` is a phrase naming the input: `image "cat.jpg"`, `image buffer`, `raw image`. */
export function fail(label: string, problem: string, cause?: unknown): never {
  throw new Blip2Error(`cannot load ${label}: ${problem}`, cause === undefined ? undefined : { cause });
}

/** Checked on the header, before any pixel is decoded, so a hostile header cannot make us allocate gigabytes. */
export function checkDimensions(label: string, width: number, height: number): void {
  if (!Number.isInteger(width) || !Number.isInteger(height) || width <= 0 || height <= 0) {
    fail(label, `empty image, ${width}x${height} px (width and height must be at least 1 px)`);
  }
  if (width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE) {
    fail(label, `too large: ${width}x${height} px (the limit is ${MAX_IMAGE_SIDE} px a side)`);
  }
  if (width * height > MAX_IMAGE_PIXELS) {
    fail(label, `too large: ${width}x${height} px = ${width * height} pixels (the limit is ${MAX_IMAGE_PIXELS} pixels)`);
  }
}
