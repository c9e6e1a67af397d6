/**
 * `blip2 serve`'s HTTP server (Fastify): captions, questions, chats, image-text matching and index
 * search as JSON routes, OpenAI's chat completions and models, health and Prometheus metrics, and
 * the web page. One loaded model serves every request through one queue (see scheduler.ts).
 *
 * Safe by default: it listens on loopback; elsewhere it needs an API key; bodies and images have
 * limits; remote images are not fetched unless allowed; thumbnails come from the index only; CORS
 * is off unless origins are named; errors are JSON with a stable code and never a stack trace.
 */
import cors from "@fastify/cors";
import multipart from "@fastify/multipart";
import fastifyStatic from "@fastify/static";
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import { randomUUID, timingSafeEqual } from "node:crypto";
import fs from "node:fs";
import { fileURLToPath } from "node:url";
import type { Blip2ForImageTextRetrieval } from "../api/retrieval.js";
import { vqaPrompt, type Blip2 } from "../api/tasks.js";
import { Blip2Error } from "../errors.js";
import { checkPromptLength } from "../generation/limits.js";
import type { GenerationOptions } from "../generation/options.js";
import type { ImageStore } from "../search/store.js";
import { ChatStore } from "./chats.js";
import { errorBody, HttpError, toErrorResponse } from "./errors.js";
import { batchKey, generationBatching, generationRunner, TextStream, type GenItem, type GenResult } from "./generation.js";
import { requestImage, type ImageLimits } from "./images.js";
import { ServerMetrics } from "./metrics.js";
import { completionSchema, planCompletion, type CompletionRequest } from "./openai.js";
import { Scheduler } from "./scheduler.js";
import { searchIndex, Thumbnails } from "./search.js";

export interface ServeOptions {
  /** The captioning / question answering model (caption, ask, chats, chat completions). */
  blip2?: Blip2;
  /** The image-text retrieval model (match, search). */
  retrieval?: Blip2ForImageTextRetrieval;
  /** The index searched by /v1/search (built with `blip2 index`, with `retrieval`'s model). */
  store?: ImageStore;
  /** Names shown by /health, /v1/models and the page. */
  modelName?: string;
  retrievalName?: string;
  dtype?: string;
  host?: string;
  /** Bearer token every /v1 route and /metrics need; required off loopback. */
  apiKey?: string;
  /** Origins allowed by CORS (none by default: browsers may call the API from its own page only). */
  corsOrigins?: string[];
  allowRemoteImages?: boolean;
  /** Largest request body, bytes. */
  maxBodyBytes?: number;
  /** Largest image, width × height. */
  maxImagePixels?: number;
  /** Requests waiting for the model at most; past it, 429. */
  maxQueue?: number;
  /** Generations decoded together at most (1: one at a time). */
  maxBatch?: number;
  /** Each request's time limit, ms (queue and run). */
  timeoutMs?: number;
  /** Idle chats are closed after this, ms. */
  chatTtlMs?: number;
  maxChats?: number;
  /** Folder of the built web page (null: no page). */
  webRoot?: string | null;
  /** Fastify's request log (off by default). */
  logger?: boolean;
}

export const SERVE_DEFAULTS = {
  host: "127.0.0.1",
  port: 8080,
  maxBodyBytes: 20 * 1024 * 1024,
  maxImagePixels: 40_000_000,
  maxQueue: 64,
  maxBatch: 8,
  timeoutMs: 120_000,
  chatTtlMs: 10 * 60_000,
  maxChats: 64,
};

/** 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach. */
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || host === "[::1]" || /^127(\.\d{1,3}){3}$/.test(host) || host === "::ffff:127.0.0.1";
}

/** The generation options of the JSON routes, in transformers' names. */
const generationProperties = {
  max_new_tokens: { type: "integer", minimum: 1, maximum: 4096 },
  min_new_tokens: { type: "integer", minimum: 0 },
  num_beams: { type: "integer", minimum: 1, maximum: 16 },
  length_penalty: { type: "number" },
  repetition_penalty: { type: "number", exclusiveMinimum: 0 },
  no_repeat_ngram_size: { type: "integer", minimum: 0 },
  do_sample: { type: "boolean" },
  temperature: { type: "number", minimum: 0 },
  top_k: { type: "integer", minimum: 0 },
  top_p: { type: "number", exclusiveMinimum: 0, maximum: 1 },
  seed: { type: "integer", minimum: 0 },
  stream: { type: "boolean" },
} as const;

