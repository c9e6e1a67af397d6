/**
 * A small typed graph IR. Model files build graphs through the op functions in `ops.ts`; each op
 * checks its input shapes and computes its output shape at build time, so a wrong weight shape or a
 * mis-wired layer fails while the graph is built, with the op and the shapes in the message.
 *
 * A graph is a list of nodes in topological order (ops append as they are called), which is what a
 * reverse-mode pass needs: walk the nodes backwards, apply each op's vector-Jacobian rule.
 */
import { Blip2Error } from "../errors.js";
import type { TensorInfo } from "../io/safetensors.js";

export type DType = "float32" | "float16" | "bfloat16" | "int64" | "int32" | "uint32" | "int8" | "uint8" | "bool";

/** A dimension: a number when known at build time, a symbol (e.g. "batch") when dynamic. */
export type Dim = number | string;
export type Shape = readonly Dim[];

export type Attr =
  | { kind: "int"; value: number }
  | { kind: "float"; value: number }
  | { kind: "ints"; value: number[] }
  | { kind: "floats"; value: number[] }
  | { kind: "string"; value: string };

export const attr = {
  int: (value: number): Attr => ({ kind: "int", value }),
  float: (value: number): Attr => ({ kind: "float", value }),
  ints: (value: number[]): Attr => ({ kind: "ints", value }),
  floats: (value: number[]): Attr => ({ kind: "floats", value }),
  string: (value: string): Attr => ({ kind: "string", value }),
};

export class Value {
  constructor(
    readonly graph: Graph,
    readonly name: string,
    readonly dtype: DType,
    readonly shape: Shape,
    readonly producer: Node | null,
  ) {}

  get rank(): number {
    return this.shape.length;
  }

  /** The dimension at `axis` (negative counts from the end). */
  dim(axis: number): Dim {
    const a = axis < 0 ? this.shape.length + axis : axis;
    const d = this.shape[a];
    if (d === undefined) throw new Blip2Error(`internal: axis ${axis} out of range for shape [${this.shape.join(", ")}]`);
    return d;
  }
}

export interface Node {
  op: string;
  domain: string;
  inputs: (Value | null)[];
  outputs: Value[];
  attrs: Record<string, Attr>;
}

/** Tensor data held in the graph itself (small constants). */
export type ConstData = Float32Array | BigInt64Array | Int32Array | Uint32Array | Uint8Array | Int8Array;

export type Initializer =
  | { kind: "inline"; name: string; dtype: DType; dims: number[]; data: ConstData }
  /** Bytes that stay in a file (a safetensors shard), referenced by absolute offset. */
  | { kind: "external"; name: string; dtype: DType; dims: number[]; file: string; offset: number; byteLength: number };

export interface GraphInput {
  value: Value;
}

const SAFE_TO_IR: Record<string, DType> = { F32: "float32", F16: "float16", BF16: "bfloat16", I64: "int64", I32: "int32", I8: "int8", U8: "uint8", BOOL: "bool" };

/**
 * What a graph is built for. ONNX Runtime's CPU kernels multiply 8-bit weights in integer
 * arithmetic; its GPU providers have no such kernels (WebGPU ran them on the CPU, and failed on
 * their uint8 zero points), so a "gpu" graph widens 8-bit weights to float32 on the device instead.
 */
export type Target = "cpu" | "gpu";

export class Graph {
  readonly nodes: Node[] = [];
  readonly inputs: Value[] = [];
  readonly outputs: Value[] = [];
  readonly initializers: Initializer[] = [];
  private names = new Set<string>();
  private counter = 0;
  private constCache = new Map<string, Value>();
  private weightCache = new Map<string, Value>();
  /** The checkpoint tensor each weight value stands for (casts included). */
  readonly weightNames = new Map<Value, string>();
  /**
   * In a training graph, the checkpoint tensors that are trained: each becomes a float32 graph input
   * of its own name (the trainer holds its values) instead of a weight read from the file.
   */
  trainable: ((name: string) => boolean) | null = null;
  /** The trained tensors' inputs, by checkpoint name, in the order the graph first used them. */
  readonly trained = new Map<string, Value>();

  constructor(
    readonly name: string,
    readonly target: Target = "cpu",
  ) {}

  /** A fresh unique value name with a readable prefix. */
  uniqueName(prefix: string): string {
    let name = prefix;
    while (this.names.has(name)) name = `${prefix}_${++this.counter}`;
    this.names.add(name);
    return name;
  }

