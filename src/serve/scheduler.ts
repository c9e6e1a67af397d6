/**
 * One queue in front of the model. The model runs one batch at a time (two generations at once
 * would only split the same cores), so requests wait here, in order, up to a bound past which they
 * are refused with 429 and a Retry-After. Jobs that share a batch key (greedy generations with the
 * same options) are taken from the queue together, up to `maxBatch`, and decode as one batch: rows
 * cost far less than whole generations. A job whose signal aborts (its client left, or its time
 * limit passed) leaves the queue at once; in a running batch it is answered at once, and the batch
 * stops when all its jobs have left.
 *
 * What this does not do: a request that arrives while a batch runs waits for the next batch
 * instead of joining the running one at its next step (that needs a key/value cache whose rows
 * come and go, which the runtime does not have).
 */
import { HttpError } from "./errors.js";

/** A job that runs alone (a chat turn, an index search), given a signal that aborts it. */
export interface SoloJob<R> {
  key: null;
  signal: AbortSignal;
  run(signal: AbortSignal): Promise<R>;
}

/** A job that may decode with others of the same key. */
export interface BatchJob<I> {
  key: string;
  signal: AbortSignal;
  item: I;
}

/** Runs a batch of items; one result (or error) per item, in order. */
export type BatchRunner<I, R> = (items: I[], signal: AbortSignal) => Promise<(R | Error)[]>;

export interface SchedulerLimits {
  /** Jobs waiting (not running) at most. */
  maxQueue: number;
  /** Jobs decoding together at most. */
  maxBatch: number;
}

export interface SchedulerEvents {
  /** A batch (or solo job) started: how many jobs it has. */
  onBatch?: (size: number) => void;
  /** The queue's length changed. */
  onQueue?: (length: number) => void;
}

interface Entry {
  key: string | null;
  signal: AbortSignal;
  start(): void;
  fail(err: unknown): void;
  /** Set while in the queue: removes its abort listener. */
  detach?: () => void;
  item?: unknown;
  settle?: (result: unknown) => void;
  run?: (signal: AbortSignal) => Promise<unknown>;
}

export class Scheduler<I, R> {
  private readonly queue: Entry[] = [];
  private running = false;
  /** Mean wall time of a batch, for Retry-After. */
  private meanBatchSeconds = 1;

  constructor(
    private readonly runBatch: BatchRunner<I, R>,
    readonly limits: SchedulerLimits,
    private readonly events: SchedulerEvents = {},
  ) {}

  get queued(): number {
    return this.queue.length;
  }

  /** Runs `job` when its turn comes (with others of its key). Rejects with 429 when the queue is full. */
  submit<T>(job: SoloJob<T>): Promise<T>;
  submit(job: BatchJob<I>): Promise<R>;
  submit(job: SoloJob<unknown> | BatchJob<I>): Promise<unknown> {
    return new Promise((resolve, reject) => {
      if (job.signal.aborted) return reject(job.signal.reason);
      if (this.queue.length >= this.limits.maxQueue) {
        const seconds = Math.max(1, Math.ceil(this.meanBatchSeconds * (1 + this.queue.length / this.limits.maxBatch)));
        return reject(new HttpError(429, "queue_full", `the server is busy: ${this.queue.length} requests are waiting (the limit); retry in ${seconds} s`, { "retry-after": String(seconds) }));
      }
      let settled = false;
      const entry: Entry = {
        key: job.key,
        signal: job.signal,
        start: () => entry.detach?.(),
        fail: (err) => {
          if (settled) return;
          settled = true;
          reject(err);
        },
        settle: (result) => {
          if (settled) return;
          settled = true;
          resolve(result);
        },
        ...(job.key === null ? { run: (job as SoloJob<unknown>).run } : { item: (job as BatchJob<I>).item }),
      };
      const onAbort = () => {
        const i = this.queue.indexOf(entry);
        if (i >= 0) this.queue.splice(i, 1);
        this.events.onQueue?.(this.queue.length);
        entry.fail(job.signal.reason);
      };
      job.signal.addEventListener("abort", onAbort, { once: true });
      entry.detach = () => job.signal.removeEventListener("abort", onAbort);
      this.queue.push(entry);
      this.events.onQueue?.(this.queue.length);
      void this.drain();
    });
  }

  private async drain(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (this.queue.length) {
        const batch = this.take();
        this.events.onQueue?.(this.queue.length);
        this.events.onBatch?.(batch.length);
        const started = performance.now();
        await this.execute(batch);
        const seconds = (performance.now() - started) / 1000;
        this.meanBatchSeconds = 0.8 * this.meanBatchSeconds + 0.2 * seconds;
      }
    } finally {
      this.running = false;
    }
  }

  /** The head of the queue, and when it can be batched the queued jobs of its key after it. */
  private take(): Entry[] {
    const head = this.queue.shift()!;
    const batch = [head];
    if (head.key !== null) {
      for (let i = 0; i < this.queue.length && batch.length < this.limits.maxBatch; ) {
        if (this.queue[i]!.key === head.key) batch.push(...this.queue.splice(i, 1));
        else i++;
      }
    }
    for (const e of batch) e.start();
    return batch;
  }

  private async execute(batch: Entry[]): Promise<void> {
    // The batch runs while any of its jobs still wants it; each job that leaves is answered now.
    const stop = new AbortController();
    let left = 0;
    const leave = (e: Entry) => {
      e.fail(e.signal.reason);
      if (++left === batch.length) stop.abort(e.signal.reason);
    };
    const listeners = batch.map((e) => {
      const listener = () => leave(e);
      if (e.signal.aborted) leave(e);
      else e.signal.addEventListener("abort", listener, { once: true });
      return () => e.signal.removeEventListener("abort", listener);
    });
    try {
      if (stop.signal.aborted) return;
      if (batch[0]!.key === null) {
        batch[0]!.settle!(await batch[0]!.run!(stop.signal));
      } else {
        const results = await this.runBatch(batch.map((e) => e.item as I), stop.signal);
        results.forEach((r, i) => (r instanceof Error ? batch[i]!.fail(r) : batch[i]!.settle!(r)));
      }
    } catch (err) {
      for (const e of batch) e.fail(err);
    } finally {
      for (const remove of listeners) remove();
    }
  }
}
