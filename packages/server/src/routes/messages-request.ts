// POST /v1/messages (Anthropic Messages API): the request body → chat messages, tools, sampling.
// tool_use blocks become the assistant's tool calls, tool_result blocks tool messages (in
// DeepSeek-V3's tool format, tools.ts). Every field the route does not implement is a 400.
import type { ChatMessage, SamplingParams, ToolCall } from "@ds3/core";
import { invalid } from "../errors.js";
import type { ToolChoice, ToolDef } from "../validate.js";
import { type Obj, arr, bool, isObj, kind, num, obj, onlyKnown, show, str, toolName } from "./responses-fields.js";

export interface MessagesRequest {
  model: string;
  messages: ChatMessage[];
  tools: ToolDef[] | null;
  toolChoice: ToolChoice;
  parallelToolCalls: boolean;
  sampling: SamplingParams;
  maxTokens: number;
  stopSequences: string[];
  stream: boolean;
}

const WHAT = "this server's /v1/messages";
const TOP = new Set(["model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p", "top_k", "tools", "tool_choice", "metadata"]);

export function parseMessagesRequest(o: Obj): MessagesRequest {
  onlyKnown(o, TOP, "", WHAT);
  const model = str(o, "model", "model");
  if (!model) throw invalid("model", "is required");
  const maxTokens = num(o, "max_tokens", 1, Number.MAX_SAFE_INTEGER, "max_tokens", true);
  if (maxTokens === undefined) throw invalid("max_tokens", "is required");
  const stream = bool(o, "stream", "stream") ?? false;
  const s: SamplingParams = { maxTokens };
  const temperature = num(o, "temperature", 0, 1, "temperature");
  if (temperature !== undefined) s.temperature = temperature;
  const topP = num(o, "top_p", 0, 1, "top_p");
  if (topP !== undefined) {
    if (topP === 0) throw invalid("top_p", "must be in (0, 1], got 0");
    s.topP = topP;
  }
  const topK = num(o, "top_k", 0, Number.MAX_SAFE_INTEGER, "top_k", true);
  if (topK !== undefined && topK > 0) s.topK = topK;
  const stops = arr(o, "stop_sequences", "stop_sequences") ?? [];
  if (stops.length > 16) throw invalid("stop_sequences", `at most 16 stop sequences, got ${stops.length}`);
  stops.forEach((x, i) => {
    if (typeof x !== "string" || x === "") throw invalid(`stop_sequences[${i}]`, `must be a non-empty string, got ${show(x)}`);
  });
  if (stops.length) s.stop = stops as string[];
  const md = obj(o, "metadata", "metadata");
  if (md) {
    onlyKnown(md, new Set(["user_id"]), "metadata", WHAT);
    str(md, "user_id", "metadata.user_id");
  }

  const messages: ChatMessage[] = [];
  const system = systemText(o.system);
  if (system !== null) messages.push({ role: "system", content: system });
  messages.push(...turns(o.messages));
  const t = parseTools(o);
  return { model, messages, tools: t.tools, toolChoice: t.choice, parallelToolCalls: t.parallel, sampling: s, maxTokens, stopSequences: stops as string[], stream };
}

/** text blocks: {type: "text", text, cache_control?} (cache_control is a caching hint; prefix caching is automatic here) */
function textBlock(b: Obj, p: string): string {
  onlyKnown(b, new Set(["type", "text", "cache_control", "citations"]), p, WHAT);
  if (Array.isArray(b.citations) && b.citations.length) throw invalid(`${p}.citations`, "is not supported", "unsupported_parameter");
  if (typeof b.text !== "string") throw invalid(`${p}.text`, `must be a string, got ${kind(b.text)}`);
  return b.text;
}

function systemText(v: unknown): string | null {
  if (v == null) return null;
  if (typeof v === "string") return v;
  if (!Array.isArray(v)) throw invalid("system", `must be a string or an array of text blocks, got ${kind(v)}`);
  return v
    .map((b, i) => {
      const p = `system[${i}]`;
      if (!isObj(b) || b.type !== "text") throw invalid(`${p}.type`, `must be "text", got ${show(isObj(b) ? b.type : b)}`);
      return textBlock(b, p);
    })
    .join("\n");
}

function toolResultText(v: unknown, p: string): string {
  if (v == null) return "";
  if (typeof v === "string") return v;
  if (!Array.isArray(v)) throw invalid(p, `must be a string or an array of text blocks, got ${kind(v)}`);
  return v
    .map((b, i) => {
      const q = `${p}[${i}]`;
      if (!isObj(b) || b.type !== "text") throw invalid(`${q}.type`, `only "text" blocks are supported in tool results, got ${show(isObj(b) ? b.type : b)}`, "unsupported_parameter");
      return textBlock(b, q);
    })
    .join("");
}

