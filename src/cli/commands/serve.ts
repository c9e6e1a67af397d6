/** `blip2 serve`: the models behind an HTTP API (OpenAI-compatible too) and a web page. */
import fs from "node:fs";
import { Blip2ForImageTextRetrieval } from "../../api/retrieval.js";
import type { Blip2 } from "../../api/tasks.js";
import { Blip2Error } from "../../errors.js";
import { openStore, type ImageStore } from "../../search/store.js";
import { createServer, DEFAULT_WEB_ROOT, isLoopback, SERVE_DEFAULTS } from "../../serve/server.js";
import { intOption, listOption, stringOption, UsageError, type Command } from "../command.js";
import { DEFAULT_MODEL, loadModel, modelHelp, modelLoadOptions, modelOptions } from "../shared.js";
import { indexedModel, modelFor } from "./index.js";

export const serve: Command = {
  name: "serve",
  summary: "serve the model over HTTP: JSON API, OpenAI-compatible chat completions, a web page",
  usage: "blip2 serve [--model M] [--index DB] [--host 127.0.0.1] [--port 8080] [--api-key K]",
  help: [
    `--host H                 address to listen on (default ${SERVE_DEFAULTS.host}; any other needs --api-key)`,
    `--port N                 port (default ${SERVE_DEFAULTS.port}; 0: any free port)`,
    "--api-key K              clients must send \"Authorization: Bearer K\" (default: $BLIP2_API_KEY, else none)",
    "--index DB               an index made by 'blip2 index', for /v1/search (its model also serves /v1/match)",
    "--retrieval-model R      the image-text matching model for /v1/match without --index",
    "--cors ORIGIN            allow this origin to call the API from its pages (repeat for several; default none)",
    "--allow-remote-images    fetch http(s) image URLs (default: data URLs and uploads only)",
    `--max-body-mb N          largest request body (default ${SERVE_DEFAULTS.maxBodyBytes / 2 ** 20})`,
    `--max-image-pixels N     largest image, width x height (default ${SERVE_DEFAULTS.maxImagePixels})`,
    `--max-queue N            requests waiting at most; more get 429 (default ${SERVE_DEFAULTS.maxQueue})`,
    `--max-batch N            generations decoded together at most (default ${SERVE_DEFAULTS.maxBatch}; 1: one at a time)`,
    `--timeout S              each request's time limit in seconds (default ${SERVE_DEFAULTS.timeoutMs / 1000})`,
    `--chat-ttl S             idle chats are closed after S seconds (default ${SERVE_DEFAULTS.chatTtlMs / 1000})`,
    `--max-chats N            chats open at once at most (default ${SERVE_DEFAULTS.maxChats})`,
    ...modelHelp,
  ].join("\n"),
  options: {
    ...modelOptions,
    host: { type: "string" },
    port: { type: "string" },
    "api-key": { type: "string" },
    index: { type: "string" },
    "retrieval-model": { type: "string" },
    cors: { type: "string", multiple: true },
    "allow-remote-images": { type: "boolean" },
    "max-body-mb": { type: "string" },
    "max-image-pixels": { type: "string" },
    "max-queue": { type: "string" },
    "max-batch": { type: "string" },
    timeout: { type: "string" },
    "chat-ttl": { type: "string" },
    "max-chats": { type: "string" },
  },
  async run(args, io) {
    if (args.positionals.length) throw new UsageError(`serve: unexpected argument ${JSON.stringify(args.positionals[0])}`);
    const host = stringOption(args, "host") ?? SERVE_DEFAULTS.host;
    const port = intOption(args, "port", 0) ?? SERVE_DEFAULTS.port;
    if (port > 65535) throw new UsageError(`invalid value for --port: expected 0 to 65535, got ${port}`);
    const apiKey = stringOption(args, "api-key") ?? (process.env.BLIP2_API_KEY || undefined);
    // Checked before any model is loaded: a refusal should not take a minute to arrive.
    if (!isLoopback(host) && !apiKey) throw new UsageError(`serve: refusing to listen on ${host} without --api-key (other machines could use the model); give --api-key, or listen on 127.0.0.1`);
    const seconds = (name: string) => {
      const s = intOption(args, name, 1);
      return s === undefined ? undefined : s * 1000;
    };
    const limits = {
      maxBodyBytes: mb(intOption(args, "max-body-mb", 1)),
      maxImagePixels: intOption(args, "max-image-pixels", 1),
      maxQueue: intOption(args, "max-queue", 0),
      maxBatch: intOption(args, "max-batch", 1),
      timeoutMs: seconds("timeout"),
      chatTtlMs: seconds("chat-ttl"),
      maxChats: intOption(args, "max-chats", 1),
    };
    const db = stringOption(args, "index");
    if (db !== undefined && !fs.existsSync(db)) throw new Blip2Error(`${db}: no such index (build one with 'blip2 index')`);

    const modelName = stringOption(args, "model") ?? process.env.BLIP2_MODEL ?? DEFAULT_MODEL;
    let blip2: Blip2 | undefined;
    let retrieval: Blip2ForImageTextRetrieval | undefined;
    let store: ImageStore | undefined;
    try {
      ({ blip2 } = await loadModel(args, io));
      await blip2.model.prepare();
      const retrievalName = db !== undefined ? await modelFor({ values: {}, positionals: [] }, db) : stringOption(args, "retrieval-model");
      if (retrievalName !== undefined) {
        const { progressSink: _, ...load } = modelLoadOptions(args, io);
        retrieval = await Blip2ForImageTextRetrieval.fromPretrained(retrievalName, load);
        if (db !== undefined) store = await openStore(db, indexedModel(retrieval, retrievalName), false);
      }
      const app = await createServer({
        ...Object.fromEntries(Object.entries(limits).filter(([, v]) => v !== undefined)),
        blip2,
        retrieval,
        store,
        modelName,
        retrievalName,
        dtype: stringOption(args, "dtype") ?? "fp32",
        host,
        apiKey,
        corsOrigins: listOption(args, "cors"),
        allowRemoteImages: args.values["allow-remote-images"] === true,
        webRoot: DEFAULT_WEB_ROOT,
      });
      const address = await app.listen({ host, port });
      io.stderr.write(`blip2 serve: ${modelName} on ${address}/ (Ctrl-C stops)\n`);
      await stopSignal();
      io.stderr.write("blip2 serve: stopping\n");
      await app.close();
    } finally {
      await store?.close();
      await retrieval?.dispose();
      await blip2?.dispose();
    }
    return 0;
  },
};

const mb = (n: number | undefined) => (n === undefined ? undefined : n * 2 ** 20);

/** Resolves on the first SIGINT or SIGTERM. */
function stopSignal(): Promise<void> {
  return new Promise((resolve) => {
    const stop = () => {
      process.off("SIGINT", stop);
      process.off("SIGTERM", stop);
      resolve();
    };
    process.once("SIGINT", stop);
    process.once("SIGTERM", stop);
  });
}
