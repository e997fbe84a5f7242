// Request validation: every known field is type- and range-checked, and any problem is a 400
// that names the field. A field the server does not implement is a 400 naming it too (never a
// silent 200): each route lists the fields it accepts, and fields OpenAI clients send with a
// default ("store": false, "service_tier": "auto", ...) pass when they mean "unset". `null`
// means "not given" for every optional field.
import { MAX_LOGPROBS, type ChatMessage, type SamplingParams, type ToolCall } from "@ds3/core";
import { invalid } from "./errors.js";
import type { GrammarSpec } from "./grammar.js";

type Obj = Record<string, unknown>;

const kind = (v: unknown): string => (v === null ? "null" : Array.isArray(v) ? "array" : typeof v);
const show = (v: unknown): string => {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
};

export function isObject(v: unknown): v is Obj {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function num(o: Obj, key: string, lo: number, hi: number, opts: { int?: boolean; loOpen?: boolean; param?: string } = {}): number | undefined {
  const v = o[key];
  const param = opts.param ?? key;
  if (v == null) return undefined;
  const range = `${opts.loOpen ? "(" : "["}${lo}, ${hi === Infinity ? "inf)" : `${hi}]`}`;
  const want = opts.int ? `an integer in ${range}` : `a number in ${range}`;
  if (typeof v !== "number" || !Number.isFinite(v)) throw invalid(param, `must be ${want}, got ${kind(v)} ${show(v)}`);
  if (opts.int && !Number.isSafeInteger(v)) throw invalid(param, `must be ${want}, got ${show(v)}`);
  if (v < lo || v > hi || (opts.loOpen && v === lo)) throw invalid(param, `must be ${want}, got ${show(v)}`);
  return v;
}

function bool(o: Obj, key: string, param = key): boolean | undefined {
  const v = o[key];
  if (v == null) return undefined;
  if (typeof v !== "boolean") throw invalid(param, `must be a boolean, got ${kind(v)} ${show(v)}`);
  return v;
}

function str(o: Obj, key: string, param = key): string | undefined {
  const v = o[key];
  if (v == null) return undefined;
  if (typeof v !== "string") throw invalid(param, `must be a string, got ${kind(v)} ${show(v)}`);
  return v;
}

export interface ToolDef {
  type: "function";
  function: { name: string; description?: string; parameters?: Obj; strict?: boolean };
}

export type ToolChoice = "none" | "auto" | "required" | { name: string };

/** A structured-output constraint and the request field it came from (named in its errors). */
export interface GrammarRequest {
  spec: GrammarSpec;
  param: string;
}

export interface CommonRequest {
  model?: string;
  n: number;
  stream: boolean;
  includeUsage: boolean;
  /** sampling fields the request gave (core's names); defaults are resolved later */
  sampling: SamplingParams;
  /** top logprobs per position; null: no logprobs */
  logprobs: number | null;
  logitBias: Map<number, number> | null;
  jsonMode: boolean;
  /** max_tokens as given (undefined: up to the context) */
  maxTokens?: number;
  /** the output follows this grammar (response_format json_schema, structured_outputs, guided_*, regex, ebnf);
   *  json_object may also come as jsonMode */
  grammar?: GrammarRequest | null;
  /** min_tokens (vLLM): EOS and stop_token_ids are masked until this many tokens */
  minTokens?: number;
  /** include_stop_str_in_output (vLLM): the stop string that matched ends the text */
  includeStopStr?: boolean;
}

export interface ChatRequest extends CommonRequest {
  messages: ChatMessage[];
  /** return_tokens_as_token_ids (vLLM): logprob tokens named token_id:<id> */
  tokenIdNames: boolean;
  tools: ToolDef[] | null;
  toolChoice: ToolChoice;
  parallelToolCalls: boolean;
  /** chat_template_kwargs: extra variables for the checkpoint's chat template */
  templateVars?: Record<string, unknown> | null;
  /** continue_final_message / the last message's `prefix: true`: the last assistant message is continued */
  continueFinal?: boolean;
  /** add_generation_prompt (default true; false with continueFinal) */
  addGenerationPrompt?: boolean;
  /** reasoning_effort: "none" switches thinking off, any other effort on (the template's `thinking`) */
  reasoningEffort?: string;
}

