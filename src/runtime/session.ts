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
import type { Graph } from "../ir/graph.js";
import { serializeGraph } from "../ir/onnx.js";

export type Device = "cpu" | "webgpu" | "cuda";

export interface RuntimeOptions {
  /** Intra-op threads (default: ONNX Runtime's choice, one per core). */
  threads?: number;
  device?: Device;
}

/** A graph compiled into a session; run with named feeds, returns named outputs. */
export class CompiledGraph {
  private constructor(
    readonly name: string,
    private readonly session: ort.InferenceSession,
  ) {}

  static async create(graph: Graph, options: RuntimeOptions = {}): Promise<CompiledGraph> {
    const files = [...new Set(graph.initializers.flatMap((i) => (i.kind === "external" ? [i.file] : [])))];
    const real = new Map(files.map((f) => [f, realPath(f)]));
    const folder = commonFolder([...real.values()]);
    const bytes = serializeGraph(graph, { externalLocation: (file) => path.relative(folder, real.get(file)!) });
    const sessionOptions: ort.InferenceSession.SessionOptions = {
      executionProviders: [options.device ?? "cpu"],
      graphOptimizationLevel: "all",
      ...(options.threads ? { intraOpNumThreads: options.threads, interOpNumThreads: 1 } : {}),
      extra: {
        session: {
          model_external_initializers_file_folder_path: folder,
          // Prepacking keeps a private, re-laid-out copy of every weight matrix: not worth it for
          // float32 weights (read in place from the mapped file), but block-quantized MatMulNBits
          // needs its packed layout to run fast (some 100x).
          disable_prepacking: graph.nodes.some((n) => n.op === "MatMulNBits") ? "0" : "1",
        },
      },
    };
    try {
      return new CompiledGraph(graph.name, await ort.InferenceSession.create(bytes, sessionOptions));
    } catch (err) {
      throw new Blip2Error(`cannot create the ${graph.name} session: ${describeError(err)}`, { cause: err });
    }
  }

  async run(feeds: Record<string, ort.Tensor>): Promise<Record<string, ort.Tensor>> {
    try {
      return (await this.session.run(feeds)) as Record<string, ort.Tensor>;
    } catch (err) {
      throw new Blip2Error(`${this.name}: ${describeError(err)}`, { cause: err });
    }
  }

  get inputNames(): readonly string[] {
    return this.session.inputNames;
  }

  get outputNames(): readonly string[] {
    return this.session.outputNames;
  }

  async release(): Promise<void> {
    await this.session.release();
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
function commonFolder(files: string[]): string {
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

/** Sessions by name, each created from its graph on first use. */
export class SessionCache {
  private sessions = new Map<string, Promise<CompiledGraph>>();

  constructor(private readonly options: RuntimeOptions) {}

  get(name: string, build: () => Graph): Promise<CompiledGraph> {
    let s = this.sessions.get(name);
    if (!s) {
      s = CompiledGraph.create(build(), this.options);
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
