/**
 * Blip2Processor: the image processor and the tokenizer together, as transformers' processor does
 * it. When the checkpoint's processor config has `num_query_tokens`, each prompt is tokenized and
 * padded, then `num_query_tokens` `<image>` tokens are put in front of it (so padding sits between
 * the image tokens and the text, as in transformers). An image without a prompt is captioned from
 * the empty prompt (image tokens + BOS).
 */
import path from "node:path";
import { parseBlip2Config, type Blip2Config } from "./config.js";
import { Blip2Error } from "./errors.js";
import { resolveModel, type HubOptions } from "./hub/download.js";
import { readJsonFile } from "./io/checkpoint.js";
import type { ImageInput } from "./image/decode.js";
import { BlipImageProcessor, parseImageProcessorConfig, type ImageProcessorBackend, type ImageProcessorConfig } from "./image/imageProcessor.js";
import { Blip2Tokenizer } from "./tokenizer/tokenizer.js";

export const IMAGE_TOKEN = "<image>";

export interface ProcessorInputs {
  images?: ImageInput | ImageInput[];
  text?: string | string[];
  /** Where pad tokens go in a batch of prompts (default: the tokenizer's side). */
  paddingSide?: "left" | "right";
}

export interface ProcessorOutputs {
  /** [N, 3, H, W] float32, N = number of images (absent without images). */
  pixelValues?: Float32Array;
  pixelShape?: [number, number, number, number];
  inputIds: number[][];
  attentionMask: number[][];
}

export interface ProcessorLoadOptions {
  /**
   * Resizing as transformers 5 does it by default ("torchvision") or as transformers 4 and
   * `BlipImageProcessorPil` do ("pil"). Default: what the checkpoint's image_processor_type means in transformers 5.
   */
  imageBackend?: ImageProcessorBackend;
  /**
   * Turn images upright by their EXIF orientation, as transformers' `load_image` (and so its
   * pipelines) does. Default false: as transformers' processor given a PIL image from `open`, which
   * does not. `Blip2.load` and `pipeline` turn it on.
   */
  exifOrientation?: boolean;
}

/** A processor can be called like a function, as in transformers(.js): `await processor({ images, text })`. */
export interface Blip2Processor {
  (inputs: ProcessorInputs): Promise<ProcessorOutputs>;
}

export class Blip2Processor {
  constructor(
    readonly imageProcessor: BlipImageProcessor,
    readonly tokenizer: Blip2Tokenizer,
    /** `<image>` tokens put before each prompt; null for checkpoints whose processor adds none. */
    readonly numQueryTokens: number | null,
    readonly imageTokenId: number | null,
  ) {
    // The instance is a function that processes its argument, with this class's methods and fields.
    const call = (inputs: ProcessorInputs) => this.process(inputs);
    return Object.assign(Object.setPrototypeOf(call, new.target.prototype), this);
  }

  /** Load from a local folder or a Hub model id. */
  static async fromPretrained(src: string, options: HubOptions & ProcessorLoadOptions = {}): Promise<Blip2Processor> {
    const dir = await resolveModel(src, options);
    const configJson = readJsonFile(path.join(dir, "config.json"));
    return Blip2Processor.fromDirectory(dir, configJson === undefined ? undefined : parseBlip2Config(configJson, path.join(dir, "config.json")), options);
  }

  /** Load from a local checkpoint folder; `config` (config.json) is checked against the processor. */
  static async fromDirectory(dir: string, config?: Blip2Config, options: ProcessorLoadOptions = {}): Promise<Blip2Processor> {
    const processorFile = path.join(dir, "processor_config.json");
    const processorJson = readJsonFile(processorFile) as Record<string, unknown> | undefined;
    const imageConfig = loadImageConfig(dir, processorJson, config, options.imageBackend);
    const tokenizer = await Blip2Tokenizer.fromDirectory(dir);
    const n = processorJson?.num_query_tokens;
    if (n !== undefined && n !== null && !(Number.isInteger(n) && (n as number) > 0)) {
      throw new Blip2Error(`${processorFile}: num_query_tokens must be a positive integer, got ${JSON.stringify(n)}`);
    }
    const numQueryTokens = (n as number | null | undefined) ?? null;
    let imageTokenId: number | null = null;
    if (numQueryTokens !== null) {
      imageTokenId = tokenizer.tokenToId(IMAGE_TOKEN) ?? tokenizer.addSpecialToken(IMAGE_TOKEN);
      if (config && config.imageTokenIndex !== null && config.imageTokenIndex !== imageTokenId) {
        throw new Blip2Error(`${dir}: the tokenizer's ${IMAGE_TOKEN} token is id ${imageTokenId} but config.json's image_token_index is ${config.imageTokenIndex}`);
      }
      if (config && numQueryTokens !== config.numQueryTokens) {
        throw new Blip2Error(`${processorFile}: num_query_tokens is ${numQueryTokens} but config.json's num_query_tokens is ${config.numQueryTokens}`);
      }
    }
    return new Blip2Processor(new BlipImageProcessor(imageConfig, { exifOrientation: options.exifOrientation }), tokenizer, numQueryTokens, imageTokenId);
  }

