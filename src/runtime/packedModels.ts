/**
 * ONNX Runtime's packed integer weights, kept on disk. A session whose graph has integer kernels
 * (q8/q4 weights) lays every weight out again for its kernels when it is created: most of a
 * quantized model's load time and as much private memory as
 * the weights themselves. The first time a graph is created on a machine, ONNX Runtime also saves
 * its optimized graph with the packed weights in an external data file, under
 * `<blip2 cache>/packed/<key>/`; every later load opens that file, and the packed weights are
 * memory-mapped from it (page cache, shared between processes) instead of packed again.
 *
 * The packed layout depends on the CPU's instruction set (AMX, AVX-512 VNNI, AVX2 lay weights out
 * differently) and on ONNX Runtime's version, so both are part of the key, with the graph itself,
 * the size and modification time of every weight file it reads, and how blip2 writes the copy (its
 * data file is page-aligned after ONNX Runtime saves it: see alignPacked.ts).
 *
 * ONNX Runtime maps the packed weights as they are: every session opened from a copy is first
 * checked against the session that saved it (see probe.ts).
 */
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type * as ort from "onnxruntime-node";
import { env } from "onnxruntime-node";
import { describeError } from "../errors.js";
import { bytesOf, partialFile, partialWriterAlive, removeAbandonedFiles } from "../io/partialFile.js";
import { prunableWeightCaches } from "../quantize/weightCache.js";
import { warnOnce } from "../warn.js";
import { alignPacked } from "./alignPacked.js";
import { probeDifference, sampleOutputs, type ProbeRecord } from "./probe.js";

const MODEL = "model.onnx";
const DATA = "model.data";
const RECORD = "entry.json";
const GB = 1e9;

/** Where packed weights are kept in a blip2 cache. */
export const packedRoot = (cacheDir: string) => path.join(cacheDir, "packed");

/** The data file of the packed copy in `dir` (the weights that are mapped). */
export const packedDataFile = (dir: string) => path.join(dir, DATA);

/** How blip2 writes packed copies (see alignPacked.ts); copies written otherwise are not opened. */
const FORMAT = "blip2-packed/3";

/** What a packed copy was made for: the ONNX Runtime, the CPU and the weight files it was packed from. */
interface Identity {
  format: string;
  onnxruntime: string;
  cpu: string;
  weights: { file: string; bytes: number; mtimeMs: number }[];
}

/** Recorded beside a packed copy, for `blip2 cache` and for checking it before use. */
export interface PackedRecord extends Identity {
  graph: string;
  /** The size of the data file as written: a shorter one (truncated) would fault when mapped. */
  dataBytes: number;
  /** What the probe gave in the session that saved the copy (packed in memory). */
  probe: ProbeRecord;
}

/** The CPU's model and instruction-set flags: packed layouts differ between them. */
export function cpuIdentity(): string {
  try {
    const info = fs.readFileSync("/proc/cpuinfo", "utf8");
    const field = (name: string) => new RegExp(`^${name}\\s*:\\s*(.*)$`, "m").exec(info)?.[1] ?? "";
    const flags = field("flags") || field("Features");
    if (flags) return `${os.arch()} ${field("model name")} ${flags}`;
  } catch {
    // not Linux: the model name is what there is
  }
  return `${os.arch()} ${os.cpus()[0]?.model ?? "unknown"}`;
}

function identity(weightFiles: string[]): Identity {
  return {
    format: FORMAT,
    onnxruntime: env.versions.common,
    cpu: cpuIdentity(),
    weights: weightFiles.map((file) => {
      const s = fs.statSync(file);
      return { file, bytes: s.size, mtimeMs: s.mtimeMs };
    }),
  };
}

/** The packed copy of one graph: its folder, whether it is there and whole. */
export class PackedModel {
  private constructor(
    readonly dir: string,
    readonly graph: string,
    private readonly identity: Identity,
    /** The bytes of the weights the graph reads: the saved copy takes about twice as many. */
    readonly weightBytes: number,
  ) {}

