/**
 * Generation options, in transformers' vocabulary (camelCased), merged over the checkpoint's
 * `generation_config.json` and validated with messages that name the option.
 */
import type { Blip2Config } from "../config.js";
import { Blip2Error } from "../errors.js";

export interface GenerationOptions {
  /** New tokens to generate at most (default: generation_config's max_new_tokens, else 20). */
  maxNewTokens?: number;
  /** New tokens before EOS is allowed (default 0). */
  minNewTokens?: number;
  /**
   * Sample instead of greedy/beam argmax. Default: generation_config's do_sample, else false; as a
   * convenience, a temperature, topK or topP given here with doSample unset turns sampling on
   * (a seed alone does not: it only seeds sampling, as in transformers).
   */
  doSample?: boolean;
  temperature?: number;
  topK?: number;
  topP?: number;
  /** Seed of the sampler's random generator: the same seed gives the same text (sampling only). */
  seed?: number;
  numBeams?: number;
  lengthPenalty?: number;
  earlyStopping?: boolean | "never";
  numReturnSequences?: number;
  repetitionPenalty?: number;
  noRepeatNgramSize?: number;
  /** Token ids that end a sequence (default: generation_config / the text config's eos_token_id). */
  eosTokenId?: number | number[];
  padTokenId?: number;
}

/** Options with every default resolved. */
export interface ResolvedGeneration {
  maxNewTokens: number;
  minNewTokens: number;
  doSample: boolean;
  temperature: number;
  topK: number;
  topP: number;
  seed: number;
  numBeams: number;
  lengthPenalty: number;
  earlyStopping: boolean | "never";
  numReturnSequences: number;
  repetitionPenalty: number;
  noRepeatNgramSize: number;
  eosTokenIds: number[];
  padTokenId: number;
  decoderStartTokenId: number;
}

/** The fields of generation_config.json that map onto GenerationOptions. */
const FILE_FIELDS: Record<string, keyof GenerationOptions> = {
  max_new_tokens: "maxNewTokens",
  min_new_tokens: "minNewTokens",
  do_sample: "doSample",
  temperature: "temperature",
  top_k: "topK",
  top_p: "topP",
  num_beams: "numBeams",
  length_penalty: "lengthPenalty",
  early_stopping: "earlyStopping",
  num_return_sequences: "numReturnSequences",
  repetition_penalty: "repetitionPenalty",
  no_repeat_ngram_size: "noRepeatNgramSize",
  eos_token_id: "eosTokenId",
  pad_token_id: "padTokenId",
};

/** Read generation_config.json (already parsed) into options; unknown fields are ignored as transformers does. */
export function generationDefaults(json: unknown, file: string): GenerationOptions & { decoderStartTokenId?: number } {
  if (json === undefined) return {};
  if (json === null || typeof json !== "object" || Array.isArray(json)) throw new Blip2Error(`${file}: expected a JSON object`);
  const out: Record<string, unknown> = {};
  for (const [key, name] of Object.entries(FILE_FIELDS)) {
    const v = (json as Record<string, unknown>)[key];
    if (v !== undefined && v !== null) out[name] = v;
  }
  const start = (json as Record<string, unknown>).decoder_start_token_id;
  if (typeof start === "number") out.decoderStartTokenId = start;
  try {
    validate(out as GenerationOptions);
  } catch (err) {
    throw new Blip2Error(`${file}: ${(err as Error).message}`);
  }
  return out as GenerationOptions;
}

function check(ok: boolean, name: string, expected: string, value: unknown): void {
  if (!ok) throw new Blip2Error(`invalid generation option ${name}: expected ${expected}, got ${JSON.stringify(value)}`);
}

const isInt = (v: unknown, min: number) => typeof v === "number" && Number.isInteger(v) && v >= min;
const isNum = (v: unknown) => typeof v === "number" && Number.isFinite(v);

