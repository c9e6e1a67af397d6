/**
 * One benchmark configuration (model, dtype, threads) in a fresh process, so load time and memory
 * are its own. Prints one JSON object. Run by scripts/bench.ts.
 */
import fs from "node:fs";
import { parseArgs } from "node:util";
import { Blip2 } from "../src/api/tasks.js";
import { linearWeights, tensorsInUse, variantNames } from "../src/quantize/quantize.js";
import { readOncePerPrompt, weightDType } from "../src/io/weightFormat.js";
import { usableDevice, type Device } from "../src/runtime/session.js";

const { values } = parseArgs({ options: { dir: { type: "string" }, dtype: { type: "string" }, threads: { type: "string" }, runs: { type: "string" }, tokens: { type: "string" }, reference: { type: "string" }, "load-only": { type: "boolean" }, device: { type: "string" }, "no-packed-cache": { type: "boolean" } } });
const dir = values.dir!;
const dtype = values.dtype as "fp32" | "q8" | "q4";
const threads = Number(values.threads);
const requested = (values.device ?? "cpu") as Device;
// What the sessions run on: an unavailable device falls back to the CPU, and the table says so.
const device = await usableDevice(requested);
const runs = Number(values.runs ?? 3);
const tokens = Number(values.tokens ?? 20);
const IMAGE = new URL("../test/fixtures/photo640x427.jpg", import.meta.url).pathname;

const status = () => {
  const s = fs.readFileSync("/proc/self/status", "utf8");
  const kb = (k: string) => Number(s.match(new RegExp(`${k}:\\s+(\\d+)`))![1]) * 1024;
  return { rss: kb("VmRSS"), hwm: kb("VmHWM"), anon: kb("RssAnon"), file: kb("RssFile") };
};
let peakAnon = 0;
const sample = () => (peakAnon = Math.max(peakAnon, status().anon));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const spread = (xs: number[]) => ({ median: median(xs), min: Math.min(...xs), max: Math.max(...xs) });
const seconds = (ms: number) => ms / 1000;

let t = performance.now();
const blip2 = await Blip2.load(dir, { dtype, threads, device: requested, packedWeights: values["no-packed-cache"] !== true });
await blip2.model.prepare();
const loadS = seconds(performance.now() - t);
sample();
if (values["load-only"]) {
  await blip2.dispose();
  process.exit(0);
}

const ckpt = blip2.model.checkpoint;
// Bytes of language-model weights read per generated token: every linear weight of the decoder
// once (for T5, not the encoder's, which runs once per prompt).
const decoderWeights = linearWeights(ckpt).byPart.language.filter((n) => !readOncePerPrompt(n));
const lmBytes = decoderWeights.reduce((sum, name) => {
  const d = weightDType(name, ckpt.dtypes.language);
  const parts = d === "fp32" ? [name] : variantNames(name, d);
  return sum + parts.reduce((s, n) => s + ckpt.tensor(n).byteLength, 0);
}, 0);

/**
 * The prompt: 6 text tokens after the 32 image tokens. The synthetic checkpoint ships a
 * small tokenizer that splits words into more pieces than the real one (14 ids for this text), so
 * the ids are cut to the first 5 text ids and the last (OPT: BOS + 4 + 1; T5: 5 + EOS).
 */
async function prompt(images: string[]) {
  const p = await blip2.processor.process({ images, text: "a photo of a cat and" });
  const queries = ckpt.config.numQueryTokens;
  const cut = (row: number[]) => [...row.slice(0, queries + 5), row.at(-1)!];
  return { ...p, inputIds: p.inputIds.map(cut), attentionMask: p.attentionMask.map(cut) };
}
const one = await prompt([IMAGE]);
const four = await prompt([IMAGE, IMAGE, IMAGE, IMAGE]);
if (one.inputIds[0]!.length !== ckpt.config.numQueryTokens + 6) throw new Error(`bench prompt has ${one.inputIds[0]!.length} ids`);

