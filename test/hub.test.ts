/** Hub downloads against a fake Hub on 127.0.0.1 (test/hubServer.ts): cache layout, resume, integrity, errors, env vars. */
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { Blip2Error } from "../src/errors.js";
import { isRepoId, resolveModel, type DownloadProgress, type HubOptions } from "../src/hub/download.js";
import { fixture } from "./helpers.js";
import { commitOf, gitBlobSha1, isLfs, readFolder, sha256, startFakeHub, type FakeHub, type RepoFiles } from "./hubServer.js";

const TINY = "blip2-test/tiny-blip2-opt";
const PRIVATE = "blip2-test/private";
const SHARDED = "blip2-test/sharded";
const LEGACY = "legacy-only";

/** Deterministic filler bytes. */
function bytes(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed * 2654435761;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

const tinyFiles: RepoFiles = {
  ...readFolder(fixture("tiny-blip2-opt")), // includes reference.json / reference.safetensors, which must not be fetched
  "README.md": Buffer.from("# tiny BLIP-2\n"),
  "pytorch_model.bin": bytes(3000, 1),
};
/** What a BLIP-2 download of the tiny repo holds. */
const TINY_EXPECTED = ["config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json"];
const WEIGHTS = tinyFiles["model.safetensors"]!;

const shardIndex = (shards: string[]) =>
  Buffer.from(JSON.stringify({ metadata: { total_size: 12000 }, weight_map: Object.fromEntries(shards.map((s, i) => [`tensor.${i}`, s])) }));
const shardedMain: RepoFiles = {
  "config.json": tinyFiles["config.json"]!,
  "tokenizer.json": tinyFiles["tokenizer.json"]!,
  "special_tokens_map.json": Buffer.from("{}\n"),
  "added_tokens.json": Buffer.from("{}\n"), // same content, same blob
  "model.safetensors.index.json": shardIndex(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
  "model-00001-of-00002.safetensors": bytes(5000, 2),
  "model-00002-of-00002.safetensors": bytes(7000, 3),
  "unused.safetensors": bytes(100, 4),
  "pytorch_model-00001-of-00002.bin": bytes(100, 5),
};
const shardedNested: RepoFiles = {
  "config.json": tinyFiles["config.json"]!,
  "tokenizer.json": tinyFiles["tokenizer.json"]!,
  "model.safetensors.index.json": shardIndex(["weights/model-00001-of-00001.safetensors"]),
  "weights/model-00001-of-00001.safetensors": bytes(4000, 6),
};

const etagOf = (file: string, data: Buffer) => (isLfs(file) ? sha256(data) : gitBlobSha1(data));

let hub: FakeHub;
const temps: string[] = [];
const tmp = (name: string) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `blip2-hub-${name}-`));
  temps.push(dir);
  return dir;
};

beforeAll(async () => {
  hub = await startFakeHub([
    { id: TINY, revisions: { main: tinyFiles, "v1.0": tinyFiles } },
    { id: PRIVATE, revisions: { main: tinyFiles }, private: true },
    { id: SHARDED, revisions: { main: shardedMain, nested: shardedNested, "refs/pr/1": shardedMain } },
    { id: LEGACY, revisions: { main: { "config.json": tinyFiles["config.json"]!, "pytorch_model.bin": bytes(100, 7) } } },
  ]);
});
afterAll(async () => {
  await hub.close();
  for (const dir of temps) fs.rmSync(dir, { recursive: true, force: true });
});

// Every test starts with no HF_* variables (and HF_HOME in a temp folder, so nothing reads ~/.cache or a real token).
const ENV_KEYS = [
  "HF_HOME",
  "HF_HUB_CACHE",
  "HUGGINGFACE_HUB_CACHE",
  "HF_TOKEN",
  "HUGGING_FACE_HUB_TOKEN",
  "HF_TOKEN_PATH",
  "HF_HUB_OFFLINE",
  "TRANSFORMERS_OFFLINE",
  "HF_ENDPOINT",
  "XDG_CACHE_HOME",
  "HF_HUB_ETAG_TIMEOUT",
  "HF_HUB_DOWNLOAD_TIMEOUT",
];
let savedEnv: Record<string, string | undefined>;
let cache: string;
let opts: HubOptions;
beforeEach(() => {
  savedEnv = Object.fromEntries(ENV_KEYS.map((k) => [k, process.env[k]]));
  for (const k of ENV_KEYS) delete process.env[k];
  process.env.HF_HOME = tmp("home");
  cache = tmp("cache");
  opts = { endpoint: hub.url, cacheDir: cache };
  hub.clearLog();
});
afterEach(() => {
  for (const k of ENV_KEYS) {
    if (savedEnv[k] === undefined) delete process.env[k];
    else process.env[k] = savedEnv[k];
  }
});

