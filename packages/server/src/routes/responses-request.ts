// POST /v1/responses: the request body → a conversation (chat messages), tools, sampling and an
// output format. The server is stateless: `store: true` and `previous_response_id` are 400s;
// `item_reference` input items resolve against the output items this server returned recently
// (kept in memory, see RecentItems), which is what the AI SDK's default provider sends for
// earlier assistant text. Every other field the route does not implement is a 400 naming it.
import { MAX_LOGPROBS, type ChatMessage, type SamplingParams, type ToolCall } from "@ds3/core";
import { invalid } from "../errors.js";
import type { GrammarSpec } from "../grammar.js";
import type { ToolChoice, ToolDef } from "../validate.js";
import { type Obj, arr, bool, isObj, kind, num, obj, onlyKnown, show, str, toolName } from "./responses-fields.js";

export interface ResponsesRequest {
  model?: string;
  messages: ChatMessage[];
  instructions: string | null;
  tools: ToolDef[] | null;
  /** as the request gave them (echoed in the response object) */
  toolsEcho: Obj[];
  toolChoice: ToolChoice;
  parallelToolCalls: boolean;
  /** text.format: null for plain text */
  format: GrammarSpec | null;
  formatEcho: Obj;
  sampling: SamplingParams;
  maxOutputTokens?: number;
  stream: boolean;
  /** top logprobs per output token; null: none */
  logprobs: number | null;
  metadata: Record<string, string>;
  user: string | null;
}

const TOP = new Set([
  "model",
  "input",
  "instructions",
  "tools",
  "tool_choice",
  "parallel_tool_calls",
  "text",
  "max_output_tokens",
  "temperature",
  "top_p",
  "stream",
  "store",
  "metadata",
  "user",
  "safety_identifier",
  "top_logprobs",
  "include",
  "truncation",
  "service_tier",
  "previous_response_id",
  "reasoning",
  "stream_options",
]);

const WHAT = "this server's /v1/responses";

/** Output items this server returned lately, so `item_reference` inputs can name them: the
 *  newest `capacity` items within `maxChars` characters of JSON (the oldest are dropped first). */
export class RecentItems {
  private readonly items = new Map<string, { item: Obj; size: number }>();
  private chars = 0;
  constructor(
    readonly capacity = 4096,
    readonly maxChars = 32 * 1024 * 1024,
  ) {}
  add(item: Obj): void {
    const id = item.id;
    if (typeof id !== "string") return;
    this.drop(id);
    const size = JSON.stringify(item).length;
    if (size > this.maxChars) return;
    this.items.set(id, { item, size });
    this.chars += size;
    while (this.items.size > this.capacity || this.chars > this.maxChars) this.drop(this.items.keys().next().value as string);
  }
  get(id: string): Obj | undefined {
    return this.items.get(id)?.item;
  }
  private drop(id: string): void {
    const e = this.items.get(id);
    if (!e) return;
    this.items.delete(id);
    this.chars -= e.size;
  }
}