  input(name: string, dtype: DType, shape: Shape): Value {
    if (this.names.has(name)) throw new Blip2Error(`internal: graph ${this.name} already has a value named ${name}`);
    this.names.add(name);
    const v = new Value(this, name, dtype, shape, null);
    this.inputs.push(v);
    return v;
  }

  /** Mark `value` as a graph output under `name`. */
  output(value: Value, name: string): Value {
    const out = value.name === name ? value : this.addNode("Identity", [value], {}, [{ dtype: value.dtype, shape: value.shape, name }])[0]!;
    this.outputs.push(out);
    return out;
  }

  /**
   * A weight read from a checkpoint, referenced by file offset. Floating-point weights that are not
   * float32 are cast to float32 inside the graph (ONNX Runtime folds the cast once at load).
   */
  weight(info: TensorInfo, castTo: DType | null = "float32"): Value {
    const cached = this.weightCache.get(info.name);
    if (cached) return cached;
    if (this.trainable?.(info.name)) {
      const v = this.input(info.name, "float32", info.shape);
      this.weightCache.set(info.name, v);
      this.weightNames.set(v, info.name);
      this.trained.set(info.name, v);
      return v;
    }
    const dtype = SAFE_TO_IR[info.dtype];
    if (!dtype) throw new Blip2Error(`${info.file}: tensor ${info.name} has dtype ${info.dtype}, which the graph cannot use`);
    const name = this.uniqueName(info.name);
    this.initializers.push({ kind: "external", name, dtype, dims: [...info.shape], file: info.file, offset: info.offset, byteLength: info.byteLength });
    let v = new Value(this, name, dtype, info.shape, null);
    if (castTo && dtype !== castTo && isFloat(dtype)) {
      v = this.addNode("Cast", [v], { to: attr.int(onnxDataType(castTo)) }, [{ dtype: castTo, shape: info.shape }])[0]!;
    }
    this.weightCache.set(info.name, v);
    this.weightNames.set(v, info.name);
    return v;
  }

  /** A constant tensor stored inline; identical constants are shared. */
  constant(data: ConstData, dtype: DType, dims: number[]): Value {
    const key = `${dtype}|${dims.join(",")}|${Array.from(data as ArrayLike<number | bigint>).join(",")}`;
    const hit = key.length < 4096 ? this.constCache.get(key) : undefined;
    if (hit) return hit;
    const name = this.uniqueName("const");
    this.initializers.push({ kind: "inline", name, dtype, dims, data });
    const v = new Value(this, name, dtype, dims, null);
    if (key.length < 4096) this.constCache.set(key, v);
    return v;
  }

  scalar(x: number, dtype: DType = "float32"): Value {
    return this.constant(dtype === "int64" ? BigInt64Array.from([BigInt(x)]) : Float32Array.from([x]), dtype, []);
  }

  ints(values: number[]): Value {
    return this.constant(BigInt64Array.from(values.map(BigInt)), "int64", [values.length]);
  }

  addNode(op: string, inputs: (Value | null)[], attrs: Record<string, Attr>, outputs: { dtype: DType; shape: Shape; name?: string }[], domain = ""): Value[] {
    for (const i of inputs) {
      if (i && i.graph !== this) throw new Blip2Error(`internal: ${op} mixes values from graphs ${i.graph.name} and ${this.name}`);
    }
    const node: Node = { op, domain, inputs, attrs, outputs: [] };
    node.outputs = outputs.map((o) => new Value(this, o.name ? this.claim(o.name) : this.uniqueName(op.toLowerCase()), o.dtype, o.shape, node));
    this.nodes.push(node);
    return node.outputs;
  }

  private claim(name: string): string {
    if (this.names.has(name)) throw new Blip2Error(`internal: graph ${this.name} already has a value named ${name}`);
    this.names.add(name);
    return name;
  }
}

export function isFloat(dtype: DType): boolean {
  return dtype === "float32" || dtype === "float16" || dtype === "bfloat16";
}

/** ONNX TensorProto.DataType codes. */
export function onnxDataType(dtype: DType): number {
  switch (dtype) {
    case "float32": return 1;
    case "uint8": return 2;
    case "int8": return 3;
    case "int32": return 6;
    case "uint32": return 12;
    case "int64": return 7;
    case "bool": return 9;
    case "float16": return 10;
    case "bfloat16": return 16;
  }
}