const storageOf = (repo: string, cacheDir = cache) => path.join(cacheDir, `models--${repo.replace("/", "--")}`);

/** The one-line Blip2Error a promise rejects with. */
async function errorOf(p: Promise<unknown>): Promise<string> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(Blip2Error);
  const message = (err as Error).message;
  expect(message).not.toContain("\n");
  return message;
}

async function closedPortUrl(): Promise<string> {
  const server = http.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return `http://127.0.0.1:${port}`;
}

describe("download into the HF cache", () => {
  it("lays out blobs, relative symlinks and refs/main, byte-identical, with progress", async () => {
    const events: DownloadProgress[] = [];
    hub.slowNext("model.safetensors", 64 * 1024, 40); // ~7 chunks over ~250 ms: some progress in between
    const t0 = Date.now();
    const dir = await resolveModel(TINY, { ...opts, progress: (p) => events.push({ ...p }) });
    const elapsed = Date.now() - t0;

    const storage = storageOf(TINY);
    const commit = commitOf(TINY, "main");
    expect(dir).toBe(path.join(storage, "snapshots", commit));
    expect(fs.readFileSync(path.join(storage, "refs", "main"), "utf8")).toBe(commit);
    expect(fs.readdirSync(dir).sort()).toEqual(TINY_EXPECTED);
    for (const file of TINY_EXPECTED) {
      const link = path.join(dir, file);
      expect(fs.lstatSync(link).isSymbolicLink(), file).toBe(true);
      expect(fs.readlinkSync(link)).toBe(`../../blobs/${etagOf(file, tinyFiles[file]!)}`);
      expect(fs.readFileSync(link).equals(tinyFiles[file]!), file).toBe(true);
    }
    expect(etagOf("model.safetensors", WEIGHTS)).toMatch(/^[0-9a-f]{64}$/);
    expect(etagOf("config.json", tinyFiles["config.json"]!)).toMatch(/^[0-9a-f]{40}$/);
    // blobs: exactly the files, nothing .incomplete
    expect(fs.readdirSync(path.join(storage, "blobs")).sort()).toEqual(TINY_EXPECTED.map((f) => etagOf(f, tinyFiles[f]!)).sort());

    // only what BLIP-2 needs was asked for; the LFS file came from the CDN
    const asked = new Set(hub.log.filter((r) => r.kind === "resolve").map((r) => r.file));
    expect([...asked].sort()).toEqual(TINY_EXPECTED);
    expect(hub.dataRequests().map((r) => `${r.kind}:${r.file}`).sort()).toEqual(TINY_EXPECTED.map((f) => `${isLfs(f) ? "cdn" : "resolve"}:${f}`).sort());
    expect(hub.log.every((r) => r.authorization === undefined)).toBe(true);

    // progress: per downloaded file, non-decreasing `loaded`, one final done at the full size
    expect(new Set(events.map((e) => e.file))).toEqual(new Set(TINY_EXPECTED));
    for (const file of TINY_EXPECTED) {
      const mine = events.filter((e) => e.file === file);
      const size = tinyFiles[file]!.length;
      expect(mine.every((e) => e.total === size)).toBe(true);
      for (let i = 1; i < mine.length; i++) expect(mine[i]!.loaded).toBeGreaterThanOrEqual(mine[i - 1]!.loaded);
      expect(mine.filter((e) => e.done)).toHaveLength(1);
      expect(mine.at(-1)).toEqual({ file, loaded: size, total: size, done: true });
    }
    const weights = events.filter((e) => e.file === "model.safetensors");
    const partial = weights.filter((e) => !e.done && e.loaded > 0 && e.loaded < WEIGHTS.length);
    expect(partial.length).toBeGreaterThanOrEqual(1);
    expect(weights.length).toBeLessThanOrEqual(Math.ceil(elapsed / 100) + 2); // throttled to ~10 a second
  });

  it("downloads nothing again: one listing request, none for a commit hash or offline", async () => {
    const dir = await resolveModel(TINY, opts);
    hub.clearLog();
    expect(await resolveModel(TINY, opts)).toBe(dir);
    expect(hub.log.map((r) => `${r.method} ${r.kind}`)).toEqual(["GET api"]);

    hub.clearLog();
    expect(await resolveModel(TINY, { ...opts, revision: commitOf(TINY, "main") })).toBe(dir);
    expect(await resolveModel(TINY, { ...opts, offline: true })).toBe(dir);
    process.env.HF_HUB_OFFLINE = "1";
    expect(await resolveModel(TINY, { cacheDir: cache })).toBe(dir);
    process.env.HF_HUB_OFFLINE = "true";
    expect(await resolveModel(TINY, { cacheDir: cache, endpoint: "http://127.0.0.1:9" })).toBe(dir);
    expect(hub.log).toEqual([]);
  });

  it("another revision with the same files reuses the blobs: metadata requests only", async () => {
    await resolveModel(TINY, opts);
    hub.clearLog();
    const dir = await resolveModel(TINY, { ...opts, revision: "v1.0" });
    const commit = commitOf(TINY, "v1.0");
    expect(dir).toBe(path.join(storageOf(TINY), "snapshots", commit));
    expect(fs.readFileSync(path.join(storageOf(TINY), "refs", "v1.0"), "utf8")).toBe(commit);
    expect(hub.dataRequests()).toEqual([]);
    expect(hub.log.filter((r) => r.method === "HEAD")).toHaveLength(TINY_EXPECTED.length);
    expect(fs.readFileSync(path.join(dir, "model.safetensors")).equals(WEIGHTS)).toBe(true);
    expect(fs.readdirSync(path.join(storageOf(TINY), "blobs"))).toHaveLength(TINY_EXPECTED.length);
  });

  it("fetches the index and the shards it names, one blob for identical files, nested paths", async () => {
    const dir = await resolveModel(SHARDED, opts);
    const wanted = [
      "added_tokens.json",
      "config.json",
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      "model.safetensors.index.json",
      "special_tokens_map.json",
      "tokenizer.json",
    ];
    expect(fs.readdirSync(dir).sort()).toEqual(wanted);
    for (const f of wanted) expect(fs.readFileSync(path.join(dir, f)).equals(shardedMain[f]!), f).toBe(true);
    expect(fs.readlinkSync(path.join(dir, "added_tokens.json"))).toBe(fs.readlinkSync(path.join(dir, "special_tokens_map.json")));
    const twins = hub.dataRequests().filter((r) => r.file === "added_tokens.json" || r.file === "special_tokens_map.json");
    expect(twins).toHaveLength(1);
    expect(hub.log.some((r) => r.file === "unused.safetensors" || r.file?.endsWith(".bin"))).toBe(false);

    const nested = await resolveModel(SHARDED, { ...opts, revision: "nested" });
    const shard = "weights/model-00001-of-00001.safetensors";
    expect(nested).toBe(path.join(storageOf(SHARDED), "snapshots", commitOf(SHARDED, "nested")));
    expect(fs.readlinkSync(path.join(nested, shard))).toBe(`../../../blobs/${sha256(shardedNested[shard]!)}`);
    expect(fs.readFileSync(path.join(nested, shard)).equals(shardedNested[shard]!)).toBe(true);
    expect(fs.readFileSync(path.join(storageOf(SHARDED), "refs", "nested"), "utf8")).toBe(commitOf(SHARDED, "nested"));

    // a branch name with slashes: refs/refs/pr/1, as huggingface_hub writes it
    const pr = await resolveModel(SHARDED, { ...opts, revision: "refs/pr/1" });
    expect(fs.readFileSync(path.join(storageOf(SHARDED), "refs", "refs", "pr", "1"), "utf8")).toBe(commitOf(SHARDED, "refs/pr/1"));
    expect(await resolveModel(SHARDED, { ...opts, revision: "refs/pr/1", offline: true })).toBe(pr);
  });
});

