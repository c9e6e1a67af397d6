/** Shared test helpers: fixture paths, reference tensors, tolerance checks. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { PassThrough } from "node:stream";
import { fileURLToPath } from "node:url";
import { expect, vi } from "vitest";
import { readSafetensorsHeader, readTensorF32, readTensorInts, type TensorInfo } from "../src/io/safetensors.js";

export const FIXTURES = path.join(path.dirname(fileURLToPath(import.meta.url)), "fixtures");
export const fixture = (...parts: string[]) => path.join(FIXTURES, ...parts);

export interface RefTensor {
  shape: number[];
  data: Float32Array;
}

/** All tensors of a reference safetensors file, floats as float32, ints converted too. */
export function loadReference(file: string): Map<string, RefTensor> {
  const { tensors } = readSafetensorsHeader(file);
  const out = new Map<string, RefTensor>();
  for (const [name, info] of tensors) out.set(name, { shape: info.shape, data: asF32(info) });
  return out;
}

function asF32(info: TensorInfo): Float32Array {
  if (info.dtype.startsWith("F") || info.dtype === "BF16") return readTensorF32(info);
  return Float32Array.from(readTensorInts(info));
}

export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m;
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** The tolerance: max |diff| <= tol * max(1, max |ref|), shapes equal. */
export function expectClose(name: string, actual: { shape: readonly number[]; data: ArrayLike<number> }, ref: RefTensor, tol = 1e-4): void {
  expect(actual.shape, `${name} shape`).toEqual(ref.shape);
  const diff = maxAbsDiff(actual.data, ref.data);
  const bound = tol * Math.max(1, maxAbs(ref.data));
  expect(diff, `${name}: max |diff| ${diff} > ${bound}`).toBeLessThanOrEqual(bound);
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the CLI in-process with captured output (and `input` as stdin, see cliWithInput). */
export async function cli(...argv: string[]): Promise<CliResult> {
  return cliWithInput("", ...argv);
}

export async function cliWithInput(input: string, ...argv: string[]): Promise<CliResult> {
  const { run } = await import("../src/cli/run.js");
  const collect = () => {
    const s = new PassThrough();
    const chunks: Buffer[] = [];
    s.on("data", (c: Buffer) => chunks.push(c));
    return { s, text: () => Buffer.concat(chunks).toString("utf8") };
  };
  const out = collect();
  const err = collect();
  const stdin = new PassThrough();
  stdin.end(input);
  const code = await run(argv, { stdout: out.s, stderr: err.s, stdin });
  return { code, stdout: out.text(), stderr: err.text() };
}

/** A writable copy of a fixture checkpoint in a fresh temp folder. */
export function copyFixture(name: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-test-"));
  fs.cpSync(fixture(name), dir, { recursive: true });
  for (const f of fs.readdirSync(dir)) fs.chmodSync(path.join(dir, f), 0o644);
  return dir;
}

/** Rewrite a safetensors file's JSON header (the data bytes are kept as they are). */
export function editSafetensorsHeader(file: string, edit: (header: Record<string, any>) => void): void {
  const bytes = fs.readFileSync(file);
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString("utf8"));
  edit(header);
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  fs.writeFileSync(file, Buffer.concat([length, json, bytes.subarray(8 + n)]));
}

/**
 * Makes `fs.statSync` or `fs.readdirSync` see `target` as another process leaves it when it moves or
 * removes it meanwhile: ENOENT (or undefined, where asked with `throwIfNoEntry: false`). Every other
 * path is read as usual. `mockRestore()` ends it.
 */
export function vanishing(method: "statSync" | "readdirSync", target: string) {
  const original = fs[method] as (p: fs.PathLike, options?: unknown) => unknown;
  return vi.spyOn(fs, method).mockImplementation(((p: fs.PathLike, options?: { throwIfNoEntry?: boolean }) => {
    if (String(p) !== target) return original(p, options);
    if (options?.throwIfNoEntry === false) return undefined;
    throw Object.assign(new Error(`ENOENT: no such file or directory, ${method === "statSync" ? "stat" : "scandir"} '${target}'`), { code: "ENOENT" });
  }) as never);
}