export interface CompletionRequestBody extends CommonRequest {
  prompts: Array<string | number[]>;
  echo: boolean;
  tokenIdNames: boolean;
}

function common(o: Obj, vocabSize: number, chat: boolean): CommonRequest {
  const model = str(o, "model");
  const n = num(o, "n", 1, 128, { int: true }) ?? 1;
  const stream = bool(o, "stream") ?? false;
  let includeUsage = false;
  if (o.stream_options != null) {
    if (!isObject(o.stream_options)) throw invalid("stream_options", `must be an object, got ${kind(o.stream_options)}`);
    if (!stream) throw invalid("stream_options", "is only allowed when stream is true");
    includeUsage = bool(o.stream_options, "include_usage", "stream_options.include_usage") ?? false;
  }
  const s: SamplingParams = {};
  const set = <K extends keyof SamplingParams>(k: K, v: SamplingParams[K] | undefined) => {
    if (v !== undefined) s[k] = v;
  };
  set("temperature", num(o, "temperature", 0, 2));
  set("topP", num(o, "top_p", 0, 1, { loOpen: true }));
  set("topK", num(o, "top_k", -1, Number.MAX_SAFE_INTEGER, { int: true }));
  set("minP", num(o, "min_p", 0, 1));
  set("presencePenalty", num(o, "presence_penalty", -2, 2));
  set("frequencyPenalty", num(o, "frequency_penalty", -2, 2));
  set("repetitionPenalty", num(o, "repetition_penalty", 0, Number.MAX_VALUE, { loOpen: true }));
  set("seed", num(o, "seed", Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER, { int: true }));
  set("ignoreEos", bool(o, "ignore_eos"));
  const minMax = chat ? 1 : 0;
  const maxTokens = num(o, "max_completion_tokens", minMax, Number.MAX_SAFE_INTEGER, { int: true }) ?? num(o, "max_tokens", minMax, Number.MAX_SAFE_INTEGER, { int: true });
  if (maxTokens !== undefined) s.maxTokens = maxTokens;

  if (o.stop != null) {
    const stop = typeof o.stop === "string" ? [o.stop] : o.stop;
    if (!Array.isArray(stop)) throw invalid("stop", `must be a string or an array of strings, got ${kind(o.stop)}`);
    if (stop.length > 16) throw invalid("stop", `at most 16 stop strings, got ${stop.length}`);
    stop.forEach((x, i) => {
      if (typeof x !== "string" || x === "") throw invalid("stop", `stop[${i}] must be a non-empty string, got ${show(x)}`);
    });
    if (stop.length) s.stop = stop as string[];
  }
  if (o.stop_token_ids != null) {
    const ids = o.stop_token_ids;
    if (!Array.isArray(ids)) throw invalid("stop_token_ids", `must be an array of token ids, got ${kind(ids)}`);
    ids.forEach((x, i) => {
      if (!Number.isSafeInteger(x) || (x as number) < 0 || (x as number) >= vocabSize)
        throw invalid("stop_token_ids", `stop_token_ids[${i}] must be a token id in [0, ${vocabSize}), got ${show(x)}`);
    });
    s.stopTokenIds = ids as number[];
  }

  let logitBias: Map<number, number> | null = null;
  if (o.logit_bias != null) {
    if (!isObject(o.logit_bias)) throw invalid("logit_bias", `must be an object mapping token ids to biases, got ${kind(o.logit_bias)}`);
    logitBias = new Map();
    for (const [k, v] of Object.entries(o.logit_bias)) {
      const id = Number(k);
      if (!/^\d+$/.test(k) || !Number.isSafeInteger(id) || id >= vocabSize) throw invalid("logit_bias", `key ${show(k)} is not a token id in [0, ${vocabSize})`);
      if (typeof v !== "number" || !Number.isFinite(v) || v < -100 || v > 100) throw invalid("logit_bias", `logit_bias[${k}] must be a number in [-100, 100], got ${show(v)}`);
      logitBias.set(id, v);
    }
    if (logitBias.size === 0) logitBias = null;
  }

  const grammar = structuredOutput(o);
  const jsonMode = grammar?.spec.type === "json_object";

  const minTokens = num(o, "min_tokens", 0, Number.MAX_SAFE_INTEGER, { int: true });
  if (minTokens !== undefined && maxTokens !== undefined && minTokens > maxTokens)
    throw invalid("min_tokens", `must be at most max_tokens (${maxTokens}), got ${minTokens}`);
  const includeStopStr = bool(o, "include_stop_str_in_output") ?? false;

  return {
    model,
    n,
    stream,
    includeUsage,
    sampling: s,
    logprobs: null,
    logitBias,
    jsonMode,
    maxTokens,
    grammar,
    ...(minTokens !== undefined && minTokens > 0 && { minTokens }),
    includeStopStr,
  };
}