describe("resume and integrity", () => {
  it("an interrupted download fails, and the next call resumes it with a Range request", async () => {
    hub.interruptNext("model.safetensors", 100_000);
    const message = await errorOf(resolveModel(TINY, opts));
    expect(message).toMatch(
      new RegExp(`^${TINY}: download of model\\.safetensors was interrupted after \\d+ of ${WEIGHTS.length} bytes \\(.+\\); run again to resume$`),
    );
    const blobs = path.join(storageOf(TINY), "blobs");
    const partial = path.join(blobs, `${sha256(WEIGHTS)}.incomplete`);
    const have = fs.statSync(partial).size;
    expect(have).toBeGreaterThan(0);
    expect(have).toBeLessThanOrEqual(100_000);
    expect(fs.readFileSync(partial).equals(WEIGHTS.subarray(0, have))).toBe(true);
    const snapshot = path.join(storageOf(TINY), "snapshots", commitOf(TINY, "main"));
    expect(fs.existsSync(path.join(snapshot, "model.safetensors"))).toBe(false);

    hub.clearLog();
    const dir = await resolveModel(TINY, opts);
    const data = hub.dataRequests();
    expect(data).toHaveLength(1); // the small files were complete already
    expect(data[0]).toMatchObject({ kind: "cdn", file: "model.safetensors", range: `bytes=${have}-`, status: 206, bytes: WEIGHTS.length - have });
    expect(fs.readFileSync(path.join(dir, "model.safetensors")).equals(WEIGHTS)).toBe(true);
    expect(fs.existsSync(partial)).toBe(false);
  });

  it("starts over when the server ignores the Range header (200)", async () => {
    hub.interruptNext("model.safetensors", 50_000);
    await errorOf(resolveModel(TINY, opts));
    hub.ignoreRangeNext();
    hub.clearLog();
    const dir = await resolveModel(TINY, opts);
    const data = hub.dataRequests();
    expect(data).toHaveLength(1);
    expect(data[0]!.range).toMatch(/^bytes=\d+-$/);
    expect(data[0]).toMatchObject({ status: 200, bytes: WEIGHTS.length });
    expect(fs.readFileSync(path.join(dir, "model.safetensors")).equals(WEIGHTS)).toBe(true);
  });

  it("corrupted bytes (sha256 of an LFS file) fail with the file named and leave no blob", async () => {
    hub.corruptNext("model.safetensors");
    const message = await errorOf(resolveModel(TINY, opts));
    expect(message).toMatch(
      new RegExp(
        `^${TINY}: model\\.safetensors: the downloaded content does not match its sha256 \\(expected ${sha256(WEIGHTS)}, got [0-9a-f]{64}\\); the download was deleted, try again$`,
      ),
    );
    const blobs = fs.readdirSync(path.join(storageOf(TINY), "blobs"));
    expect(blobs.filter((b) => b.startsWith(sha256(WEIGHTS)))).toEqual([]);
    expect(blobs.some((b) => b.endsWith(".incomplete"))).toBe(false);

    const dir = await resolveModel(TINY, opts); // a clean retry works
    expect(fs.readFileSync(path.join(dir, "model.safetensors")).equals(WEIGHTS)).toBe(true);
  });

  it("corrupted bytes (git blob sha1 of a regular file) fail the same way", async () => {
    hub.corruptNext("config.json");
    const config = tinyFiles["config.json"]!;
    const message = await errorOf(resolveModel(TINY, opts));
    expect(message).toMatch(new RegExp(`^${TINY}: config\\.json: the downloaded content does not match its git blob sha1 \\(expected ${gitBlobSha1(config)}, got [0-9a-f]{40}\\)`));
    expect(fs.readdirSync(path.join(storageOf(TINY), "blobs")).filter((b) => b.startsWith(gitBlobSha1(config)))).toEqual([]);
  });

  it("a failed file stops the downloads in flight; they resume later", async () => {
    const slowShard = "model-00002-of-00002.safetensors";
    hub.slowNext(slowShard, 500, 100); // 14 pieces, ~1.4 s
    hub.interruptNext("model-00001-of-00002.safetensors", 1000);
    const t0 = Date.now();
    expect(await errorOf(resolveModel(SHARDED, opts))).toMatch(/^blip2-test\/sharded: download of model-00001-of-00002\.safetensors was interrupted after/);
    expect(Date.now() - t0).toBeLessThan(1000); // did not wait for the slow shard
    const partial = path.join(storageOf(SHARDED), "blobs", `${sha256(shardedMain[slowShard]!)}.incomplete`);
    expect(fs.statSync(partial).size).toBeLessThan(7000);

    const dir = await resolveModel(SHARDED, opts);
    expect(fs.readFileSync(path.join(dir, slowShard)).equals(shardedMain[slowShard]!)).toBe(true);
  });

  it("a stalled download is abandoned after HF_HUB_DOWNLOAD_TIMEOUT seconds", async () => {
    process.env.HF_HUB_DOWNLOAD_TIMEOUT = "0.2";
    hub.slowNext("model.safetensors", 100_000, 1000);
    expect(await errorOf(resolveModel(TINY, opts))).toBe(
      `${TINY}: download of model.safetensors was interrupted after 100000 of ${WEIGHTS.length} bytes (no data for 0.2 s); run again to resume`,
    );
  });

  it("a resumed download whose earlier part is wrong is caught by the checksum", async () => {
    hub.interruptNext("model.safetensors", 100_000);
    await errorOf(resolveModel(TINY, opts));
    const partial = path.join(storageOf(TINY), "blobs", `${sha256(WEIGHTS)}.incomplete`);
    const fd = fs.openSync(partial, "r+");
    fs.writeSync(fd, Buffer.alloc(16, 0x55), 0, 16, 10);
    fs.closeSync(fd);
    expect(await errorOf(resolveModel(TINY, opts))).toMatch(/model\.safetensors: the downloaded content does not match its sha256/);
    expect(fs.existsSync(partial)).toBe(false);
    const dir = await resolveModel(TINY, opts);
    expect(fs.readFileSync(path.join(dir, "model.safetensors")).equals(WEIGHTS)).toBe(true);
  });
});

