/**
 * safetensors: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
 * We read only the header; tensor bytes stay in the file and are referenced by absolute offset
 * (ONNX external data) or read on demand for the few small tensors the host code needs.
 */
import fs from "node:fs";
import { Blip2Error } from "../errors.js";
import { partialFile } from "./partialFile.js";

export type SafeDType = "F64" | "F32" | "F16" | "BF16" | "I64" | "I32" | "I16" | "I8" | "U8" | "BOOL";

export const DTYPE_BYTES: Record<SafeDType, number> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1,
};

export interface TensorInfo {
  name: string;
  dtype: SafeDType;
  shape: number[];
  /** Path of the file holding the bytes. */
  file: string;
  /** Absolute byte offset of the tensor inside `file`. */
  offset: number;
  byteLength: number;
}

const MAX_HEADER_BYTES = 100 * 1024 * 1024;

/** Parse a safetensors header and validate every entry against the file's real size. */
export function readSafetensorsHeader(file: string): { tensors: Map<string, TensorInfo>; metadata: Record<string, string> } {
  let fd: number;
  try {
    fd = fs.openSync(file, "r");
  } catch (err) {
    throw new Blip2Error(`${file}: cannot open safetensors file (${(err as NodeJS.ErrnoException).code ?? err})`);
  }
  try {
    const size = fs.fstatSync(fd).size;
    if (size < 8) throw new Blip2Error(`${file}: truncated safetensors file (${size} bytes, no header)`);
    const lenBuf = Buffer.alloc(8);
    fs.readSync(fd, lenBuf, 0, 8, 0);
    const headerLen = Number(lenBuf.readBigUInt64LE(0));
    if (headerLen > MAX_HEADER_BYTES || 8 + headerLen > size) {
      throw new Blip2Error(`${file}: safetensors header says ${headerLen} bytes but the file has ${size} bytes (truncated or not safetensors)`);
    }
    const headerBuf = Buffer.alloc(headerLen);
    fs.readSync(fd, headerBuf, 0, headerLen, 8);
    let header: Record<string, unknown>;
    try {
      header = JSON.parse(headerBuf.toString("utf8"));
    } catch {
      throw new Blip2Error(`${file}: safetensors header is not valid JSON`);
    }
    if (header === null || typeof header !== "object" || Array.isArray(header)) {
      throw new Blip2Error(`${file}: safetensors header is not a JSON object`);
    }
    const dataStart = 8 + headerLen;
    const tensors = new Map<string, TensorInfo>();
    let metadata: Record<string, string> = {};
    for (const [name, entry] of Object.entries(header)) {
      if (name === "__metadata__") {
        metadata = (entry ?? {}) as Record<string, string>;
        continue;
      }
      tensors.set(name, parseEntry(file, name, entry, dataStart, size));
    }
    return { tensors, metadata };
  } finally {
    fs.closeSync(fd);
  }
}

function parseEntry(file: string, name: string, entry: unknown, dataStart: number, fileSize: number): TensorInfo {
  const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
  if (typeof e?.dtype !== "string" || !(e.dtype in DTYPE_BYTES)) {
    throw new Blip2Error(`${file}: tensor ${name} has unsupported dtype ${JSON.stringify(e?.dtype)} (supported: ${Object.keys(DTYPE_BYTES).join(", ")})`);
  }
  const dtype = e.dtype as SafeDType;
  const shape = e.shape;
  if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) {
    throw new Blip2Error(`${file}: tensor ${name} has an invalid shape ${JSON.stringify(shape)}`);
  }
  const offsets = e.data_offsets;
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isInteger(o) && o >= 0)) {
    throw new Blip2Error(`${file}: tensor ${name} has invalid data_offsets ${JSON.stringify(offsets)}`);
  }
  const [begin, end] = offsets as [number, number];
  const expected = (shape as number[]).reduce((a, b) => a * b, 1) * DTYPE_BYTES[dtype];
  if (end - begin !== expected) {
    throw new Blip2Error(`${file}: tensor ${name} of shape [${shape.join(", ")}] ${dtype} needs ${expected} bytes but its header gives ${end - begin}`);
  }
  if (dataStart + end > fileSize) {
    throw new Blip2Error(`${file}: truncated: tensor ${name} ends at byte ${dataStart + end} but the file has ${fileSize} bytes`);
  }
  return { name, dtype, shape: shape as number[], file, offset: dataStart + begin, byteLength: expected };
}