/** A JSON schema given as an object or as a JSON string (vLLM accepts both). */
function schemaOf(v: unknown, param: string): Obj {
  let x = v;
  if (typeof x === "string") {
    try {
      x = JSON.parse(x);
    } catch (e) {
      throw invalid(param, `is not valid JSON: ${(e as Error).message}`);
    }
  }
  if (typeof x === "boolean") x = x ? {} : { not: {} };
  if (!isObject(x)) throw invalid(param, `must be a JSON schema object, got ${kind(x)}`);
  return x;
}

function choicesOf(v: unknown, param: string): string[] {
  if (!Array.isArray(v) || v.length === 0) throw invalid(param, `must be a non-empty array of strings, got ${show(v)}`);
  v.forEach((c, i) => {
    if (typeof c !== "string") throw invalid(`${param}[${i}]`, `must be a string, got ${kind(c)}`);
  });
  return v as string[];
}

function nonEmpty(v: unknown, param: string): string {
  if (typeof v !== "string" || v === "") throw invalid(param, `must be a non-empty string, got ${kind(v)} ${show(v)}`);
  return v;
}

/**
 * The structured-output constraint of a request, from whichever field gave it: OpenAI's
 * response_format (json_object, json_schema), vLLM's structured_outputs (json, regex, choice,
 * grammar, json_object) and guided_json / guided_regex / guided_choice / guided_grammar, SGLang's
 * regex / ebnf. At most one may be given.
 */
function structuredOutput(o: Obj): GrammarRequest | null {
  const found: GrammarRequest[] = [];
  const rf = o.response_format;
  if (rf != null) {
    if (!isObject(rf)) throw invalid("response_format", `must be an object, got ${kind(rf)}`);
    const t = str(rf, "type", "response_format.type");
    if (t === "json_object") found.push({ spec: { type: "json_object" }, param: "response_format" });
    else if (t === "json_schema") {
      const js = rf.json_schema;
      if (!isObject(js)) throw invalid("response_format.json_schema", `must be an object with name and schema, got ${kind(js)}`);
      const name = str(js, "name", "response_format.json_schema.name");
      if (name !== undefined && !/^[A-Za-z0-9_-]{1,64}$/.test(name))
        throw invalid("response_format.json_schema.name", `must be 1-64 characters of a-z, A-Z, 0-9, _ or -; got ${show(name)}`);
      str(js, "description", "response_format.json_schema.description");
      const strict = bool(js, "strict", "response_format.json_schema.strict");
      const schema = js.schema == null ? {} : schemaOf(js.schema, "response_format.json_schema.schema");
      found.push({ spec: { type: "json_schema", schema, ...(strict !== undefined && { strict }) }, param: "response_format.json_schema.schema" });
    } else if (t !== "text" && t !== undefined)
      throw invalid("response_format.type", `must be "text", "json_object" or "json_schema", got ${show(rf.type)}`);
  }
  const so = o.structured_outputs ?? o.guided_decoding;
  const soName = o.structured_outputs != null ? "structured_outputs" : "guided_decoding";
  if (so != null) {
    if (!isObject(so)) throw invalid(soName, `must be an object with one of json, regex, choice, grammar, json_object; got ${kind(so)}`);
    const given: GrammarRequest[] = [];
    for (const [k, v] of Object.entries(so)) {
      if (v == null || v === false) continue;
      const p = `${soName}.${k}`;
      if (k === "json") given.push({ spec: { type: "json_schema", schema: schemaOf(v, p) }, param: p });
      else if (k === "regex") given.push({ spec: { type: "regex", pattern: nonEmpty(v, p) }, param: p });
      else if (k === "choice") given.push({ spec: { type: "choice", choices: choicesOf(v, p) }, param: p });
      else if (k === "grammar") given.push({ spec: { type: "grammar", grammar: nonEmpty(v, p) }, param: p });
      else if (k === "json_object") {
        if (v !== true) throw invalid(p, `must be true, got ${show(v)}`);
        given.push({ spec: { type: "json_object" }, param: p });
      } else throw invalid(p, "is not supported (supported: json, regex, choice, grammar, json_object)");
    }
    if (given.length > 1) throw invalid(given[1]!.param, `only one of ${given.map((g) => g.param).join(", ")} may be given`);
    found.push(...given);
  }
  const fields: Array<[string, (v: unknown, p: string) => GrammarSpec]> = [
    ["guided_json", (v, p) => ({ type: "json_schema", schema: schemaOf(v, p) })],
    ["guided_regex", (v, p) => ({ type: "regex", pattern: nonEmpty(v, p) })],
    ["guided_choice", (v, p) => ({ type: "choice", choices: choicesOf(v, p) })],
    ["guided_grammar", (v, p) => ({ type: "grammar", grammar: nonEmpty(v, p) })],
    ["regex", (v, p) => ({ type: "regex", pattern: nonEmpty(v, p) })],
    ["ebnf", (v, p) => ({ type: "grammar", grammar: nonEmpty(v, p) })],
  ];
  for (const [k, f] of fields) if (o[k] != null) found.push({ spec: f(o[k], k), param: k });
  if (found.length > 1) throw invalid(found[1]!.param, `cannot be combined with ${found[0]!.param}: give one structured-output constraint`);
  return found[0] ?? null;
}

