/**
 * Hugging Face Hub downloads into the standard HF cache (the layout and protocol of
 * `huggingface_hub`'s `snapshot_download` / `hf_hub_download`, so caches are shared with Python):
 *
 * 1. `GET {endpoint}/api/models/{repo}/revision/{revision}` → the commit hash and the file list;
 *    refs/{revision} records the commit for branches and tags.
 * 2. For each file BLIP-2 needs, `HEAD {endpoint}/{repo}/resolve/{commit}/{file}` without following
 *    CDN redirects: X-Linked-Etag (else ETag) names the blob, X-Linked-Size (else Content-Length)
 *    is its size, Location (if any) is where the bytes are.
 * 3. The bytes stream to blobs/{etag}.incomplete (resumed with `Range: bytes=N-`), are checked against
 *    the etag (sha256 for LFS files, git blob sha1 otherwise) and the size, then renamed to
 *    blobs/{etag}; snapshots/{commit}/{file} is a relative symlink to it.
 */
import { createHash, type Hash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { builtInModel } from "./builtin.js";
import { Blip2Error, describeError } from "../errors.js";
import {
  blobPath,
  COMMIT_HASH,
  linkPointer,
  missingForLoad,
  pointerPath,
  readRef,
  snapshotFolder,
  storageFolder,
  writeRef,
} from "./cache.js";
import { hubSettings, type HubOptions, type HubSettings } from "./settings.js";

export type { DownloadProgress, HubOptions } from "./settings.js";
export { defaultCacheDir, hfHome } from "./settings.js";
export { repoFolderName } from "./cache.js";

/** Small files fetched when the repo has them (configs and every tokenizer format the loader reads). */
export const MODEL_FILES = [
  "config.json",
  "generation_config.json",
  "processor_config.json",
  "preprocessor_config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "vocab.json",
  "merges.txt",
  "spiece.model",
  "vocab.txt",
] as const;
const SINGLE_WEIGHTS = "model.safetensors";
const WEIGHTS_INDEX = "model.safetensors.index.json";

/** Files downloaded at once. */
const CONCURRENCY = 4;
/** Progress calls per file are at least this far apart (plus the final `done`). */
const PROGRESS_INTERVAL_MS = 100;

/** "name" or "org/name": letters, digits, "-", "_", "."; not starting or ending with "-" or "."; no "--" or ".."; at most 96 characters a part. */
const REPO_ID = /^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?\/)?[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$/;

export function isRepoId(s: string): boolean {
  return REPO_ID.test(s) && !s.includes("--") && !s.includes("..") && !s.endsWith(".git");
}

/** A local folder is returned as is (absolute); a Hub repo id ("org/name") is downloaded (or found in the cache) and its snapshot folder returned. */
export async function resolveModel(src: string, options: HubOptions = {}): Promise<string> {
  let stat: fs.Stats | undefined;
  try {
    stat = src === "" ? undefined : fs.statSync(src);
  } catch {
    stat = undefined;
  }
  if (stat?.isDirectory()) return path.resolve(src);
  if (stat) throw new Blip2Error(`${src}: is a file, not a model folder (a folder with config.json) or a Hub model id`);
  const builtIn = builtInModel(src);
  if (builtIn) return builtIn;
  if (!isRepoId(src)) throw new Blip2Error(`${JSON.stringify(src)} is neither a folder nor a Hub model id (like Salesforce/blip2-opt-2.7b)`);

  const settings = hubSettings(options);
  const storage = storageFolder(settings.cacheDir, src);
  if (settings.offline) return resolveOffline(src, settings, storage);
  if (COMMIT_HASH.test(settings.revision)) {
    // A commit never changes: a snapshot with config.json and all its weights is complete (weights come last).
    const snapshot = snapshotFolder(storage, settings.revision);
    if (fs.existsSync(snapshot) && missingForLoad(snapshot).length === 0) return snapshot;
  }
  return new HubDownload(src, settings, storage).run();
}

function label(repo: string, revision: string): string {
  return revision === "main" ? repo : `${repo}@${revision}`;
}

function resolveOffline(repo: string, s: HubSettings, storage: string): string {
  const commit = readRef(storage, s.revision);
  const snapshot = commit === undefined ? undefined : snapshotFolder(storage, commit);
  if (!snapshot || !fs.existsSync(snapshot)) {
    throw new Blip2Error(
      `${label(repo, s.revision)}: not in the cache at ${snapshot ?? storage} and offline mode is on (HF_HUB_OFFLINE or offline: true), so nothing is downloaded`,
    );
  }
  const missing = missingForLoad(snapshot);
  if (missing.length > 0) {
    throw new Blip2Error(`${label(repo, s.revision)}: the cached snapshot ${snapshot} lacks ${missing.join(", ")} and offline mode is on (HF_HUB_OFFLINE or offline: true)`);
  }
  return snapshot;
}

interface FileMetadata {
  etag: string;
  size: number;
  /** Where the bytes are: the resolve URL, or the CDN URL it redirects to. */
  location: string;
}

interface RevisionInfo {
  sha: string;
  files: Set<string>;
}

class HubDownload {
  /** Blob downloads in flight, so two files with the same content are fetched once. */
  private readonly inflight = new Map<string, Promise<void>>();

  constructor(
    private readonly repo: string,
    private readonly s: HubSettings,
    private readonly storage: string,
  ) {}

  async run(): Promise<string> {
    const { sha: commit, files } = await this.listRevision();
    writeRef(this.storage, this.s.revision, commit);
    const snapshot = snapshotFolder(this.storage, commit);
    fs.mkdirSync(snapshot, { recursive: true });

    const hasIndex = files.has(WEIGHTS_INDEX);
    if (!hasIndex && !files.has(SINGLE_WEIGHTS)) {
      const others = [...files].filter((f) => /\.(bin|pt|pth|ckpt|h5|msgpack|onnx|gguf)$/.test(f) || f.endsWith(".safetensors"));
      const found = others.length ? ` (it has ${others.slice(0, 3).join(", ")}${others.length > 3 ? ", ..." : ""})` : "";
      throw new Blip2Error(
        `${label(this.repo, this.s.revision)}: the repo has no safetensors weights (${SINGLE_WEIGHTS} or ${WEIGHTS_INDEX})${found}; only safetensors checkpoints can be loaded`,
      );
    }
    // Small files first, weights last: a snapshot holding all weights is complete (see missingForLoad).
    const first = MODEL_FILES.filter((f) => files.has(f)) as string[];
    if (hasIndex) first.push(WEIGHTS_INDEX);
    await inPool(first, (f, signal) => this.file(commit, f, signal));
    const weights = hasIndex ? this.shards(commit, files) : [SINGLE_WEIGHTS];
    await inPool(weights, (f, signal) => this.file(commit, f, signal));
    return snapshot;
  }

  /** The *.safetensors shards model.safetensors.index.json names (each must be in the repo). */
  private shards(commit: string, files: Set<string>): string[] {
    const indexFile = pointerPath(this.storage, commit, WEIGHTS_INDEX);
    let map: unknown;
    try {
      map = (JSON.parse(fs.readFileSync(indexFile, "utf8")) as { weight_map?: unknown })?.weight_map;
    } catch (err) {
      throw new Blip2Error(`${this.repo}: ${WEIGHTS_INDEX} is not valid JSON (${describeError(err)})`);
    }
    if (!map || typeof map !== "object" || Array.isArray(map)) throw new Blip2Error(`${this.repo}: ${WEIGHTS_INDEX} has no weight_map`);
    const shards = [...new Set(Object.values(map as Record<string, unknown>))];
    for (const shard of shards) {
      if (typeof shard !== "string" || !shard.endsWith(".safetensors") || !isSafeRepoPath(shard)) {
        throw new Blip2Error(`${this.repo}: ${WEIGHTS_INDEX} names the shard ${JSON.stringify(shard)}, which is not a .safetensors file of the repo`);
      }
      if (!files.has(shard)) throw new Blip2Error(`${this.repo}: ${WEIGHTS_INDEX} names the shard ${shard}, which the repo does not have`);
    }
    return shards as string[];
  }

  // ---- HTTP ----

  private headers(extra: Record<string, string> = {}, auth = true): Record<string, string> {
    const h: Record<string, string> = { "user-agent": `blip2 (Node.js ${process.version})`, ...extra };
    if (auth && this.s.token) h.authorization = `Bearer ${this.s.token}`;
    return h;
  }

  /** fetch, with network failures turned into one-line errors. */
  private async request(url: string, init: RequestInit, timer: Timer): Promise<Response> {
    try {
      return await fetch(url, { ...init, signal: timer.signal });
    } catch (err) {
      throw this.requestError(url, err, timer);
    }
  }

  private requestError(url: string, err: unknown, timer: Timer): unknown {
    if (err instanceof Blip2Error) return err;
    if (timer.parentAborted) return err; // another file failed; its error is the one reported
    const origin = new URL(url).origin;
    const where = origin === new URL(this.s.endpoint).origin ? this.s.endpoint : origin;
    if (timer.timedOut) return new Blip2Error(`${this.repo}: ${where} did not answer within ${timer.ms / 1000} s; ${this.offlineHint()}`);
    return new Blip2Error(`${this.repo}: cannot reach ${where} (${networkCode(err)}); ${this.offlineHint()}`, { cause: err });
  }

  private offlineHint(): string {
    const commit = readRef(this.storage, this.s.revision);
    const snapshot = commit === undefined ? undefined : snapshotFolder(this.storage, commit);
    if (snapshot && fs.existsSync(snapshot) && missingForLoad(snapshot).length === 0) {
      return `the model is cached at ${snapshot}: set HF_HUB_OFFLINE=1 to use it without the network`;
    }
    return "check the network, HF_ENDPOINT or a proxy, or set HF_HUB_OFFLINE=1 to use models already in the cache";
  }

  /** A one-line error for an HTTP error answer. */
  private async httpError(res: Response, what: { file?: string; listing?: boolean }): Promise<never> {
    await res.body?.cancel().catch(() => {});
    const code = res.headers.get("x-error-code");
    const message = oneLine(res.headers.get("x-error-message") ?? "");
    const status = res.status;
    const repo = this.repo;
    if (status === 401 || status === 403) {
      const maybeMissing = code === "RepoNotFound" ? " (or does not exist)" : "";
      const hint = this.s.token
        ? "the token given has no access to it (for a gated repo, accept its conditions on the Hub first)"
        : "set HF_TOKEN or pass token";
      throw new Blip2Error(`${repo}: access denied (${status}): the repo is private or gated${maybeMissing}; ${hint}`);
    }
    if (code === "RevisionNotFound") {
      throw new Blip2Error(`${repo}: unknown revision ${JSON.stringify(this.s.revision)} (${status}): no such branch, tag or commit on ${this.s.endpoint}`);
    }
    if (status === 404 && (what.listing || code === "RepoNotFound")) throw new Blip2Error(`${repo}: no such model on ${this.s.endpoint} (404)`);
    if (status === 404 && what.file) throw new Blip2Error(`${repo}: ${what.file} not found (404) though the repo listing has it`);
    const about = what.file ? `downloading ${what.file}` : "listing the repo";
    const detail = message ? `: ${message}` : "";
    const retry = status === 429 || status >= 500 ? "; try again later" : "";
    throw new Blip2Error(`${repo}: ${this.s.endpoint} answered HTTP ${status} ${about}${detail}${retry}`);
  }

  private async listRevision(): Promise<RevisionInfo> {
    const url = `${this.s.endpoint}/api/models/${this.repo}/revision/${encodeURIComponent(this.s.revision)}`;
    const timer = new Timer(this.s.metadataTimeoutMs);
    try {
      const res = await this.request(url, { headers: this.headers({ accept: "application/json" }) }, timer);
      if (!res.ok) await this.httpError(res, { listing: true });
      let json: unknown;
      try {
        json = await res.json();
      } catch (err) {
        if (timer.timedOut) throw this.requestError(url, err, timer);
        throw new Blip2Error(`${this.repo}: ${this.s.endpoint} answered the repo listing with something other than JSON; is HF_ENDPOINT a Hugging Face Hub?`);
      }
      const info = json as { sha?: unknown; siblings?: unknown };
      const siblings = Array.isArray(info?.siblings) ? (info.siblings as { rfilename?: unknown }[]) : undefined;
      if (typeof info?.sha !== "string" || !/^[0-9A-Za-z]+$/.test(info.sha) || !siblings) {
        throw new Blip2Error(`${this.repo}: the repo listing from ${this.s.endpoint} has no commit sha or file list; is HF_ENDPOINT a Hugging Face Hub?`);
      }
      const files = new Set<string>();
      for (const s of siblings) if (typeof s?.rfilename === "string" && isSafeRepoPath(s.rfilename)) files.add(s.rfilename);
      return { sha: info.sha, files };
    } finally {
      timer.stop();
    }
  }

  /** Make snapshots/{commit}/{file} present: nothing to do, a link to a known blob, or a download. */
  private async file(commit: string, file: string, signal: AbortSignal): Promise<void> {
    const pointer = pointerPath(this.storage, commit, file);
    if (fs.existsSync(pointer)) return;
    const meta = await this.metadata(commit, file, signal);
    const blob = blobPath(this.storage, meta.etag);
    if (!fs.existsSync(blob)) {
      let pending = this.inflight.get(blob);
      if (!pending) {
        pending = this.downloadBlob(file, meta, blob, signal).finally(() => this.inflight.delete(blob));
        this.inflight.set(blob, pending);
      }
      await pending;
    }
    linkPointer(blob, pointer);
  }

  /** HEAD on the resolve URL; same-host (relative) redirects are followed, a CDN redirect is not. */
  private async metadata(commit: string, file: string, signal: AbortSignal): Promise<FileMetadata> {
    let url = `${this.s.endpoint}/${this.repo}/resolve/${commit}/${file.split("/").map(encodeURIComponent).join("/")}`;
    const timer = new Timer(this.s.metadataTimeoutMs, signal);
    try {
      for (let hops = 0; ; hops++) {
        const res = await this.request(url, { method: "HEAD", headers: this.headers({ "accept-encoding": "identity" }), redirect: "manual" }, timer);
        const redirect = res.status >= 300 && res.status < 400;
        const location = res.headers.get("location");
        if (redirect && location && isRelativeUrl(location) && hops < 10) {
          url = new URL(location, url).href; // e.g. a renamed repo
          continue;
        }
        if (!redirect && !res.ok) await this.httpError(res, { file });
        const etag = normalizeEtag(res.headers.get("x-linked-etag") ?? res.headers.get("etag"));
        const size = toSize(res.headers.get("x-linked-size") ?? (redirect ? null : res.headers.get("content-length")));
        const repoCommit = res.headers.get("x-repo-commit");
        if (repoCommit && repoCommit !== commit) {
          throw new Blip2Error(`${this.repo}: ${file}: ${this.s.endpoint} answered for commit ${repoCommit}, not the ${commit} it listed; try again`);
        }
        if (redirect && !location) throw new Blip2Error(`${this.repo}: ${file}: ${this.s.endpoint} answered ${res.status} without a Location`);
        if (!etag) throw new Blip2Error(`${this.repo}: ${file}: ${this.s.endpoint} sent no ETag, so the file cannot be cached; is HF_ENDPOINT a Hugging Face Hub?`);
        if (!/^[A-Za-z0-9_.+=-]+$/.test(etag) || etag === "." || etag === "..") {
          throw new Blip2Error(`${this.repo}: ${file}: unusable ETag ${JSON.stringify(etag)} from ${this.s.endpoint}`);
        }
        if (size === undefined) throw new Blip2Error(`${this.repo}: ${file}: ${this.s.endpoint} sent no file size (X-Linked-Size or Content-Length)`);
        return { etag, size, location: redirect ? new URL(location!, url).href : url };
      }
    } finally {
      timer.stop();
    }
  }

  private async get(meta: FileMetadata, start: number, timer: Timer): Promise<Response> {
    // Like huggingface_hub: a CDN on another host gets a signed URL, not the token.
    const sameHost = new URL(meta.location).host === new URL(this.s.endpoint).host;
    const extra: Record<string, string> = { "accept-encoding": "identity" };
    if (start > 0) extra.range = `bytes=${start}-`;
    return this.request(meta.location, { headers: this.headers(extra, sameHost) }, timer);
  }

  /** Download to blobs/{etag}.incomplete (continuing what is there), verify, rename to blobs/{etag}. */
  private async downloadBlob(file: string, meta: FileMetadata, blob: string, signal: AbortSignal): Promise<void> {
    const incomplete = `${blob}.incomplete`;
    fs.mkdirSync(path.dirname(blob), { recursive: true });
    let start = fileSize(incomplete);
    if (start > meta.size) start = 0;
    const checksum = Checksum.forEtag(meta.etag, meta.size);
    if (start > 0 && checksum) await checksum.addFile(incomplete, start);

    let loaded = start;
    let lastReport = 0;
    let progressError: { error: unknown } | undefined;
    const report = (done: boolean) => {
      if (!this.s.progress) return;
      try {
        this.s.progress({ file, loaded, total: meta.size, done });
      } catch (error) {
        progressError ??= { error };
        throw error;
      }
    };

    const timer = new Timer(this.s.idleTimeoutMs, signal);
    let tooLong = false;
    try {
      if (start < meta.size) {
        let res = await this.get(meta, start, timer);
        if (start > 0) {
          const range = parseContentRange(res.headers.get("content-range"));
          const resumed = res.status === 206 && range?.start === start && (range.total === undefined || range.total === meta.size);
          if (!resumed && res.status !== 200) {
            // 416, or a range we did not ask for: start over.
            await res.body?.cancel().catch(() => {});
            res = await this.get(meta, 0, timer);
          }
          if (!resumed) {
            start = 0;
            loaded = 0;
            checksum?.reset();
          }
        }
        if (res.status !== 200 && !(start > 0 && res.status === 206)) await this.httpError(res, { file });
        if (!res.body) throw new Blip2Error(`${this.repo}: ${file}: empty answer from ${new URL(meta.location).origin}`);

        lastReport = Date.now();
        report(false);
        // Every received chunk is written (awaited) before the next is read: when the connection
        // breaks, what arrived is on disk, a prefix of the file, for the next run to continue.
        const out = await fs.promises.open(incomplete, start > 0 ? "a" : "w");
        try {
          for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
            loaded += chunk.length;
            if (loaded > meta.size) {
              tooLong = true;
              throw new Error("more bytes than announced");
            }
            checksum?.update(chunk);
            timer.touch();
            await writeAll(out, chunk);
            const now = Date.now();
            if (now - lastReport >= PROGRESS_INTERVAL_MS) {
              lastReport = now;
              report(false);
            }
          }
        } finally {
          await out.close();
        }
      } else if (start === 0) {
        fs.writeFileSync(incomplete, ""); // an empty file
      }
    } catch (err) {
      if (progressError) throw progressError.error;
      if (err instanceof Blip2Error) throw err;
      if (timer.parentAborted) throw err;
      if (tooLong) {
        fs.rmSync(incomplete, { force: true });
        throw new Blip2Error(`${this.repo}: ${file}: the server sent more than the ${meta.size} bytes it announced; the partial download was deleted, try again`);
      }
      const got = fileSize(incomplete);
      const why = timer.timedOut ? `no data for ${timer.ms / 1000} s` : networkCode(err);
      throw new Blip2Error(`${this.repo}: download of ${file} was interrupted after ${got} of ${meta.size} bytes (${why}); run again to resume`, { cause: err });
    } finally {
      timer.stop();
    }

    const got = fileSize(incomplete);
    if (got < meta.size) {
      throw new Blip2Error(`${this.repo}: download of ${file} was interrupted after ${got} of ${meta.size} bytes (the connection closed early); run again to resume`);
    }
    if (got > meta.size) {
      fs.rmSync(incomplete, { force: true });
      throw new Blip2Error(`${this.repo}: ${file}: ${got} bytes downloaded but ${meta.size} announced; the download was deleted, try again`);
    }
    if (checksum) {
      const digest = checksum.digest();
      if (digest !== meta.etag.toLowerCase()) {
        fs.rmSync(incomplete, { force: true });
        throw new Blip2Error(
          `${this.repo}: ${file}: the downloaded content does not match its ${checksum.name} (expected ${meta.etag}, got ${digest}); the download was deleted, try again`,
        );
      }
    }
    fs.renameSync(incomplete, blob);
    loaded = meta.size;
    report(true);
  }
}

