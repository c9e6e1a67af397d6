/**
 * The graphs of Blip2ForImageTextRetrieval (BLIP-2's first stage):
 * - image features: vision encoder, Q-Former queries, normalized `vision_projection` per query (ITC);
 * - text features: the Q-Former over text alone, normalized `text_projection` of the [CLS] output (ITC);
 * - image-text matching: queries and text together, queries cross-attending to the image; the
 *   `itm_head` logits averaged over the query outputs (ITM).
 */
import type { Checkpoint } from "../io/checkpoint.js";
import { Graph, type Value } from "../ir/graph.js";
import * as op from "../ir/ops.js";
import { visionAndQueries, type GraphOptions } from "./blip2.js";
import { expandToBatch, linearLayer, Params } from "./layers.js";
import { qformer, qformerTextEmbeddings } from "./qformer.js";

/** F.normalize(x, dim=-1): x / max(||x||, 1e-12). */
export function normalize(x: Value): Value {
  const g = x.graph;
  const norm = op.sqrt(op.reduceSum(op.mul(x, x), [-1]));
  return op.div(x, op.max(norm, g.scalar(1e-12)));
}

/** pixel_values -> image embeddings for ITM and normalized per-query ITC embeddings. */
export function retrievalImageGraph(ckpt: Checkpoint, options: GraphOptions = {}): Graph {
  const cfg = ckpt.config;
  const { g, root, queries } = visionAndQueries(ckpt, "retrieval_image", options.target);
  g.output(normalize(linearLayer(root.at("vision_projection"), queries.lastHiddenState, cfg.qformer.hiddenSize, cfg.imageTextHiddenSize)), "image_embeds");
  return g;
}

/** input_ids, attention_mask -> normalized ITC text embeddings from the [CLS] position. */
export function retrievalTextGraph(ckpt: Checkpoint, options: GraphOptions = {}): Graph {
  const cfg = ckpt.config;
  const g = new Graph("retrieval_text", options.target);
  const root = new Params(g, ckpt);
  const ids = g.input("input_ids", "int64", ["batch", "length"]);
  const mask = g.input("attention_mask", "int64", ["batch", "length"]);
  const text = qformer(root.at("qformer"), cfg.qformer, {
    queryEmbeds: null,
    textEmbeds: qformerTextEmbeddings(root.at("embeddings"), cfg.qformer, ids),
    attentionMask: mask,
    imageEmbeds: null,
    queryLength: 0,
  }).lastHiddenState;
  const cls = op.squeeze(op.slice(text, [0], [1], [1]), [1]);
  g.output(text, "text_last_hidden_state");
  g.output(normalize(linearLayer(root.at("text_projection"), cls, cfg.qformer.hiddenSize, cfg.imageTextHiddenSize)), "text_embeds");
  return g;
}

/**
 * (image embeddings, text) pairs -> ITM [no-match, match] logits averaged over the queries. The
 * image embeddings are one per text, or one for every text (`images` 1): the cross-attention then
 * projects that image once and broadcasts it, so matching an image against many texts takes no
 * copy of it per text.
 */
export function itmGraph(ckpt: Checkpoint, options: GraphOptions = {}): Graph {
  const cfg = ckpt.config;
  const g = new Graph("itm", options.target);
  const root = new Params(g, ckpt);
  const patches = (cfg.vision.imageSize / cfg.vision.patchSize) ** 2 + 1;
  const imageEmbeds = g.input("image_embeds", "float32", ["images", patches, cfg.vision.hiddenSize]);
  const ids = g.input("input_ids", "int64", ["batch", "length"]);
  const mask = g.input("attention_mask", "int64", ["batch", "length"]);
  const q = cfg.numQueryTokens;
  const queryTokens = expandToBatch(root.get("query_tokens", [1, q, cfg.qformer.hiddenSize]), ids);
  // Queries are never padding: their mask is all ones.
  const queryMask = expandToBatch(g.constant(new BigInt64Array(q).fill(1n), "int64", [1, q]), mask);
  const out = qformer(root.at("qformer"), cfg.qformer, {
    queryEmbeds: queryTokens,
    textEmbeds: qformerTextEmbeddings(root.at("embeddings"), cfg.qformer, ids),
    attentionMask: op.concat([queryMask, mask], 1),
    imageEmbeds,
    queryLength: q,
  }).lastHiddenState;
  const logits = linearLayer(root.at("itm_head"), op.slice(out, [0], [q], [1]), cfg.qformer.hiddenSize, 2);
  g.output(out, "itm_qformer_last_hidden_state");
  g.output(op.reduceMean(logits, [1], false), "itm_logits");
  return g;
}
