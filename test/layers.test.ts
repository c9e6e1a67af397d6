/**
 * The layers of src/ import one way only: each folder (or top-level file) belongs to one layer, and
 * a file may import from its own layer and the layers below it, never from one above. The order is
 * the one docs/architecture.md states; a folder or top-level file that is in no layer fails, so a
 * new one must be placed (here and there) before it can be used.
 */
import fs from "node:fs";
import path from "node:path";
import ts from "typescript";
import { describe, expect, it } from "vitest";

const SRC = path.resolve(import.meta.dirname, "../src");

/** Bottom to top. Folders end in "/", top-level files do not. */
const LAYERS: { name: string; members: string[] }[] = [
  { name: "base", members: ["errors.ts", "config.ts", "warn.ts", "thread.ts"] },
  { name: "io", members: ["io/", "hub/", "image/", "tokenizer/", "processor.ts"] },
  { name: "ir", members: ["ir/"] },
  { name: "autodiff", members: ["autodiff/"] },
  { name: "models", members: ["models/"] },
  { name: "quantize", members: ["quantize/"] },
  { name: "runtime", members: ["runtime/"] },
  { name: "generation", members: ["generation/"] },
  { name: "train", members: ["train/", "world/"] },
  { name: "api", members: ["api/", "index.ts"] },
  { name: "shapes", members: ["shapes/"] },
  { name: "search", members: ["search/"] },
  { name: "serve", members: ["serve/"] },
  { name: "cli", members: ["cli/"] },
];

/** The member of src/ a path under it belongs to: its top folder ("io/") or the file itself ("config.ts"). */
function memberOf(relative: string): string {
  const [first, ...rest] = relative.split("/");
  return rest.length ? `${first}/` : first!;
}

/** The layer's position (0 = bottom) of a member of src/, or undefined when it is in none. */
function layerOf(member: string): number | undefined {
  const i = LAYERS.findIndex((l) => l.members.includes(member));
  return i < 0 ? undefined : i;
}

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const full = path.join(dir, e.name);
    if (e.isDirectory()) return sourceFiles(full);
    return /\.(ts|mts|js|mjs)$/.test(e.name) && !e.name.endsWith(".d.ts") ? [full] : [];
  });
}

/** The relative imports of a source file (static, type-only, re-exports and dynamic), as paths under src/. */
function importsOf(file: string, text: string): string[] {
  const { importedFiles } = ts.preProcessFile(text, true, true);
  return importedFiles
    .map((f) => f.fileName)
    .filter((spec) => spec.startsWith("./") || spec.startsWith("../"))
    .map((spec) => path.relative(SRC, path.resolve(path.dirname(file), spec)).split(path.sep).join("/"));
}

/** Every import that goes from a layer to one above it, as "from -> to (layer -> layer)". */
function upwardImports(files: Map<string, string>): string[] {
  const wrong: string[] = [];
  for (const [file, text] of files) {
    const from = path.relative(SRC, file).split(path.sep).join("/");
    const fromLayer = layerOf(memberOf(from));
    for (const to of importsOf(file, text)) {
      if (to.startsWith("..")) continue; // outside src/: not ours to order
      const toLayer = layerOf(memberOf(to));
      if (fromLayer === undefined || toLayer === undefined) continue; // reported as unplaced
      if (toLayer > fromLayer) wrong.push(`src/${from} -> src/${to} (${LAYERS[fromLayer]!.name} imports ${LAYERS[toLayer]!.name})`);
    }
  }
  return wrong;
}

const readAll = () => new Map(sourceFiles(SRC).map((f) => [f, fs.readFileSync(f, "utf8")]));

describe("layers", () => {
  it("places every folder and top-level file of src/ in a layer", () => {
    const members = fs.readdirSync(SRC, { withFileTypes: true }).map((e) => (e.isDirectory() ? `${e.name}/` : e.name));
    const unplaced = members.filter((m) => (m.endsWith("/") || /\.(ts|mts|js|mjs)$/.test(m)) && layerOf(m) === undefined);
    expect(unplaced, "add these to LAYERS in test/layers.test.ts and to docs/architecture.md").toEqual([]);
  });

  it("has no import from a lower layer to a higher one", () => {
    expect(upwardImports(readAll())).toEqual([]);
  });

  it("names each member of src/ once", () => {
    const all = LAYERS.flatMap((l) => l.members);
    expect(all.filter((m, i) => all.indexOf(m) !== i)).toEqual([]);
  });

  // The checker itself, on made-up files: it must see every kind of import and tell the direction.
  it("finds an upward import in every form an import can take", () => {
    const file = (rel: string) => path.join(SRC, rel);
    const fake = new Map([
      [file("io/a.ts"), `import { x } from "../quantize/dtype.js";`],
      [file("io/b.ts"), `import type { Y } from "../models/layers.js";`],
      [file("ir/c.ts"), `export { z } from "../runtime/session.js";`],
      [file("models/d.ts"), `const m = await import("../api/load.js");`],
      [file("errors.ts"), `import "./config.js"; import { q } from "./cli/main.js";`],
      [file("cli/e.ts"), `import { Blip2 } from "../api/tasks.js"; import fs from "node:fs"; import { s } from "./shared.js";`],
      [file("runtime/f.ts"), `import { w } from "../io/weightFormat.js"; import ort from "onnxruntime-node";`],
    ]);
    expect(upwardImports(fake)).toEqual([
      "src/io/a.ts -> src/quantize/dtype.js (io imports quantize)",
      "src/io/b.ts -> src/models/layers.js (io imports models)",
      "src/ir/c.ts -> src/runtime/session.js (ir imports runtime)",
      "src/models/d.ts -> src/api/load.js (models imports api)",
      "src/errors.ts -> src/cli/main.js (base imports cli)",
    ]);
  });

  it("leaves a folder that is in no layer unplaced", () => {
    expect(layerOf("newthing/")).toBeUndefined();
    expect(layerOf("io/")).toBeLessThan(layerOf("quantize/")!);
    expect(layerOf("train/")).toBeGreaterThan(layerOf("generation/")!);
    expect(layerOf("train/")).toBeLessThan(layerOf("api/")!);
  });
});
