/**
 * One queue in front of the model. The model runs one batch at a time (two generations at once
 * would only split the same cores), so requests wait here, in order, up to a bound past which they
 * are refused with 429 and a Retry-After.
 *
 * Jobs that share a batch key (greedy generations) decode together in a running batch whose rows
 * come and go: between two of its steps, the queued jobs of its key join it, up to `maxBatch` rows,
 * and a job whose row ended has left it and been answered. A queued job may start its work before
 * its turn (`arrive`: its image goes through the vision encoder as it comes, beside the batch's
 * decoding). Once a job of another kind waits at the head of the queue, the batch takes no one
 * else: it runs until its rows have ended, then that job runs. Batches that cannot take rows
 * once started (`wholeBatches`: T5's, whose rows must start together) take the queued jobs of
 * their key when they start. A job whose signal aborts (its client left, or its time limit passed)
 * is answered at once: it leaves the queue, or its row leaves the batch at the next step.
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

/** A batch that runs step by step; rows join it between steps. */
export interface RunningBatch<I, R> {
  /** Rows in it (joined and not ended, nor aborted). */
  readonly size: number;
  /** Whether a row may still join. */
  readonly open: boolean;
  /** Adds a row, which takes part from the next step; settles with its result when it ends. After `signal` aborts, it leaves at the next step. */
  join(item: I, signal: AbortSignal): Promise<R>;
  /** Runs one step of every row; a failure fails the batch. */
  step(): Promise<void>;
  /** Frees what it holds; called once it has no rows, or after a failure. */
  close(): Promise<void>;
}

export interface Batching<I, R> {
  /** Called as a job enters the queue: work it can do before its turn. */
  arrive?(item: I): void;
  /** A new batch for jobs of `key`. */
  open(key: string): RunningBatch<I, R>;
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
  /** A job started: how many jobs run with it (itself included). */
  onBatch?: (size: number) => void;
  /** The queue's length changed. */
  onQueue?: (length: number) => void;
}

interface Entry {
  key: string | null;
  signal: AbortSignal;
  /** Leaves the queue: removes its abort listener there. */
  start(): void;
  fail(err: unknown): void;
  settle(result: unknown): void;
  item?: unknown;
  run?: (signal: AbortSignal) => Promise<unknown>;
}

export class Scheduler<I, R> {
  private readonly queue: Entry[] = [];
  private readonly batching: Batching<I, R>;
  private running = false;
  /** Mean wall time of a job once started, for Retry-After. */
  private meanJobSeconds = 1;