const GENERATION_FIELDS: Record<string, keyof GenerationOptions> = {
  max_new_tokens: "maxNewTokens",
  min_new_tokens: "minNewTokens",
  num_beams: "numBeams",
  length_penalty: "lengthPenalty",
  repetition_penalty: "repetitionPenalty",
  no_repeat_ngram_size: "noRepeatNgramSize",
  do_sample: "doSample",
  temperature: "temperature",
  top_k: "topK",
  top_p: "topP",
  seed: "seed",
};

function generationOf(body: Record<string, unknown>): GenerationOptions {
  const out: Record<string, unknown> = {};
  for (const [field, name] of Object.entries(GENERATION_FIELDS)) if (body[field] !== undefined) out[name] = body[field];
  return out as GenerationOptions;
}

/** A body schema: the image (an upload or a string, checked by images.ts), these fields, nothing else. */
function bodySchema(required: string[], properties: Record<string, object>) {
  return { body: { type: "object", required, additionalProperties: false, properties } };
}

type Body = Record<string, unknown>;

export async function createServer(options: ServeOptions): Promise<FastifyInstance> {
  const o = { ...SERVE_DEFAULTS, ...options };
  if (!isLoopback(o.host) && !o.apiKey) {
    throw new Blip2Error(`refusing to listen on ${o.host} without --api-key: other machines could use the model; give --api-key KEY (clients send "Authorization: Bearer KEY"), or listen on 127.0.0.1`);
  }
  const app = Fastify({
    logger: o.logger ?? false,
    bodyLimit: o.maxBodyBytes,
    // Unknown fields are refused (not silently dropped), so a typo in an option is an error.
    ajv: { customOptions: { removeAdditional: false, coerceTypes: "array", allErrors: false } },
    return503OnClosing: true,
  });
  const metrics = new ServerMetrics();
  const limits: ImageLimits = { maxPixels: o.maxImagePixels, maxBytes: o.maxBodyBytes, allowRemote: o.allowRemoteImages ?? false };
  const scheduler = new Scheduler<GenItem, GenResult>(o.blip2 ? generationBatching(o.blip2) : async () => [], { maxQueue: o.maxQueue, maxBatch: o.maxBatch }, {
    onQueue: (n) => metrics.queue.set(n),
    onBatch: (n) => metrics.batchSize.observe(n),
  });
  const chats = new ChatStore(o.chatTtlMs, o.maxChats, (n) => metrics.chats.set(n));
  const thumbnails = o.store ? new Thumbnails(o.store) : null;
  app.addHook("onClose", async () => chats.close());

  await app.register(multipart, { attachFieldsToBody: "keyValues", limits: { fileSize: o.maxBodyBytes, files: 16, fields: 64, fieldSize: o.maxBodyBytes } });
  if (o.corsOrigins?.length) await app.register(cors, { origin: o.corsOrigins, methods: ["GET", "POST", "DELETE"], allowedHeaders: ["content-type", "authorization"] });

  // Metrics and the API key, for every request, streamed ones included.
  app.addHook("onRequest", async (request, reply) => {
    const started = performance.now();
    reply.raw.once("finish", () => {
      const route = request.routeOptions.url ?? "unmatched";
      metrics.requests.inc({ route, status: String(reply.raw.statusCode) });
      metrics.latency.observe({ route }, (performance.now() - started) / 1000);
    });
    if (o.apiKey && (request.url.startsWith("/v1/") || request.url.startsWith("/metrics")) && request.method !== "OPTIONS" && !authorized(request, o.apiKey)) {
      reply.header("www-authenticate", "Bearer");
      throw new HttpError(401, "invalid_api_key", "missing or wrong API key: send \"Authorization: Bearer KEY\"");
    }
  });

  app.setErrorHandler((err, request, reply) => {
    const [status, body] = toErrorResponse(err);
    if (status >= 500 && !(err instanceof HttpError)) request.log.error(err);
    if (err instanceof HttpError) reply.headers(err.headers);
    return reply.code(status).type("application/json").send(body);
  });
  app.setNotFoundHandler((request, reply) => reply.code(404).send(errorBody(404, "not_found", `no route ${request.method} ${request.url.split("?")[0]}`)));

  const needModel = (): Blip2 => {
    if (!o.blip2) throw new HttpError(404, "no_model", "this server has no captioning model (start it with --model)");
    return o.blip2;
  };
  const needIndex = () => {
    if (!o.retrieval || !o.store || !thumbnails) throw new HttpError(404, "no_index", "this server has no index to search (start it with --index DB)");
    return { retrieval: o.retrieval, store: o.store, thumbnails };
  };
  const needRetrieval = (): Blip2ForImageTextRetrieval => {
    if (!o.retrieval) throw new HttpError(404, "no_retrieval_model", "this server has no image-text matching model (start it with --index DB or --retrieval-model M)");
    return o.retrieval;
  };

  /** A signal that aborts when the client leaves or the request's time is up. */
  function requestSignal(reply: FastifyReply): AbortSignal {
    const control = new AbortController();
    const timer = setTimeout(() => control.abort(new HttpError(504, "timeout", `the request took longer than this server's limit of ${o.timeoutMs / 1000} s`)), o.timeoutMs);
    timer.unref();
    reply.raw.once("close", () => {
      clearTimeout(timer);
      if (!reply.raw.writableFinished) control.abort(new HttpError(499, "client_closed", "the client closed the connection"));
    });
    return control.signal;
  }

  /** Runs one generation through the queue, in a batch with others when its options allow (see generation.ts). */
  async function generate(blip2: Blip2, item: GenItem, signal: AbortSignal): Promise<GenResult> {
    const promptTokens = blip2.processor.tokenize([item.prompt]).inputIds[0]!.length;
    // A bad option or a prompt too long fails here, before queueing.
    checkPromptLength(blip2.model.config, promptTokens, blip2.model.generationConfig(item.options).maxNewTokens);
    const key = batchKey(blip2, item.options, promptTokens);
    const result = await (key === null
      ? scheduler.submit({ key: null, signal, run: async (s) => first(await generationRunner(blip2)([item], s)) })
      : scheduler.submit({ key, signal, item }));
    metrics.generated(result.completionTokens, result.runMs / result.batchSize);
    return result;
  }

  /** A caption or an answer: JSON, or server-sent events `token` ({text}) then `done` (the JSON). */
  async function answer(request: FastifyRequest, reply: FastifyReply, prompt: string) {
    const blip2 = needModel();
    const body = request.body as Body;
    const arrived = performance.now();
    const image = await requestImage(body.image, "image", limits);
    const signal = requestSignal(reply);
    const respond = (r: GenResult) => ({
      text: r.text,
      ids: r.ids,
      finish_reason: r.finishReason,
      timings: { total_ms: round(performance.now() - arrived), run_ms: round(r.runMs), batch_size: r.batchSize, new_tokens: r.completionTokens },
    });
    if (body.stream !== true) return respond(await generate(blip2, { image, prompt, options: generationOf(body) }, signal));
    const sse = openEvents(reply);
    try {
      const r = await generate(blip2, { image, prompt, options: generationOf(body), onText: (text) => sse.send("token", { text }) }, signal);
      sse.send("done", respond(r));
    } catch (err) {
      sse.error(err);
    }
    sse.end();
  }

  const captionProps = { image: {}, prompt: { type: "string", maxLength: 4000 }, ...generationProperties };
  app.post("/v1/caption", { schema: bodySchema(["image"], captionProps) }, (request, reply) => answer(request, reply, ((request.body as Body).prompt as string | undefined) ?? ""));
  const askProps = { image: {}, question: { type: "string", minLength: 1, maxLength: 4000 }, ...generationProperties };
  app.post("/v1/ask", { schema: bodySchema(["image", "question"], askProps) }, (request, reply) => {
    const question = ((request.body as Body).question as string).trim();
    if (!question) throw new HttpError(400, "invalid_request", "question: empty");
    return answer(request, reply, vqaPrompt(question));
  });

  // Chats: the image is encoded once; each message is a turn of the demo's conversation.
  app.post("/v1/chats", { schema: bodySchema(["image"], { image: {}, context_window: { type: "integer", minimum: 8 } }) }, async (request, reply) => {
    const blip2 = needModel();
    const body = request.body as Body;
    chats.checkRoom();
    const image = await requestImage(body.image, "image", limits);
    const chat = await scheduler.submit({ key: null, signal: requestSignal(reply), run: () => blip2.chat(image, { contextWindow: body.context_window as number | undefined }) });
    const id = chats.add(chat);
    return reply.code(201).send({ id, context_window: chat.contextWindow, expires_after_idle_s: o.chatTtlMs / 1000 });
  });
  const messageProps = { content: { type: "string", minLength: 1, maxLength: 4000 }, ...generationProperties };
  app.post("/v1/chats/:id/messages", { schema: bodySchema(["content"], messageProps) }, async (request, reply) => {
    const blip2 = needModel();
    const chat = chats.get((request.params as { id: string }).id);
    const body = request.body as Body;
    const question = (body.content as string).trim();
    if (!question) throw new HttpError(400, "invalid_request", "content: empty");
    const options = generationOf(body);
    blip2.model.generationConfig(options);
    const signal = requestSignal(reply);
    const turn = async (onText?: (text: string) => void) => {
      const stream = new TextStream(blip2, { onText });
      const started = performance.now();
      let tokens = 0;
      const reply = await scheduler.submit({
        key: null,
        signal,
        run: (s) => chat.ask(question, { ...options, signal: s, onToken: (t: number[], finished: boolean[]) => (tokens++, stream.push(t[0]!, finished[0]!)) } as GenerationOptions),
      });
      stream.emit(reply.answer);
      metrics.generated(tokens, performance.now() - started);
      return { answer: reply.answer, dropped_turns: reply.droppedTurns, turns: chat.history.length };
    };
    if (body.stream !== true) return turn();
    const sse = openEvents(reply);
    try {
      sse.send("done", await turn((text) => sse.send("token", { text })));
    } catch (err) {
      sse.error(err);
    }
    sse.end();
  });
  app.delete("/v1/chats/:id", async (request, reply) => {
    await chats.delete((request.params as { id: string }).id);
    return reply.code(204).send();
  });

  app.post("/v1/match", { schema: bodySchema(["images", "texts"], { images: {}, texts: { anyOf: [{ type: "string", minLength: 1 }, { type: "array", minItems: 1, maxItems: 64, items: { type: "string", minLength: 1 } }] } }) }, async (request, reply) => {
    const retrieval = needRetrieval();
    const body = request.body as Body;
    const list = Array.isArray(body.images) ? body.images : [body.images];
    if (!list.length || list.length > 16) throw new HttpError(400, "invalid_request", `images: give 1 to 16 images, got ${list.length}`);
    const images = await Promise.all(list.map((v, i) => requestImage(v, `images[${i}]`, limits)));
    const texts = (Array.isArray(body.texts) ? body.texts : [body.texts]) as string[];
    return scheduler.submit({
      key: null,
      signal: requestSignal(reply),
      run: async () => {
        const itm = await retrieval.match(images, texts);
        return { itm: itm.probability, itc: await retrieval.similarity(images, texts) };
      },
    });
  });

  app.post("/v1/search", { schema: bodySchema(["text"], { text: { type: "string", minLength: 1, maxLength: 2000 }, k: { type: "integer", minimum: 1, maximum: 100 }, rerank: { type: "integer", minimum: 0, maximum: 100 } }) }, async (request, reply) => {
    const { retrieval, store } = needIndex();
    const body = request.body as { text: string; k?: number; rerank?: number };
    const results = await scheduler.submit({ key: null, signal: requestSignal(reply), run: () => searchIndex(retrieval, store, body.text, body.k ?? 10, body.rerank ?? 0) });
    return { results: results.map((r) => ({ ...r, thumbnail: `/v1/thumbnails?path=${encodeURIComponent(r.path)}` })) };
  });
  app.get("/v1/thumbnails", { schema: { querystring: { type: "object", required: ["path"], properties: { path: { type: "string", minLength: 1 }, size: { type: "integer", minimum: 16, maximum: 1024 } } } } }, async (request, reply) => {
    const { thumbnails: thumbs } = needIndex();
    const q = request.query as { path: string; size?: number };
    return reply.type("image/jpeg").header("cache-control", "private, max-age=300").send(await thumbs.jpeg(q.path, q.size ?? 256));
  });

  // OpenAI-compatible routes.
  app.get("/v1/models", async () => ({
    object: "list",
    data: [o.blip2 && o.modelName, o.retrieval && o.retrievalName].filter((m): m is string => Boolean(m)).map((id) => ({ id, object: "model", created: 0, owned_by: "blip2" })),
  }));
  app.post("/v1/chat/completions", { schema: { body: completionSchema } }, async (request, reply) => {
    const blip2 = needModel();
    const body = request.body as CompletionRequest;
    const plan = planCompletion(body);
    const image = await requestImage(plan.image, "messages: image_url", limits);
    const signal = requestSignal(reply);
    const id = `chatcmpl-${randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const model = o.modelName ?? "blip2";
    const usage = (r: GenResult) => ({ prompt_tokens: r.promptTokens, completion_tokens: r.completionTokens, total_tokens: r.promptTokens + r.completionTokens });
    if (body.stream !== true) {
      const r = await generate(blip2, { image, prompt: plan.prompt, options: plan.options, stop: plan.stop }, signal);
      return { id, object: "chat.completion", created, model, choices: [{ index: 0, message: { role: "assistant", content: r.text }, finish_reason: r.finishReason, logprobs: null }], usage: usage(r) };
    }
    const sse = openEvents(reply);
    const chunk = (delta: object, finish: string | null, extra: object = {}) => sse.data({ id, object: "chat.completion.chunk", created, model, choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }], ...extra });
    chunk({ role: "assistant", content: "" }, null);
    try {
      const r = await generate(blip2, { image, prompt: plan.prompt, options: plan.options, stop: plan.stop, onText: (text) => chunk({ content: text }, null) }, signal);
      chunk({}, r.finishReason, { usage: usage(r) });
      sse.raw("data: [DONE]\n\n");
    } catch (err) {
      sse.data(toErrorResponse(err)[1]);
    }
    sse.end();
  });

  app.get("/health", async () => ({
    status: "ok",
    model: o.blip2 ? (o.modelName ?? null) : null,
    dtype: o.dtype ?? "fp32",
    retrieval_model: o.retrieval ? (o.retrievalName ?? null) : null,
    indexed_images: o.store?.count() ?? null,
    queue: scheduler.queued,
    max_batch: o.maxBatch,
    chats: chats.size,
    tokens_per_second: (await metrics.tokensPerSecond.get()).values[0]?.value ?? null,
  }));
  app.get("/metrics", async (_request, reply) => reply.type(metrics.registry.contentType).send(await metrics.registry.metrics()));

  if (o.webRoot && fs.existsSync(o.webRoot)) {
    await app.register(fastifyStatic, { root: o.webRoot, prefix: "/", index: "index.html", wildcard: false });
  } else {
    app.get("/", async (_request, reply) => reply.code(404).send(errorBody(404, "no_page", "the web page is not built: run 'npm run build' in blip2's folder")));
  }
  return app;
}

function first(results: (GenResult | Error)[]): GenResult {
  const r = results[0]!;
  if (r instanceof Error) throw r;
  return r;
}

const round = (ms: number) => Math.round(ms * 10) / 10;

function authorized(request: FastifyRequest, key: string): boolean {
  const header = request.headers.authorization ?? "";
  const given = Buffer.from(header.startsWith("Bearer ") ? header.slice(7) : "");
  const wanted = Buffer.from(key);
  return given.length === wanted.length && timingSafeEqual(given, wanted);
}

/** Server-sent events on a reply that Fastify hands over (headers it set, CORS's included, are kept). */
function openEvents(reply: FastifyReply) {
  const headers = { ...reply.getHeaders(), "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", connection: "keep-alive", "x-accel-buffering": "no" };
  reply.hijack();
  reply.raw.writeHead(200, headers as Record<string, string>);
  const write = (text: string) => {
    if (!reply.raw.destroyed) reply.raw.write(text);
  };
  return {
    send: (event: string, data: unknown) => write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`),
    data: (data: unknown) => write(`data: ${JSON.stringify(data)}\n\n`),
    raw: write,
    /** An error after the stream began: an `error` event with the JSON error body. */
    error: (err: unknown) => write(`event: error\ndata: ${JSON.stringify(toErrorResponse(err)[1])}\n\n`),
    end: () => reply.raw.end(),
  };
}

/** Where `npm run build` puts the page: dist/web beside dist/serve (also found from src/serve, when run from the sources). */
export const DEFAULT_WEB_ROOT = fileURLToPath(new URL("../../dist/web", import.meta.url));