/** The checksum an etag stands for: sha256 of the content (LFS), or the git blob sha1. */
class Checksum {
  private hash!: Hash;

  private constructor(
    readonly name: string,
    private readonly algorithm: "sha256" | "sha1",
    private readonly prefix: string,
  ) {
    this.reset();
  }

  static forEtag(etag: string, size: number): Checksum | undefined {
    if (/^[0-9a-fA-F]{64}$/.test(etag)) return new Checksum("sha256", "sha256", "");
    if (/^[0-9a-fA-F]{40}$/.test(etag)) return new Checksum("git blob sha1", "sha1", `blob ${size}\0`);
    return undefined;
  }

  reset(): void {
    this.hash = createHash(this.algorithm);
    if (this.prefix) this.hash.update(this.prefix);
  }

  update(chunk: Uint8Array): void {
    this.hash.update(chunk);
  }

  /** Hash the first `length` bytes of a file (what an earlier run downloaded). */
  async addFile(file: string, length: number): Promise<void> {
    for await (const chunk of fs.createReadStream(file, { start: 0, end: length - 1 })) this.hash.update(chunk as Buffer);
  }

  digest(): string {
    return this.hash.digest("hex");
  }
}

/**
 * Aborts a request when `ms` pass without `touch()` (a stall), or when `parent` aborts
 * (another file of the same snapshot failed).
 */
