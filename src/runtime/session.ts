/**
 * Turning graphs into ONNX Runtime sessions. Weights stay in the checkpoint's safetensors files:
 * the model is passed to ONNX Runtime as bytes, with external-data locations relative to a folder
 * that holds every weight file. ONNX Runtime refuses locations that leave that folder, symlinks
 * included, so locations are computed from the files' real paths (the Hugging Face cache's
 * `snapshots/` entries are symlinks into `blobs/`). Nothing is written next to the user's files.
 */
import fs from "node:fs";
import path from "node:path";
import * as ort from "onnxruntime-node";
import { Blip2Error, describeError } from "../errors.js";
import type { Worker } from "node:worker_threads";
import { Graph, type Target } from "../ir/graph.js";
import { serializeGraph } from "../ir/onnx.js";
import { startWorker } from "../thread.js";
import { warnOnce } from "../warn.js";
import { fedSlots, rowView, type CacheShape, type RowPlacement } from "./kvCache.js";
import { createPacked, PackedModel, type PackingProgress } from "./packedModels.js";
import { probeFeeds } from "./probe.js";
import { fromWire, joinRows, SessionHost, toWire, type CacheStep, type WireTensor } from "./sessionHost.js";

// ONNX Runtime's Linux build starts a telemetry uploader with its first session, and that reads the
// process's command line with a recursive std::regex: a command line of some 15 kB (a long prompt
// or question given as an argument) overflowed the stack of the worker thread that creates the
// sessions, and the process died of a segmentation fault. blip2 sends nothing anywhere, so it turns
// that uploader off, unless the user chose otherwise. Set before any session, in the main thread:
// the native library reads the process's environment, which workers' `process.env` does not change.
process.env.ORT_DISABLE_TELEMETRY ??= "1";

export const DEVICES = ["cpu", "webgpu", "cuda"] as const;
export type Device = (typeof DEVICES)[number];
export const isDevice = (name: string): name is Device => (DEVICES as readonly string[]).includes(name);

export interface RuntimeOptions {
  /** Intra-op threads (default: ONNX Runtime's choice, one per core). */
  threads?: number;
  /** Where to run; an unavailable device falls back to the CPU with a warning. */
  device?: Device;
  /**
   * Run sessions in a worker thread, so that the event loop stays free during long runs (default
   * true). Off, they run in this thread (slightly less copying of inputs).
   */
  worker?: boolean;
  /**
   * Keep ONNX Runtime's memory arena (default true): freed activations stay with the session for
   * the next run, which decoding steps need (without it they allocate their outputs afresh). See
   * Blip2Runtime.sessionOptions for the sessions that turn it off (T5's once-per-prompt encoder passes).
   */
  arena?: boolean;
  /**
   * Where to keep ONNX Runtime's packed integer weights (see runtime/packedModels.ts); without it,
   * sessions with q8/q4 weights pack them in memory at every load.
   */
  packedDir?: string;
  /** Told when a graph's packed weights start and finish being saved there (the first load on a machine). */
  packingProgress?: (p: PackingProgress) => void;
}

/** The operations of a session host, here or in a worker thread. */
interface Host {
  /** Creates a session from graph bytes or a model file. */
  create(id: number, name: string, model: Uint8Array | string, options: ort.InferenceSession.SessionOptions): Promise<void>;
  run(id: number, feeds: Record<string, ort.Tensor>, step?: CacheStep): Promise<Record<string, ort.Tensor>>;
  release(id: number): Promise<void>;
  runIntoCache(id: number, feeds: Record<string, ort.Tensor>, cache: number): Promise<void>;
  newCache(id: number, shape: CacheShape): Promise<void>;
  resizeCache(id: number, capacity: number, keep: number): Promise<void>;
  reorderCache(id: number, index: number[], shared: number): Promise<void>;
  composeCache(id: number, rows: RowPlacement<number>[], capacity: number, length: number): Promise<void>;
  dropCache(id: number): Promise<void>;
}

