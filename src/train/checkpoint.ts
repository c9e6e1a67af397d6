/**
 * Training checkpoints on disk. Each save is a complete Hugging Face checkpoint folder (config.json,
 * safetensors weights, tokenizer, processor and generation files) that transformers loads as it
 * is, plus the trainer's state: `trainer_state.json` (what the trainer records to resume: step,
 * random generator, data position, and the identity of the training) and `optimizer.safetensors`
 * (the optimizer's moments).
 *
 * Frozen tensors are copied byte for byte from their source files, in chunks, so a checkpoint of
 * any size is written in little memory; trained tensors are written from the caller's values, in
 * the source tensor's dtype.
 *
 * Saves are atomic. The folder is written as `<out>.tmp-<pid>` beside `<out>`, synced to disk,
 * renamed `<out>.new-<pid>` (complete), then swapped in: `<out>` → `<out>.old-<pid>`,
 * `<out>.new-<pid>` → `<out>`, and the old one removed. A process killed at any point leaves
 * either the previous checkpoint or the new one, and `recoverInterruptedSave` (run by every open)
 * finishes or undoes an interrupted swap and removes what the killed writer left.
 */
import fs from "node:fs";
import path from "node:path";
import { Blip2Error } from "../errors.js";
import { Checkpoint } from "../io/checkpoint.js";
import { DTYPE_BYTES, floatToHalf, readSafetensorsHeader, readTensorF32, type SafeDType, type TensorInfo } from "../io/safetensors.js";

/** Values of a tensor, as the trainer holds them. */
export interface TensorValue {
  shape: number[];
  data: Float32Array;
}

/** One tensor of a folder being written: copied byte for byte from a file, or given as bytes. */
export interface TensorEntry {
  name: string;
  dtype: SafeDType;
  shape: number[];
  /** The source tensor whose bytes are copied (a frozen tensor). */
  from?: TensorInfo;
  /** The bytes to write, already in `dtype` (a trained or new tensor). */
  bytes?: Uint8Array;
}

/** What a resumed run needs besides the weights. */
export interface TrainerState {
  /**
   * Identifies the training (stage, source model fingerprint, data, ...): opaque JSON chosen by the
   * trainer. `checkOutDir` lets a run write only into a folder saved under an equal identity.
   */
  identity: unknown;
  /** Step, random generator state, data position, settings: any JSON. */
  json: unknown;
  /** Optimizer moments and any other float tensors, by name. */
  tensors: Map<string, TensorValue>;
}

/** Small files written beside the weights: file name → contents, or null to leave the source's out. */
export type ExtraFiles = Record<string, string | Uint8Array | null>;

export interface SaveOptions {
  /** The checkpoint training started from (its frozen tensors are copied from its files). */
  source: Checkpoint;
  /** The folder to save into; it is replaced atomically. */
  out: string;
  /** New values of trained tensors (also of tensors the source lacks, such as stage 1's extras). */
  trained: Map<string, TensorValue>;
  /** Tensors new to the checkpoint that are not trained. */
  added?: Map<string, TensorValue>;
  /** config.json to write (default: the source's). */
  config?: unknown;
  /** Files to add or replace (tokenizer files, ...), or null to leave one of the source's out. */
  files?: ExtraFiles;
  /** The trainer's state; absent for a folder that is only a model. */
  state?: TrainerState;
  /** Largest weight file before sharding (default 2 GB, as the issue asks). */
  maxShardBytes?: number;
}

export const TRAINER_STATE_FILE = "trainer_state.json";
export const OPTIMIZER_FILE = "optimizer.safetensors";
const TRAINER_STATE_FORMAT = "blip2-trainer-state/1";
const DEFAULT_MAX_SHARD_BYTES = 2_000_000_000; // transformers reads "2GB" as 2 * 10^9
const COPY_CHUNK_BYTES = 16 * 1024 * 1024;