  /**
   * The packed copy for a serialized graph that reads `weightBytes` bytes from `weightFiles` (real
   * paths), created with `options`: their optimizer settings are part of the key, since the copy
   * holds the graph as ONNX Runtime optimized it.
   */
  static for(root: string, graph: string, bytes: Uint8Array, weightFiles: string[], weightBytes: number, options: ort.InferenceSession.SessionOptions): PackedModel {
    const id = identity(weightFiles);
    const optimizer = JSON.stringify({ level: options.graphOptimizationLevel, optimization: options.extra?.optimization });
    const key = crypto.createHash("sha256").update(bytes).update(JSON.stringify(id)).update(optimizer).digest("hex").slice(0, 32);
    return new PackedModel(path.join(root, key), graph, id, weightBytes);
  }

  get model(): string {
    return path.join(this.dir, MODEL);
  }

  /**
   * The copy's record if it was saved completely (the record is written last) by this version of
   * blip2, and its data file still has the size it had; else null.
   */
  record(): PackedRecord | null {
    const record = readRecord(this.dir);
    if (record?.format !== FORMAT) return null;
    try {
      return fs.statSync(packedDataFile(this.dir)).size === record.dataBytes && fs.existsSync(this.model) ? record : null;
    } catch {
      return null;
    }
  }

  /**
   * Marks the copy as opened now (its record's modification time), so that `blip2 cache` can tell
   * an older copy of the same graph's weights, which no load opens any more, from this one.
   */
  markOpened(): void {
    try {
      const now = new Date();
      fs.utimesSync(path.join(this.dir, RECORD), now, now);
    } catch {
      // a read-only cache: nothing is pruned from it either
    }
  }

  /** Removes the copy, where the cache can be written (a read-only one keeps it). */
  remove(): void {
    try {
      fs.rmSync(this.dir, { recursive: true, force: true });
    } catch {
      // read-only: the copy stays, and each load packs in memory after its warning
    }
  }

  /** Session options that make ONNX Runtime save the optimized graph and its packed weights in `folder`. */
  saveOptions(options: ort.InferenceSession.SessionOptions, folder: string): ort.InferenceSession.SessionOptions {
    const session = {
      ...(options.extra?.session as Record<string, string>),
      optimized_model_external_initializers_file_name: DATA,
      optimized_model_external_initializers_min_size_in_bytes: "1024",
      save_external_prepacked_constant_initializers: "1",
    };
    return { ...options, optimizedModelFilePath: path.join(folder, MODEL), extra: { ...options.extra, session } };
  }

  /** Session options for opening the saved graph: already optimized, its weights beside it. */
  openOptions(options: ort.InferenceSession.SessionOptions): ort.InferenceSession.SessionOptions {
    const { model_external_initializers_file_folder_path: _, ...session } = options.extra?.session as Record<string, string>;
    return { ...options, graphOptimizationLevel: "disabled", extra: { ...options.extra, session } };
  }

  /**
   * Records the saved files in `folder` with the probe's outputs, and moves them into place, over a
   * damaged copy; where another process has been first, its copy stays.
   */
  commit(folder: string, probe: ProbeRecord): void {
    const record: PackedRecord = { graph: this.graph, ...this.identity, dataBytes: fs.statSync(packedDataFile(folder)).size, probe };
    fs.writeFileSync(path.join(folder, RECORD), JSON.stringify(record) + "\n");
    if (fs.existsSync(this.dir) && !this.record()) this.remove();
    try {
      fs.renameSync(folder, this.dir);
    } catch (err) {
      if (!this.record()) throw err;
    }
  }
}

/** A graph's packed weights being saved (`done` false), then saved or given up (`done` true). */
export interface PackingProgress {
  graph: string;
  done: boolean;
}

