/**
 * Captions to token ids for training, as LAVIS prepares them:
 * - stage 1: the Q-Former's BERT tokenizer, truncated and padded to `max_txt_len` (32);
 * - stage 2, OPT: `prompt + " " + caption + "\n"` (the caption and "\n" without a prompt), right
 *   padding, truncated to `max_txt_len`, after the image tokens; labels are the ids with the image
 *   tokens, the padding and, with a prompt, BOS and the prompt's tokens set to -100;
 * - stage 2, T5: the prompt (or the example's own prefix) after the image tokens to the encoder,
 *   the caption and `</s>` as the decoder's labels.
 * Every batch is padded to one length for the whole run (`length`), so one graph serves all steps.
 */
import type { Blip2Processor } from "../processor.js";
import type { Blip2Tokenizer } from "../tokenizer/tokenizer.js";
import type { Example } from "./data.js";
import type { Stage1Batch } from "./steps.js";
import type { Stage2Batch } from "./stage2.js";

/** LAVIS's `max_txt_len`. */
export const MAX_TEXT_LENGTH = 32;

/** Ids cut to `max`, keeping a closing special token ([SEP], </s>) when the sequence had one. */
function truncate(ids: number[], max: number, closing: number | undefined): number[] {
  if (ids.length <= max) return ids;
  const last = ids[ids.length - 1];
  return closing !== undefined && last === closing ? [...ids.slice(0, max - 1), last] : ids.slice(0, max);
}

function padTo(rows: number[][], length: number, padId: number): { ids: number[][]; mask: number[][] } {
  return {
    ids: rows.map((r) => [...r, ...new Array<number>(length - r.length).fill(padId)]),
    mask: rows.map((r) => [...new Array<number>(r.length).fill(1), ...new Array<number>(length - r.length).fill(0)]),
  };
}

export class Stage1Text {
  constructor(
    private readonly tokenizer: Blip2Tokenizer,
    readonly decTokenId: number,
    readonly length = MAX_TEXT_LENGTH,
  ) {}

  batch(examples: Example[]): Stage1Batch {
    const t = this.tokenizer;
    const rows = examples.map((e) => truncate(t.encode(e.text), this.length, t.sepTokenId));
    const padTokenId = t.padTokenId ?? 0;
    const { ids, mask } = padTo(rows, this.length, padTokenId);
    return { inputIds: ids, attentionMask: mask, decTokenId: this.decTokenId, padTokenId };
  }
}

export class Stage2Text {
  private readonly tokenizer: Blip2Tokenizer;

  constructor(
    private readonly processor: Blip2Processor,
    private readonly languageModel: "opt" | "t5",
    readonly prompt: string,
    readonly maxLength = MAX_TEXT_LENGTH,
  ) {
    this.tokenizer = processor.tokenizer;
  }

  /** Ids of the text part of one example (before image tokens and padding), and its labels. */
  private encode(e: Example): { ids: number[]; labels: number[]; decoder?: number[] } {
    const t = this.tokenizer;
    if (this.languageModel === "opt") {
      const text = this.prompt ? `${this.prompt} ${e.text}\n` : `${e.text}\n`;
      const ids = truncate(t.encode(text), this.maxLength, undefined);
      // LAVIS masks the prompt's tokens, BOS included, counted as the prompt alone tokenizes.
      const promptLength = this.prompt ? t.encode(this.prompt).length : 0;
      return { ids, labels: ids.map((id, i) => (i < promptLength ? -100 : id)) };
    }
    const ids = truncate(t.encode(e.prefix ?? this.prompt), this.maxLength, t.eosTokenId);
    const decoder = truncate(t.encode(e.text), this.maxLength, t.eosTokenId);
    return { ids, labels: ids, decoder };
  }

  /** The longest text over the data set: every batch is padded to it. */
  lengths(examples: Example[]): { length: number; targetLength: number } {
    let length = 1;
    let targetLength = 1;
    for (const e of examples) {
      const x = this.encode(e);
      length = Math.max(length, x.ids.length);
      targetLength = Math.max(targetLength, x.decoder?.length ?? 0);
    }
    return { length, targetLength };
  }

  batch(examples: Example[], size: { length: number; targetLength: number }): Stage2Batch {
    const t = this.tokenizer;
    const q = this.processor.numQueryTokens ?? 0;
    const imageId = this.processor.imageTokenId;
    const padId = t.padTokenId ?? 0;
    const encoded = examples.map((e) => this.encode(e));
    const { ids, mask } = padTo(encoded.map((x) => x.ids), size.length, padId);
    const images = imageId === null ? [] : new Array<number>(q).fill(imageId);
    const inputIds = ids.map((r) => [...images, ...r]);
    const attentionMask = mask.map((r) => [...new Array<number>(images.length).fill(1), ...r]);
    if (this.languageModel === "opt") {
      const labels = encoded.map((x, i) => [...new Array<number>(images.length).fill(-100), ...x.labels, ...new Array<number>(size.length - x.ids.length).fill(-100)].map((id, j) => (attentionMask[i]![j] ? id : -100)));
      return { inputIds, attentionMask, labels };
    }
    const decoder = padTo(encoded.map((x) => x.decoder!), size.targetLength, padId);
    const labels = decoder.ids.map((r, i) => r.map((id, j) => (decoder.mask[i]![j] ? id : -100)));
    return { inputIds, attentionMask, labels, decoderAttentionMask: decoder.mask };
  }
}