export function parseResponsesRequest(o: Obj, recent: RecentItems): ResponsesRequest {
  onlyKnown(o, TOP, "", WHAT);
  if (o.store === true)
    throw invalid("store", "this server does not store responses (it is stateless): omit store or send false, and send the whole conversation as input", "unsupported_parameter");
  bool(o, "store", "store");
  if (o.previous_response_id != null)
    throw invalid("previous_response_id", "this server does not store responses: send the earlier turns as input items instead", "unsupported_parameter");
  const model = str(o, "model", "model");
  const stream = bool(o, "stream", "stream") ?? false;
  const so = obj(o, "stream_options", "stream_options");
  if (so) {
    if (!stream) throw invalid("stream_options", "is only allowed when stream is true");
    onlyKnown(so, new Set(), "stream_options", WHAT);
  }
  const truncation = str(o, "truncation", "truncation");
  if (truncation !== undefined && truncation !== "disabled") throw invalid("truncation", `only "disabled" is supported (a prompt over the context is a 400), got ${show(truncation)}`, "unsupported_parameter");
  const tier = str(o, "service_tier", "service_tier");
  if (tier !== undefined && tier !== "auto" && tier !== "default") throw invalid("service_tier", `only "auto" or "default" is supported, got ${show(tier)}`, "unsupported_parameter");
  const reasoning = obj(o, "reasoning", "reasoning");
  if (reasoning) onlyKnown(reasoning, new Set(), "reasoning", `${WHAT} (DeepSeek-V3 has no reasoning effort or summary settings)`);

  const s: SamplingParams = {};
  const temperature = num(o, "temperature", 0, 2, "temperature");
  if (temperature !== undefined) s.temperature = temperature;
  const topP = num(o, "top_p", 0, 1, "top_p");
  if (topP !== undefined) {
    if (topP === 0) throw invalid("top_p", "must be in (0, 1], got 0");
    s.topP = topP;
  }
  const maxOutputTokens = num(o, "max_output_tokens", 1, Number.MAX_SAFE_INTEGER, "max_output_tokens", true);
  if (maxOutputTokens !== undefined) s.maxTokens = maxOutputTokens;

  // logprobs: top_logprobs, and include: ["message.output_text.logprobs"]
  const include = arr(o, "include", "include") ?? [];
  let wantLogprobs = false;
  include.forEach((x, i) => {
    if (x === "message.output_text.logprobs") wantLogprobs = true;
    else throw invalid(`include[${i}]`, `only "message.output_text.logprobs" is supported, got ${show(x)}`, "unsupported_parameter");
  });
  const top = num(o, "top_logprobs", 0, MAX_LOGPROBS, "top_logprobs", true);
  const logprobs = wantLogprobs || (top !== undefined && top > 0) ? (top ?? 0) : null;

  const metadata: Record<string, string> = {};
  const md = obj(o, "metadata", "metadata");
  if (md) {
    const entries = Object.entries(md);
    if (entries.length > 16) throw invalid("metadata", `at most 16 keys, got ${entries.length}`);
    for (const [k, v] of entries) {
      if (k.length > 64) throw invalid("metadata", `key ${show(k)} is longer than 64 characters`);
      if (typeof v !== "string" || v.length > 512) throw invalid(`metadata.${k}`, `must be a string of at most 512 characters, got ${kind(v)}`);
      metadata[k] = v;
    }
  }
  const user = str(o, "user", "user") ?? str(o, "safety_identifier", "safety_identifier") ?? null;

  const instructions = str(o, "instructions", "instructions") ?? null;
  const messages: ChatMessage[] = instructions !== null ? [{ role: "system", content: instructions }] : [];
  messages.push(...inputMessages(o.input, recent));
  if (!messages.some((m) => m.role !== "system")) throw invalid("input", "holds no user, assistant or tool turn");

  const t = parseTools(o);
  const parallelToolCalls = bool(o, "parallel_tool_calls", "parallel_tool_calls") ?? true;
  const { format, echo } = parseFormat(o);
  return {
    model,
    messages,
    instructions,
    tools: t.tools,
    toolsEcho: t.echo,
    toolChoice: t.choice,
    parallelToolCalls,
    format,
    formatEcho: echo,
    sampling: s,
    ...(maxOutputTokens !== undefined && { maxOutputTokens }),
    stream,
    logprobs,
    metadata,
    user,
  };
}

function textParts(v: unknown, param: string, allowed: ReadonlySet<string>): string {
  if (typeof v === "string") return v;
  if (!Array.isArray(v)) throw invalid(param, `must be a string or an array of content parts, got ${kind(v)}`);
  let out = "";
  v.forEach((p, i) => {
    const q = `${param}[${i}]`;
    if (!isObj(p)) throw invalid(q, `must be a content part object, got ${kind(p)}`);
    if (typeof p.type !== "string" || !allowed.has(p.type))
      throw invalid(`${q}.type`, `must be ${[...allowed].map((x) => `"${x}"`).join(" or ")} (this server takes text only), got ${show(p.type)}`, "unsupported_parameter");
    if (typeof p.text !== "string") throw invalid(`${q}.text`, `must be a string, got ${kind(p.text)}`);
    out += p.text;
  });
  return out;
}

