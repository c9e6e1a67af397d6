/**
 * SentencePiece support: a minimal protobuf reader for `spiece.model` (the `ModelProto` of
 * google/sentencepiece's `sentencepiece_model.proto`, only the fields a converter needs) and the
 * `precompiled_charsmap` normalizer, reproducing the `spm_precompiled` crate used by Hugging Face
 * tokenizers (`Precompiled` normalizer) bit for bit: a Darts double-array trie over UTF-8 bytes
 * whose values index a NUL-separated table of replacement strings.
 */

/** Thrown for malformed protobuf input; callers turn it into a Blip2Error naming the file. */
export class ProtobufError extends Error {}

/** Wire types of the protobuf encoding. */
const VARINT = 0;
const FIXED64 = 1;
const LENGTH_DELIMITED = 2;
const FIXED32 = 5;

/** Sequential reader over one protobuf message (a byte range of a buffer). */
export class ProtoReader {
  private pos: number;
  private readonly view: DataView;

  constructor(
    private readonly buf: Uint8Array,
    start = 0,
    private readonly end = buf.length,
  ) {
    this.pos = start;
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }

  get done(): boolean {
    return this.pos >= this.end;
  }

  /** Reads a varint as an unsigned 64-bit BigInt-free number when it fits, exact up to 2^53. */
  private varintRaw(): { lo: number; hi: number } {
    // lo: bits 0..27 (4 bytes of 7 bits), hi: bits 28..63; combined later.
    let lo = 0;
    let hi = 0;
    let shift = 0;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) throw new ProtobufError("truncated varint");
      const b = this.buf[this.pos++]!;
      const bits = b & 0x7f;
      if (shift < 28) {
        lo |= bits << shift;
      } else {
        hi += bits * 2 ** (shift - 28);
      }
      shift += 7;
      if ((b & 0x80) === 0) return { lo: lo >>> 0, hi };
    }
    throw new ProtobufError("varint longer than 10 bytes");
  }

  /** An unsigned varint (uint32/uint64/bool/enum/tag/length). */
  uint(): number {
    const { lo, hi } = this.varintRaw();
    return hi * 2 ** 28 + lo;
  }

  /** A varint read as int32 (negative values are sign-extended to 64 bits on the wire). */
  int32(): number {
    const { lo, hi } = this.varintRaw();
    // The low 32 bits decide an int32: bits 0..27 in lo, bits 28..31 are the low 4 bits of hi.
    const low32 = (lo | ((hi % 16) << 28)) >>> 0;
    return low32 | 0;
  }

  bool(): boolean {
    return this.uint() !== 0;
  }

  float(): number {
    if (this.pos + 4 > this.end) throw new ProtobufError("truncated float");
    const v = this.view.getFloat32(this.pos, true);
    this.pos += 4;
    return v;
  }

  /** A length-delimited field's bytes (a view, not a copy). */
  bytes(): Uint8Array {
    const len = this.uint();
    if (len > this.end - this.pos) throw new ProtobufError("length-delimited field runs past the end");
    const out = this.buf.subarray(this.pos, this.pos + len);
    this.pos += len;
    return out;
  }

  string(): string {
    return utf8Decoder.decode(this.bytes());
  }

  /** Reads a field tag: field number and wire type. */
  tag(): { field: number; wire: number } {
    const t = this.uint();
    const field = Math.floor(t / 8);
    const wire = t % 8;
    if (field === 0) throw new ProtobufError("field number 0");
    return { field, wire };
  }

  /** Skips a field of the given wire type. */
  skip(wire: number): void {
    switch (wire) {
      case VARINT:
        this.varintRaw();
        return;
      case FIXED64:
        this.advance(8);
        return;
      case LENGTH_DELIMITED:
        this.bytes();
        return;
      case FIXED32:
        this.advance(4);
        return;
      default:
        throw new ProtobufError(`unsupported wire type ${wire}`);
    }
  }

  private advance(n: number): void {
    if (this.pos + n > this.end) throw new ProtobufError("truncated fixed-width field");
    this.pos += n;
  }

  /** A reader over an embedded message. */
  message(): ProtoReader {
    const b = this.bytes();
    return new ProtoReader(this.buf, b.byteOffset - this.buf.byteOffset, b.byteOffset - this.buf.byteOffset + b.length);
  }
}

const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

/** `ModelProto.SentencePiece.Type`. */
export enum PieceType {
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
}

export interface SentencePiece {
  piece: string;
  score: number;
  type: PieceType;
}

/** `TrainerSpec.ModelType`. */
export enum SpmModelType {
  Unigram = 1,
  Bpe = 2,
  Word = 3,
  Char = 4,
}