class LocalHost implements Host {
  private readonly host = new SessionHost();
  create(id: number, name: string, model: Uint8Array | string, options: ort.InferenceSession.SessionOptions) {
    return this.host.create(id, name, model, options);
  }
  run(id: number, feeds: Record<string, ort.Tensor>, step?: CacheStep) {
    return this.host.run(id, feeds, step);
  }
  release(id: number) {
    return this.host.release(id);
  }
  runIntoCache(id: number, feeds: Record<string, ort.Tensor>, cache: number) {
    return this.host.runIntoCache(id, feeds, cache);
  }
  async newCache(id: number, shape: CacheShape) {
    this.host.newCache(id, shape);
  }
  async resizeCache(id: number, capacity: number, keep: number) {
    this.host.resizeCache(id, capacity, keep);
  }
  async reorderCache(id: number, index: number[], shared: number) {
    this.host.reorderCache(id, index, shared);
  }
  async composeCache(id: number, rows: RowPlacement<number>[], capacity: number, length: number) {
    this.host.composeCache(id, rows, capacity, length);
  }
  async dropCache(id: number) {
    this.host.dropCache(id);
  }
}

/** One worker thread for the process, referenced only while it has work (so it never holds the process open). */
class WorkerHost implements Host {
  private readonly worker: Worker;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private seq = 0;
  private failure: Error | null = null;

  constructor() {
    this.worker = startWorker(import.meta.url, "sessionWorker");
    this.worker.unref();
    this.worker.on("message", (m: { seq: number; result?: unknown; error?: string }) => {
      const p = this.pending.get(m.seq);
      this.pending.delete(m.seq);
      if (!this.pending.size) this.worker.unref();
      if (m.error !== undefined) p?.reject(new Blip2Error(m.error));
      else p?.resolve(m.result);
    });
    const fail = (err: Error) => {
      this.failure = new Blip2Error(`the inference worker failed: ${describeError(err)}`);
      for (const p of this.pending.values()) p.reject(this.failure);
      this.pending.clear();
    };
    this.worker.on("error", fail);
    this.worker.on("exit", (code) => fail(new Error(`it exited with code ${code}`)));
  }

  private call<T>(message: Record<string, unknown>, transfer: ArrayBuffer[] = []): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    const seq = ++this.seq;
    if (!this.pending.size) this.worker.ref();
    return new Promise<T>((resolve, reject) => {
      this.pending.set(seq, { resolve: resolve as (v: unknown) => void, reject });
      try {
        this.worker.postMessage({ ...message, seq }, transfer);
      } catch (err) {
        // Never sent (a buffer that cannot be transferred): nothing will answer it.
        this.pending.delete(seq);
        if (!this.pending.size) this.worker.unref();
        reject(err);
      }
    });
  }

  create(id: number, name: string, model: Uint8Array | string, options: ort.InferenceSession.SessionOptions) {
    return this.call<void>({ op: "create", id, name, model, options }, typeof model === "string" ? [] : [model.buffer as ArrayBuffer]);
  }
  async run(id: number, feeds: Record<string, ort.Tensor>, step?: CacheStep) {
    return fromWire(await this.call<Record<string, WireTensor>>({ op: "run", id, feeds: toWire(feeds), step }));
  }
  release(id: number) {
    return this.call<void>({ op: "release", id });
  }
  runIntoCache(id: number, feeds: Record<string, ort.Tensor>, cache: number) {
    return this.call<void>({ op: "runIntoCache", id, feeds: toWire(feeds), cache });
  }
  newCache(id: number, shape: CacheShape) {
    return this.call<void>({ op: "newCache", id, shape });
  }
  resizeCache(id: number, capacity: number, keep: number) {
    return this.call<void>({ op: "resizeCache", id, capacity, keep });
  }
  reorderCache(id: number, index: number[], shared: number) {
    return this.call<void>({ op: "reorderCache", id, index, shared });
  }
  composeCache(id: number, rows: RowPlacement<number>[], capacity: number, length: number) {
    return this.call<void>({ op: "composeCache", id, rows, capacity, length });
  }
  dropCache(id: number) {
    return this.call<void>({ op: "dropCache", id });
  }
}

/**
 * Options a runtime sets per session. `thread` names the worker thread it lives in: ONNX Runtime
 * creates a session synchronously, prepacking its integer weights on one thread, so sessions in
 * separate workers are created side by side (the vision encoder's beside the language model's).
 */
export type SessionOptions = Pick<RuntimeOptions, "arena"> & {
  thread?: "image";
  /**
   * Let ONNX Runtime fold what is computed from weights alone into new weights at load (default
   * true). Training graphs turn it off: their backward dequantizes each 8- or 4-bit weight for one
   * product, and folded, the 4-bit codes unpacked from their bytes would be kept beside the packed
   * ones for every layer (DequantizeLinear itself is never folded).
   */
  foldConstants?: boolean;
};