describe("errors", () => {
  it("unknown repo, unknown revision, no safetensors", async () => {
    expect(await errorOf(resolveModel("blip2-test/nope", opts))).toBe(`blip2-test/nope: no such model on ${hub.url} (404)`);
    expect(await errorOf(resolveModel(TINY, { ...opts, revision: "v9" }))).toBe(
      `${TINY}: unknown revision "v9" (404): no such branch, tag or commit on ${hub.url}`,
    );
    expect(await errorOf(resolveModel(LEGACY, opts))).toBe(
      `${LEGACY}: the repo has no safetensors weights (model.safetensors or model.safetensors.index.json) (it has pytorch_model.bin); only safetensors checkpoints can be loaded`,
    );
  });

  it("a private repo: 401 without the token; the token option, HF_TOKEN and $HF_HOME/token work", async () => {
    expect(await errorOf(resolveModel(PRIVATE, opts))).toBe(`${PRIVATE}: access denied (401): the repo is private or gated; set HF_TOKEN or pass token`);
    expect(await errorOf(resolveModel(PRIVATE, { ...opts, token: "hf_wrong" }))).toBe(
      `${PRIVATE}: access denied (401): the repo is private or gated; the token given has no access to it (for a gated repo, accept its conditions on the Hub first)`,
    );

    hub.clearLog();
    const dir = await resolveModel(PRIVATE, { ...opts, token: hub.token });
    expect(fs.readFileSync(path.join(dir, "model.safetensors")).equals(WEIGHTS)).toBe(true);
    const hubRequests = hub.log.filter((r) => r.kind !== "cdn");
    expect(hubRequests.length).toBeGreaterThan(TINY_EXPECTED.length);
    expect(hubRequests.every((r) => r.authorization === `Bearer ${hub.token}`)).toBe(true);

    process.env.HF_TOKEN = hub.token;
    const viaEnv = await resolveModel(PRIVATE, { endpoint: hub.url, cacheDir: tmp("cache") });
    expect(fs.readFileSync(path.join(viaEnv, "config.json")).equals(tinyFiles["config.json"]!)).toBe(true);
    delete process.env.HF_TOKEN;

    fs.writeFileSync(path.join(process.env.HF_HOME!, "token"), `${hub.token}\n`);
    const viaFile = await resolveModel(PRIVATE, { endpoint: hub.url, cacheDir: tmp("cache") });
    expect(fs.readFileSync(path.join(viaFile, "tokenizer.json")).equals(tinyFiles["tokenizer.json"]!)).toBe(true);
  });

  it("connection refused: one line naming the endpoint, suggesting HF_HUB_OFFLINE=1", async () => {
    const endpoint = await closedPortUrl();
    expect(await errorOf(resolveModel(TINY, { ...opts, endpoint }))).toBe(
      `${TINY}: cannot reach ${endpoint} (ECONNREFUSED); check the network, HF_ENDPOINT or a proxy, or set HF_HUB_OFFLINE=1 to use models already in the cache`,
    );
    const dir = await resolveModel(TINY, opts); // now it is cached: the error says where
    expect(await errorOf(resolveModel(TINY, { ...opts, endpoint }))).toBe(
      `${TINY}: cannot reach ${endpoint} (ECONNREFUSED); the model is cached at ${dir}: set HF_HUB_OFFLINE=1 to use it without the network`,
    );
  });

  it("offline with nothing cached: says where it looked, makes no request", async () => {
    expect(await errorOf(resolveModel(TINY, { ...opts, offline: true }))).toBe(
      `${TINY}: not in the cache at ${storageOf(TINY)} and offline mode is on (HF_HUB_OFFLINE or offline: true), so nothing is downloaded`,
    );
    process.env.HF_HUB_OFFLINE = "1";
    const commit = commitOf(TINY, "main");
    expect(await errorOf(resolveModel(TINY, { ...opts, revision: commit }))).toBe(
      `${TINY}@${commit}: not in the cache at ${path.join(storageOf(TINY), "snapshots", commit)} and offline mode is on (HF_HUB_OFFLINE or offline: true), so nothing is downloaded`,
    );
    expect(hub.log).toEqual([]);
  });

  it("bad endpoint or revision strings", async () => {
    expect(await errorOf(resolveModel(TINY, { ...opts, endpoint: "ftp://example.com" }))).toBe(`endpoint "ftp://example.com" is not an http(s) URL`);
    expect(await errorOf(resolveModel(TINY, { ...opts, revision: "../../etc" }))).toBe(`revision "../../etc" is not a valid branch, tag or commit`);
  });
});

