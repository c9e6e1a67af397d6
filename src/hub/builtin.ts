/**
 * Models that ship inside the npm package, usable by name wherever a folder or a Hub id is: the
 * BLIP-2 that blip2 trained itself on its synthetic world (`blip2 world`), which runs offline.
 */
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

/** The package's models folder: two levels above this file, from src/hub or from dist/hub. */
export const BUILT_IN_FOLDER = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "models");

export const BUILT_IN_MODELS: Record<string, string> = {
  "blip2-shapes": "captions and answers questions about the synthetic world's shapes (OPT, 64 px)",
  "blip2-shapes-itm": "its stage-1 Q-Former: image-text matching and search over the same world",
};

/** The folder of a built-in model, or null when `name` is not one (or the package lacks it). */
export function builtInModel(name: string): string | null {
  if (!Object.hasOwn(BUILT_IN_MODELS, name)) return null;
  const dir = path.join(BUILT_IN_FOLDER, name);
  return fs.existsSync(path.join(dir, "config.json")) ? dir : null;
}