let localHost: LocalHost | null = null;
const workerHosts = new Map<string, WorkerHost>();
let nextId = 0;

function hostFor(options: RuntimeOptions & SessionOptions, device: Device): Host {
  if (options.worker === false) return (localHost ??= new LocalHost());
  const thread = sessionThread(options, device);
  let host = workerHosts.get(thread);
  if (!host) workerHosts.set(thread, (host = new WorkerHost()));
  return host;
}

/**
 * The worker thread a session lives in. On a GPU every session shares one: ONNX Runtime's GPU
 * providers drive one device context per process, which two threads must not use at once. On an
 * H200, with the vision encoder's session in a worker of its own, both WebGPU loads tried (a tiny
 * and a full-size model) failed with "CommandEncoder is already finished" and crashed; in one
 * worker, 16 of 17 full-size loads passed.
 */
export const sessionThread = (options: SessionOptions, device: Device): string => (device === "cpu" ? (options.thread ?? "main") : "main");

const INTEGER_KERNELS = new Set(["MatMulNBits", "MatMulIntegerToFloat"]);

/**
 * Whether ONNX Runtime prepacks the graph's weights. Prepacking keeps a private, re-laid-out copy of
 * every weight matrix: not worth it for float32 weights (read in place from the mapped file), but
 * the integer kernels need their packed layout to run fast (without it, MatMulNBits runs far
 * slower and MatMulIntegerToFloat packs the weight again on every call).
 */
export const prepacks = (graph: Graph): boolean => graph.nodes.some((n) => INTEGER_KERNELS.has(n.op));

/**
 * ONNX Runtime's graph optimizers left out. BiasGeluFusion: its CPU kernel is slower than the bias
 * Add and Gelu it fuses (ViT-g's MLP in q8; docs/performance.md).
 */
const DISABLED_OPTIMIZERS = "BiasGeluFusion";

/**
 * The optimizers a session leaves out, as ONNX Runtime takes them (separated by semicolons).
 * Without constant folding, ReshapeFusion goes too: it then meets Reshapes whose target shape is
 * computed (byRows) feeding Reshapes to a constant shape, and ONNX Runtime 1.30 fails to create the
 * session when it joins them ("a name which does not exist ... _new_reshape").
 */
export const disabledOptimizers = (options: SessionOptions): string =>
  options.foldConstants === false ? `${DISABLED_OPTIMIZERS};ConstantFolding;ReshapeFusion` : DISABLED_OPTIMIZERS;

/** A graph compiled into a session; run with named feeds, returns named outputs. */
export class CompiledGraph {
  private constructor(
    readonly name: string,
    /** Where it runs: the device asked for, or the CPU it fell back to. */
    readonly device: Device,
    private readonly host: Host,
    private readonly id: number,
  ) {}

  static async create(graph: Graph, options: RuntimeOptions & SessionOptions = {}): Promise<CompiledGraph> {
    const files = [...new Set(graph.initializers.flatMap((i) => (i.kind === "external" ? [i.file] : [])))];
    const real = new Map(files.map((f) => [f, realPath(f)]));
    const folder = commonFolder([...real.values()]);
    const bytes = serializeGraph(graph, { externalLocation: (file) => path.relative(folder, real.get(file)!) });
    const device = await usableDevice(options.device ?? "cpu");
    const sessionOptions: ort.InferenceSession.SessionOptions = {
      // Nodes the device cannot run fall back to the CPU.
      executionProviders: device === "cpu" ? ["cpu"] : [device, "cpu"],
      graphOptimizationLevel: "all",
      // Errors only: on a GPU, ONNX Runtime warns for every session that shape computations run on
      // the CPU (as intended); blip2 reports what the user must know itself.
      logSeverityLevel: 3,
      enableCpuMemArena: options.arena ?? true,
      ...(options.threads ? { intraOpNumThreads: options.threads, interOpNumThreads: 1 } : {}),
      extra: {
        session: {
          model_external_initializers_file_folder_path: folder,
          disable_prepacking: prepacks(graph) ? "0" : "1",
        },
        optimization: { disable_specified_optimizers: disabledOptimizers(options) },
      },
    };
    const host = hostFor(options, device);
    const id = ++nextId;
    if (device === "cpu" && options.packedDir && prepacks(graph)) {
      const slot = {
        create: (model: Uint8Array | string, o: ort.InferenceSession.SessionOptions) => host.create(id, graph.name, model, o),
        run: (feeds: Record<string, ort.Tensor>) => host.run(id, feeds),
        release: () => host.release(id),
      };
      const weightBytes = graph.initializers.reduce((sum, i) => sum + (i.kind === "external" ? i.byteLength : 0), 0);
      const packed = PackedModel.for(options.packedDir, graph.name, bytes, [...real.values()], weightBytes, sessionOptions);
      await createPacked(slot, packed, bytes, sessionOptions, probeFeeds(graph), options.packingProgress);
    } else {
      await host.create(id, graph.name, bytes, sessionOptions);
    }
    return new CompiledGraph(graph.name, device, host, id);
  }