const vision1: number[] = [];
const vision4: number[] = [];
for (let r = 0; r < runs; r++) {
  t = performance.now();
  await blip2.model.imageFeatures(one.pixelValues!, 1);
  vision1.push(seconds(performance.now() - t));
  t = performance.now();
  await blip2.model.imageFeatures(four.pixelValues!, 4);
  vision4.push(seconds(performance.now() - t) / 4);
  sample();
}

/** A full caption of `tokens` new tokens (EOS disallowed until then): first-token time, per-token times, total. */
async function caption(inputs: typeof one) {
  const start = performance.now();
  const stamps: number[] = [];
  await blip2.model.generate({ ...inputs, maxNewTokens: tokens, minNewTokens: tokens, onToken: () => void stamps.push(performance.now()) });
  const total = seconds(performance.now() - start);
  const steps = stamps.slice(1).map((s, i) => seconds(s - stamps[i]!));
  sample();
  return { ttft: seconds(stamps[0]! - start), perToken: median(steps), total };
}
const single = [];
const batch = [];
for (let r = 0; r < runs; r++) single.push(await caption(one));
for (let r = 0; r < runs; r++) batch.push(await caption(four));

// Quality: the last position's logits for two images against the float32 run's.
const pair = await blip2.processor.process({ images: [IMAGE, new URL("../test/fixtures/image1.png", import.meta.url).pathname], text: "a photo of a" });
const rt = (blip2.model as unknown as { runtime: import("../src/runtime/blip2Runtime.js").Blip2Runtime }).runtime;
const features = await blip2.model.imageFeatures(pair.pixelValues!, 2);
const logits = await lastLogits();
let quality: { cosine: number; top1: string } | null = null;
if (values.reference && dtype === "fp32") fs.writeFileSync(values.reference, Buffer.from(logits.buffer, logits.byteOffset, logits.byteLength));
else if (values.reference && fs.existsSync(values.reference)) {
  const b = fs.readFileSync(values.reference);
  const ref = new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4);
  const vocab = ckpt.config.text.vocabSize;
  let cosine = 1;
  let agree = 0;
  const rows = ref.length / vocab;
  for (let r = 0; r < rows; r++) {
    let dot = 0, a = 0, q = 0, ia = 0, iq = 0;
    for (let v = 0; v < vocab; v++) {
      const x = ref[r * vocab + v]!;
      const y = logits[r * vocab + v]!;
      dot += x * y;
      a += x * x;
      q += y * y;
      if (x > ref[r * vocab + ia]!) ia = v;
      if (y > logits[r * vocab + iq]!) iq = v;
    }
    cosine = Math.min(cosine, dot / Math.sqrt(a * q));
    if (ia === iq) agree++;
  }
  quality = { cosine, top1: `${agree}/${rows}` };
}

const end = status();
console.log(JSON.stringify({
  dtype, threads, device, runs, tokens,
  loadS,
  vision1: spread(vision1),
  vision4PerImage: spread(vision4),
  ttft: spread(single.map((s) => s.ttft)),
  perToken: spread(single.map((s) => s.perToken)),
  total: spread(single.map((s) => s.total)),
  batch4Total: spread(batch.map((s) => s.total)),
  batch4PerToken: spread(batch.map((s) => s.perToken)),
  lmBytesPerToken: lmBytes,
  memory: { peakRss: end.hwm, peakAnon, fileRss: end.file },
  weightBytes: weightBytesOf(),
  quality,
}));
await blip2.dispose();

/** The language model's logits for the next token after each prompt. */
async function lastLogits(): Promise<Float32Array> {
  return (await rt.forward(pair.inputIds, pair.attentionMask, features, { lastOnly: true })).logits!.data as Float32Array;
}

/** Bytes of the weights the sessions use: the checkpoint's tensors in the precisions in use. */
function weightBytesOf(): number {
  return tensorsInUse(ckpt).reduce((sum, t) => sum + t.byteLength, 0);
}
