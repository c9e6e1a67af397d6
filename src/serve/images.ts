/**
 * Images as requests carry them: an uploaded file, a `data:` URL, or (only when the server allows
 * it) an http(s) URL. The size is read from the header and checked against the server's pixel
 * limit before any pixel is decoded, so a small file that would decode to gigabytes is refused.
 */
import sharp from "sharp";
import { Blip2Error, describeError } from "../errors.js";
import { loadImage, type RawImage } from "../image/decode.js";
import { HttpError } from "./errors.js";

export interface ImageLimits {
  /** Largest width × height accepted. */
  maxPixels: number;
  /** Largest encoded image, in bytes (also the limit on what a remote URL may send). */
  maxBytes: number;
  /** Fetch http(s) URLs; off by default, so the server cannot be made to reach other hosts. */
  allowRemote: boolean;
}

/** Encoded bytes of an image given as an upload (bytes) or a string (`data:` or http(s) URL). */
export async function imageBytes(value: unknown, field: string, limits: ImageLimits): Promise<Uint8Array> {
  if (value instanceof Uint8Array) return value;
  if (typeof value !== "string") throw new HttpError(400, "invalid_image", `${field}: expected an uploaded file or a data URL, got ${value === undefined ? "nothing" : typeof value}`);
  if (value.startsWith("data:")) return dataUrlBytes(value, field);
  if (/^https?:\/\//i.test(value)) {
    if (!limits.allowRemote) throw new HttpError(400, "remote_image_refused", `${field}: remote image URLs are not fetched by this server (start it with --allow-remote-images); send the image as a data URL or an upload`);
    return fetchImage(value, field, limits.maxBytes);
  }
  throw new HttpError(400, "invalid_image", `${field}: expected a data URL (data:image/png;base64,...) or an uploaded file, got a string starting ${JSON.stringify(value.slice(0, 16))}`);
}

function dataUrlBytes(url: string, field: string): Uint8Array {
  const comma = url.indexOf(",");
  if (comma < 0) throw new HttpError(400, "invalid_image", `${field}: a data URL needs a comma before its data`);
  const meta = url.slice(5, comma);
  const payload = url.slice(comma + 1);
  if (meta.endsWith(";base64")) return Buffer.from(payload, "base64");
  return Buffer.from(decodeURIComponent(payload), "latin1");
}

async function fetchImage(url: string, field: string, maxBytes: number): Promise<Uint8Array> {
  let response: Response;
  try {
    response = await fetch(url, { signal: AbortSignal.timeout(30_000), redirect: "follow" });
  } catch (err) {
    throw new HttpError(400, "invalid_image", `${field}: cannot fetch ${url} (${describeError(err)})`);
  }
  if (!response.ok) throw new HttpError(400, "invalid_image", `${field}: fetching ${url} gave HTTP ${response.status}`);
  const length = Number(response.headers.get("content-length") ?? 0);
  if (length > maxBytes) throw new HttpError(413, "image_too_large", `${field}: ${url} is ${length} bytes, over the ${maxBytes}-byte limit`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (bytes.length > maxBytes) throw new HttpError(413, "image_too_large", `${field}: ${url} is ${bytes.length} bytes, over the ${maxBytes}-byte limit`);
  return bytes;
}

/** Width and height from the file's header, without decoding pixels; null when the header is not one we read. */
export async function headerSize(bytes: Uint8Array): Promise<[number, number] | null> {
  // BMP and GIF are decoded by blip2 itself (see image/decode.ts): read their headers here too.
  if (bytes.length >= 26 && bytes[0] === 0x42 && bytes[1] === 0x4d) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    return [Math.abs(view.getInt32(18, true)), Math.abs(view.getInt32(22, true))];
  }
  if (bytes.length >= 10 && String.fromCharCode(...bytes.subarray(0, 3)) === "GIF") {
    return [bytes[6]! | (bytes[7]! << 8), bytes[8]! | (bytes[9]! << 8)];
  }
  try {
    const meta = await sharp(bytes, { limitInputPixels: false }).metadata();
    return meta.width && meta.height ? [meta.width, meta.pageHeight ?? meta.height] : null;
  } catch {
    return null; // the decoder below names the problem
  }
}

/** The decoded RGB pixels of a request's image, its size checked first. */
export async function requestImage(value: unknown, field: string, limits: ImageLimits): Promise<RawImage> {
  const bytes = await imageBytes(value, field, limits);
  if (bytes.length > limits.maxBytes) throw new HttpError(413, "image_too_large", `${field}: ${bytes.length} bytes, over the ${limits.maxBytes}-byte limit`);
  const size = await headerSize(bytes);
  if (size && size[0] * size[1] > limits.maxPixels) {
    throw new HttpError(413, "image_too_large", `${field}: ${size[0]}x${size[1]} = ${size[0] * size[1]} pixels, over this server's limit of ${limits.maxPixels} pixels`);
  }
  try {
    // Turned upright by its EXIF orientation, as the CLI and Blip2.load do (transformers' load_image).
    const rgb = await loadImage(bytes, field, { exifOrientation: true });
    return { ...rgb, channels: 3 };
  } catch (err) {
    if (err instanceof Blip2Error) throw new HttpError(400, "invalid_image", describeError(err));
    throw err;
  }
}