/** The files of a source folder that belong in a checkpoint (the weights are written anew). */
const CHECKPOINT_FILE = /^(config\.json|generation_config\.json|preprocessor_config\.json|processor_config\.json|chat_template\.json|special_tokens_map\.json|added_tokens\.json|merges\.txt|spiece\.model|tokenizer[^/]*|vocab[^/]*)$/;

/** Saves a training checkpoint into `out`, atomically (see the file comment). */
export function saveCheckpoint(options: SaveOptions): void {
  const { out } = options;
  // A run resumed from its own output reads its frozen tensors there: each save replaces those
  // files, so their offsets are read again rather than taken from a Checkpoint opened before.
  let source = options.source;
  if (path.resolve(source.dir) === path.resolve(out)) {
    recoverInterruptedSave(out);
    source = Checkpoint.open(out);
  }
  if (source.converted) throw new Blip2Error(`${source.dir}: written by blip2 quantize (converted weights); train from the original checkpoint`);
  const tensors = planTensors(source, options.trained, options.added ?? new Map());
  const files: Record<string, string | Uint8Array | { copy: string }> = {};
  for (const name of fs.readdirSync(source.dir).filter((f) => CHECKPOINT_FILE.test(f)).sort()) files[name] = { copy: path.join(source.dir, name) };
  if (options.config !== undefined) files["config.json"] = `${JSON.stringify(options.config, null, 2)}\n`;
  for (const [name, contents] of Object.entries(options.files ?? {})) {
    checkFileName(name);
    if (contents === null) delete files[name];
    else files[name] = contents;
  }
  writeModelFolder({ out, tensors, files, state: options.state, maxShardBytes: options.maxShardBytes });
}

/**
 * The tensors of the saved checkpoint, in the source's order (by file, then offset) with new
 * tensors merged in by name, so a source in alphabetical order (as transformers writes) stays so.
 */
function planTensors(source: Checkpoint, trained: Map<string, TensorValue>, added: Map<string, TensorValue>): TensorEntry[] {
  for (const name of added.keys()) if (trained.has(name)) throw new Blip2Error(`internal: tensor ${name} is given both as trained and as added`);
  for (const name of added.keys()) if (source.has(name)) throw new Blip2Error(`internal: added tensor ${name} is already in ${source.dir}`);
  const inFolder = source
    .names()
    .map((name) => source.tensor(name))
    // A Checkpoint may carry converted copies from the blip2 cache: those are not the model's.
    .filter((info) => path.dirname(info.file) === source.dir)
    .sort((a, b) => path.basename(a.file).localeCompare(path.basename(b.file)) || a.offset - b.offset);
  const values = new Map([...trained, ...added]);
  for (const [name, v] of values) checkValue(name, v);
  const fresh = [...values.keys()].filter((name) => !source.has(name)).sort();
  const entries: TensorEntry[] = [];
  const pushFresh = (before: string | null) => {
    while (fresh.length && (before === null || fresh[0]! < before)) {
      const name = fresh.shift()!;
      const v = values.get(name)!;
      entries.push({ name, dtype: "F32", shape: v.shape, bytes: encodeFloats(v.data, "F32", name) });
    }
  };
  for (const info of inFolder) {
    pushFresh(info.name);
    const v = values.get(info.name);
    if (v) entries.push({ name: info.name, dtype: info.dtype, shape: v.shape, bytes: encodeFloats(v.data, info.dtype, info.name) });
    else entries.push({ name: info.name, dtype: info.dtype, shape: info.shape, from: info });
  }
  pushFresh(null);
  return entries;
}

function checkValue(name: string, v: TensorValue): void {
  const n = v.shape.reduce((a, b) => a * b, 1);
  if (n !== v.data.length) throw new Blip2Error(`internal: tensor ${name} has shape [${v.shape.join(", ")}] (${n} values) but ${v.data.length} values`);
}

