/** `blip2 cache`: listing the converted weights, pruning what no version reads, removing one checkpoint's. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Blip2, listWeightCaches } from "../src/index.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { cli, fixture, vanishing } from "./helpers.js";

const root = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-cachecmd-"));
const weights = path.join(root, "weights");
let fingerprint = "";
let current = "";

/** A file of `bytes` bytes (its content does not matter to the cache command). */
function put(file: string, bytes: number): string {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, Buffer.alloc(bytes, 7));
  return file;
}

beforeAll(async () => {
  const b = await Blip2.load(fixture("tiny-blip2-opt"), { dtype: "q8", blip2Cache: root });
  await b.dispose();
  fingerprint = Checkpoint.open(fixture("tiny-blip2-opt")).fingerprint();
  current = path.join(weights, fingerprint, "blip2-weights-3");
});
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

describe("blip2 cache", () => {
  it("lists each checkpoint's conversions, their size, format and source", async () => {
    put(path.join(weights, fingerprint, "blip2-weights-1", "language-q8.safetensors"), 3000);
    const r = await cli("cache", "--cache-dir", root);
    expect(r.code, r.stderr).toBe(0);
    const lines = r.stdout.trim().split("\n");
    expect(lines[0]).toBe(weights);
    const id = fingerprint.slice(0, 12);
    expect(lines).toContain(lines.find((l) => l.startsWith(`${id}  blip2-weights/3`) && l.includes("language-q8, qformer-q8, vision-q8") && l.endsWith(`from ${fixture("tiny-blip2-opt")}`)));
    expect(lines.some((l) => l.startsWith(`${id}  blip2-weights/1`) && /3\.0 kB {2}older format/.test(l))).toBe(true);
    const json = JSON.parse((await cli("cache", "--cache-dir", root, "--json")).stdout);
    const sizes = fs.readdirSync(current).filter((f) => f.endsWith(".safetensors")).reduce((s, f) => s + fs.statSync(path.join(current, f)).size, 0);
    expect(json.entries.map((e: { format: string; age: string; bytes: number }) => [e.format, e.age, e.bytes])).toEqual([["blip2-weights/1", "older", 3000], ["blip2-weights/3", "current", sizes]]);
    // The library function the command prints.
    expect(listWeightCaches(root)).toEqual(json.entries);
  });

  it("lists a conversion whose partial file is renamed into place meanwhile without it, not failing", () => {
    const moved = path.join(current, `language-q4.safetensors.tmp-${process.pid}`);
    put(moved, 10);
    const racing = vanishing("statSync", moved);
    try {
      const entry = listWeightCaches(root).find((e) => e.dir === current)!;
      expect(entry.files.map((f) => f.name)).toEqual(["language-q8.safetensors", "qformer-q8.safetensors", "vision-q8.safetensors"]);
    } finally {
      racing.mockRestore();
      fs.rmSync(moved);
    }
  });

  it("--prune removes older formats and killed conversions' partial files, nothing else", async () => {
    const older = path.join(weights, "0123456789abcdef", "blip2-weights-1");
    put(path.join(older, "vision-q8.safetensors"), 500);
    // An older version still converting into its folder: left until it is done.
    const stillWritten = put(path.join(weights, "abcdef0123456789", "blip2-weights-1", `vision-q8.safetensors.tmp-${process.pid}`), 50);
    const newer = put(path.join(weights, fingerprint, "blip2-weights-4", "vision-q8.safetensors"), 100);
    const notOurs = put(path.join(weights, fingerprint, "notes", "readme.txt"), 10);
    const dead = put(path.join(current, "language-q4.safetensors.tmp-99999999"), 200);
    const running = put(path.join(current, `vision-q4.safetensors.tmp-${process.pid}`), 200);
    const r = await cli("cache", "--prune", "--cache-dir", root);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`removed ${older}\n`);
    expect(r.stdout).toContain(`removed ${dead}\n`);
    expect(r.stdout).toMatch(/freed 3\.7 kB\n$/);
    expect(fs.existsSync(path.dirname(older))).toBe(false);
    expect(fs.existsSync(path.join(weights, fingerprint, "blip2-weights-1"))).toBe(false);
    for (const kept of [newer, notOurs, running, stillWritten, path.join(current, "language-q8.safetensors")]) expect(fs.existsSync(kept), kept).toBe(true);
    fs.rmSync(running);
    fs.rmSync(path.join(weights, "abcdef0123456789"), { recursive: true });
    fs.rmSync(path.dirname(newer), { recursive: true });
    fs.rmSync(path.dirname(notOurs), { recursive: true });
  });

  it("--remove takes one checkpoint's conversions by id or unambiguous prefix", async () => {
    put(path.join(weights, "ffff0000aaaa", "blip2-weights-3", "vision-q8.safetensors"), 10);
    fs.writeFileSync(path.join(weights, "ffff0000aaaa", "blip2-weights-3", "source.json"), JSON.stringify({ checkpoint: "/no/such/blip2-model" }));
    expect((await cli("cache", "--cache-dir", root)).stdout).toContain("ffff0000aaaa  blip2-weights/3      10 B  vision-q8  from /no/such/blip2-model (no longer there)\n");
    put(path.join(weights, "ffff1111bbbb", "blip2-weights-3", "vision-q8.safetensors"), 10);
    const ambiguous = await cli("cache", "--remove", "ffff", "--cache-dir", root);
    expect(ambiguous.code).toBe(1);
    expect(ambiguous.stderr).toMatch(/id "ffff" is ambiguous: it starts ffff0000aaaa, ffff1111bbbb/);
    const missing = await cli("cache", "--remove", "abc", "--cache-dir", root);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain(`${weights}: no converted weights with id "abc"`);
    const one = await cli("cache", "--remove", "ffff0", "--cache-dir", root);
    expect(one.code, one.stderr).toBe(0);
    expect(fs.existsSync(path.join(weights, "ffff0000aaaa"))).toBe(false);
    expect(fs.existsSync(path.join(weights, "ffff1111bbbb"))).toBe(true);

    const running = put(path.join(current, `vision-q4.safetensors.tmp-${process.pid}`), 1);
    const busy = await cli("cache", "--remove", fingerprint.slice(0, 12), "--cache-dir", root);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toContain(`${running}: a conversion is still being written by process ${process.pid}`);
    fs.rmSync(running);
    const done = await cli("cache", "--remove", fingerprint.slice(0, 12), "--cache-dir", root);
    expect(done.code, done.stderr).toBe(0);
    expect(fs.existsSync(path.join(weights, fingerprint))).toBe(false);
    expect((await cli("cache", "--cache-dir", root)).stdout).toBe(`${weights}\nffff1111bbbb  blip2-weights/3      10 B  vision-q8\ntotal 10 B\n`);
  });

  it("rejects --prune with --remove, and stray arguments", async () => {
    expect((await cli("cache", "--prune", "--remove", "ab", "--cache-dir", root)).stderr).toMatch(/--prune and --remove cannot be combined \(see 'blip2 cache --help'\)/);
    expect((await cli("cache", "list")).code).toBe(2);
  });
});