/** The parts of a SentencePiece `ModelProto` the converters use (defaults as in the .proto). */
export interface SentencePieceModel {
  pieces: SentencePiece[];
  trainerSpec: {
    modelType: SpmModelType;
    unkId: number;
    bosId: number;
    eosId: number;
    padId: number;
    unkPiece: string;
    bosPiece: string;
    eosPiece: string;
    padPiece: string;
    byteFallback: boolean;
  };
  normalizerSpec: {
    name: string;
    precompiledCharsmap: Uint8Array;
    addDummyPrefix: boolean;
    removeExtraWhitespaces: boolean;
    escapeWhitespaces: boolean;
  };
}

function parsePiece(r: ProtoReader): SentencePiece {
  let piece: string | undefined;
  let score = 0;
  let type = PieceType.Normal;
  while (!r.done) {
    const { field, wire } = r.tag();
    if (field === 1 && wire === LENGTH_DELIMITED) piece = r.string();
    else if (field === 2 && wire === FIXED32) score = r.float();
    else if (field === 3 && wire === VARINT) type = r.int32();
    else r.skip(wire);
  }
  if (piece === undefined) throw new ProtobufError("a piece has no text");
  if (!(type >= PieceType.Normal && type <= PieceType.Byte)) throw new ProtobufError(`a piece has unknown type ${type}`);
  return { piece, score, type };
}

function parseTrainerSpec(r: ProtoReader, spec: SentencePieceModel["trainerSpec"]): void {
  while (!r.done) {
    const { field, wire } = r.tag();
    if (wire === VARINT && field === 3) spec.modelType = r.int32();
    else if (wire === VARINT && field === 35) spec.byteFallback = r.bool();
    else if (wire === VARINT && field === 40) spec.unkId = r.int32();
    else if (wire === VARINT && field === 41) spec.bosId = r.int32();
    else if (wire === VARINT && field === 42) spec.eosId = r.int32();
    else if (wire === VARINT && field === 43) spec.padId = r.int32();
    else if (wire === LENGTH_DELIMITED && field === 45) spec.unkPiece = r.string();
    else if (wire === LENGTH_DELIMITED && field === 46) spec.bosPiece = r.string();
    else if (wire === LENGTH_DELIMITED && field === 47) spec.eosPiece = r.string();
    else if (wire === LENGTH_DELIMITED && field === 48) spec.padPiece = r.string();
    else r.skip(wire);
  }
}

function parseNormalizerSpec(r: ProtoReader, spec: SentencePieceModel["normalizerSpec"]): void {
  while (!r.done) {
    const { field, wire } = r.tag();
    if (wire === LENGTH_DELIMITED && field === 1) spec.name = r.string();
    else if (wire === LENGTH_DELIMITED && field === 2) spec.precompiledCharsmap = r.bytes().slice();
    else if (wire === VARINT && field === 3) spec.addDummyPrefix = r.bool();
    else if (wire === VARINT && field === 4) spec.removeExtraWhitespaces = r.bool();
    else if (wire === VARINT && field === 5) spec.escapeWhitespaces = r.bool();
    else r.skip(wire);
  }
}

/**
 * Parses a serialized SentencePiece `ModelProto`. Throws ProtobufError on malformed input
 * (truncation, bad wire types, invalid UTF-8, no pieces, an unk id out of range).
 */
export function parseSentencePieceModel(data: Uint8Array): SentencePieceModel {
  const model: SentencePieceModel = {
    pieces: [],
    trainerSpec: {
      modelType: SpmModelType.Unigram,
      unkId: 0,
      bosId: 1,
      eosId: 2,
      padId: -1,
      unkPiece: "<unk>",
      bosPiece: "<s>",
      eosPiece: "</s>",
      padPiece: "<pad>",
      byteFallback: false,
    },
    normalizerSpec: {
      name: "",
      precompiledCharsmap: new Uint8Array(0),
      addDummyPrefix: true,
      removeExtraWhitespaces: true,
      escapeWhitespaces: true,
    },
  };
  const r = new ProtoReader(data);
  try {
    while (!r.done) {
      const { field, wire } = r.tag();
      if (field === 1 && wire === LENGTH_DELIMITED) model.pieces.push(parsePiece(r.message()));
      else if (field === 2 && wire === LENGTH_DELIMITED) parseTrainerSpec(r.message(), model.trainerSpec);
      else if (field === 3 && wire === LENGTH_DELIMITED) parseNormalizerSpec(r.message(), model.normalizerSpec);
      else r.skip(wire);
    }
  } catch (err) {
    if (err instanceof ProtobufError) throw err;
    if (err instanceof TypeError) throw new ProtobufError(`invalid UTF-8 in a string field`);
    throw err;
  }
  if (model.pieces.length === 0) throw new ProtobufError("the model has no pieces");
  const unk = model.trainerSpec.unkId;
  if (!(unk >= 0 && unk < model.pieces.length)) throw new ProtobufError(`unk_id ${unk} is outside the ${model.pieces.length} pieces`);
  return model;
}