/** One session slot of a host: created from graph bytes or a model file, run, and released. */
export interface SessionSlot {
  create(model: Uint8Array | string, options: ort.InferenceSession.SessionOptions): Promise<void>;
  run(feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>>;
  release(): Promise<void>;
}

let nextFolder = 0;

/**
 * Creates the session from its packed copy, saving that first where it is missing, and checks it
 * with the probe (`probe`: the graph's probe inputs, see probe.ts). Where the copy cannot be saved
 * (a full disk, a read-only cache), opened, or computes other numbers than the session that saved
 * it, the session packs its weights in memory as before, with a warning; a copy that failed is
 * removed, and the next load saves it again.
 */
export async function createPacked(slot: SessionSlot, packed: PackedModel, bytes: Uint8Array, options: ort.InferenceSession.SessionOptions, probe: Record<string, ort.Tensor>, progress?: (p: PackingProgress) => void): Promise<void> {
  let record = packed.record();
  const saving = !record;
  if (!record) {
    progress?.({ graph: packed.graph, done: false });
    const saved = await save(slot, packed, bytes, options, probe);
    progress?.({ graph: packed.graph, done: true });
    record = saved ? packed.record() : null;
    if (!record) return slot.create(bytes, options);
  }
  try {
    await slot.create(packed.model, packed.openOptions(options));
    const differs = probeDifference(record.probe, sampleOutputs(await slot.run(probe)));
    if (differs) throw new Error(`they compute other numbers than packing in memory did: ${differs}`);
    packed.markOpened();
  } catch (err) {
    warnOnce(`${packed.dir}: cannot use the packed weights kept there (${describeError(err).slice(0, 200)}); removed, packing them again`);
    await slot.release();
    packed.remove();
    return slot.create(bytes, options);
  }
  if (saving) noticePrunable(cacheDirOf(packed));
}

async function save(slot: SessionSlot, packed: PackedModel, bytes: Uint8Array, options: ort.InferenceSession.SessionOptions, probe: Record<string, ort.Tensor>): Promise<boolean> {
  const folder = partialFile(`${packed.dir}-${++nextFolder}`);
  try {
    fs.mkdirSync(folder, { recursive: true });
    removeAbandonedFiles(path.dirname(folder));
    const free = fs.statfsSync(folder);
    // The codes and their packed copy, twice while the copy is page-aligned, and a gigabyte to spare.
    const need = 4 * packed.weightBytes + GB;
    if (free.bavail * free.bsize < need) {
      const prunable = prunableBytesNow(cacheDirOf(packed));
      const hint = prunable > 0 ? `; \`blip2 cache --prune\` would free ${(prunable / GB).toFixed(1)} GB` : "";
      throw new Error(`${((free.bavail * free.bsize) / GB).toFixed(1)} GB free on its disk, ${(need / GB).toFixed(1)} GB wanted${hint}`);
    }
    // A copy: the bytes are handed over to a worker thread, and needed again if saving fails (a
    // Node Buffer's slice() would share them).
    await slot.create(new Uint8Array(bytes), packed.saveOptions(options, folder));
    const expected = sampleOutputs(await slot.run(probe));
    await slot.release();
    alignPacked(folder, MODEL, DATA);
    packed.commit(folder, expected);
    return true;
  } catch (err) {
    warnOnce(`cannot keep packed weights in ${path.dirname(packed.dir)} (${describeError(err).slice(0, 200)}); they are packed in memory at each load`);
    await slot.release();
    return false;
  } finally {
    if (fs.existsSync(folder)) fs.rmSync(folder, { recursive: true, force: true });
  }
}

/** The blip2 cache a packed copy is kept in (`<cache>/packed/<key>`). */
const cacheDirOf = (packed: PackedModel) => path.dirname(path.dirname(packed.dir));

/** The caches whose prunable bytes have been told of (once per process). */
const noticed = new Set<string>();

/**
 * After a save, tells once where `blip2 cache --prune` would free a gigabyte or more: a save is what
 * makes older copies superseded (a new blip2 builds a graph differently, a weight file changed), and
 * each is as large as the model's converted weights again, so they fill a disk unnoticed otherwise.
 */
function noticePrunable(cacheDir: string): void {
  if (noticed.has(cacheDir)) return;
  const bytes = prunableBytesNow(cacheDir);
  if (bytes < GB) return;
  noticed.add(cacheDir);
  warnOnce(`${cacheDir} holds ${(bytes / GB).toFixed(1)} GB of converted and packed weights that this version of blip2 will not open again on this machine; \`blip2 cache --prune\` removes them`);
}

/** prunableBytes, or 0 while another process changes the cache under the listing (a notice never fails a load). */
function prunableBytesNow(cacheDir: string): number {
  try {
    return prunableBytes(cacheDir);
  } catch {
    return 0;
  }
}

function readRecord(dir: string): PackedRecord | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, RECORD), "utf8")) as PackedRecord;
  } catch {
    return null;
  }
}

export interface PackedEntry {
  dir: string;
  bytes: number;
  /** Its graph and the weight files it was packed from, where recorded. */
  graph?: string;
  weights?: string[];
  /** Why this version of blip2 on this machine will never open it again, if so. */
  stale?: string;
}