/**
 * 400 for every field of `o` that is neither in `accepted` nor one of the fields OpenAI clients
 * send with a value meaning "unset" (store: false, metadata: {}, service_tier: "auto", ...).
 */
export function rejectUnknownFields(o: Obj, accepted: ReadonlySet<string>, where: string): void {
  for (const [k, v] of Object.entries(o)) {
    if (accepted.has(k) || v === null || v === undefined) continue;
    const unset = UNSET[k];
    if (unset?.(v)) continue;
    throw invalid(k, `is not supported by ${where}`, "unsupported_parameter");
  }
}

const isEmptyObj = (v: unknown) => isObject(v) && Object.keys(v).length === 0;
/** fields clients send with these values when the user did not set them */
const UNSET: Record<string, (v: unknown) => boolean> = {
  store: (v) => v === false,
  metadata: isEmptyObj,
  service_tier: (v) => v === "auto" || v === "default",
  modalities: (v) => Array.isArray(v) && v.length === 1 && v[0] === "text",
  functions: (v) => Array.isArray(v) && v.length === 0,
  echo: (v) => v === false,
  skip_special_tokens: (v) => v === true,
  spaces_between_special_tokens: (v) => v === true,
  priority: (v) => v === 0,
  logprobs: (v) => v === false,
  best_of: (v) => v === 1,
};

const COMMON_FIELDS = [
  "model",
  "n",
  "stream",
  "stream_options",
  "temperature",
  "top_p",
  "top_k",
  "min_p",
  "presence_penalty",
  "frequency_penalty",
  "repetition_penalty",
  "seed",
  "ignore_eos",
  "max_tokens",
  "stop",
  "stop_token_ids",
  "logit_bias",
  "response_format",
  "structured_outputs",
  "guided_decoding",
  "guided_json",
  "guided_regex",
  "guided_choice",
  "guided_grammar",
  "regex",
  "ebnf",
  "min_tokens",
  "include_stop_str_in_output",
  "return_tokens_as_token_ids",
  // metadata about the caller, no effect on the output
  "user",
  "safety_identifier",
  "prompt_cache_key",
  "request_id",
];
/** the fields /v1/chat/completions implements */
export const CHAT_FIELDS: ReadonlySet<string> = new Set([
  ...COMMON_FIELDS,
  "messages",
  "max_completion_tokens",
  "logprobs",
  "top_logprobs",
  "tools",
  "tool_choice",
  "parallel_tool_calls",
  "chat_template_kwargs",
  "continue_final_message",
  "add_generation_prompt",
  "reasoning_effort",
]);
/** the fields /v1/completions implements */
export const COMPLETION_FIELDS: ReadonlySet<string> = new Set([...COMMON_FIELDS, "prompt", "logprobs", "echo", "suffix", "best_of"]);