/** Float32 values as the bytes of `dtype` (float16 and bfloat16 rounded to nearest even). */
export function encodeFloats(data: Float32Array, dtype: SafeDType, name: string): Uint8Array {
  switch (dtype) {
    case "F32":
      return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    case "F64":
      return new Uint8Array(Float64Array.from(data).buffer);
    case "F16":
      return new Uint8Array(Uint16Array.from(data, floatToHalf).buffer);
    case "BF16": {
      const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
      const out = new Uint16Array(data.length);
      for (let i = 0; i < data.length; i++) {
        const x = bits[i]!;
        out[i] = Number.isNaN(data[i]) ? 0x7fc0 : (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
      }
      return new Uint8Array(out.buffer);
    }
    default:
      throw new Blip2Error(`tensor ${name} is ${dtype} in the source checkpoint; only floating-point tensors can be trained`);
  }
}

export interface ModelFolder {
  out: string;
  /** In the order they are written. */
  tensors: TensorEntry[];
  /** File name → contents, or a file to copy. */
  files: Record<string, string | Uint8Array | { copy: string }>;
  state?: TrainerState;
  maxShardBytes?: number;
}

/**
 * Writes a checkpoint folder atomically: weights (sharded above `maxShardBytes`), the small files,
 * the trainer state. A failure (a full disk) leaves `out` as it was and no partial folder.
 */
export function writeModelFolder(folder: ModelFolder): void {
  const out = path.resolve(folder.out);
  recoverInterruptedSave(out);
  const existed = fs.existsSync(out);
  const tmp = siblingName(out, "tmp", process.pid);
  const complete = siblingName(out, "new", process.pid);
  const needed = bytesToWrite(folder);
  try {
    fs.mkdirSync(path.dirname(out), { recursive: true });
    checkFreeSpace(out, needed);
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp);
    writeWeights(tmp, folder.tensors, folder.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES);
    for (const [name, contents] of Object.entries(folder.files)) {
      writeFileSynced(path.join(tmp, name), typeof contents === "object" && "copy" in contents ? fs.readFileSync(contents.copy) : contents);
    }
    if (folder.state) writeTrainerState(tmp, folder.state);
    syncDir(tmp);
    fs.renameSync(tmp, complete);
    swapIn(complete, out);
  } catch (err) {
    for (const partial of [tmp, complete]) fs.rmSync(partial, { recursive: true, force: true });
    throw saveError(err, out, existed, needed);
  }
}

function saveError(err: unknown, out: string, existed: boolean, needed: number): unknown {
  if (err instanceof Blip2Error) return err;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === undefined) return err;
  const kept = existed ? "the checkpoint already there is intact" : "no folder was left";
  if (code === "ENOSPC") return new Blip2Error(`${out}: the disk is full (ENOSPC) while saving the checkpoint (${formatBytes(needed)} to write); nothing was saved and ${kept}`, { cause: err });
  const message = (err as Error).message.split("\n")[0]!;
  const why = message.startsWith(code) ? message : `${code}: ${message}`; // Node's messages start with the code
  return new Blip2Error(`${out}: cannot save the checkpoint (${why}); nothing was saved and ${kept}`, { cause: err });
}

function checkFreeSpace(out: string, needed: number): void {
  const stats = fs.statfsSync(path.dirname(out));
  const free = stats.bavail * stats.bsize;
  if (free < needed) {
    throw new Blip2Error(`${out}: not enough disk space to save the checkpoint: ${formatBytes(needed)} needed (the previous checkpoint is replaced only once the new one is complete), ${formatBytes(free)} free; nothing was saved`);
  }
}

function bytesToWrite(folder: ModelFolder): number {
  let n = 0;
  for (const t of folder.tensors) n += entryBytes(t);
  for (const contents of Object.values(folder.files)) {
    n += typeof contents === "string" ? Buffer.byteLength(contents) : "copy" in contents ? fs.statSync(contents.copy).size : contents.byteLength;
  }
  for (const t of folder.state?.tensors.values() ?? []) n += t.data.byteLength;
  return n;
}