  /** `batching`: how jobs of a key run together; a BatchRunner runs them as wholeBatches. */
  constructor(
    batching: Batching<I, R> | BatchRunner<I, R>,
    readonly limits: SchedulerLimits,
    private readonly events: SchedulerEvents = {},
  ) {
    this.batching = typeof batching === "function" ? wholeBatches(batching) : batching;
  }

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
        const seconds = Math.max(1, Math.ceil(this.meanJobSeconds * (1 + this.queue.length / this.limits.maxBatch)));
        return reject(new HttpError(429, "queue_full", `the server is busy: ${this.queue.length} requests are waiting (the limit); retry in ${seconds} s`, { "retry-after": String(seconds) }));
      }
      let settled = false;
      const onAbort = () => {
        const i = this.queue.indexOf(entry);
        if (i >= 0) this.queue.splice(i, 1);
        this.events.onQueue?.(this.queue.length);
        entry.fail(job.signal.reason);
      };
      const entry: Entry = {
        key: job.key,
        signal: job.signal,
        start: () => job.signal.removeEventListener("abort", onAbort),
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
      job.signal.addEventListener("abort", onAbort, { once: true });
      this.queue.push(entry);
      this.events.onQueue?.(this.queue.length);
      if (job.key !== null) this.batching.arrive?.(entry.item as I);
      void this.drain();
    });
  }

  private async drain(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (this.queue.length) {
        const head = this.queue[0]!;
        if (head.key === null) await this.runSolo(head);
        else await this.runBatch(head.key);
      }
    } finally {
      this.running = false;
    }
  }

  private async runSolo(entry: Entry): Promise<void> {
    this.take(entry);
    this.events.onBatch?.(1);
    // Its run is given its signal, to stop at its next step.
    await this.answer(entry, async () => {
      entry.signal.throwIfAborted();
      return entry.run!(entry.signal);
    });
  }

  /** A batch of `key`'s jobs, joined by more between its steps while it is open and its key heads the queue. */
  private async runBatch(key: string): Promise<void> {
    const batch = this.batching.open(key);
    const members = new Set<Entry>();
    try {
      while (true) {
        this.admit(batch, key, members);
        if (batch.size === 0) break;
        await batch.step();
      }
    } catch (err) {
      for (const e of members) e.fail(err);
    } finally {
      await batch.close().catch(() => undefined);
    }
  }

  /** Queued jobs of `key` join `batch`, in order, up to maxBatch rows, while a job of its key heads the queue. */
  private admit(batch: RunningBatch<I, R>, key: string, members: Set<Entry>): void {
    if (!batch.open || this.queue[0]?.key !== key) return;
    for (let i = 0; i < this.queue.length && batch.size < this.limits.maxBatch; ) {
      const entry = this.queue[i]!;
      if (entry.key !== key) {
        i++;
        continue;
      }
      this.take(entry);
      members.add(entry);
      // The batch drops its row at its next step once its signal aborts.
      void this.answer(entry, () => batch.join(entry.item as I, entry.signal)).finally(() => members.delete(entry));
      this.events.onBatch?.(batch.size);
    }
  }

  /** Takes `entry` out of the queue: it runs now. */
  private take(entry: Entry): void {
    this.queue.splice(this.queue.indexOf(entry), 1);
    entry.start();
    this.events.onQueue?.(this.queue.length);
  }

  /**
   * Settles a started `entry` with what `work` gives, or fails it; answered at once when its
   * signal aborts meanwhile. Its time goes into the mean that Retry-After is made of.
   */
  private async answer(entry: Entry, work: () => Promise<unknown>): Promise<void> {
    const leave = () => entry.fail(entry.signal.reason);
    entry.signal.addEventListener("abort", leave, { once: true });
    const started = performance.now();
    try {
      entry.settle(await work());
    } catch (err) {
      entry.fail(err);
    } finally {
      entry.signal.removeEventListener("abort", leave);
      this.meanJobSeconds = 0.8 * this.meanJobSeconds + 0.2 * ((performance.now() - started) / 1000);
    }
  }
}

/**
 * Batches that run their rows in one go (a BatchRunner): they take their rows before their one
 * step. The run is told to stop once every row has left.
 */
export function wholeBatches<I, R>(runner: BatchRunner<I, R>): Batching<I, R> {
  return {
    open(): RunningBatch<I, R> {
      const rows: { item: I; signal: AbortSignal; resolve: (r: R) => void; reject: (err: unknown) => void }[] = [];
      let started = false;
      let finished = false;
      return {
        get size() {
          return finished ? 0 : rows.filter((r) => !r.signal.aborted).length;
        },
        get open() {
          return !started;
        },
        join(item, signal) {
          return new Promise<R>((resolve, reject) => rows.push({ item, signal, resolve, reject }));
        },
        async step() {
          started = true;
          const stop = new AbortController();
          const leave = () => rows.every((r) => r.signal.aborted) && stop.abort(rows.at(-1)?.signal.reason);
          for (const r of rows) r.signal.addEventListener("abort", leave, { once: true });
          try {
            leave();
            if (stop.signal.aborted) return;
            const results = await runner(rows.map((r) => r.item), stop.signal);
            results.forEach((r, i) => (r instanceof Error ? rows[i]!.reject(r) : rows[i]!.resolve(r)));
          } catch (err) {
            for (const r of rows) r.reject(err);
          } finally {
            finished = true;
            for (const r of rows) r.signal.removeEventListener("abort", leave);
          }
        },
        async close() {},
      };
    },
  };
}