function turns(v: unknown): ChatMessage[] {
  if (v == null) throw invalid("messages", "is required");
  if (!Array.isArray(v)) throw invalid("messages", `must be an array of messages, got ${kind(v)}`);
  if (v.length === 0) throw invalid("messages", "must hold at least one message");
  const out: ChatMessage[] = [];
  v.forEach((m, i) => {
    const p = `messages[${i}]`;
    if (!isObj(m)) throw invalid(p, `must be an object, got ${kind(m)}`);
    onlyKnown(m, new Set(["role", "content"]), p, WHAT);
    if (m.role !== "user" && m.role !== "assistant") throw invalid(`${p}.role`, `must be "user" or "assistant", got ${show(m.role)}`);
    if (typeof m.content === "string") {
      out.push({ role: m.role, content: m.content });
      return;
    }
    if (!Array.isArray(m.content)) throw invalid(`${p}.content`, `must be a string or an array of content blocks, got ${kind(m.content)}`);
    if (m.role === "user") {
      // tool results first (they answer the previous assistant turn), then the user's text
      let text: string | null = null;
      m.content.forEach((b, j) => {
        const q = `${p}.content[${j}]`;
        if (!isObj(b)) throw invalid(q, `must be a content block, got ${kind(b)}`);
        if (b.type === "text") text = (text ?? "") + textBlock(b, q);
        else if (b.type === "tool_result") {
          onlyKnown(b, new Set(["type", "tool_use_id", "content", "is_error", "cache_control"]), q, WHAT);
          const id = str(b, "tool_use_id", `${q}.tool_use_id`);
          if (!id) throw invalid(`${q}.tool_use_id`, "is required");
          const isError = bool(b, "is_error", `${q}.is_error`) ?? false;
          const content = toolResultText(b.content, `${q}.content`);
          out.push({ role: "tool", content: isError ? `Error: ${content}` : content, tool_call_id: id });
        } else throw invalid(`${q}.type`, `must be "text" or "tool_result" in a user message (this server takes text only), got ${show(b.type)}`, "unsupported_parameter");
      });
      if (text !== null) out.push({ role: "user", content: text });
      return;
    }
    let content: string | null = null;
    const calls: ToolCall[] = [];
    m.content.forEach((b, j) => {
      const q = `${p}.content[${j}]`;
      if (!isObj(b)) throw invalid(q, `must be a content block, got ${kind(b)}`);
      if (b.type === "text") content = (content ?? "") + textBlock(b, q);
      else if (b.type === "tool_use") {
        onlyKnown(b, new Set(["type", "id", "name", "input", "cache_control"]), q, WHAT);
        const id = str(b, "id", `${q}.id`);
        if (!id) throw invalid(`${q}.id`, "is required");
        const name = toolName(b.name, `${q}.name`);
        if (!isObj(b.input)) throw invalid(`${q}.input`, `must be an object, got ${kind(b.input)}`);
        calls.push({ type: "function", id, function: { name, arguments: JSON.stringify(b.input) } });
      } else if (b.type === "thinking" || b.type === "redacted_thinking") {
        // earlier turns' reasoning is dropped, as DeepSeek's chat template does
      } else throw invalid(`${q}.type`, `must be "text", "tool_use" or "thinking" in an assistant message, got ${show(b.type)}`, "unsupported_parameter");
    });
    const msg: ChatMessage = { role: "assistant", content: calls.length && content === "" ? null : (content ?? (calls.length ? null : "")) };
    if (calls.length) msg.tool_calls = calls;
    out.push(msg);
  });
  return out;
}

function parseTools(o: Obj): { tools: ToolDef[] | null; choice: ToolChoice; parallel: boolean } {
  const list = arr(o, "tools", "tools") ?? [];
  const names = new Set<string>();
  const tools: ToolDef[] = list.map((t, i) => {
    const p = `tools[${i}]`;
    if (!isObj(t)) throw invalid(p, `must be an object, got ${kind(t)}`);
    if (t.type != null && t.type !== "custom") throw invalid(`${p}.type`, `only client tools (type "custom" or none) are supported, got ${show(t.type)}`, "unsupported_parameter");
    onlyKnown(t, new Set(["type", "name", "description", "input_schema", "cache_control"]), p, WHAT);
    const name = toolName(t.name, `${p}.name`);
    if (names.has(name)) throw invalid(`${p}.name`, `duplicate tool name ${show(name)}`);
    names.add(name);
    const description = str(t, "description", `${p}.description`);
    const schema = obj(t, "input_schema", `${p}.input_schema`);
    if (!schema) throw invalid(`${p}.input_schema`, "is required");
    return { type: "function" as const, function: { name, ...(description !== undefined && { description }), parameters: schema } };
  });
  let choice: ToolChoice = tools.length ? "auto" : "none";
  let parallel = true;
  const tc = obj(o, "tool_choice", "tool_choice");
  if (tc) {
    onlyKnown(tc, new Set(["type", "name", "disable_parallel_tool_use"]), "tool_choice", WHAT);
    parallel = !(bool(tc, "disable_parallel_tool_use", "tool_choice.disable_parallel_tool_use") ?? false);
    if (tc.type === "auto") choice = tools.length ? "auto" : "none";
    else if (tc.type === "none") choice = "none";
    else if (tc.type === "any") choice = "required";
    else if (tc.type === "tool") {
      const name = str(tc, "name", "tool_choice.name");
      if (!name || !names.has(name)) throw invalid("tool_choice.name", `names a tool that is not in tools: ${show(tc.name)}`);
      choice = { name };
    } else throw invalid("tool_choice.type", `must be "auto", "any", "tool" or "none", got ${show(tc.type)}`);
    if ((choice === "required" || typeof choice === "object") && !tools.length) throw invalid("tool_choice", `${show(tc.type)} needs tools`);
  }
  return { tools: tools.length ? tools : null, choice, parallel };
}