class Timer {
  private readonly controller = new AbortController();
  private last = Date.now();
  private readonly interval: NodeJS.Timeout;
  timedOut = false;
  parentAborted = false;

  constructor(
    readonly ms: number,
    private readonly parent?: AbortSignal,
  ) {
    this.interval = setInterval(() => this.check(), Math.max(10, Math.min(1000, ms / 4)));
    this.interval.unref();
    if (parent?.aborted) this.onParent();
    else parent?.addEventListener("abort", this.onParent, { once: true });
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  touch(): void {
    this.last = Date.now();
  }

  stop(): void {
    clearInterval(this.interval);
    this.parent?.removeEventListener("abort", this.onParent);
  }

  private check(): void {
    if (Date.now() - this.last < this.ms || this.controller.signal.aborted) return;
    this.timedOut = true;
    this.controller.abort(new Error("timed out"));
  }

  private readonly onParent = (): void => {
    this.parentAborted = true;
    this.controller.abort(new Error("cancelled"));
  };
}

/** Runs `fn` over `items`, a few at a time; on the first failure the others are aborted and that failure is thrown. */
async function inPool<T>(items: readonly T[], fn: (item: T, signal: AbortSignal) => Promise<void>): Promise<void> {
  const controller = new AbortController();
  let failure: { error: unknown } | undefined;
  let next = 0;
  const worker = async () => {
    while (next < items.length && !failure) {
      const item = items[next++]!;
      try {
        await fn(item, controller.signal);
      } catch (error) {
        if (!failure) {
          failure = { error };
          controller.abort();
        }
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(CONCURRENCY, items.length) }, worker));
  if (failure) throw failure.error;
}

/** A repo path safe to put under snapshots/: relative, "/"-separated, no "." or ".." parts. */
function isSafeRepoPath(p: string): boolean {
  return p !== "" && !p.startsWith("/") && !p.includes("\\") && !/[\u0000-\u001f]/.test(p) && p.split("/").every((part) => part !== "" && part !== "." && part !== "..");
}

function isRelativeUrl(location: string): boolean {
  return !/^[A-Za-z][A-Za-z0-9+.-]*:/.test(location) && !location.startsWith("//");
}

/** `W/"abc"` or `"abc"` → `abc` (huggingface_hub's _normalize_etag). */
function normalizeEtag(etag: string | null): string | undefined {
  if (etag === null) return undefined;
  const e = etag.trim().replace(/^W\//, "").replace(/^"+|"+$/g, "");
  return e || undefined;
}

function toSize(value: string | null): number | undefined {
  if (value === null || !/^\d+$/.test(value.trim())) return undefined;
  const n = Number(value.trim());
  return Number.isSafeInteger(n) ? n : undefined;
}

/** "bytes 100-199/200" → { start: 100, total: 200 } ("*" total → undefined). */
function parseContentRange(value: string | null): { start: number; total: number | undefined } | undefined {
  const m = value === null ? null : /^bytes\s+(\d+)-(\d+)\/(\d+|\*)$/i.exec(value.trim());
  if (!m) return undefined;
  return { start: Number(m[1]), total: m[3] === "*" ? undefined : Number(m[3]) };
}

async function writeAll(out: fs.promises.FileHandle, chunk: Uint8Array): Promise<void> {
  for (let offset = 0; offset < chunk.length; ) {
    const { bytesWritten } = await out.write(chunk, offset, chunk.length - offset);
    offset += bytesWritten;
  }
}

function fileSize(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

/** ECONNREFUSED, ENOTFOUND, ... from a fetch error and its causes. */
function networkCode(err: unknown): string {
  let e: unknown = err;
  for (let depth = 0; e && depth < 5; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && code) return code;
    const inner = (e as { errors?: unknown[] }).errors;
    if (Array.isArray(inner) && inner.length > 0) {
      const c = (inner[0] as { code?: unknown }).code;
      if (typeof c === "string" && c) return c;
    }
    if (!(e as { cause?: unknown }).cause) break;
    e = (e as { cause?: unknown }).cause;
  }
  return oneLine(describeError(e ?? err));
}

function oneLine(s: string): string {
  return s.replace(/\s+/g, " ").trim();
}
