/**
 * How many positions the language model takes, and the one check every prompt passes before it
 * runs: a prompt that does not fit is refused with a line that says what to change, never cut and
 * never run into an out-of-memory kill.
 */
import type { Blip2Config } from "../config.js";
import { Blip2Error } from "../errors.js";
import { T5_MAX_POSITIONS } from "../models/t5.js";

/** OPT's learned positions; T5, whose relative positions set no limit, T5_MAX_POSITIONS in its encoder and its decoder each. */
export function languageModelPositions(config: Blip2Config): number {
  return config.text.modelType === "opt" ? config.text.maxPositionEmbeddings : T5_MAX_POSITIONS;
}

/** Queries placed before the text rather than at `<image>` tokens (legacy checkpoints): they take positions too. */
export function queriesBeforeText(config: Blip2Config): number {
  return config.imageTokenIndex === null ? config.numQueryTokens : 0;
}

/**
 * Refuses a prompt of `width` tokens (a batch's padded width) with `maxNewTokens` to generate that
 * the language model cannot take. OPT reads the prompt and the new tokens in one sequence; T5's
 * encoder reads the prompt and its decoder the start token and the new tokens.
 */
export function checkPromptLength(config: Blip2Config, width: number, maxNewTokens: number): void {
  const positions = languageModelPositions(config);
  const prompt = width + queriesBeforeText(config);
  const whose = config.text.modelType === "opt" ? "the language model's" : "the";
  const where = config.text.modelType === "opt" ? "" : " blip2 gives T5's encoder";
  if (prompt > positions) throw new Blip2Error(`prompt too long: ${prompt} prompt tokens (image tokens included) exceed ${whose} ${positions} positions${where}`);
  if (config.text.modelType === "opt" && prompt + maxNewTokens > positions) {
    throw new Blip2Error(`the prompt's ${prompt} tokens (image tokens included) + ${maxNewTokens} new tokens exceed the language model's ${positions} positions: at most ${positions - prompt} new tokens fit after this prompt`);
  }
  if (config.text.modelType === "t5" && 1 + maxNewTokens > positions) {
    throw new Blip2Error(`${maxNewTokens} new tokens exceed the ${positions} positions blip2 gives T5's decoder (the start token and the new tokens): at most ${positions - 1}`);
  }
}