const USER_PARTS = new Set(["input_text"]);
const ASSISTANT_PARTS = new Set(["output_text", "input_text"]);
const ROLES = new Set(["user", "system", "developer", "assistant"]);

/** `input` as a string or a list of items → chat messages (function calls join the assistant turn). */
function inputMessages(input: unknown, recent: RecentItems): ChatMessage[] {
  if (input == null) throw invalid("input", "is required");
  if (typeof input === "string") return [{ role: "user", content: input }];
  if (!Array.isArray(input)) throw invalid("input", `must be a string or an array of input items, got ${kind(input)}`);
  if (input.length === 0) throw invalid("input", "must hold at least one item");
  const out: ChatMessage[] = [];
  const lastAssistant = (): ChatMessage => {
    const last = out[out.length - 1];
    if (last && last.role === "assistant") return last;
    const m: ChatMessage = { role: "assistant", content: null };
    out.push(m);
    return m;
  };
  input.forEach((raw, i) => {
    const p = `input[${i}]`;
    if (!isObj(raw)) throw invalid(p, `must be an input item object, got ${kind(raw)}`);
    let it = raw;
    if (it.type === "item_reference") {
      const id = str(it, "id", `${p}.id`);
      const found = id !== undefined ? recent.get(id) : undefined;
      if (!found)
        throw invalid(`${p}.id`, `no item ${show(id)} is known to this server (it keeps no responses; recent output items only): send the item itself`, "item_not_found");
      it = found;
    }
    const type = it.type ?? (it.role !== undefined ? "message" : undefined);
    if (type === "message") {
      if (typeof it.role !== "string" || !ROLES.has(it.role)) throw invalid(`${p}.role`, `must be one of user, system, developer, assistant; got ${show(it.role)}`);
      const role = it.role === "developer" ? "system" : it.role;
      const content = textParts(it.content, `${p}.content`, role === "assistant" ? ASSISTANT_PARTS : USER_PARTS);
      if (role === "assistant") {
        const m = lastAssistant();
        if (m.tool_calls?.length) out.push({ role: "assistant", content });
        else m.content = (m.content ?? "") + content;
      } else out.push({ role, content });
    } else if (type === "function_call") {
      const name = toolName(it.name, `${p}.name`);
      const callId = str(it, "call_id", `${p}.call_id`);
      if (!callId) throw invalid(`${p}.call_id`, "is required");
      const args = str(it, "arguments", `${p}.arguments`) ?? "{}";
      const m = lastAssistant();
      const call: ToolCall = { type: "function", id: callId, function: { name, arguments: args } };
      (m.tool_calls ??= []).push(call);
    } else if (type === "function_call_output") {
      const callId = str(it, "call_id", `${p}.call_id`);
      if (!callId) throw invalid(`${p}.call_id`, "is required");
      if (it.output == null) throw invalid(`${p}.output`, "is required");
      const content = textParts(it.output, `${p}.output`, USER_PARTS);
      out.push({ role: "tool", content, tool_call_id: callId });
    } else if (type === "reasoning") {
      // DeepSeek's chat template drops earlier turns' reasoning; so does this route
    } else throw invalid(`${p}.type`, `must be "message", "function_call", "function_call_output", "reasoning" or "item_reference", got ${show(it.type)}`, "unsupported_parameter");
  });
  // an assistant turn made only of calls has no content
  for (const m of out) if (m.role === "assistant" && m.tool_calls?.length && m.content === "") m.content = null;
  for (const m of out) if (m.role === "assistant" && m.content === null && !m.tool_calls?.length) m.content = "";
  return out;
}