  /** Pixel values for the images and token ids for the prompts (one prompt per image). */
  async process(inputs: ProcessorInputs): Promise<ProcessorOutputs> {
    const images = inputs.images === undefined ? [] : Array.isArray(inputs.images) ? inputs.images : [inputs.images];
    const texts = this.prompts(inputs.text, images.length);
    const out: ProcessorOutputs = { ...this.tokenize(texts, inputs.paddingSide) };
    if (images.length) {
      const { pixelValues, shape } = await this.imageProcessor.preprocess(images);
      out.pixelValues = pixelValues;
      out.pixelShape = shape;
    }
    return out;
  }

  /** Token ids of prompts, padded, with the `<image>` tokens in front when the processor adds them. */
  tokenize(texts: string[], paddingSide?: "left" | "right"): { inputIds: number[][]; attentionMask: number[][] } {
    const padded = this.tokenizer.pad(texts.map((t) => this.tokenizer.encode(t)), paddingSide);
    if (this.numQueryTokens === null) return padded;
    const image = new Array<number>(this.numQueryTokens).fill(this.imageTokenId!);
    const ones = new Array<number>(this.numQueryTokens).fill(1);
    return {
      inputIds: padded.inputIds.map((ids) => [...image, ...ids]),
      attentionMask: padded.attentionMask.map((m) => [...ones, ...m]),
    };
  }

  batchDecode(ids: number[][], options: { skipSpecialTokens?: boolean } = {}): string[] {
    return this.tokenizer.batchDecode(ids, options);
  }

  decode(ids: number[], options: { skipSpecialTokens?: boolean } = {}): string {
    return this.tokenizer.decode(ids, options);
  }

  private prompts(text: string | string[] | undefined, images: number): string[] {
    if (text === undefined) return new Array(Math.max(images, 1)).fill("");
    const texts = Array.isArray(text) ? text : [text];
    if (images > 0 && texts.length === 1 && images > 1) return new Array(images).fill(texts[0]);
    if (images > 0 && texts.length !== images) throw new Blip2Error(`got ${images} images and ${texts.length} prompts: give one prompt, or one per image`);
    return texts;
  }
}

/** The image processor's settings: `processor_config.json`'s `image_processor`, else `preprocessor_config.json`. */
function loadImageConfig(dir: string, processorJson: Record<string, unknown> | undefined, config: Blip2Config | undefined, backend: ImageProcessorBackend | undefined): ImageProcessorConfig {
  const nested = processorJson?.image_processor;
  const preprocessorFile = path.join(dir, "preprocessor_config.json");
  const [json, file] = nested !== undefined ? [nested, path.join(dir, "processor_config.json")] : [readJsonFile(preprocessorFile), preprocessorFile];
  if (json === undefined) {
    if (!config) throw new Blip2Error(`${dir}: no preprocessor_config.json or processor_config.json with an image_processor`);
    // No processor files: BlipImageProcessor's defaults at the vision encoder's resolution.
    const size = config.vision.imageSize;
    return { ...parseImageProcessorConfig({}, file, { backend }), size: { height: size, width: size } };
  }
  const parsed = parseImageProcessorConfig(json, file, { backend });
  const size = config?.vision.imageSize;
  if (size !== undefined && parsed.doResize && (parsed.size.height !== size || parsed.size.width !== size)) {
    throw new Blip2Error(`${file}: size is ${parsed.size.height}x${parsed.size.width} but the vision encoder takes ${size}x${size} (vision_config.image_size)`);
  }
  return parsed;
}
