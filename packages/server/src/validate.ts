// Request validation: every known field is type- and range-checked, and any problem is a 400
// that names the field. Unknown fields are ignored (as the OpenAI API and vLLM do); `null`
// means "not given" for every optional field.
import { MAX_LOGPROBS, type ChatMessage, type SamplingParams, type ToolCall } from "@ds3/core";
import { invalid } from "./errors.js";

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
}

export interface ChatRequest extends CommonRequest {
  messages: ChatMessage[];
  /** return_tokens_as_token_ids (vLLM): logprob tokens named token_id:<id> */
  tokenIdNames: boolean;
  tools: ToolDef[] | null;
  toolChoice: ToolChoice;
  parallelToolCalls: boolean;
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

  let jsonMode = false;
  if (o.response_format != null) {
    const rf = o.response_format;
    if (!isObject(rf)) throw invalid("response_format", `must be an object, got ${kind(rf)}`);
    const t = str(rf, "type", "response_format.type");
    if (t === "json_object") jsonMode = true;
    else if (t === "json_schema") throw invalid("response_format.type", `"json_schema" is not supported; use "json_object"`);
    else if (t !== "text") throw invalid("response_format.type", `must be "text" or "json_object", got ${show(rf.type)}`);
  }

  return { model, n, stream, includeUsage, sampling: s, logprobs: null, logitBias, jsonMode, maxTokens };
}

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

export function parseChatRequest(o: Obj, vocabSize: number): ChatRequest {
  const msgs = messages(o.messages);
  const c = common(o, vocabSize, true);
  const lp = bool(o, "logprobs") ?? false;
  const top = num(o, "top_logprobs", 0, MAX_LOGPROBS, { int: true });
  if (top !== undefined && !lp) throw invalid("top_logprobs", "needs logprobs: true");
  c.logprobs = lp ? (top ?? 0) : null;
  const t = tools(o);
  const parallelToolCalls = bool(o, "parallel_tool_calls") ?? true;
  const tokenIdNames = bool(o, "return_tokens_as_token_ids") ?? false;
  str(o, "user");
  return { ...c, messages: msgs, tools: t.tools, toolChoice: t.toolChoice, parallelToolCalls, tokenIdNames };
}

export function parseCompletionRequest(o: Obj, vocabSize: number): CompletionRequestBody {
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