/** Read a tensor's raw bytes from its file. */
export function readTensorBytes(info: TensorInfo): Buffer {
  const buf = Buffer.alloc(info.byteLength);
  const fd = fs.openSync(info.file, "r");
  try {
    let done = 0;
    while (done < info.byteLength) {
      const n = fs.readSync(fd, buf, done, info.byteLength - done, info.offset + done);
      if (n === 0) throw new Blip2Error(`${info.file}: truncated while reading tensor ${info.name}`);
      done += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return buf;
}

/** Read a floating-point tensor as float32, widening F16/BF16/F64. */
export function readTensorF32(info: TensorInfo): Float32Array {
  const bytes = readTensorBytes(info);
  const n = info.byteLength / DTYPE_BYTES[info.dtype];
  const out = new Float32Array(n);
  switch (info.dtype) {
    case "F32":
      out.set(new Float32Array(bytes.buffer, bytes.byteOffset, n));
      return out;
    case "F64":
      for (let i = 0; i < n; i++) out[i] = bytes.readDoubleLE(i * 8);
      return out;
    case "BF16": {
      const u32 = new Uint32Array(out.buffer);
      for (let i = 0; i < n; i++) u32[i] = bytes.readUInt16LE(i * 2) << 16;
      return out;
    }
    case "F16":
      for (let i = 0; i < n; i++) out[i] = halfToFloat(bytes.readUInt16LE(i * 2));
      return out;
    default:
      throw new Blip2Error(`${info.file}: tensor ${info.name} is ${info.dtype}, expected a floating-point dtype`);
  }
}

/** Read an integer tensor (I64/I32/...) as plain numbers. */
export function readTensorInts(info: TensorInfo): number[] {
  const bytes = readTensorBytes(info);
  const size = DTYPE_BYTES[info.dtype];
  const n = info.byteLength / size;
  const out: number[] = new Array(n);
  for (let i = 0; i < n; i++) {
    const at = i * size;
    switch (info.dtype) {
      case "I64": out[i] = Number(bytes.readBigInt64LE(at)); break;
      case "I32": out[i] = bytes.readInt32LE(at); break;
      case "I16": out[i] = bytes.readInt16LE(at); break;
      case "I8": out[i] = bytes.readInt8(at); break;
      case "U8": case "BOOL": out[i] = bytes.readUInt8(at); break;
      default: throw new Blip2Error(`${info.file}: tensor ${info.name} is ${info.dtype}, expected an integer dtype`);
    }
  }
  return out;
}

export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

export interface TensorToWrite {
  dtype: "F32" | "I64";
  shape: number[];
  data: Float32Array | BigInt64Array;
}

/** Write tensors to a safetensors file (atomically: a temp file renamed into place). */
export function writeSafetensors(file: string, tensors: Record<string, TensorToWrite>, metadata?: Record<string, string>): void {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  const names = Object.keys(tensors).sort();
  for (const name of names) {
    const t = tensors[name]!;
    const bytes = t.data.byteLength;
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  // Pad the header with spaces so the data starts 8-byte aligned, as the reference writer does.
  json += " ".repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const headerBuf = Buffer.from(json, "utf8");
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(headerBuf.length));
  const tmp = partialFile(file);
  const fd = fs.openSync(tmp, "w");
  try {
    fs.writeSync(fd, lenBuf);
    fs.writeSync(fd, headerBuf);
    for (const name of names) {
      const d = tensors[name]!.data;
      fs.writeSync(fd, new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
    }
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

export function floatToHalf(f: number): number {
  // Round to nearest even through a float32 view of the value.
  const f32 = new Float32Array([f]);
  const x = new Uint32Array(f32.buffer)[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    return sign | (half + (rest > mid || (rest === mid && half & 1) ? 1 : 0));
  }
  const half = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  return sign | (half + (rest > 0x1000 || (rest === 0x1000 && half & 1) ? 1 : 0));
}

export interface StreamedTensor {
  name: string;
  dtype: SafeDType;
  shape: number[];
  /** Produces the tensor's bytes when its turn to be written comes. */
  data: () => Uint8Array | Promise<Uint8Array>;
  /** Starts producing them in the background, some tensors ahead of their turn. */
  prepare?: () => void;
}

/**
 * Write tensors in order, atomically, each produced on demand while the next `ahead` are prepared
 * (so only those are in memory). `onWritten` is told each tensor's name after it is on disk.
 */
export async function writeSafetensorsStreamed(file: string, tensors: StreamedTensor[], metadata: Record<string, string>, onWritten?: (name: string) => void, ahead = 0): Promise<void> {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of tensors) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[t.dtype];
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const tmp = partialFile(file);
  const fd = fs.openSync(tmp, "w");
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
    fs.writeSync(fd, len);
    fs.writeSync(fd, json);
    for (let i = 0; i < tensors.length; i++) {
      for (const next of tensors.slice(i, i + 1 + ahead)) next.prepare?.();
      const t = tensors[i]!;
      const data = await t.data();
      const expected = (header[t.name] as { data_offsets: number[] }).data_offsets;
      if (data.byteLength !== expected[1]! - expected[0]!) throw new Blip2Error(`internal: tensor ${t.name} produced ${data.byteLength} bytes, expected ${expected[1]! - expected[0]!}`);
      fs.writeSync(fd, data);
      onWritten?.(t.name);
    }
  } catch (err) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  fs.closeSync(fd);
  fs.renameSync(tmp, file);
}