function parseTools(o: Obj): { tools: ToolDef[] | null; echo: Obj[]; choice: ToolChoice } {
  const list = arr(o, "tools", "tools") ?? [];
  const names = new Set<string>();
  const echo: Obj[] = [];
  const tools: ToolDef[] = list.map((t, i) => {
    const p = `tools[${i}]`;
    if (!isObj(t)) throw invalid(p, `must be an object, got ${kind(t)}`);
    if (t.type !== "function") throw invalid(`${p}.type`, `only "function" tools are supported, got ${show(t.type)}`, "unsupported_parameter");
    onlyKnown(t, new Set(["type", "name", "description", "parameters", "strict"]), p, WHAT);
    const name = toolName(t.name, `${p}.name`);
    if (names.has(name)) throw invalid(`${p}.name`, `duplicate tool name ${show(name)}`);
    names.add(name);
    const description = str(t, "description", `${p}.description`);
    const parameters = obj(t, "parameters", `${p}.parameters`);
    const strict = bool(t, "strict", `${p}.strict`);
    echo.push({ type: "function", name, description: description ?? null, parameters: parameters ?? null, strict: strict ?? null });
    return { type: "function" as const, function: { name, ...(description !== undefined && { description }), ...(parameters !== undefined && { parameters }), ...(strict !== undefined && { strict }) } };
  });
  let choice: ToolChoice = tools.length ? "auto" : "none";
  const tc = o.tool_choice;
  if (tc != null) {
    if (tc === "none" || tc === "auto" || tc === "required") choice = tc;
    else if (isObj(tc) && tc.type === "function") {
      const name = str(tc, "name", "tool_choice.name");
      if (!name || !names.has(name)) throw invalid("tool_choice.name", `names a function that is not in tools: ${show(tc.name)}`);
      choice = { name };
    } else throw invalid("tool_choice", `must be "none", "auto", "required" or {"type": "function", "name": ...}, got ${show(tc)}`, "unsupported_parameter");
    if (choice !== "none" && !tools.length) throw invalid("tool_choice", `${show(tc)} needs tools`);
  }
  return { tools: tools.length ? tools : null, echo, choice };
}

function parseFormat(o: Obj): { format: GrammarSpec | null; echo: Obj } {
  const text = obj(o, "text", "text");
  if (!text) return { format: null, echo: { type: "text" } };
  onlyKnown(text, new Set(["format"]), "text", WHAT);
  const f = obj(text, "format", "text.format");
  if (!f) return { format: null, echo: { type: "text" } };
  const type = str(f, "type", "text.format.type");
  if (type === "text") {
    onlyKnown(f, new Set(["type"]), "text.format", WHAT);
    return { format: null, echo: { type: "text" } };
  }
  if (type === "json_object") {
    onlyKnown(f, new Set(["type"]), "text.format", WHAT);
    return { format: { type: "json_object" }, echo: { type: "json_object" } };
  }
  if (type === "json_schema") {
    onlyKnown(f, new Set(["type", "name", "schema", "strict", "description"]), "text.format", WHAT);
    const name = str(f, "name", "text.format.name");
    if (!name || !/^[A-Za-z0-9_-]{1,64}$/.test(name)) throw invalid("text.format.name", `must be 1-64 characters of a-z, A-Z, 0-9, _ or -; got ${show(f.name)}`);
    const schema = obj(f, "schema", "text.format.schema");
    if (!schema) throw invalid("text.format.schema", "is required");
    const strict = bool(f, "strict", "text.format.strict");
    const description = str(f, "description", "text.format.description");
    return {
      format: { type: "json_schema", schema, ...(strict !== undefined && { strict }) },
      echo: { type: "json_schema", name, schema, strict: strict ?? null, ...(description !== undefined && { description }) },
    };
  }
  throw invalid("text.format.type", `must be "text", "json_object" or "json_schema", got ${show(f.type)}`);
}