describe("local folders and model ids", () => {
  it("a folder is returned as an absolute path, with no request", async () => {
    const abs = fixture("tiny-blip2-opt");
    expect(await resolveModel(abs, opts)).toBe(abs);
    expect(await resolveModel(path.relative(process.cwd(), abs), opts)).toBe(abs);
    expect(hub.log).toEqual([]);
  });

  it("neither a folder nor a model id: a clear error", async () => {
    for (const src of ["not/a/model", "./missing-folder", "has space/x", "org/-name", "a--b", ""]) {
      expect(await errorOf(resolveModel(src, opts))).toBe(`${JSON.stringify(src)} is neither a folder nor a Hub model id (like Salesforce/blip2-opt-2.7b)`);
    }
    expect(await errorOf(resolveModel(fixture("image0.png"), opts))).toMatch(/image0\.png: is a file, not a model folder/);
    expect(hub.log).toEqual([]);
  });

  it("repo id rules follow huggingface_hub", () => {
    for (const ok of ["gpt2", "Salesforce/blip2-opt-2.7b", "org_1/Name.v2", "a/b"]) expect(isRepoId(ok), ok).toBe(true);
    for (const bad of ["a/b/c", ".repo", "repo.", "foo--bar", "foo..bar", "foo.git", "a b", "/abs", "x".repeat(97)]) expect(isRepoId(bad), bad).toBe(false);
  });
});