/**
 * The `Precompiled` normalizer of SentencePiece models, as Hugging Face tokenizers applies it:
 * the text is cut into extended grapheme clusters; a cluster shorter than 6 UTF-8 bytes is first
 * looked up whole, otherwise (or when that finds nothing) each of its characters is looked up;
 * a lookup takes the *first* (shortest) prefix match of the double-array trie and replaces the
 * whole looked-up chunk with the rule's output.
 */
export class PrecompiledCharsmap {
  private readonly array: Uint32Array;
  private readonly normalized: Uint8Array;
  private readonly cache = new Map<string, string | null>();
  private static readonly segmenter = new Intl.Segmenter(undefined, { granularity: "grapheme" });
  private static readonly encoder = new TextEncoder();

  /** Throws ProtobufError when the blob is malformed. */
  constructor(charsmap: Uint8Array) {
    if (charsmap.length < 4) throw new ProtobufError("precompiled_charsmap is shorter than its header");
    const view = new DataView(charsmap.buffer, charsmap.byteOffset, charsmap.byteLength);
    const trieSize = view.getUint32(0, true);
    const units = Math.floor(trieSize / 4);
    if (4 + units * 4 > charsmap.length) throw new ProtobufError("precompiled_charsmap trie runs past the end");
    this.array = new Uint32Array(units);
    for (let i = 0; i < units; i++) this.array[i] = view.getUint32(4 + i * 4, true);
    this.normalized = charsmap.slice(4 + units * 4);
    try {
      utf8Decoder.decode(this.normalized);
    } catch {
      throw new ProtobufError("precompiled_charsmap replacement table is not valid UTF-8");
    }
    if (units === 0) throw new ProtobufError("precompiled_charsmap has an empty trie");
  }

  private unit(pos: number): number {
    // Out-of-range reads would panic in Rust; treat them as "no match" here.
    return pos < this.array.length ? this.array[pos]! : 0;
  }

  private static offset(unit: number): number {
    // (unit >> 10) << ((unit & (1 << 9)) >> 6)
    const base = Math.floor(unit / 1024);
    const shift = (unit & 0x200) >>> 6;
    return base * 2 ** shift;
  }

  /** Values (byte offsets into the replacement table) of every key that is a prefix of `key`. */
  private commonPrefixSearch(key: Uint8Array): number[] {
    const results: number[] = [];
    let nodePos = 0;
    let unit = this.unit(nodePos);
    nodePos ^= PrecompiledCharsmap.offset(unit);
    for (const c of key) {
      if (c === 0) break;
      nodePos ^= c;
      unit = this.unit(nodePos);
      // label: unit & ((1 << 31) | 0xff)
      const label = (unit & 0xff) + (unit >= 0x80000000 ? 0x80000000 : 0);
      if (label !== c) return results;
      nodePos ^= PrecompiledCharsmap.offset(unit);
      if (((unit >>> 8) & 1) === 1) results.push(this.unit(nodePos) & 0x7fffffff);
    }
    return results;
  }

  private normalizedAt(index: number): string {
    let end = index;
    while (end < this.normalized.length && this.normalized[end] !== 0) end++;
    return utf8Decoder.decode(this.normalized.subarray(Math.min(index, this.normalized.length), end));
  }

  /** The replacement for a chunk, or null when the trie has no rule for it. */
  transform(chunk: string): string | null {
    const cached = this.cache.get(chunk);
    if (cached !== undefined) return cached;
    const results = this.commonPrefixSearch(PrecompiledCharsmap.encoder.encode(chunk));
    const out = results.length === 0 ? null : this.normalizedAt(results[0]!);
    if (this.cache.size < 65536) this.cache.set(chunk, out);
    return out;
  }

  normalize(text: string): string {
    let out = "";
    for (const { segment } of PrecompiledCharsmap.segmenter.segment(text)) {
      if (utf8Length(segment) < 6) {
        const norm = this.transform(segment);
        if (norm !== null) {
          out += norm;
          continue;
        }
      }
      for (const ch of segment) {
        const norm = this.transform(ch);
        out += norm ?? ch;
      }
    }
    return out;
  }
}

function utf8Length(s: string): number {
  let n = 0;
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    n += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
  }
  return n;
}
