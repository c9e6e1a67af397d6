/**
 * Weight conversion on worker threads, one weight per job: converting a checkpoint is a one-time
 * cost of a minute or more of arithmetic per precision (OPT-2.7B: 3.8 billion weights at about 70
 * million a second per core into blocks), and spreading it over the cores shortens it; it also
 * keeps the event loop free meanwhile.
 */
import os from "node:os";
import type { Worker } from "node:worker_threads";
import { Blip2Error } from "../errors.js";
import type { TensorInfo } from "../io/safetensors.js";
import { startWorker } from "../thread.js";
import type { QuantizedMatrix } from "./blockQuant.js";
import type { ChannelQuantized } from "./channelQuant.js";

/** One weight to convert: into 8-bit channels or 4-bit blocks, or narrowed to float16. */
export type ConvertJob = { info: TensorInfo; to: "channels" } | { info: TensorInfo; to: "blocks"; blockSize: number } | { info: TensorInfo; to: "fp16" };

interface Pending {
  resolve: (result: unknown) => void;
  reject: (e: Error) => void;
}

/** At most this many threads: each holds one float32 weight (up to half a GB) while it works. */
const MAX_THREADS = 8;

export class QuantizePool {
  private readonly idle: Worker[] = [];
  private readonly all: Worker[] = [];
  private readonly queue: { job: ConvertJob; pending: Pending }[] = [];
  private readonly running = new Map<Worker, Pending>();
  private closed = false;

  constructor(readonly threads = Math.min(MAX_THREADS, os.availableParallelism())) {}

  /** A [N, K] weight in 8-bit channels (channelQuant.ts). */
  quantizeChannels(info: TensorInfo): Promise<ChannelQuantized> {
    return this.run({ info, to: "channels" });
  }

  /** A [N, K] weight in 4-bit blocks of `blockSize` along K (blockQuant.ts). */
  quantizeBlocks(info: TensorInfo, blockSize: number): Promise<QuantizedMatrix> {
    return this.run({ info, to: "blocks", blockSize });
  }

  /** A weight's values as float16 bits. */
  toHalf(info: TensorInfo): Promise<Uint16Array> {
    return this.run({ info, to: "fp16" });
  }

  private run<T>(job: ConvertJob): Promise<T> {
    return new Promise((resolve, reject) => {
      this.queue.push({ job, pending: { resolve: resolve as (r: unknown) => void, reject } });
      this.next();
    });
  }

  /** Ends the threads; jobs still waiting fail. */
  async close(): Promise<void> {
    this.closed = true;
    for (const { pending } of this.queue.splice(0)) pending.reject(new Blip2Error("the quantization threads were closed"));
    await Promise.all(this.all.map((w) => w.terminate()));
  }

  private next(): void {
    if (this.closed || !this.queue.length) return;
    const worker = this.idle.pop() ?? (this.all.length < this.threads ? this.spawn() : null);
    if (!worker) return;
    const { job, pending } = this.queue.shift()!;
    this.running.set(worker, pending);
    worker.postMessage(job);
  }

  private spawn(): Worker {
    const worker = startWorker(import.meta.url, "quantizeWorker");
    this.all.push(worker);
    worker.on("message", (m: { result?: unknown; error?: string }) => {
      const pending = this.running.get(worker)!;
      this.running.delete(worker);
      this.idle.push(worker);
      if (m.error !== undefined) pending.reject(new Blip2Error(m.error));
      else pending.resolve(m.result!);
      this.next();
    });
    worker.on("error", (err) => this.fail(worker, err));
    worker.on("exit", (code) => this.fail(worker, new Error(`it exited with code ${code}`)));
    return worker;
  }

  /** A thread that died takes its job with it; the others go on. (An `error` is followed by an `exit`: counted once.) */
  private fail(worker: Worker, err: Error): void {
    const at = this.all.indexOf(worker);
    if (at < 0) return;
    this.all.splice(at, 1);
    if (this.idle.includes(worker)) this.idle.splice(this.idle.indexOf(worker), 1);
    const pending = this.running.get(worker);
    this.running.delete(worker);
    pending?.reject(new Blip2Error(`a quantization thread failed: ${err.message}`));
    this.next();
  }
}
