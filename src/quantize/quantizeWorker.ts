/** A worker thread of quantize/pool.ts: reads one weight from its file and converts it. */
import { parentPort } from "node:worker_threads";
import { describeError } from "../errors.js";
import { floatToHalf, readTensorF32 } from "../io/safetensors.js";
import { quantizeMatrix } from "./blockQuant.js";
import { quantizeChannels } from "./channelQuant.js";
import type { ConvertJob } from "./pool.js";

parentPort!.on("message", (job: ConvertJob) => {
  try {
    const w = readTensorF32(job.info);
    if (job.to === "fp16") {
      const half = Uint16Array.from(w, floatToHalf);
      parentPort!.postMessage({ result: half }, [half.buffer]);
      return;
    }
    const [n, k] = job.info.shape as [number, number];
    if (job.to === "channels") {
      const m = quantizeChannels(w, n, k);
      parentPort!.postMessage({ result: m }, [m.weight.buffer, m.scales.buffer] as ArrayBuffer[]);
      return;
    }
    const m = quantizeMatrix(w, n, k, job.blockSize);
    parentPort!.postMessage({ result: m }, [m.weight.buffer, m.scales.buffer, m.zeroPoints.buffer] as ArrayBuffer[]);
  } catch (err) {
    parentPort!.postMessage({ error: describeError(err) });
  }
});
