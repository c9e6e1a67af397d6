/** Serialize a Graph to an ONNX ModelProto (protobuf bytes) with the schema from `onnx-proto`. */
import onnxProto from "onnx-proto";
import { onnxDataType, type Attr, type Graph, type Initializer, type Shape, type Value } from "./graph.js";

const { onnx } = onnxProto;

export const OPSET = 21;
/** IR version 10 goes with opset 21. */
const IR_VERSION = 10;

export interface SerializeOptions {
  /** Where an external initializer's file is found, relative to the .onnx file. */
  externalLocation: (file: string) => string;
}

export function serializeGraph(graph: Graph, options: SerializeOptions): Uint8Array {
  const usesMicrosoft = graph.nodes.some((n) => n.domain === "com.microsoft");
  const model = onnx.ModelProto.create({
    irVersion: IR_VERSION,
    producerName: "blip2",
    opsetImport: [
      { domain: "", version: OPSET },
      ...(usesMicrosoft ? [{ domain: "com.microsoft", version: 1 }] : []),
    ],
    graph: {
      name: graph.name,
      node: graph.nodes.map((n, i) => ({
        opType: n.op,
        domain: n.domain,
        name: `${n.op}_${i}`,
        input: n.inputs.map((v) => v?.name ?? ""),
        output: n.outputs.map((v) => v.name),
        attribute: Object.entries(n.attrs).map(([name, a]) => attribute(name, a)),
      })),
      input: graph.inputs.map(valueInfo),
      output: graph.outputs.map(valueInfo),
      initializer: graph.initializers.map((init) => tensorProto(init, options)),
    },
  });
  return onnx.ModelProto.encode(model).finish();
}

function valueInfo(v: Value) {
  return { name: v.name, type: { tensorType: { elemType: onnxDataType(v.dtype), shape: shapeProto(v.shape) } } };
}

function shapeProto(shape: Shape) {
  // Symbols from shape inference ("reshape?3") are left anonymous; named ones ("batch") are kept.
  return { dim: shape.map((d) => (typeof d === "number" ? { dimValue: d } : /^[A-Za-z_]\w*$/.test(d) ? { dimParam: d } : {})) };
}

function attribute(name: string, a: Attr) {
  const T = onnx.AttributeProto.AttributeType;
  switch (a.kind) {
    case "int": return { name, type: T.INT, i: a.value };
    case "float": return { name, type: T.FLOAT, f: a.value };
    case "ints": return { name, type: T.INTS, ints: a.value };
    case "floats": return { name, type: T.FLOATS, floats: a.value };
    case "string": return { name, type: T.STRING, s: new TextEncoder().encode(a.value) };
  }
}

function tensorProto(init: Initializer, options: SerializeOptions) {
  const base = { name: init.name, dataType: onnxDataType(init.dtype), dims: init.dims };
  if (init.kind === "external") {
    return {
      ...base,
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: "location", value: options.externalLocation(init.file) },
        { key: "offset", value: String(init.offset) },
        { key: "length", value: String(init.byteLength) },
      ],
    };
  }
  const d = init.data;
  return { ...base, rawData: new Uint8Array(d.buffer, d.byteOffset, d.byteLength) };
}