function textContent(v: unknown, param: string, nullable: boolean): string | null {
  if (v == null) {
    if (nullable) return null;
    throw invalid(param, "is required");
  }
  if (typeof v === "string") return v;
  if (Array.isArray(v)) {
    let out = "";
    v.forEach((part, i) => {
      if (!isObject(part)) throw invalid(`${param}[${i}]`, `must be a content part object, got ${kind(part)}`);
      if (part.type !== "text") throw invalid(`${param}[${i}].type`, `only "text" content parts are supported, got ${show(part.type)}`);
      if (typeof part.text !== "string") throw invalid(`${param}[${i}].text`, `must be a string, got ${kind(part.text)}`);
      out += part.text;
    });
    return out;
  }
  throw invalid(param, `must be a string or an array of content parts, got ${kind(v)}`);
}

const ROLES = new Set(["system", "developer", "user", "assistant", "tool"]);

function messages(v: unknown): ChatMessage[] {
  if (v == null) throw invalid("messages", "is required");
  if (!Array.isArray(v)) throw invalid("messages", `must be an array of messages, got ${kind(v)}`);
  if (v.length === 0) throw invalid("messages", "must hold at least one message");
  return v.map((m, i) => {
    const p = `messages[${i}]`;
    if (!isObject(m)) throw invalid(p, `must be an object, got ${kind(m)}`);
    if (typeof m.role !== "string" || !ROLES.has(m.role)) throw invalid(`${p}.role`, `must be one of system, developer, user, assistant, tool; got ${show(m.role)}`);
    const role = m.role === "developer" ? "system" : m.role;
    let toolCalls: ToolCall[] | undefined;
    if (role === "assistant" && m.tool_calls != null) {
      if (!Array.isArray(m.tool_calls)) throw invalid(`${p}.tool_calls`, `must be an array, got ${kind(m.tool_calls)}`);
      toolCalls = m.tool_calls.map((tc, j) => {
        const q = `${p}.tool_calls[${j}]`;
        if (!isObject(tc)) throw invalid(q, `must be an object, got ${kind(tc)}`);
        if (tc.type != null && tc.type !== "function") throw invalid(`${q}.type`, `must be "function", got ${show(tc.type)}`);
        if (!isObject(tc.function)) throw invalid(`${q}.function`, "must be an object with name and arguments");
        const name = str(tc.function, "name", `${q}.function.name`);
        if (!name) throw invalid(`${q}.function.name`, "is required");
        const args = tc.function.arguments == null ? "{}" : tc.function.arguments;
        if (typeof args !== "string") throw invalid(`${q}.function.arguments`, `must be a JSON string, got ${kind(args)}`);
        const id = tc.id == null ? undefined : str(tc, "id", `${q}.id`);
        return { type: "function" as const, ...(id !== undefined && { id }), function: { name, arguments: args } };
      });
      if (toolCalls.length === 0) toolCalls = undefined;
    }
    let content = textContent(m.content, `${p}.content`, role === "assistant");
    // an empty assistant content beside tool calls is no content (the templates test for none)
    if (toolCalls && content === "") content = null;
    if (role === "assistant" && content === null && !toolCalls) content = "";
    const out: ChatMessage = { role, content };
    if (toolCalls) out.tool_calls = toolCalls;
    if (role === "tool") {
      const id = m.tool_call_id == null ? undefined : str(m, "tool_call_id", `${p}.tool_call_id`);
      if (id !== undefined) out.tool_call_id = id;
    }
    if (m.name != null) out.name = str(m, "name", `${p}.name`);
    if (m.prefix != null) {
      // DeepSeek's chat prefix completion: the last assistant message is continued
      if (bool(m, "prefix", `${p}.prefix`)) {
        if (role !== "assistant" || i !== v.length - 1) throw invalid(`${p}.prefix`, "only the last message may have prefix: true, and it must be an assistant message");
        if (toolCalls) throw invalid(`${p}.prefix`, "cannot continue a message with tool_calls");
        out.prefix = true;
      }
    }
    return out;
  });
}

