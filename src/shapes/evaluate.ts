/**
 * How a BLIP-2 trained on the synthetic world does on a data set of it (`blip2 world dataset`):
 * - captioning: the share of images whose caption names every object with every attribute right
 *   (and nothing else), as the world's grammar reads it;
 * - zero-shot VQA: the share of questions answered right, per question type, asked in the
 *   `Question: {} Answer:` prompt the model never saw with an image;
 * - retrieval: recall@1/5 of each image's caption among the data set's, ITC alone and ITC + ITM.
 */
import fs from "node:fs";
import path from "node:path";
import { evaluateRetrieval } from "../api/evaluate.js";
import type { Blip2 } from "../api/tasks.js";
import { captionMatchesScene, QUESTION_TYPES, questionPrompt, type QuestionType } from "../world/language.js";
import type { Scene } from "../world/scene.js";

function readJsonl<T>(file: string): T[] {
  return fs.readFileSync(file, "utf8").split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l) as T);
}

export interface CaptionScore {
  images: number;
  correct: number;
  accuracy: number;
  /** A few captions with their truth, for the report. */
  samples: { image: string; caption: string; correct: boolean }[];
}

export async function captionAccuracy(blip2: Blip2, dataset: string, limit = Infinity): Promise<CaptionScore> {
  const scenes = readJsonl<{ image: string; scene: Scene }>(path.join(dataset, "scenes.jsonl")).slice(0, limit);
  let correct = 0;
  const samples: CaptionScore["samples"] = [];
  for (const { image, scene } of scenes) {
    const caption = await blip2.caption(path.join(dataset, image), { maxNewTokens: 40 });
    const ok = captionMatchesScene(caption, scene);
    if (ok) correct++;
    if (samples.length < 8) samples.push({ image, caption, correct: ok });
  }
  return { images: scenes.length, correct, accuracy: scenes.length ? correct / scenes.length : 0, samples };
}

export interface VqaScore {
  questions: number;
  accuracy: number;
  byType: Record<QuestionType, number>;
}

/** The first word of a generated answer, lower case, without punctuation. */
export function answerWord(text: string): string {
  return (text.trim().toLowerCase().match(/[a-z]+/) ?? [""])[0]!;
}

export async function vqaAccuracy(blip2: Blip2, dataset: string, limit = Infinity): Promise<VqaScore> {
  const questions = readJsonl<{ image: string; question: string; answer: string; type: QuestionType }>(path.join(dataset, "questions.jsonl"));
  const images = [...new Set(questions.map((q) => q.image))].slice(0, limit);
  const chosen = questions.filter((q) => images.includes(q.image));
  const right = Object.fromEntries(QUESTION_TYPES.map((t) => [t, 0])) as Record<QuestionType, number>;
  const asked = Object.fromEntries(QUESTION_TYPES.map((t) => [t, 0])) as Record<QuestionType, number>;
  for (const q of chosen) {
    const answer = await blip2.caption(path.join(dataset, q.image), { prompt: questionPrompt(q.question), maxNewTokens: 4 });
    asked[q.type]++;
    if (answerWord(answer) === q.answer) right[q.type]++;
  }
  const total = Object.values(right).reduce((a, b) => a + b, 0);
  const byType = Object.fromEntries(QUESTION_TYPES.map((t) => [t, asked[t] ? right[t] / asked[t] : 0])) as Record<QuestionType, number>;
  return { questions: chosen.length, accuracy: chosen.length ? total / chosen.length : 0, byType };
}

export interface RetrievalScore {
  candidates: number;
  itc: { r1: number; r5: number };
  itcItm: { r1: number; r5: number };
}

/** Recall among the first `candidates` images of the data set, one caption each, both directions averaged. */
export async function retrievalScore(model: string, dataset: string, candidates = 100, work = dataset): Promise<RetrievalScore> {
  const captions = readJsonl<{ image: string; text: string }>(path.join(dataset, "captions.jsonl"));
  const seen = new Set<string>();
  const rows = captions.filter((c) => !seen.has(c.image) && seen.add(c.image)).slice(0, candidates).map((c) => ({ image: path.join(dataset, c.image), text: c.text }));
  const file = path.join(work, `retrieval-${candidates}.jsonl`);
  fs.writeFileSync(file, rows.map((r) => JSON.stringify(r)).join("\n"));
  const r = await evaluateRetrieval(model, file, { rerank: 16 });
  const mean = (a: { r1: number; r5: number }, b: { r1: number; r5: number }) => ({ r1: (a.r1 + b.r1) / 2, r5: (a.r5 + b.r5) / 2 });
  return { candidates: rows.length, itc: mean(r.itcImageToText, r.itcTextToImage), itcItm: mean(r.imageToText, r.textToImage) };
}
