/**
 * OpenAI's chat completions over BLIP-2: the conversation becomes the demo's prompt (earlier turns
 * as `Question: q Answer: a.`, then `Question: q Answer:`), its one image the image; sampling
 * options map onto transformers' (temperature 0 is greedy; unset, the checkpoint's defaults rule).
 */
import { vqaPrompt } from "../api/tasks.js";
import type { GenerationOptions } from "../generation/options.js";
import { HttpError } from "./errors.js";

export interface ContentPart {
  type: string;
  text?: string;
  image_url?: { url: string; detail?: string } | string;
}

export interface ChatMessage {
  role: string;
  content: string | ContentPart[] | null;
}

export interface CompletionRequest {
  model?: string;
  messages: ChatMessage[];
  stream?: boolean;
  max_tokens?: number;
  max_completion_tokens?: number;
  temperature?: number;
  top_p?: number;
  seed?: number;
  stop?: string | string[] | null;
  n?: number;
}

export const completionSchema = {
  type: "object",
  required: ["messages"],
  properties: {
    model: { type: "string" },
    messages: {
      type: "array",
      minItems: 1,
      items: {
        type: "object",
        required: ["role"],
        properties: {
          role: { type: "string", enum: ["system", "developer", "user", "assistant"] },
          content: {
            anyOf: [
              { type: "string" },
              { type: "null" },
              {
                type: "array",
                items: {
                  type: "object",
                  required: ["type"],
                  properties: {
                    type: { type: "string", enum: ["text", "image_url"] },
                    text: { type: "string" },
                    image_url: { anyOf: [{ type: "string" }, { type: "object", required: ["url"], properties: { url: { type: "string" }, detail: { type: "string" } } }] },
                  },
                },
              },
            ],
          },
        },
      },
    },
    stream: { type: "boolean" },
    max_tokens: { type: "integer", minimum: 1 },
    max_completion_tokens: { type: "integer", minimum: 1 },
    temperature: { type: "number", minimum: 0, maximum: 2 },
    top_p: { type: "number", exclusiveMinimum: 0, maximum: 1 },
    seed: { type: "integer", minimum: 0 },
    stop: { anyOf: [{ type: "string" }, { type: "array", items: { type: "string" }, maxItems: 4 }, { type: "null" }] },
    n: { type: "integer", minimum: 1, maximum: 1 },
  },
} as const;

export interface CompletionPlan {
  /** The image part's URL (a data URL, or a remote one). */
  image: string;
  prompt: string;
  options: GenerationOptions;
  stop: string[];
}

function textOf(content: ChatMessage["content"]): string {
  if (content === null || content === undefined) return "";
  if (typeof content === "string") return content;
  return content.filter((p) => p.type === "text").map((p) => p.text ?? "").join(" ");
}

function imagesOf(content: ChatMessage["content"]): string[] {
  if (!Array.isArray(content)) return [];
  return content.filter((p) => p.type === "image_url").map((p) => (typeof p.image_url === "string" ? p.image_url : p.image_url?.url ?? ""));
}

/** The prompt, image and options of a chat completion request. */
export function planCompletion(body: CompletionRequest): CompletionPlan {
  const images = body.messages.flatMap((m) => imagesOf(m.content));
  if (images.length !== 1) throw new HttpError(400, "invalid_request", `messages: BLIP-2 answers about exactly one image; give one image_url part (got ${images.length})`);
  const turns = body.messages.filter((m) => m.role === "user" || m.role === "assistant");
  const last = turns.at(-1);
  if (!last || last.role !== "user") throw new HttpError(400, "invalid_request", "messages: the last message (system messages aside) must be the user's");
  // Earlier turns, paired as the demo's chat: a user question, then the assistant's answer.
  const parts: string[] = [];
  let question: string | null = null;
  for (const m of turns.slice(0, -1)) {
    if (m.role === "user") question = [question, textOf(m.content)].filter(Boolean).join(" ");
    else if (question !== null) {
      parts.push(`${vqaPrompt(question)} ${textOf(m.content)}.`);
      question = null;
    }
  }
  const asked = [question, textOf(last.content)].filter(Boolean).join(" ").trim();
  // No question at all: a zero-shot caption, as the demo's "caption" button.
  const prompt = !asked && !parts.length ? "" : [...parts, vqaPrompt(asked)].join(" ");
  const options: GenerationOptions = {};
  const max = body.max_completion_tokens ?? body.max_tokens;
  if (max !== undefined) options.maxNewTokens = max;
  if (body.temperature === 0) options.doSample = false;
  else if (body.temperature !== undefined) Object.assign(options, { doSample: true, temperature: body.temperature });
  if (body.top_p !== undefined && body.temperature !== 0) Object.assign(options, { doSample: true, topP: body.top_p });
  if (body.seed !== undefined) options.seed = body.seed;
  const stop = body.stop === null || body.stop === undefined ? [] : typeof body.stop === "string" ? [body.stop] : body.stop;
  return { image: images[0]!, prompt, options, stop };
}
