/** A worker thread of quantize/pool.ts: reads one weight from its file and quantizes it. */
import { parentPort } from "node:worker_threads";
import { describeError } from "../errors.js";
import { readTensorF32 } from "../io/safetensors.js";
import { quantizeMatrix } from "./blockQuant.js";
import type { QuantizeJob } from "./pool.js";

parentPort!.on("message", ({ info, bits, blockSize }: QuantizeJob) => {
  try {
    const [n, k] = info.shape as [number, number];
    const m = quantizeMatrix(readTensorF32(info), n, k, bits, blockSize);
    parentPort!.postMessage({ result: m }, [m.weight.buffer, m.scales.buffer, m.zeroPoints.buffer] as ArrayBuffer[]);
  } catch (err) {
    parentPort!.postMessage({ error: describeError(err) });
  }
});
