/** Runs Blip2ForImageTextRetrieval's graphs (ITC embeddings, ITM logits); sessions cached. */
import type * as ort from "onnxruntime-node";
import { Blip2Error } from "../errors.js";
import type { Checkpoint } from "../io/checkpoint.js";
import { itmGraph, retrievalImageGraph, retrievalTextGraph } from "../models/retrieval.js";
import type { Tensors } from "./blip2Runtime.js";
import { runImages, SessionCache, tensor, VISION_SESSION, type RuntimeOptions } from "./session.js";

export class RetrievalRuntime {
  private readonly sessions: SessionCache;

  constructor(
    readonly checkpoint: Checkpoint,
    readonly options: RuntimeOptions = {},
  ) {
    this.sessions = new SessionCache(options);
    const cfg = checkpoint.config;
    if (!cfg.qformer.useQformerTextInput) {
      throw new Blip2Error(`${checkpoint.dir}: this checkpoint has no Q-Former text input (qformer_config.use_qformer_text_input is false): it is not an image-text retrieval model`);
    }
  }

  /** pixel_values [B, 3, H, W] -> `image_embeds` [B, Q, E] (normalized) and `vision_last_hidden_state`. */
  async images(pixelValues: Float32Array, batch: number): Promise<Tensors> {
    const s = await this.sessions.get("image", (target) => retrievalImageGraph(this.checkpoint, { target }), VISION_SESSION);
    return runImages(s, pixelValues, batch, this.checkpoint.config.vision.imageSize);
  }

  /** Padded token ids -> `text_embeds` [T, E] (normalized). */
  async texts(inputIds: number[][], attentionMask: number[][]): Promise<Tensors> {
    const s = await this.sessions.get("text", (target) => retrievalTextGraph(this.checkpoint, { target }));
    const dims = [inputIds.length, inputIds[0]!.length];
    return s.run({ input_ids: tensor.i64(inputIds.flat(), dims), attention_mask: tensor.i64(attentionMask.flat(), dims) });
  }

  /** ITM logits [P, 2] for P texts and their image features: one per text, or one for all of them ([1, N, D]). */
  async itm(imageEmbeds: ort.Tensor, inputIds: number[][], attentionMask: number[][]): Promise<Tensors> {
    const s = await this.sessions.get("itm", (target) => itmGraph(this.checkpoint, { target }));
    const dims = [inputIds.length, inputIds[0]!.length];
    return s.run({ image_embeds: imageEmbeds, input_ids: tensor.i64(inputIds.flat(), dims), attention_mask: tensor.i64(attentionMask.flat(), dims) });
  }

  release(): Promise<void> {
    return this.sessions.release();
  }
}

/**
 * ITC similarity [B, T]: for each image and text, the largest dot product between the text
 * embedding and any of the image's query embeddings (all normalized): transformers' logits_per_image.
 */
export function itcSimilarity(imageEmbeds: ort.Tensor, textEmbeds: ort.Tensor): Float32Array {
  const [b, q, e] = imageEmbeds.dims as [number, number, number];
  const [t, e2] = textEmbeds.dims as [number, number];
  if (e !== e2) throw new Blip2Error(`internal: image embeddings of size ${e} vs text embeddings of size ${e2}`);
  const img = imageEmbeds.data as Float32Array;
  const txt = textEmbeds.data as Float32Array;
  const out = new Float32Array(b * t);
  for (let i = 0; i < b; i++) {
    for (let j = 0; j < t; j++) {
      let best = -Infinity;
      for (let k = 0; k < q; k++) {
        let dot = 0;
        for (let x = 0; x < e; x++) dot += img[(i * q + k) * e + x]! * txt[j * e + x]!;
        best = Math.max(best, dot);
      }
      out[i * t + j] = best;
    }
  }
  return out;
}
