/**
 * On a machine with a GPU: every tiny fixture in every dtype on the device against the CPU, with
 * greedy and beam generations, ITC similarities and ITM probabilities compared, and load and run
 * times. A report, not a test: quantized kernels differ between devices, so generations may
 * differ where two tokens are close; the float32 parity test is `test/runtime.test.ts`.
 * Exits with 1 when the device is not available (the runtime would fall back to the CPU).
 *
 * npm run check:gpu [-- --device webgpu|cuda]
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { Blip2, Blip2ForImageTextRetrieval } from "../src/index.js";
import { isDevice, usableDevice, type Device } from "../src/runtime/session.js";

const { values } = parseArgs({ options: { device: { type: "string" } } });
const device = values.device ?? "webgpu";
if (!isDevice(device) || device === "cpu") {
  console.error(`--device: expected webgpu or cuda, got ${JSON.stringify(device)}`);
  process.exit(2);
}
if ((await usableDevice(device)) !== device) process.exit(1);

const fixture = (...p: string[]) => new URL(path.join("../test/fixtures", ...p), import.meta.url).pathname;
const images = ["image0.png", "image1.png", "image2.png"].map((f) => fixture(f));
const blip2Cache = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-gpu-check-"));
const dtypes = ["fp32", "q8", "q4"] as const;
const maxDiff = (a: number[], b: number[]) => Math.max(...a.map((x, i) => Math.abs(x - b[i]!)));
const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);
const timed = async <T>(f: () => Promise<T>): Promise<[T, number]> => {
  const t = performance.now();
  return [await f(), Math.round(performance.now() - t)];
};

async function captions(name: string, dtype: (typeof dtypes)[number], on: Device) {
  const [model, loadMs] = await timed(async () => {
    const m = await Blip2.load(fixture(name), { device: on, dtype, blip2Cache });
    await m.model.prepare(); // sessions are otherwise created on first use
    return m;
  });
  const [ids, runMs] = await timed(async () => ({
    greedy: (await model.captionAll(images, { maxNewTokens: 10 })).map((r) => r.ids),
    beam: (await model.captionAll(images, { maxNewTokens: 10, numBeams: 3, prompt: "a photo of" })).map((r) => r.ids),
  }));
  await model.dispose();
  return { ...ids, loadMs, runMs };
}

async function scores(dtype: (typeof dtypes)[number], on: Device) {
  const model = await Blip2ForImageTextRetrieval.fromPretrained(fixture("tiny-blip2-itm"), { device: on, dtype, blip2Cache });
  const texts = ["a cat on a mat", "two dogs", "a red car"];
  const result = { itc: (await model.similarity(images, texts)).flat(), itm: (await model.match(images, texts)).probability.flat() };
  await model.dispose();
  return result;
}

for (const name of ["tiny-blip2-opt", "tiny-blip2-t5"])
  for (const dtype of dtypes) {
    const cpu = await captions(name, dtype, "cpu");
    const gpu = await captions(name, dtype, device);
    console.log(`${name} ${dtype}: greedy ${same(cpu.greedy, gpu.greedy) ? "same" : "DIFFERENT"}, beam ${same(cpu.beam, gpu.beam) ? "same" : "DIFFERENT"}; load ${cpu.loadMs}/${gpu.loadMs} ms, run ${cpu.runMs}/${gpu.runMs} ms (cpu/${device})`);
  }
for (const dtype of dtypes) {
  const cpu = await scores(dtype, "cpu");
  const gpu = await scores(dtype, device);
  console.log(`tiny-blip2-itm ${dtype}: ITC max |diff| ${maxDiff(cpu.itc, gpu.itc).toExponential(2)}, ITM probability max |diff| ${maxDiff(cpu.itm, gpu.itm).toExponential(2)}`);
}
fs.rmSync(blip2Cache, { recursive: true, force: true });
