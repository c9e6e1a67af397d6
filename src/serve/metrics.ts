/** The server's Prometheus metrics (prom-client), in a registry of its own per server. */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";

export class ServerMetrics {
  readonly registry = new Registry();
  readonly requests = new Counter({ name: "blip2_requests_total", help: "HTTP requests answered, by route and status", labelNames: ["route", "status"], registers: [this.registry] });
  readonly latency = new Histogram({
    name: "blip2_request_duration_seconds",
    help: "Time from a request's arrival to its answer's end, by route",
    labelNames: ["route"],
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
    registers: [this.registry],
  });
  readonly queue = new Gauge({ name: "blip2_queue_length", help: "Requests waiting for the model", registers: [this.registry] });
  readonly batchSize = new Histogram({ name: "blip2_batch_size", help: "Requests run together in one batch", buckets: [1, 2, 3, 4, 6, 8, 12, 16, 32], registers: [this.registry] });
  readonly tokens = new Counter({ name: "blip2_generated_tokens_total", help: "Tokens generated", registers: [this.registry] });
  readonly tokensPerSecond = new Gauge({ name: "blip2_tokens_per_second", help: "Tokens per second of the last batch (all its rows)", registers: [this.registry] });
  readonly chats = new Gauge({ name: "blip2_open_chats", help: "Chats open (not deleted or expired)", registers: [this.registry] });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: "blip2_" });
  }

  /** A batch of `rows` generated `tokens` in `ms`. */
  generated(tokens: number, ms: number): void {
    this.tokens.inc(tokens);
    if (ms > 0) this.tokensPerSecond.set((tokens * 1000) / ms);
  }
}