function tools(o: Obj): { tools: ToolDef[] | null; toolChoice: ToolChoice } {
  let defs: ToolDef[] | null = null;
  if (o.tools != null) {
    if (!Array.isArray(o.tools)) throw invalid("tools", `must be an array of tools, got ${kind(o.tools)}`);
    defs = o.tools.map((t, i) => {
      const p = `tools[${i}]`;
      if (!isObject(t)) throw invalid(p, `must be an object, got ${kind(t)}`);
      if (t.type !== "function") throw invalid(`${p}.type`, `must be "function", got ${show(t.type)}`);
      if (!isObject(t.function)) throw invalid(`${p}.function`, `must be an object, got ${kind(t.function)}`);
      const name = str(t.function, "name", `${p}.function.name`);
      if (!name || !/^[A-Za-z0-9_.-]{1,64}$/.test(name)) throw invalid(`${p}.function.name`, `must be 1-64 characters of a-z, A-Z, 0-9, _, . or -; got ${show(t.function.name)}`);
      const description = str(t.function, "description", `${p}.function.description`);
      if (t.function.parameters != null && !isObject(t.function.parameters)) throw invalid(`${p}.function.parameters`, `must be a JSON schema object, got ${kind(t.function.parameters)}`);
      return {
        type: "function" as const,
        function: { name, ...(description !== undefined && { description }), ...(t.function.parameters != null && { parameters: t.function.parameters as Obj }) },
      };
    });
    const names = new Set<string>();
    defs.forEach((d, i) => {
      if (names.has(d.function.name)) throw invalid(`tools[${i}].function.name`, `duplicate tool name ${show(d.function.name)}`);
      names.add(d.function.name);
    });
    if (defs.length === 0) defs = null;
  }
  let toolChoice: ToolChoice = defs ? "auto" : "none";
  const tc = o.tool_choice;
  if (tc != null) {
    if (tc === "none" || tc === "auto" || tc === "required") toolChoice = tc;
    else if (isObject(tc)) {
      if (tc.type !== "function" || !isObject(tc.function) || typeof tc.function.name !== "string")
        throw invalid("tool_choice", `must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}`);
      toolChoice = { name: tc.function.name };
    } else throw invalid("tool_choice", `must be "none", "auto", "required" or a named function, got ${show(tc)}`);
    if (toolChoice !== "none" && !defs) throw invalid("tool_choice", `${show(tc)} needs tools`);
    if (typeof toolChoice === "object" && !defs!.some((d) => d.function.name === (toolChoice as { name: string }).name))
      throw invalid("tool_choice", `names a function that is not in tools: ${show((toolChoice as { name: string }).name)}`);
  }
  return { tools: defs, toolChoice };
}

const EFFORTS = new Set(["none", "minimal", "low", "medium", "high", "xhigh"]);

