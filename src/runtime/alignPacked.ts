/**
 * Page-aligning the data file of a model ONNX Runtime saved with its packed weights. ONNX Runtime
 * 1.30 writes each packed blob right after the tensor before it, at any byte offset, and restores
 * `MatMulNBits`' packed blobs wrongly unless they start aligned: a graph of three chained
 * `MatMulNBits` gave NaN after reopening from the first node at an unaligned offset on, and the same
 * results as before saving once every range started at a multiple of 4096. So the saved file is
 * copied range by range to page-aligned offsets, and the model's external-data entries follow.
 */
import fs from "node:fs";
import path from "node:path";
import onnxProto from "onnx-proto";
import { Blip2Error } from "../errors.js";

const { onnx } = onnxProto;
const PAGE = 4096;
/** What ONNX Runtime writes for a packed blob: `<kernel>+<hash>|<offset>;<length>;<flags>`. */
const PACKED_ENTRY = /^(.+)\|(\d+);(\d+);(\d+)$/;
const KNOWN_KEYS = new Set(["location", "offset", "length", "checksum"]);

interface Range {
  offset: number;
  length: number;
  /** Sets the range's new offset in the model. */
  moveTo: (offset: number) => void;
}

/** Rewrites `<folder>/<model>` and its data file `<folder>/<data>` with every range page-aligned. */
export function alignPacked(folder: string, model: string, data: string): void {
  const modelFile = path.join(folder, model);
  const proto = onnx.ModelProto.decode(fs.readFileSync(modelFile));
  const ranges = (proto.graph?.initializer ?? []).flatMap((init) => rangesOf(init, data));
  const aligned = path.join(folder, `${data}.aligned`);
  copyAligned(path.join(folder, data), aligned, ranges);
  fs.renameSync(aligned, path.join(folder, data));
  fs.writeFileSync(modelFile, onnx.ModelProto.encode(proto).finish());
}

function rangesOf(init: onnxProto.onnx.ITensorProto, data: string): Range[] {
  const entries = init.externalData ?? [];
  if (!entries.length) return [];
  const value = (key: string) => entries.find((e) => e.key === key);
  if (value("location")?.value !== data) throw new Blip2Error(`${init.name}: external data outside ${data}`);
  const ranges: Range[] = [];
  const offset = value("offset");
  const length = value("length");
  if (!offset || !length) throw new Blip2Error(`${init.name}: external data without offset and length`);
  ranges.push({ offset: Number(offset.value), length: Number(length.value), moveTo: (o) => void (offset.value = String(o)) });
  for (const e of entries) {
    if (KNOWN_KEYS.has(e.key ?? "")) continue;
    const packed = /^prepacked_\d+$/.test(e.key ?? "") ? PACKED_ENTRY.exec(e.value ?? "") : null;
    if (!packed) throw new Blip2Error(`${init.name}: unknown external-data entry ${e.key}=${e.value}`);
    const [, kernel, at, bytes, flags] = packed;
    ranges.push({ offset: Number(at), length: Number(bytes), moveTo: (o) => void (e.value = `${kernel}|${o};${bytes};${flags}`) });
  }
  return ranges;
}

/** Copies each range of `from` to the next page boundary of `to`, in order. */
function copyAligned(from: string, to: string, ranges: Range[]): void {
  const src = fs.openSync(from, "r");
  const dst = fs.openSync(to, "w");
  const buffer = Buffer.alloc(64 << 20);
  try {
    const size = fs.fstatSync(src).size;
    let end = 0;
    for (const r of ranges) {
      if (r.offset + r.length > size) throw new Blip2Error(`${from}: a range ends at ${r.offset + r.length}, past the file's ${size} bytes`);
      const start = Math.ceil(end / PAGE) * PAGE;
      for (let done = 0; done < r.length; ) {
        const n = fs.readSync(src, buffer, 0, Math.min(buffer.length, r.length - done), r.offset + done);
        if (n === 0) throw new Blip2Error(`${from}: ended early`);
        fs.writeSync(dst, buffer, 0, n, start + done);
        done += n;
      }
      r.moveTo(start);
      end = start + r.length;
    }
  } finally {
    fs.closeSync(src);
    fs.closeSync(dst);
  }
}