/** Every packed copy in a blip2 cache, and whether it is still of use here. */
export function listPacked(cacheDir: string): PackedEntry[] {
  const root = packedRoot(cacheDir);
  if (!fs.existsSync(root)) return [];
  const here = { onnxruntime: env.versions.common, cpu: cpuIdentity() };
  const entries = fs.readdirSync(root, { withFileTypes: true }).filter((d) => d.isDirectory()).flatMap((d) => {
    try {
      return [packedEntry(path.join(root, d.name), here)];
    } catch (err) {
      // Moved into place or removed by another process while listed.
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw err;
    }
  });
  markSuperseded(entries);
  return entries.map(({ opened: _, ...e }) => e);
}

function packedEntry(dir: string, here: { onnxruntime: string; cpu: string }): PackedEntry & { opened?: number } {
  const bytes = bytesOf(dir);
  const writing = partialWriterAlive(path.basename(dir));
  if (writing !== null) return { dir, bytes, stale: writing ? undefined : "left by a process that was killed while saving it" };
  const record = readRecord(dir);
  if (!Array.isArray(record?.weights)) return { dir, bytes, stale: "incomplete" };
  const opened = fs.statSync(path.join(dir, RECORD), { throwIfNoEntry: false })?.mtimeMs;
  return { dir, bytes, graph: record.graph, weights: record.weights.map((w) => w.file), stale: staleness(record, here), opened };
}

/**
 * Of the usable copies of one graph packed from the same weight files, only the one opened last is
 * still of use: the others were made for that graph as an earlier version of blip2 built it (a
 * graph's key includes its bytes, so a changed graph gets a copy of its own, gigabytes for a large
 * model).
 */
function markSuperseded(entries: (PackedEntry & { opened?: number })[]): void {
  const latest = new Map<string, PackedEntry & { opened?: number }>();
  const group = (e: PackedEntry) => JSON.stringify([e.graph, e.weights]);
  for (const e of entries) {
    const last = latest.get(group(e));
    if (!e.stale && e.opened !== undefined && (!last || e.opened > last.opened!)) latest.set(group(e), e);
  }
  for (const e of entries) {
    const last = latest.get(group(e));
    if (!e.stale && last && last !== e) e.stale = `superseded by ${path.basename(last.dir)} (the same graph's weights, opened since: its graph changed with blip2)`;
  }
}

function staleness(record: PackedRecord, here: { onnxruntime: string; cpu: string }): string | undefined {
  if (record.format !== FORMAT) return "written by another version of blip2";
  if (record.onnxruntime !== here.onnxruntime) return `packed by ONNX Runtime ${record.onnxruntime}`;
  if (record.cpu !== here.cpu) return "packed on another CPU";
  for (const w of record.weights) {
    const s = fs.statSync(w.file, { throwIfNoEntry: false });
    if (!s) return `${w.file} is gone`;
    if (s.size !== w.bytes || s.mtimeMs !== w.mtimeMs) return `${w.file} has changed`;
  }
  return undefined;
}

/** The bytes `blip2 cache --prune` would free: stale packed copies and older conversions (see prunableWeightCaches). */
function prunableBytes(cacheDir: string): number {
  return listPacked(cacheDir).reduce((sum, e) => sum + (e.stale ? e.bytes : 0), 0) + prunableWeightCaches(cacheDir).bytes;
}

/** Removes the packed copies this machine will never open again. */
export function pruneStalePacked(cacheDir: string): { paths: string[]; bytes: number } {
  return removePacked(listPacked(cacheDir).filter((e) => e.stale));
}

/** Removes the packed copies made from weight files inside `folders` (converted weights being removed). */
export function removePackedFrom(cacheDir: string, folders: string[]): { paths: string[]; bytes: number } {
  const inside = (file: string) => folders.some((f) => file.startsWith(f + path.sep));
  return removePacked(listPacked(cacheDir).filter((e) => e.weights?.some(inside)));
}

function removePacked(entries: PackedEntry[]): { paths: string[]; bytes: number } {
  for (const e of entries) fs.rmSync(e.dir, { recursive: true, force: true });
  return { paths: entries.map((e) => e.dir), bytes: entries.reduce((s, e) => s + e.bytes, 0) };
}