describe("environment variables", () => {
  it("HF_HUB_CACHE and HF_ENDPOINT", async () => {
    const hubCache = tmp("hubcache");
    process.env.HF_HUB_CACHE = hubCache;
    process.env.HF_ENDPOINT = `${hub.url}/`;
    const dir = await resolveModel(TINY);
    expect(dir).toBe(path.join(storageOf(TINY, hubCache), "snapshots", commitOf(TINY, "main")));
    expect(hub.log.length).toBeGreaterThan(0);
    // options win over the environment
    process.env.HF_ENDPOINT = "http://127.0.0.1:9";
    const other = tmp("cache");
    expect(await resolveModel(TINY, { endpoint: hub.url, cacheDir: other })).toBe(path.join(storageOf(TINY, other), "snapshots", commitOf(TINY, "main")));
  });

  it("HF_HOME (cache in $HF_HOME/hub) and HF_HUB_OFFLINE", async () => {
    const home = tmp("hfhome");
    process.env.HF_HOME = home;
    const dir = await resolveModel(TINY, { endpoint: hub.url });
    expect(dir).toBe(path.join(home, "hub", `models--blip2-test--tiny-blip2-opt`, "snapshots", commitOf(TINY, "main")));

    hub.clearLog();
    process.env.HF_HUB_OFFLINE = "1";
    expect(await resolveModel(TINY, { endpoint: hub.url })).toBe(dir);
    expect(await errorOf(resolveModel(SHARDED, { endpoint: hub.url }))).toMatch(/^blip2-test\/sharded: not in the cache at .* offline mode is on/);
    expect(hub.log).toEqual([]);
    // offline: false in the options overrides the variable
    expect(await resolveModel(TINY, { endpoint: hub.url, offline: false })).toBe(dir);
    expect(hub.log.map((r) => r.kind)).toEqual(["api"]);
  });
});
