/**
 * A fake Hugging Face Hub on 127.0.0.1 (random port) for the download tests. It answers like the Hub:
 * - `GET /api/models/{repo}/revision/{revision}` → `{ id, sha, siblings: [{ rfilename }] }`;
 *   404 with X-Error-Code RepoNotFound / RevisionNotFound; 401 for a private repo without its token.
 * - `HEAD|GET /{repo}/resolve/{revision}/{file}` with X-Repo-Commit. Regular files: 200 with
 *   `ETag: "<git blob sha1>"`. LFS files (*.safetensors, *.bin): 302 to `/cdn/<sha256>` with
 *   `X-Linked-Etag: "<sha256>"`, `X-Linked-Size` and an ETag/Content-Length of their own (the
 *   pointer's and the redirect body's) that a client must not use.
 * - `GET /cdn/<sha256>`: the bytes, no auth (a signed URL on the real Hub).
 * Range requests get 206 + Content-Range (416 past the end). Switches make the next download of a
 * file stop mid-body, carry corrupted bytes, trickle slowly, or ignore Range; every request is logged.
 */
import { createHash } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import path from "node:path";

export type RepoFiles = Record<string, Buffer>;

export interface FakeRepo {
  id: string;
  /** Branch or tag → files at that revision (each gets its own commit hash). */
  revisions: Record<string, RepoFiles>;
  /** Only served with `Authorization: Bearer {hub.token}`. */
  private?: boolean;
}

export interface LoggedRequest {
  method: string;
  /** Decoded request path. */
  path: string;
  kind: "api" | "resolve" | "cdn" | "other";
  /** Repo file the request is about (resolve and cdn). */
  file?: string;
  range?: string;
  authorization?: string;
  status: number;
  /** Body bytes of file data sent (0 for HEAD, redirects and errors). */
  bytes: number;
}

export const sha256 = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");
export const sha1 = (b: Buffer | string) => createHash("sha1").update(b).digest("hex");
/** Git's blob id: sha1("blob {size}\0" + content), the Hub's ETag of regular files. */
export const gitBlobSha1 = (b: Buffer) => createHash("sha1").update(`blob ${b.length}\0`).update(b).digest("hex");
export const isLfs = (file: string) => file.endsWith(".safetensors") || file.endsWith(".bin");

/** The commit hash the fake Hub gives a revision of a repo. */
export const commitOf = (repo: string, revision: string) => sha1(`${repo}@${revision}`);

/** Every file of a folder (recursively), keyed by its "/"-separated relative path. */
export function readFolder(dir: string, prefix = ""): RepoFiles {
  const out: RepoFiles = {};
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const rel = prefix + entry.name;
    if (entry.isDirectory()) Object.assign(out, readFolder(path.join(dir, entry.name), rel + "/"));
    else out[rel] = fs.readFileSync(path.join(dir, entry.name));
  }
  return out;
}

interface Revision {
  repo: FakeRepo;
  sha: string;
  files: RepoFiles;
}

interface Slow {
  chunk: number;
  delayMs: number;
}

export class FakeHub {
  readonly log: LoggedRequest[] = [];
  /** The token private repos want. */
  token = "hf_fake_secret_token";
  url = "";
  private readonly server: http.Server;
  private readonly repos = new Map<string, FakeRepo>();
  private readonly lfsBlobs = new Map<string, { file: string; data: Buffer }>();
  private readonly interrupts = new Map<string, number>();
  private readonly corruptions = new Set<string>();
  private readonly slow = new Map<string, Slow>();
  private ignoreRange = false;

  constructor(repos: FakeRepo[]) {
    for (const repo of repos) {
      this.repos.set(repo.id, repo);
      for (const files of Object.values(repo.revisions)) {
        for (const [file, data] of Object.entries(files)) if (isLfs(file)) this.lfsBlobs.set(sha256(data), { file, data });
      }
    }
    this.server = http.createServer((req, res) => this.handle(req, res));
  }

  async listen(): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** The next data response for `file` sends `bytes` bytes of its body, then the socket is destroyed. */
  interruptNext(file: string, bytes: number): void {
    this.interrupts.set(file, bytes);
  }

  /** The next data response for `file` has one byte changed (same length). */
  corruptNext(file: string): void {
    this.corruptions.add(file);
  }

  /** The next data response for `file` is sent `chunk` bytes at a time, `delayMs` apart. */
  slowNext(file: string, chunk: number, delayMs: number): void {
    this.slow.set(file, { chunk, delayMs });
  }

  /** The next Range request is answered 200 with the whole file, as some CDNs do. */
  ignoreRangeNext(): void {
    this.ignoreRange = true;
  }

  /** Logged requests that carried file bytes or asked for them (GET on resolve or cdn). */
  dataRequests(): LoggedRequest[] {
    return this.log.filter((r) => r.method === "GET" && (r.kind === "cdn" || (r.kind === "resolve" && r.status < 300)));
  }