export function parseChatRequest(o: Obj, vocabSize: number): ChatRequest {
  rejectUnknownFields(o, CHAT_FIELDS, "/v1/chat/completions");
  const msgs = messages(o.messages);
  const c = common(o, vocabSize, true);
  if (bool(o, "echo")) throw invalid("echo", "is not supported by /v1/chat/completions");
  let templateVars: Obj | null = null;
  if (o.chat_template_kwargs != null) {
    if (!isObject(o.chat_template_kwargs)) throw invalid("chat_template_kwargs", `must be an object, got ${kind(o.chat_template_kwargs)}`);
    for (const k of Object.keys(o.chat_template_kwargs))
      if (RESERVED_TEMPLATE_VARS.has(k)) throw invalid(`chat_template_kwargs.${k}`, "is set by the server (use the request's own field)");
    templateVars = Object.keys(o.chat_template_kwargs).length ? o.chat_template_kwargs : null;
  }
  const last = msgs[msgs.length - 1]!;
  const cfm = bool(o, "continue_final_message");
  if (cfm && last.role !== "assistant") throw invalid("continue_final_message", `needs the last message to be an assistant message, got role ${show(last.role)}`);
  const continueFinal = cfm ?? last.prefix === true;
  if (last.prefix === true && cfm === false) throw invalid("continue_final_message", "is false but the last message has prefix: true");
  if (continueFinal) delete last.prefix;
  const agp = bool(o, "add_generation_prompt");
  if (continueFinal && agp === true) throw invalid("add_generation_prompt", "cannot be true with continue_final_message (or prefix: true)");
  const addGenerationPrompt = agp ?? !continueFinal;
  let reasoningEffort: string | undefined;
  if (o.reasoning_effort != null) {
    reasoningEffort = str(o, "reasoning_effort");
    if (!EFFORTS.has(reasoningEffort!)) throw invalid("reasoning_effort", `must be one of ${[...EFFORTS].join(", ")}; got ${show(reasoningEffort)}`);
    if (templateVars && "thinking" in templateVars) throw invalid("reasoning_effort", "cannot be combined with chat_template_kwargs.thinking");
  }
  const lp = bool(o, "logprobs") ?? false;
  const top = num(o, "top_logprobs", 0, MAX_LOGPROBS, { int: true });
  if (top !== undefined && !lp) throw invalid("top_logprobs", "needs logprobs: true");
  c.logprobs = lp ? (top ?? 0) : null;
  const t = tools(o);
  const parallelToolCalls = bool(o, "parallel_tool_calls") ?? true;
  const tokenIdNames = bool(o, "return_tokens_as_token_ids") ?? false;
  str(o, "user");
  if (c.grammar && t.tools && t.toolChoice !== "none")
    throw invalid(c.grammar.param, `cannot be combined with tools (tool_choice ${show(t.toolChoice === "auto" || t.toolChoice === "required" ? t.toolChoice : "named")}): the tool calls follow the tools' schemas`);
  return {
    ...c,
    messages: msgs,
    tools: t.tools,
    toolChoice: t.toolChoice,
    parallelToolCalls,
    tokenIdNames,
    templateVars,
    continueFinal,
    addGenerationPrompt,
    ...(reasoningEffort !== undefined && { reasoningEffort }),
  };
}

/** template variables the server sets itself */
const RESERVED_TEMPLATE_VARS = new Set(["messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token", "unk_token", "pad_token"]);

export function parseCompletionRequest(o: Obj, vocabSize: number): CompletionRequestBody {
  rejectUnknownFields(o, COMPLETION_FIELDS, "/v1/completions");
  const p = o.prompt;
  let prompts: Array<string | number[]>;
  const idList = (a: unknown[], param: string): number[] => {
    if (a.length === 0) throw invalid(param, "a token-id prompt must hold at least one token");
    a.forEach((x, i) => {
      if (!Number.isSafeInteger(x) || (x as number) < 0 || (x as number) >= vocabSize)
        throw invalid(param, `token ${i} must be an id in [0, ${vocabSize}), got ${show(x)}`);
    });
    return a as number[];
  };
  if (p == null) throw invalid("prompt", "is required");
  if (typeof p === "string") prompts = [p];
  else if (Array.isArray(p)) {
    if (p.length === 0) throw invalid("prompt", "must not be empty");
    if (p.every((x) => typeof x === "string")) prompts = p as string[];
    else if (p.every((x) => typeof x === "number")) prompts = [idList(p, "prompt")];
    else if (p.every((x) => Array.isArray(x))) prompts = (p as unknown[][]).map((x, i) => idList(x, `prompt[${i}]`));
    else throw invalid("prompt", "must be a string, an array of strings, an array of token ids, or an array of token-id arrays");
  } else throw invalid("prompt", `must be a string, an array of strings, an array of token ids, or an array of token-id arrays; got ${kind(p)}`);
  const c = common(o, vocabSize, false);
  const lp = num(o, "logprobs", 0, MAX_LOGPROBS, { int: true });
  c.logprobs = lp ?? null;
  const echo = bool(o, "echo") ?? false;
  const tokenIdNames = bool(o, "return_tokens_as_token_ids") ?? false;
  const suffix = str(o, "suffix");
  if (suffix) throw invalid("suffix", "is not supported");
  const bestOf = num(o, "best_of", 1, 128, { int: true });
  if (bestOf !== undefined && bestOf !== c.n) throw invalid("best_of", `only best_of = n is supported (n = ${c.n}), got ${bestOf}`);
  str(o, "user");
  if (o.tools != null) throw invalid("tools", "is a chat completions field");
  return { ...c, prompts, echo, tokenIdNames };
}
