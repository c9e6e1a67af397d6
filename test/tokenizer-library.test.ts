/**
 * Building the tokenizers library's tokenizer: where the library cannot build a normalizer or
 * pre-tokenizer (ours replace them), only that one is left out and the user is told; any other
 * failure is reported as it is. The library is wrapped to fail on demand.
 */
import fs from "node:fs";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Blip2Tokenizer } from "../src/tokenizer/tokenizer.js";
import { fixture } from "./helpers.js";

const library = vi.hoisted(() => ({
  /** What the wrapped constructor refuses: a component present in the JSON, or everything. */
  refuse: null as null | "normalizer" | "pre_tokenizer" | "always",
  /** The components of each tokenizer it built. */
  built: [] as { normalizer: boolean; pre_tokenizer: boolean }[],
}));

vi.mock("@huggingface/tokenizers", async (importOriginal) => {
  const real = await importOriginal<Record<string, unknown>>();
  const Base = real.Tokenizer as new (json: Record<string, unknown>, config: object) => object;
  class Tokenizer extends Base {
    constructor(json: Record<string, unknown>, config: object) {
      const r = library.refuse;
      if (r === "always") throw new Error("Unknown TokenizerModel type: Broken\nsecond line");
      if (r && json[r] !== null) throw new Error(`Unknown ${r === "normalizer" ? "Normalizer" : "PreTokenizer"} type: Novel`);
      super(json, config);
      library.built.push({ normalizer: json.normalizer !== null, pre_tokenizer: json.pre_tokenizer !== null });
    }
  }
  return { ...real, Tokenizer };
});

const BERT = fixture("tokenizer-bert_wordpiece");
const probes = JSON.parse(fs.readFileSync(fixture("tokenizer_probes.json"), "utf8"));

afterEach(() => {
  library.refuse = null;
  library.built.length = 0;
  vi.restoreAllMocks();
});

describe("the tokenizers library's tokenizer", () => {
  it("is built whole when the library can (no warning)", async () => {
    const warn = vi.spyOn(console, "warn").mockImplementation(() => {});
    await Blip2Tokenizer.fromDirectory(BERT);
    expect(library.built).toEqual([{ normalizer: true, pre_tokenizer: true }]);
    expect(warn).not.toHaveBeenCalled();
  });

  it.each([
    ["normalizer", { normalizer: false, pre_tokenizer: true }],
    ["pre_tokenizer", { normalizer: true, pre_tokenizer: false }],
  ] as const)("leaves out only a %s it cannot build, says so, and encodes as the whole one", async (component, built) => {
    const texts = (probes.bert_wordpiece as { text: string }[]).map((p) => p.text);
    const whole = await Blip2Tokenizer.fromDirectory(BERT);
    library.built.length = 0;
    const warn = vi.spyOn(console, "warn").mockImplementation(() => {});
    library.refuse = component;
    const tok = await Blip2Tokenizer.fromDirectory(BERT);
    expect(library.built).toEqual([built]);
    expect(warn).toHaveBeenCalledTimes(1);
    expect(String(warn.mock.calls[0]![0])).toContain(`cannot build this tokenizer's ${component} (Unknown`);
    expect(texts.map((t) => tok.encode(t))).toEqual(texts.map((t) => whole.encode(t)));
  });

  it("reports any other failure as it is, naming the file", async () => {
    library.refuse = "always";
    await expect(Blip2Tokenizer.fromDirectory(BERT)).rejects.toThrow(/tokenizer\.json: cannot build the tokenizer \(Unknown TokenizerModel type: Broken\)$/);
  });
});