  clearLog(): void {
    this.log.length = 0;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = new URL(req.url ?? "/", "http://x");
    const rawPath = url.pathname;
    const entry: LoggedRequest = {
      method: req.method ?? "GET",
      path: decodeURIComponent(rawPath),
      kind: "other",
      range: req.headers.range,
      authorization: req.headers.authorization,
      status: 0,
      bytes: 0,
    };
    this.log.push(entry);
    const reply = (status: number, headers: Record<string, string | number> = {}, body = "") => {
      entry.status = status;
      res.writeHead(status, { "content-length": Buffer.byteLength(body), ...headers });
      res.end(req.method === "HEAD" ? undefined : body);
    };

    if (rawPath.startsWith("/api/models/")) {
      entry.kind = "api";
      const m = /^\/api\/models\/(.+)\/revision\/([^/]+)$/.exec(rawPath);
      if (!m || req.method !== "GET") return reply(404, {}, "Not Found");
      const found = this.revision(decodeURIComponent(m[1]!), decodeURIComponent(m[2]!), req);
      if ("error" in found) return reply(found.status, found.headers, JSON.stringify({ error: found.error }));
      const { repo, sha, files } = found;
      const body = JSON.stringify({
        _id: sha.slice(0, 24),
        id: repo.id,
        modelId: repo.id,
        private: !!repo.private,
        sha,
        siblings: Object.keys(files)
          .sort()
          .map((rfilename) => ({ rfilename })),
      });
      return reply(200, { "content-type": "application/json; charset=utf-8" }, body);
    }

    if (rawPath.startsWith("/cdn/")) {
      entry.kind = "cdn";
      const blob = this.lfsBlobs.get(rawPath.slice("/cdn/".length));
      if (!blob || (req.method !== "GET" && req.method !== "HEAD")) return reply(404, {}, "NoSuchKey");
      entry.file = blob.file;
      return this.sendData(req, res, entry, blob.file, blob.data, { etag: `"${sha256(blob.data)}"` });
    }

    const m = /^\/(.+?)\/resolve\/([^/]+)\/(.+)$/.exec(rawPath);
    if (m && (req.method === "GET" || req.method === "HEAD")) {
      entry.kind = "resolve";
      const found = this.revision(decodeURIComponent(m[1]!), decodeURIComponent(m[2]!), req);
      if ("error" in found) return reply(found.status, found.headers, found.error);
      const file = m[3]!.split("/").map(decodeURIComponent).join("/");
      entry.file = file;
      const data = found.files[file];
      const common = { "x-repo-commit": found.sha, "accept-ranges": "bytes" };
      if (!data) return reply(404, { ...common, "x-error-code": "EntryNotFound", "x-error-message": "Entry not found" }, "Entry not found");
      if (isLfs(file)) {
        const oid = sha256(data);
        const pointer = Buffer.from(`version https://git-lfs.github.com/spec/v1\noid sha256:${oid}\nsize ${data.length}\n`);
        const location = `${this.url}/cdn/${oid}`;
        return reply(
          302,
          { ...common, location, etag: `"${gitBlobSha1(pointer)}"`, "x-linked-etag": `"${oid}"`, "x-linked-size": data.length },
          `Found. Redirecting to ${location}`,
        );
      }
      return this.sendData(req, res, entry, file, data, { ...common, etag: `"${gitBlobSha1(data)}"` });
    }
    reply(404, {}, "Not Found");
  }

  private revision(
    repoId: string,
    revision: string,
    req: http.IncomingMessage,
  ): Revision | { error: string; status: number; headers: Record<string, string> } {
    const repo = this.repos.get(repoId);
    if (!repo) return { error: "Repository not found", status: 404, headers: { "x-error-code": "RepoNotFound", "x-error-message": "Repository not found" } };
    if (repo.private && req.headers.authorization !== `Bearer ${this.token}`) {
      return { error: "Invalid username or password.", status: 401, headers: { "x-error-message": "Invalid username or password." } };
    }
    for (const [name, files] of Object.entries(repo.revisions)) {
      const sha = commitOf(repo.id, name);
      if (revision === name || revision === sha) return { repo, sha, files };
    }
    return {
      error: `Invalid rev id: ${revision}`,
      status: 404,
      headers: { "x-error-code": "RevisionNotFound", "x-error-message": `Invalid rev id: ${revision}` },
    };
  }

  private sendData(req: http.IncomingMessage, res: http.ServerResponse, entry: LoggedRequest, file: string, data: Buffer, headers: Record<string, string>): void {
    let body = data;
    let status = 200;
    const out: Record<string, string | number> = { ...headers, "accept-ranges": "bytes", "content-type": "application/octet-stream" };
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "");
    if (range && this.ignoreRange) {
      this.ignoreRange = false;
    } else if (range) {
      const start = Number(range[1]);
      const end = range[2] ? Math.min(Number(range[2]), data.length - 1) : data.length - 1;
      if (start >= data.length || end < start) {
        entry.status = 416;
        res.writeHead(416, { "content-range": `bytes */${data.length}`, "content-length": 0 });
        res.end();
        return;
      }
      status = 206;
      body = data.subarray(start, end + 1);
      out["content-range"] = `bytes ${start}-${end}/${data.length}`;
    }
    if (req.method === "GET" && this.corruptions.delete(file)) {
      body = Buffer.from(body);
      body[body.length >> 1]! ^= 0xff;
    }
    out["content-length"] = body.length;
    entry.status = status;
    res.writeHead(status, out);
    if (req.method === "HEAD") {
      res.end();
      return;
    }
    const cut = this.interrupts.get(file);
    if (cut !== undefined) {
      this.interrupts.delete(file);
      entry.bytes = Math.min(cut, body.length);
      // Destroy a moment after the bytes left, so the client reads them before it sees the socket close
      // (a fetch body stream that errors drops the chunks it has queued but not yet handed out).
      res.write(body.subarray(0, cut), () => setTimeout(() => res.socket?.destroy(), 100));
      return;
    }
    const slow = this.slow.get(file);
    entry.bytes = body.length;
    if (slow) {
      this.slow.delete(file);
      let offset = 0;
      const tick = () => {
        if (res.destroyed) return;
        const piece = body.subarray(offset, offset + slow.chunk);
        offset += piece.length;
        if (offset >= body.length) res.end(piece);
        else res.write(piece, () => setTimeout(tick, slow.delayMs));
      };
      tick();
      return;
    }
    res.end(body);
  }
}

export async function startFakeHub(repos: FakeRepo[]): Promise<FakeHub> {
  return new FakeHub(repos).listen();
}
