/**
 * Hub settings from options and environment variables, resolved the way `huggingface_hub`'s
 * `constants.py` does (read at call time, so tests and long-lived processes see changes):
 * HF_HUB_CACHE (legacy HUGGINGFACE_HUB_CACHE), HF_HOME (else $XDG_CACHE_HOME/huggingface, else
 * ~/.cache/huggingface), HF_TOKEN (legacy HUGGING_FACE_HUB_TOKEN, else the file HF_TOKEN_PATH or
 * $HF_HOME/token), HF_ENDPOINT, HF_HUB_OFFLINE (legacy TRANSFORMERS_OFFLINE), HF_HUB_ETAG_TIMEOUT,
 * HF_HUB_DOWNLOAD_TIMEOUT.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Blip2Error } from "../errors.js";

export const DEFAULT_ENDPOINT = "https://huggingface.co";
export const DEFAULT_REVISION = "main";

export interface DownloadProgress {
  /** Path of the file in the repo ("model.safetensors"). */
  file: string;
  /** Bytes of this file on disk so far (a resumed download starts at what was already there). */
  loaded: number;
  /** Bytes of this file. */
  total: number;
  done: boolean;
}

export interface HubOptions {
  /** Branch, tag or commit hash (default "main"). */
  revision?: string;
  /** Default: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub. */
  cacheDir?: string;
  /** Default: HF_TOKEN, else the token file $HF_HOME/token when present. */
  token?: string;
  /** Default: HF_ENDPOINT, else https://huggingface.co. */
  endpoint?: string;
  /** Default: HF_HUB_OFFLINE=1 (or "true", "yes", "on"). No network at all: the cache only. */
  offline?: boolean;
  /** Called as bytes arrive (at most ~10 times a second per file) and once with `done: true` per downloaded file. */
  progress?: (p: DownloadProgress) => void;
}

export interface HubSettings {
  revision: string;
  cacheDir: string;
  token: string | undefined;
  endpoint: string;
  offline: boolean;
  progress: ((p: DownloadProgress) => void) | undefined;
  /** Limit for metadata requests (listing, HEAD), ms. */
  metadataTimeoutMs: number;
  /** Longest a download may go without receiving a byte, ms. */
  idleTimeoutMs: number;
}

type Env = Record<string, string | undefined>;

const TRUE_VALUES = new Set(["1", "ON", "YES", "TRUE"]);

export function isTrue(value: string | undefined): boolean {
  return value !== undefined && TRUE_VALUES.has(value.trim().toUpperCase());
}

const nonEmpty = (v: string | undefined): string | undefined => (v !== undefined && v.trim() !== "" ? v : undefined);

function expandUser(p: string): string {
  if (p === "~") return os.homedir();
  if (p.startsWith("~/") || p.startsWith("~\\")) return path.join(os.homedir(), p.slice(2));
  return p;
}

/** $HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface. */
export function hfHome(env: Env = process.env): string {
  const home = nonEmpty(env.HF_HOME);
  if (home) return path.resolve(expandUser(home));
  const xdg = nonEmpty(env.XDG_CACHE_HOME) ?? path.join(os.homedir(), ".cache");
  return path.resolve(expandUser(xdg), "huggingface");
}

export function defaultCacheDir(env: Env = process.env): string {
  const dir = nonEmpty(env.HF_HUB_CACHE) ?? nonEmpty(env.HUGGINGFACE_HUB_CACHE);
  return dir ? path.resolve(expandUser(dir)) : path.join(hfHome(env), "hub");
}

/** HF_TOKEN, else the legacy HUGGING_FACE_HUB_TOKEN, else the token file written by `hf auth login`. */
export function defaultToken(env: Env = process.env): string | undefined {
  const fromEnv = nonEmpty(env.HF_TOKEN) ?? nonEmpty(env.HUGGING_FACE_HUB_TOKEN);
  if (fromEnv) return fromEnv.trim();
  const file = nonEmpty(env.HF_TOKEN_PATH) ? path.resolve(expandUser(env.HF_TOKEN_PATH!)) : path.join(hfHome(env), "token");
  try {
    return nonEmpty(fs.readFileSync(file, "utf8"))?.trim();
  } catch {
    return undefined;
  }
}

function positiveSeconds(value: string | undefined, fallback: number): number {
  const n = value === undefined ? NaN : Number(value);
  return Number.isFinite(n) && n > 0 ? n : fallback;
}

export function hubSettings(options: HubOptions = {}, env: Env = process.env): HubSettings {
  const endpointRaw = nonEmpty(options.endpoint) ?? nonEmpty(env.HF_ENDPOINT) ?? DEFAULT_ENDPOINT;
  const endpoint = endpointRaw.trim().replace(/\/+$/, "");
  let url: URL | undefined;
  try {
    url = new URL(endpoint);
  } catch {
    url = undefined;
  }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
    const from = nonEmpty(options.endpoint) ? "endpoint" : "HF_ENDPOINT";
    throw new Blip2Error(`${from} ${JSON.stringify(endpointRaw)} is not an http(s) URL`);
  }
  const revision = options.revision ?? DEFAULT_REVISION;
  checkRevision(revision);
  return {
    revision,
    cacheDir: options.cacheDir !== undefined ? path.resolve(expandUser(options.cacheDir)) : defaultCacheDir(env),
    token: options.token !== undefined ? nonEmpty(options.token)?.trim() : defaultToken(env),
    endpoint,
    offline: options.offline ?? (isTrue(env.HF_HUB_OFFLINE) || isTrue(env.TRANSFORMERS_OFFLINE)),
    progress: options.progress,
    metadataTimeoutMs: positiveSeconds(env.HF_HUB_ETAG_TIMEOUT, 10) * 1000,
    idleTimeoutMs: positiveSeconds(env.HF_HUB_DOWNLOAD_TIMEOUT, 10) * 1000,
  };
}

/** A revision becomes a path under refs/ (branches such as "refs/pr/1" included): keep it inside. */
function checkRevision(revision: string): void {
  const bad =
    revision === "" ||
    revision.startsWith("/") ||
    revision.endsWith("/") ||
    revision.includes("\\") ||
    /[\u0000-\u001f\u007f]/.test(revision) ||
    revision.split("/").some((part) => part === "" || part === "." || part === "..");
  if (bad) throw new Blip2Error(`revision ${JSON.stringify(revision)} is not a valid branch, tag or commit`);
}
