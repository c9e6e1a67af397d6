/**
 * The Hugging Face cache layout (shared with `huggingface_hub`, transformers, diffusers...):
 *
 *   {cache}/models--{org}--{name}/
 *     blobs/{etag}                 file contents, named by etag (git sha1, or sha256 for LFS files)
 *     blobs/{etag}.incomplete      a download in progress (resumed with a Range request)
 *     refs/{revision}              the commit hash a branch or tag pointed to when last resolved
 *     snapshots/{commit}/{file}    relative symlink to ../../blobs/{etag} (one more ../ per folder level)
 */
import fs from "node:fs";
import path from "node:path";
import { readJsonFile } from "../io/checkpoint.js";

export const COMMIT_HASH = /^[0-9a-f]{40}$/;

/** "org/name" → "models--org--name" (huggingface_hub's repo_folder_name). */
export function repoFolderName(repo: string): string {
  return ["models", ...repo.split("/")].join("--");
}

export function storageFolder(cacheDir: string, repo: string): string {
  return path.join(cacheDir, repoFolderName(repo));
}

export function snapshotFolder(storage: string, commit: string): string {
  return path.join(storage, "snapshots", commit);
}

/** Local path of a repo file ("a/b.json") inside a snapshot. */
export function pointerPath(storage: string, commit: string, file: string): string {
  return path.join(snapshotFolder(storage, commit), ...file.split("/"));
}

export function blobPath(storage: string, etag: string): string {
  return path.join(storage, "blobs", etag);
}

export function refPath(storage: string, revision: string): string {
  return path.join(storage, "refs", ...revision.split("/"));
}

/** The commit a branch or tag resolved to last time, from refs/ (a commit hash is its own answer). */
export function readRef(storage: string, revision: string): string | undefined {
  if (COMMIT_HASH.test(revision)) return revision;
  try {
    const commit = fs.readFileSync(refPath(storage, revision), "utf8").trim();
    return commit || undefined;
  } catch {
    return undefined;
  }
}

/** Record revision → commit (only for branches and tags; rewritten only when it changed, atomically). */
export function writeRef(storage: string, revision: string, commit: string): void {
  if (revision === commit) return;
  const file = refPath(storage, revision);
  if (readRef(storage, revision) === commit) return;
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.${Math.random().toString(36).slice(2, 10)}.tmp`;
  fs.writeFileSync(tmp, commit);
  fs.renameSync(tmp, file);
}

/** snapshots/{commit}/{file} → a relative symlink to the blob (a copy where symlinks are not allowed). */
export function linkPointer(blob: string, pointer: string): void {
  fs.mkdirSync(path.dirname(pointer), { recursive: true });
  const target = path.relative(path.dirname(pointer), blob);
  try {
    fs.rmSync(pointer, { force: true });
    fs.symlinkSync(target, pointer);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "EEXIST" && safeRealpath(pointer) === safeRealpath(blob)) return; // linked concurrently
    if (code === "EPERM" || code === "EACCES" || code === "ENOTSUP" || code === "EINVAL") {
      // e.g. Windows without developer mode: huggingface_hub falls back to a copy as well
      fs.copyFileSync(blob, pointer);
      return;
    }
    throw err;
  }
}

function safeRealpath(p: string): string | undefined {
  try {
    return fs.realpathSync(p);
  } catch {
    return undefined;
  }
}

/**
 * What a snapshot folder lacks for BLIP-2 to load: config.json and complete safetensors weights
 * (model.safetensors, or the index and every shard it names). Empty when loadable. Weights are
 * downloaded last, so a snapshot that has them also has the tokenizer and processor files.
 */
export function missingForLoad(dir: string): string[] {
  const has = (f: string) => fs.existsSync(path.join(dir, ...f.split("/")));
  const missing: string[] = [];
  if (!has("config.json")) missing.push("config.json");
  if (has("model.safetensors.index.json")) {
    let shards: string[] = [];
    try {
      const map = (readJsonFile(path.join(dir, "model.safetensors.index.json")) as { weight_map?: Record<string, unknown> } | undefined)?.weight_map;
      shards = [...new Set(Object.values(map ?? {}).filter((v): v is string => typeof v === "string"))];
    } catch {
      missing.push("a readable model.safetensors.index.json");
    }
    missing.push(...shards.filter((s) => !has(s)));
  } else if (!has("model.safetensors")) {
    missing.push("model.safetensors");
  }
  return missing;
}
