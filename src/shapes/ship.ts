/**
 * The trained models as the package ships them (models/blip2-shapes, models/blip2-shapes-itm): the
 * Hugging Face checkpoint files only (no trainer state), and a few example images from the test
 * split with their scenes' captions.
 */
import fs from "node:fs";
import path from "node:path";

/** What a checkpoint needs to load (the trainer's state and caches are left out). */
const MODEL_FILE = /^(config\.json|generation_config\.json|preprocessor_config\.json|processor_config\.json|special_tokens_map\.json|added_tokens\.json|merges\.txt|tokenizer[^/]*|vocab[^/]*|model[^/]*\.safetensors(\.index\.json)?)$/;

export function shipModel(from: string, to: string): number {
  fs.rmSync(to, { recursive: true, force: true });
  fs.mkdirSync(to, { recursive: true });
  let bytes = 0;
  for (const name of fs.readdirSync(from).filter((f) => MODEL_FILE.test(f))) {
    fs.copyFileSync(path.join(from, name), path.join(to, name));
    bytes += fs.statSync(path.join(to, name)).size;
  }
  return bytes;
}

/** The first `count` images of a world data set, copied as examples/<n>.png with examples/captions.json. */
export function shipExamples(dataset: string, to: string, count: number): void {
  const folder = path.join(to, "examples");
  fs.mkdirSync(folder, { recursive: true });
  const scenes = fs.readFileSync(path.join(dataset, "captions.jsonl"), "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as { image: string; text: string });
  const seen = new Set<string>();
  const chosen = scenes.filter((s) => !seen.has(s.image) && seen.add(s.image)).slice(0, count);
  const captions: Record<string, string> = {};
  chosen.forEach((s, i) => {
    const name = `example${i}.png`;
    fs.copyFileSync(path.join(dataset, s.image), path.join(folder, name));
    captions[name] = s.text;
  });
  fs.writeFileSync(path.join(folder, "captions.json"), `${JSON.stringify(captions, null, 2)}\n`);
}