  /** Runs the session; with `step`, also attends to and extends a key/value cache of the same host. */
  run(feeds: Record<string, ort.Tensor>, step?: { cache: CacheHandle; mask: number[][]; chunks?: CacheStep["chunks"] }): Promise<Record<string, ort.Tensor>> {
    if (step) this.checkHost(step.cache);
    const run = this.host.run(this.id, feeds, step && { cache: step.cache.id, mask: step.mask, chunks: step.chunks });
    if (step) step.cache.length += step.mask[0]!.length;
    return run;
  }

  /**
   * Runs the session and keeps its outputs beside `cache`, fed to each of its steps (T5's
   * cross-attention keys/values, tens of megabytes, never sent between threads).
   * They stay one row per input: the rows continuing an input (beams) share it (see models/t5.ts).
   */
  runIntoCache(feeds: Record<string, ort.Tensor>, cache: CacheHandle): Promise<void> {
    this.checkHost(cache);
    return this.host.runIntoCache(this.id, feeds, cache.id);
  }

  /** A key/value cache beside this session (see runtime/kvCache.ts). */
  async newCache(shape: CacheShape): Promise<CacheHandle> {
    const id = ++nextId;
    await this.host.newCache(id, shape);
    return new CacheHandle(this.host, id, shape.capacity);
  }

  private checkHost(cache: CacheHandle): void {
    if (cache.host !== this.host) throw new Blip2Error("internal: cache and session live in different hosts");
  }

  release(): Promise<void> {
    return this.host.release(this.id);
  }
}

/** A key/value cache kept by a session host: its capacity and how many slots are filled. */
export class CacheHandle {
  length = 0;

  constructor(
    readonly host: Host,
    readonly id: number,
    public capacity: number,
  ) {}

  /** Makes it a cache of `capacity` slots that holds its first `keep` filled ones. */
  async resize(capacity: number, keep: number): Promise<void> {
    await this.host.resizeCache(this.id, capacity, keep);
    this.capacity = capacity;
    this.length = keep;
  }

  /** Slots the next step is given: one while the cache is empty, else all (see KvCache.fedSlots). */
  get fedSlots(): number {
    return fedSlots(this.length, this.capacity);
  }

  /** Keeps rows `index` in that order; the rows a row moves between hold the same first `shared` slots (see KvCache.reorder). */
  reorder(index: number[], shared = 0): Promise<void> {
    return this.host.reorderCache(this.id, index, shared);
  }

  drop(): Promise<void> {
    return this.host.dropCache(this.id);
  }

  /**
   * A new cache of `capacity` slots, `length` filled, whose rows are rows of these caches, each
   * moved by its `shift` (see KvCache.composed): continuous batching's rows joining and leaving.
   * The caches it is made of stay as they are, for the caller to drop.
   */
  static async compose(rows: RowPlacement<CacheHandle>[], capacity: number, length: number): Promise<CacheHandle> {
    const host = rows[0]?.cache.host;
    if (!host || rows.some((r) => r.cache.host !== host)) throw new Blip2Error("internal: a cache is composed of rows of caches of one host");
    const id = ++nextId;
    await host.composeCache(id, rows.map((r) => ({ cache: r.cache.id, row: r.row, shift: r.shift })), capacity, length);
    const out = new CacheHandle(host, id, capacity);
    out.length = length;
    return out;
  }
}