export function validate(o: GenerationOptions): void {
  const ints: [keyof GenerationOptions, number][] = [["maxNewTokens", 1], ["minNewTokens", 0], ["topK", 0], ["numBeams", 1], ["numReturnSequences", 1], ["noRepeatNgramSize", 0], ["padTokenId", 0]];
  for (const [k, min] of ints) if (o[k] !== undefined) check(isInt(o[k], min), k, `an integer >= ${min}`, o[k]);
  if (o.seed !== undefined) check(isInt(o.seed, 0), "seed", "an integer >= 0", o.seed);
  if (o.temperature !== undefined) check(isNum(o.temperature) && o.temperature >= 0, "temperature", "a number >= 0", o.temperature);
  if (o.topP !== undefined) check(isNum(o.topP) && o.topP > 0 && o.topP <= 1, "topP", "a number in (0, 1]", o.topP);
  if (o.repetitionPenalty !== undefined) check(isNum(o.repetitionPenalty) && o.repetitionPenalty > 0, "repetitionPenalty", "a number > 0", o.repetitionPenalty);
  if (o.lengthPenalty !== undefined) check(isNum(o.lengthPenalty), "lengthPenalty", "a number", o.lengthPenalty);
  if (o.doSample !== undefined) check(typeof o.doSample === "boolean", "doSample", "true or false", o.doSample);
  if (o.earlyStopping !== undefined) check(typeof o.earlyStopping === "boolean" || o.earlyStopping === "never", "earlyStopping", 'true, false or "never"', o.earlyStopping);
  if (o.eosTokenId !== undefined) {
    const ids = Array.isArray(o.eosTokenId) ? o.eosTokenId : [o.eosTokenId];
    check(ids.every((i) => isInt(i, 0)), "eosTokenId", "token ids", o.eosTokenId);
  }
}

/** Merge user options over the checkpoint's defaults and the text config; validate the result. */
export function resolveGeneration(user: GenerationOptions, fileDefaults: GenerationOptions & { decoderStartTokenId?: number }, config: Blip2Config): ResolvedGeneration {
  validate(user);
  const o = { ...fileDefaults, ...definedOnly(user) };
  const text = config.text;
  const eos = o.eosTokenId ?? text.eosTokenId ?? [];
  const eosTokenIds = Array.isArray(eos) ? eos : [eos];
  const padTokenId = o.padTokenId ?? text.padTokenId ?? eosTokenIds[0] ?? 0;
  // Asking for temperature/topK/topP without doSample means sampling, as users expect; a seed
  // only makes sampling reproducible, so by itself it changes nothing (as in transformers).
  const asksForSampling = user.temperature !== undefined || user.topK !== undefined || user.topP !== undefined;
  const sampling = user.doSample ?? (asksForSampling || (fileDefaults.doSample ?? false));
  const r: ResolvedGeneration = {
    maxNewTokens: o.maxNewTokens ?? 20,
    minNewTokens: o.minNewTokens ?? 0,
    // temperature 0 is the limit of sampling: greedy.
    doSample: sampling && o.temperature !== 0,
    temperature: o.temperature ?? 1,
    topK: o.topK ?? 50,
    topP: o.topP ?? 1,
    seed: o.seed ?? 0,
    numBeams: o.numBeams ?? 1,
    lengthPenalty: o.lengthPenalty ?? 1,
    earlyStopping: o.earlyStopping ?? false,
    numReturnSequences: o.numReturnSequences ?? 1,
    repetitionPenalty: o.repetitionPenalty ?? 1,
    noRepeatNgramSize: o.noRepeatNgramSize ?? 0,
    eosTokenIds,
    padTokenId,
    decoderStartTokenId: text.modelType === "t5" ? (fileDefaults.decoderStartTokenId ?? text.decoderStartTokenId) : 0,
  };
  if (r.minNewTokens > r.maxNewTokens) throw new Blip2Error(`invalid generation options: minNewTokens (${r.minNewTokens}) exceeds maxNewTokens (${r.maxNewTokens})`);
  if (r.numReturnSequences > r.numBeams && !r.doSample) {
    throw new Blip2Error(`invalid generation options: numReturnSequences (${r.numReturnSequences}) exceeds numBeams (${r.numBeams}); use more beams or sampling`);
  }
  return r;
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