const formatBytes = (n: number) => (n >= 1e9 ? `${(n / 1e9).toFixed(1)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${n} bytes`);

const entryBytes = (t: TensorEntry) => t.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[t.dtype];

/** `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` and their index, as transformers names them. */
function writeWeights(dir: string, tensors: TensorEntry[], maxShardBytes: number): void {
  const shards: TensorEntry[][] = [[]];
  let size = 0;
  for (const t of tensors) {
    const bytes = entryBytes(t);
    if (shards.at(-1)!.length > 0 && size + bytes > maxShardBytes) {
      shards.push([]);
      size = 0;
    }
    shards.at(-1)!.push(t);
    size += bytes;
  }
  if (shards.length === 1) {
    writeSafetensorsFile(path.join(dir, "model.safetensors"), tensors);
    return;
  }
  const weightMap: Record<string, string> = {};
  const pad = (i: number) => String(i).padStart(5, "0");
  shards.forEach((shard, i) => {
    const name = `model-${pad(i + 1)}-of-${pad(shards.length)}.safetensors`;
    writeSafetensorsFile(path.join(dir, name), shard);
    for (const t of shard) weightMap[t.name] = name;
  });
  const sorted = Object.fromEntries(Object.entries(weightMap).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
  const totalSize = tensors.reduce((n, t) => n + entryBytes(t), 0);
  writeFileSynced(path.join(dir, "model.safetensors.index.json"), `${JSON.stringify({ metadata: { total_size: totalSize }, weight_map: sorted }, null, 2)}\n`);
}

/** One safetensors file, header metadata `{"format": "pt"}` as transformers writes it. */
function writeSafetensorsFile(file: string, tensors: TensorEntry[]): void {
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let offset = 0;
  for (const t of tensors) {
    const bytes = entryBytes(t);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  // Data starts 8-byte aligned, as the reference writer pads its header.
  json += " ".repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  const fd = fs.openSync(file, "wx");
  const sources = new Map<string, number>();
  try {
    writeAll(fd, length);
    writeAll(fd, Buffer.from(json, "utf8"));
    const chunk = Buffer.allocUnsafe(COPY_CHUNK_BYTES);
    for (const t of tensors) {
      if (t.bytes) {
        if (t.bytes.byteLength !== entryBytes(t)) throw new Blip2Error(`internal: tensor ${t.name} has ${t.bytes.byteLength} bytes, its shape and dtype need ${entryBytes(t)}`);
        writeAll(fd, t.bytes);
      } else {
        const from = t.from!;
        let source = sources.get(from.file);
        if (source === undefined) sources.set(from.file, (source = fs.openSync(from.file, "r")));
        copyRange(source, from, fd, chunk);
      }
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
    for (const source of sources.values()) fs.closeSync(source);
  }
}

function copyRange(source: number, from: TensorInfo, fd: number, chunk: Buffer): void {
  for (let done = 0; done < from.byteLength; ) {
    const n = fs.readSync(source, chunk, 0, Math.min(chunk.length, from.byteLength - done), from.offset + done);
    if (n === 0) throw new Blip2Error(`${from.file}: truncated while copying tensor ${from.name}`);
    writeAll(fd, chunk.subarray(0, n));
    done += n;
  }
}

function writeAll(fd: number, bytes: Uint8Array): void {
  for (let done = 0; done < bytes.byteLength; ) done += fs.writeSync(fd, bytes, done, bytes.byteLength - done);
}

function writeFileSynced(file: string, contents: string | Uint8Array): void {
  const fd = fs.openSync(file, "wx");
  try {
    writeAll(fd, typeof contents === "string" ? Buffer.from(contents, "utf8") : contents);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function syncDir(dir: string): void {
  const fd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function checkFileName(name: string): void {
  if (!name || name.includes("/") || name.includes("\\") || name === "." || name === "..") throw new Blip2Error(`internal: ${JSON.stringify(name)} is not a file name`);
}

// ---------------------------------------------------------------------------------------------
// The swap and its recovery

type Phase = "tmp" | "new" | "old";

const siblingName = (out: string, phase: Phase, pid: number) => `${out}.${phase}-${pid}`;

/**
 * `<out>.new-<pid>` (complete) takes the place of `<out>`, which is removed after. If the rename
 * fails, `<out>` is put back and the complete folder stays for the caller (or the next recovery).
 */
function swapIn(complete: string, out: string): void {
  const old = siblingName(out, "old", process.pid);
  const hadOld = fs.existsSync(out);
  if (hadOld) fs.renameSync(out, old);
  try {
    fs.renameSync(complete, out);
  } catch (err) {
    if (hadOld) fs.renameSync(old, out);
    throw err;
  }
  syncDir(path.dirname(out));
  if (hadOld) fs.rmSync(old, { recursive: true, force: true });
}

/** Whether the process that wrote a sibling folder still runs (then it is left alone). */
function writerAlive(pid: number): boolean {
  if (pid === process.pid) return false; // saves are synchronous: one of ours is a leftover
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Finishes or undoes a save whose process was killed: a complete `<out>.new-<pid>` is swapped in
 * (the newest checkpoint wins), a lone `<out>.old-<pid>` goes back to `<out>`, and the partial
 * folders of dead writers are removed. Returns what it did, one line each.
 */
export function recoverInterruptedSave(out: string): string[] {
  out = path.resolve(out);
  const parent = path.dirname(out);
  if (!fs.existsSync(parent)) return [];
  const pattern = new RegExp(`^${escapeRegExp(path.basename(out))}\\.(tmp|new|old)-(\\d+)$`);
  const leftovers = fs
    .readdirSync(parent)
    .map((name) => ({ name, match: pattern.exec(name) }))
    .filter((e) => e.match && !writerAlive(Number(e.match[2])))
    .map((e) => ({ path: path.join(parent, e.name), phase: e.match![1] as Phase, mtime: fs.statSync(path.join(parent, e.name)).mtimeMs }));
  const done: string[] = [];
  const newest = leftovers.filter((e) => e.phase === "new").sort((a, b) => b.mtime - a.mtime)[0];
  if (newest) {
    swapIn(newest.path, out);
    done.push(`${out}: completed the save interrupted in ${path.basename(newest.path)}`);
  } else if (!fs.existsSync(out)) {
    const old = leftovers.filter((e) => e.phase === "old").sort((a, b) => b.mtime - a.mtime)[0];
    if (old) {
      fs.renameSync(old.path, out);
      done.push(`${out}: restored the previous checkpoint from ${path.basename(old.path)}`);
    }
  }
  for (const e of leftovers) {
    if (e === newest || !fs.existsSync(e.path)) continue;
    fs.rmSync(e.path, { recursive: true, force: true });
    done.push(`${out}: removed ${path.basename(e.path)}, left by a save that was interrupted`);
  }
  return done;
}

const escapeRegExp = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

// ---------------------------------------------------------------------------------------------
// The output folder and the trainer state

/**
 * Checks that a run may write into `out`: a missing or empty folder, or (with an `identity`) an
 * earlier run of the same training, which the run resumes. Anything else is refused before
 * anything is written. An interrupted save there is recovered first.
 */
export function checkOutDir(out: string, identity: unknown | null): "new" | "resume" {
  recoverInterruptedSave(out);
  let stat: fs.Stats;
  try {
    stat = fs.statSync(out);
  } catch {
    return "new";
  }
  const refuse = (what: string) => new Blip2Error(`${out}: ${what}; nothing was written (choose another --out${identity === null ? " or an empty folder" : ""})`);
  if (!stat.isDirectory()) throw refuse("is a file, not a folder");
  const entries = fs.readdirSync(out).sort();
  if (entries.length === 0) return "new";
  const listing = `${entries.slice(0, 4).join(", ")}${entries.length > 4 ? `, … (${entries.length} entries)` : ""}`;
  if (identity === null) throw refuse(`is not empty (holds ${listing})`);
  if (!entries.includes(TRAINER_STATE_FILE)) throw refuse(`holds ${listing} and no ${TRAINER_STATE_FILE}, so it is not an earlier run of this training`);
  const recorded = readStateFile(out).identity;
  if (canonicalJson(recorded) !== canonicalJson(identity)) {
    throw refuse(`holds an earlier run of another training (${describeDifference(recorded, identity)})`);
  }
  return "resume";
}

/**
 * The state of the run saved in `out` when `out` holds an earlier run of this training, null when
 * the run starts anew there (see checkOutDir for what is refused).
 */
export function openTrainingOutput(out: string, identity: unknown): TrainerState | null {
  return checkOutDir(out, identity) === "resume" ? loadTrainerState(out) : null;
}

/** The trainer state saved in `out`: its JSON and its tensors. */
export function loadTrainerState(out: string): TrainerState {
  recoverInterruptedSave(out);
  const { identity, state } = readStateFile(out);
  const tensors = new Map<string, TensorValue>();
  const file = path.join(out, OPTIMIZER_FILE);
  if (fs.existsSync(file)) {
    for (const [name, info] of readSafetensorsHeader(file).tensors) tensors.set(name, { shape: info.shape, data: readTensorF32(info) });
  }
  return { identity, json: state, tensors };
}

function writeTrainerState(dir: string, state: TrainerState): void {
  const record = { format: TRAINER_STATE_FORMAT, identity: state.identity, state: state.json };
  writeFileSynced(path.join(dir, TRAINER_STATE_FILE), `${JSON.stringify(record, null, 2)}\n`);
  if (state.tensors.size === 0) return;
  const entries: TensorEntry[] = [...state.tensors].map(([name, v]) => {
    checkValue(name, v);
    return { name, dtype: "F32", shape: v.shape, bytes: encodeFloats(v.data, "F32", name) };
  });
  writeSafetensorsFile(path.join(dir, OPTIMIZER_FILE), entries);
}

function readStateFile(out: string): { identity: unknown; state: unknown } {
  const file = path.join(out, TRAINER_STATE_FILE);
  let record: { format?: unknown; identity?: unknown; state?: unknown };
  try {
    record = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new Blip2Error(`${file}: ${code === "ENOENT" ? "missing" : code ? `cannot read (${code})` : "not valid JSON"}; it is not a trainer state written by blip2`);
  }
  if (record === null || typeof record !== "object" || record.format !== TRAINER_STATE_FORMAT) {
    throw new Blip2Error(`${file}: not a trainer state written by blip2 (expected "format": "${TRAINER_STATE_FORMAT}", got ${JSON.stringify(record?.format)})`);
  }
  return { identity: record.identity, state: record.state };
}

/** JSON with object keys sorted, so equal values compare equal whatever their key order. */
function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) =>
    v !== null && typeof v === "object" && !Array.isArray(v) ? Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : 1))) : v,
  );
}

/** "stage: 2 there, 1 here; data: ..." for object identities, else both values. */
function describeDifference(recorded: unknown, identity: unknown): string {
  const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);
  if (!isObject(recorded) || !isObject(identity)) return `${canonicalJson(recorded)} there, ${canonicalJson(identity)} here`;
  const keys = [...new Set([...Object.keys(recorded), ...Object.keys(identity)])].sort();
  return keys
    .filter((k) => canonicalJson(recorded[k]) !== canonicalJson(identity[k]))
    .map((k) => `${k}: ${canonicalJson(recorded[k]) ?? "absent"} there, ${canonicalJson(identity[k]) ?? "absent"} here`)
    .join("; ");
}