const devices = new Map<Device, Promise<Device>>();

/** The device if ONNX Runtime can use it here, else the CPU (said once). */
export function usableDevice(device: Device): Promise<Device> {
  if (device === "cpu") return Promise.resolve("cpu");
  let probe = devices.get(device);
  if (!probe) {
    probe = probeDevice(device);
    devices.set(device, probe);
  }
  return probe;
}

async function probeDevice(device: Device): Promise<Device> {
  const g = new Graph("probe");
  const x = g.input("x", "float32", [1]);
  g.output(g.addNode("Relu", [x], {}, [{ dtype: "float32", shape: [1] }])[0]!, "y");
  try {
    const s = await ort.InferenceSession.create(serializeGraph(g, { externalLocation: () => "" }), { executionProviders: [device], logSeverityLevel: 4 });
    await s.release();
    return device;
  } catch (err) {
    warnOnce(`device ${device} is not available here (${describeError(err).slice(0, 160)}); running on the CPU`);
    return "cpu";
  }
}

function realPath(file: string): string {
  try {
    return fs.realpathSync(file);
  } catch {
    throw new Blip2Error(`${file}: weight file is missing`);
  }
}

/** The deepest folder containing every file (ONNX Runtime's allowed external-data folder). */
export function commonFolder(files: string[]): string {
  if (files.length === 0) return process.cwd();
  let folder = path.dirname(files[0]!);
  while (!files.every((f) => f.startsWith(folder.endsWith(path.sep) ? folder : folder + path.sep))) {
    const parent = path.dirname(folder);
    if (parent === folder) break;
    folder = parent;
  }
  return folder;
}

export const tensor = {
  f32: (data: Float32Array, dims: readonly number[]) => new ort.Tensor("float32", data, dims),
  i64: (data: ArrayLike<number> | BigInt64Array, dims: readonly number[]) =>
    new ort.Tensor("int64", data instanceof BigInt64Array ? data : BigInt64Array.from(Array.from(data, (x) => BigInt(x))), dims),
};

/**
 * Options of a session running the vision encoder: a worker thread of its own, so that ONNX
 * Runtime creates (and packs) it beside the language model's sessions rather than after them. It
 * keeps the memory arena: without it, some Flan-T5-XL q8 runs peaked higher during the image runs,
 * while OPT-2.7B q8 peaked the same either way at the same speed (docs/performance.md).
 */
export const VISION_SESSION: SessionOptions = { thread: "image" };

/**
 * Runs a graph from `pixel_values` [B, 3, size, size] whose outputs are all [B, ...]. On the CPU
 * the images go through one at a time: the vision encoder is compute-bound (257 tokens per image),
 * so a batch is no faster per image, while its activations take B times the memory.
 */
export async function runImages(s: CompiledGraph, pixelValues: Float32Array, batch: number, size: number): Promise<Record<string, ort.Tensor>> {
  const expected = batch * 3 * size * size;
  if (pixelValues.length !== expected) throw new Blip2Error(`pixel_values has ${pixelValues.length} values, expected ${batch}x3x${size}x${size}`);
  const pixels = tensor.f32(pixelValues, [batch, 3, size, size]);
  if (s.device !== "cpu" || batch === 1) return s.run({ pixel_values: pixels });
  return joinRows(batch, 1, (b) => s.run({ pixel_values: rowView(pixels, b, 1) }));
}

/** Sessions by name, each created from its graph on first use. */
export class SessionCache {
  private sessions = new Map<string, Promise<CompiledGraph>>();

  constructor(private readonly options: RuntimeOptions) {}

  /** The named session; `build` makes its graph for the kind of device the sessions run on. */
  get(name: string, build: (target: Target) => Graph, options: SessionOptions = {}): Promise<CompiledGraph> {
    let s = this.sessions.get(name);
    if (!s) {
      const o = { ...this.options, ...options };
      s = usableDevice(o.device ?? "cpu").then((device) => CompiledGraph.create(build(device === "cpu" ? "cpu" : "gpu"), o));
      this.sessions.set(name, s);
      // A failed creation is not cached: the next call tries again.
      s.catch(() => this.sessions.delete(name));
    }
    return s;
  }

  async release(): Promise<void> {
    const all = [...this.sessions.values()];
    this.sessions.clear();
    await Promise.all(all.map(async (s) => (await s).release()));
  }
}
